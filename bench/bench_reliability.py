#!/usr/bin/env python3
"""Reliability benchmark: what redundancy costs and what it buys, in one run.

Parts (each sample a FRESH subprocess, variants interleaved with the order rotated per
repetition, median of --repeat):

  degraded   healthy load vs the same load with one source directory gone (renamed away for the
             sample), for stores with parity (--parity-configs, default k=4,P=1 and k=6,P=2).
             Target (issue 4): degraded >= 0.6x healthy throughput.
  encode     parity encode speed: (1) asyncload.codecs.encode_into alone on the real block size
             (data bytes in / seconds), and (2) inside a real asyncload.save(parity=P): every
             encode_into call of the writer is timed in-process (data bytes it encoded / seconds
             spent in it), beside the end-to-end save throughput with and without parity.
             Target: parity encode >= 1 GB/s.
  slow       k sources wrapped in asyncload.testing.ThrottledSource at X bytes/s each (through
             asyncload.open(wrap_source=...)): all at X vs one at X/10, stores with parity
             (--slow-configs, default k=4,P=1 / k=6,P=2 / k=8,P=2). Target: <= 1.3x healthy time.
  scaling    k throttled sources at X each, no parity, k = 1, 2, 4, 8: throughput vs 0.85 k X
             (issue 3, acceptance 5).

Loads stream every tensor with zero-copy leases (`model.stream(copy=False)`, each view dropped),
timed from open() to the last tensor, warm page cache (every store read once before its part),
so that the read path, not page faults on fresh output memory, is what is measured.
Raw samples, medians and the configuration go to bench/results/reliability-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import all_files, generate, parse_size, run_cmd, warm_up

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
PARTS = ["degraded", "encode", "slow", "scaling"]
Sample = dict[str, Any]


def _configs(text: str) -> list[tuple[int, int]]:
    """'4:1,6:2' -> [(4, 1), (6, 2)]"""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        k, p = item.split(":")
        out.append((int(k), int(p)))
    return out


# ------------------------------------------------------------ samples (fresh subprocess)
async def _load_sample(spec: dict[str, Any]) -> Sample:
    import asyncload
    from asyncload.sources import Source
    from asyncload.testing import ThrottledSource

    rates: dict[str, float] | None = spec.get("bandwidth")  # source id or "*" -> bytes/s
    wrapped: list[ThrottledSource] = []

    def wrap(s: Source) -> Source:
        assert rates is not None
        rate = rates.get(s.id, rates.get("*"))
        t = ThrottledSource(s, bandwidth=rate, latency=spec.get("latency", 0.0), seed=len(wrapped))
        wrapped.append(t)
        return t

    opts = spec.get("options", {})
    n = tensors = 0
    t0 = time.perf_counter()
    async with asyncload.open(spec["manifest"], wrap_source=wrap if rates else None, **opts) as model:
        t1 = time.perf_counter()
        async with model.stream(copy=False) as stream:
            async for _name, arr in stream:
                n += arr.nbytes
                tensors += 1
                del arr
        t2 = time.perf_counter()
        st = model.statistics()
    seconds, stream_s = t2 - t0, t2 - t1
    return {
        "bytes": n,
        "tensors": tensors,
        "seconds": seconds,
        "gbps": n / seconds / 1e9,
        "open_s": t1 - t0,
        "stream_s": stream_s,
        "stream_gbps": n / stream_s / 1e9,
        "blocks_read": st.blocks_read,
        "degraded_reads": st.degraded_reads,
        "rebuilt_blocks": st.rebuilt_blocks,
        "hedged_reads": st.hedged_reads,
        "read_retries": st.read_retries,
        "read_timeouts": st.read_timeouts,
        "slow_sources": list(st.slow_sources),
        "down_sources": list(st.down_sources),
        "bytes_read_per_source": dict(st.bytes_read_per_source),
        "throttled_s": {t.id: round(t.throttled_s, 3) for t in wrapped},
    }


async def _save_sample(spec: dict[str, Any]) -> Sample:
    import threading

    from safetensors.numpy import load_file

    import asyncload
    import asyncload.codecs as codecs

    tensors = load_file(spec["safetensors"])  # untimed: the arrays are in memory before the clock
    calls: list[tuple[float, int, int]] = []  # seconds, data bytes in, parity bytes out
    lock = threading.Lock()
    real = codecs.encode_into

    def timed_encode(code: Any, data_blocks: Any, parity_out: Any) -> None:
        t = time.perf_counter()
        real(code, data_blocks, parity_out)
        dt = time.perf_counter() - t
        with lock:
            calls.append((dt, sum(len(b) for b in data_blocks), sum(len(b) for b in parity_out)))

    codecs.encode_into = timed_encode  # the writer imports it from asyncload.codecs at call time
    dirs = [Path(spec["dest"]) / f"s{i}" for i in range(spec["k"])]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    nbytes = sum(int(a.nbytes) for a in tensors.values())
    t0 = time.perf_counter()
    saved = await asyncload.save(
        tensors,
        Path(spec["dest"]) / "m.asyncload.json",
        sources=dirs,
        block_size=spec["block_size"],
        budget=spec["budget"],
        parity=spec["parity"],
    )
    seconds = time.perf_counter() - t0
    enc_s = sum(c[0] for c in calls)
    enc_in = sum(c[1] for c in calls)
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "gbps": nbytes / seconds / 1e9,
        "bytes_written": saved.bytes_written,
        "bytes_reused": saved.bytes_reused,
        "encode_calls": len(calls),
        "encode_s": enc_s,
        "encode_bytes_in": enc_in,
        "encode_bytes_out": sum(c[2] for c in calls),
        "encode_gbps": enc_in / enc_s / 1e9 if enc_s else None,
        "encode_share": enc_s / seconds,
    }


def _encode_sample(spec: dict[str, Any]) -> Sample:
    from asyncload.codecs import ErasureCode, encode_into

    k, p, m, stripes = spec["k"], spec["parity"], spec["block_size"], spec["stripes"]
    code = ErasureCode(data=k - p, parity=p)
    rng = np.random.default_rng(0)
    data = [memoryview(rng.integers(0, 256, m, dtype=np.uint8)) for _ in range(k - p)]
    out = [memoryview(np.zeros(m, np.uint8)) for _ in range(p)]
    encode_into(code, data, out)  # first call per geometry: driver, self-check, templates
    t0 = time.perf_counter()
    for _ in range(stripes):
        encode_into(code, data, out)
    seconds = time.perf_counter() - t0
    nbytes = stripes * (k - p) * m
    return {"bytes": nbytes, "seconds": seconds, "gbps": nbytes / seconds / 1e9}


def run_sample(kind: str, spec_json: str) -> Sample:
    import anyio

    spec = json.loads(spec_json)
    if kind == "load":
        return anyio.run(_load_sample, spec)
    if kind == "save":
        return anyio.run(_save_sample, spec)
    if kind == "encode":
        return _encode_sample(spec)
    raise ValueError(kind)


# ------------------------------------------------------------ orchestration
def sample_cmd(kind: str, spec: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--run-sample", kind, json.dumps(spec)]


Variant = tuple[list[str], Callable[[], None] | None, Callable[[], None] | None]  # cmd, before, after


def run_rounds(
    tag: str, variants: dict[str, Variant], repeat: int, timeout: float
) -> dict[str, list[Sample]]:
    """`repeat` rounds over `variants`, each sample a fresh subprocess, order rotated per round."""
    names = list(variants)
    samples: dict[str, list[Sample]] = {v: [] for v in names}
    for rep in range(repeat):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            cmd, before, after = variants[name]
            if before:
                before()
            try:
                obj, err, wall = run_cmd(cmd, timeout)
            finally:
                if after:
                    after()
            samples[name].append((obj or {}) | {"rep": rep, "wall_s": wall, "error": err})
            shown = f"{obj['gbps']:.3f} GB/s {obj['seconds']:.2f}s" if obj else f"FAILED {err[:300]}"
            print(f"  [{tag} rep {rep}] {name:<28} {shown}", flush=True)
    return samples


def median(samples: list[Sample], key: str) -> float | None:
    vals = [float(s[key]) for s in samples if not s["error"] and s.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(samples: list[Sample]) -> Sample:
    ok = [s for s in samples if not s["error"]]
    out: Sample = {"n": len(ok), "of": len(samples)}
    keys = ("gbps", "seconds", "stream_gbps", "stream_s", "open_s", "encode_gbps", "encode_share")
    for key in (*keys, "rebuilt_blocks", "hedged_reads"):
        out[key] = median(samples, key)
    if not ok and samples:
        out["error"] = samples[-1]["error"]
    return out


def source_ids(manifest: Path) -> list[str]:
    return [s["id"] for s in json.loads(manifest.read_bytes())["sources"]]


def source_dir(manifest: Path, sid: str) -> Path:
    loc = next(s["location"] for s in json.loads(manifest.read_bytes())["sources"] if s["id"] == sid)
    p = Path(loc)
    return p if p.is_absolute() else manifest.parent / p


def pack(st: Path, root: Path, k: int, parity: int, block_size: str, timeout: float) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    dirs = [root / f"s{i}" for i in range(k)]
    for d in dirs:
        d.mkdir(parents=True)
    manifest = root / "m.asyncload.json"
    cmd = [sys.executable, "-m", "asyncload", "pack", str(st), "--to", *map(str, dirs), "-o", str(manifest)]
    cmd += ["--block-size", block_size, "--parity", str(parity)]
    _, err, wall = run_cmd(cmd, timeout)
    if err and not err.startswith("no JSON object"):
        raise RuntimeError(f"pack k={k} P={parity} failed: {err}")
    print(f"packed k={k} P={parity} block {block_size}: {wall:.1f}s", flush=True)
    warm_up(all_files([root]))
    return manifest


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


# ------------------------------------------------------------ parts
def part_degraded(args: argparse.Namespace, st: Path, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, p in _configs(args.parity_configs):
        manifest = pack(st, work / f"deg-k{k}p{p}", k, p, args.block_size, args.timeout)
        gone = source_ids(manifest)[1]
        d = source_dir(manifest, gone)
        away = d.with_name(d.name + ".gone")
        spec = {"manifest": str(manifest), "options": {"budget": args.budget}}
        variants: dict[str, Variant] = {
            f"k={k},P={p} healthy": (sample_cmd("load", spec), None, None),
            f"k={k},P={p} {gone} gone": (
                sample_cmd("load", spec),
                lambda d=d, away=away: d.rename(away),
                lambda d=d, away=away: away.rename(d),
            ),
        }
        samples = run_rounds("degraded", variants, args.repeat, args.timeout)
        meds = {v: summarize(s) for v, s in samples.items()}
        h, g = meds[f"k={k},P={p} healthy"], meds[f"k={k},P={p} {gone} gone"]
        r = ratio(g["stream_gbps"], h["stream_gbps"])
        out[f"k={k},P={p}"] = {
            "samples": samples,
            "medians": meds,
            "ratio": r,
            "ratio_with_open": ratio(g["gbps"], h["gbps"]),
            "pass": None if r is None else r >= 0.6,
        }
        shutil.rmtree(manifest.parent, ignore_errors=True)
    return out


def part_encode(args: argparse.Namespace, st: Path, work: Path) -> dict[str, Any]:
    """`st`: the small checkpoint (saves fsync every block: slow on this VM's disk)."""
    out: dict[str, Any] = {}
    m = parse_size(args.block_size)
    variants: dict[str, Variant] = {}
    for k, p in _configs(args.parity_configs):
        spec = {"k": k, "parity": p, "block_size": m, "stripes": max(4, (512 * MiB) // ((k - p) * m))}
        variants[f"encode_into k={k},P={p}"] = (sample_cmd("encode", spec), None, None)
    samples = run_rounds("encode", variants, args.repeat, args.timeout)
    out["encode_into"] = {v: {"samples": s, "medians": summarize(s)} for v, s in samples.items()}

    variants = {}
    for k, p in [(k, q) for k, pp in _configs(args.parity_configs) for q in (0, pp)]:
        dest = work / f"save-k{k}p{p}"
        spec = {
            "safetensors": str(st),
            "dest": str(dest),
            "k": k,
            "parity": p,
            "block_size": m,
            "budget": parse_size(args.budget),
        }
        variants[f"save k={k},P={p}"] = (
            sample_cmd("save", spec),
            lambda dest=dest: shutil.rmtree(dest, ignore_errors=True),
            lambda dest=dest: shutil.rmtree(dest, ignore_errors=True),
        )
    samples = run_rounds("save", variants, args.repeat, args.timeout)
    out["save"] = {v: {"samples": s, "medians": summarize(s)} for v, s in samples.items()}
    return out


def _throttled_spec(manifest: Path, rates: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"budget": args.throttled_budget}
    if args.hedge is not None:
        opts["hedge"] = args.hedge
    if args.reads_per_source is not None:
        opts["reads_per_source"] = args.reads_per_source
    return {"manifest": str(manifest), "bandwidth": rates, "latency": args.latency, "options": opts}


def _tuning(text: str) -> dict[str, Any]:
    """'hedge=3,reads_per_source=2' -> {"hedge": 3.0, "reads_per_source": 2}"""
    out: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, value = item.split("=")
        out[name.strip()] = int(value) if name.strip() == "reads_per_source" else float(value)
    return out


def part_slow(args: argparse.Namespace, st: Path, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    x = args.bandwidth
    tuned = _tuning(args.slow_tuned)
    for k, p in _configs(args.slow_configs):
        manifest = pack(st, work / f"slow-k{k}p{p}", k, p, args.throttled_block_size, args.timeout)
        slow = source_ids(manifest)[0]
        pairs: list[tuple[dict[str, Any], str]] = [({}, f"k={k},P={p}")]
        if tuned:
            pairs.append((tuned, f"k={k},P={p} tuned"))
        variants: dict[str, Variant] = {}
        names: dict[str, tuple[str, str]] = {}
        for extra, label in pairs:
            healthy = _throttled_spec(manifest, {"*": x}, args)
            one_slow = _throttled_spec(manifest, {"*": x, slow: x / 10}, args)
            healthy["options"] |= extra
            one_slow["options"] |= extra
            hv, sv = f"{label} all at X", f"{label} {slow} at X/10"
            variants[hv] = (sample_cmd("load", healthy), None, None)
            variants[sv] = (sample_cmd("load", one_slow), None, None)
            names[label] = (hv, sv)
        samples = run_rounds("slow", variants, args.repeat, args.timeout)
        meds = {v: summarize(s) for v, s in samples.items()}
        for label, (hv, sv) in names.items():
            r = ratio(meds[sv]["stream_s"], meds[hv]["stream_s"])
            out[label] = {
                "options": tuned if label.endswith("tuned") else {},
                "samples": {hv: samples[hv], sv: samples[sv]},
                "medians": {hv: meds[hv], sv: meds[sv]},
                "time_ratio": r,
                "time_ratio_with_open": ratio(meds[sv]["seconds"], meds[hv]["seconds"]),
                "ideal_ratio": k / (k - 1 + 0.1),  # the other k-1 sources at X plus the slow one at X/10
                "pass": None if r is None else r <= 1.3,
            }
        shutil.rmtree(manifest.parent, ignore_errors=True)
    return out


def part_scaling(args: argparse.Namespace, st: Path, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    x = args.bandwidth
    for k in (1, 2, 4, 8):
        manifest = pack(st, work / f"scale-k{k}", k, 0, args.throttled_block_size, args.timeout)
        variants: dict[str, Variant] = {
            f"k={k}": (sample_cmd("load", _throttled_spec(manifest, {"*": x}, args)), None, None)
        }
        samples = run_rounds("scaling", variants, args.repeat, args.timeout)
        med = summarize(samples[f"k={k}"])
        target = 0.85 * k * x / 1e9
        out[f"k={k}"] = {
            "samples": samples[f"k={k}"],
            "medians": med,
            "limit_gbps": k * x / 1e9,
            "target_gbps": target,
            "fraction_of_kX": None if med["stream_gbps"] is None else med["stream_gbps"] / (k * x / 1e9),
            "fraction_with_open": None if med["gbps"] is None else med["gbps"] / (k * x / 1e9),
            "pass": None if med["stream_gbps"] is None else med["stream_gbps"] >= target,
        }
        shutil.rmtree(manifest.parent, ignore_errors=True)
    return out


# ------------------------------------------------------------ report
def print_report(result: dict[str, Any]) -> None:
    cfg = result["config"]
    print(f"\ncommand: {result['command']}")
    ck, sck = result["checkpoint"], result.get("small_checkpoint", {})
    print(
        f"checkpoint {ck['file_bytes'] / MiB:.0f} MiB (degraded), {sck.get('file_bytes', 0) / MiB:.0f} MiB "
        f"(save, slow, scaling); blocks {cfg['block_size']} / throttled {cfg['throttled_block_size']}; "
        f"budget {cfg['budget']} / throttled {cfg['throttled_budget']}; X = {cfg['bandwidth'] / 1e6:g} MB/s "
        f"per source, latency {cfg['latency'] * 1e3:g} ms per read; hedge {cfg['hedge'] or 'default'}; "
        f"median of {cfg['repeat']}, fresh process per sample, warm page cache"
    )
    print("GB/s and s: streaming phase (after open); 'w/ open': from open() on")
    parts = result["parts"]
    if "degraded" in parts:
        print("\n(a) degraded read, one source directory gone (target >= 0.60x healthy)")
        print(
            f"{'store':<10}{'healthy GB/s':>14}{'degraded GB/s':>15}{'ratio':>7}{'w/ open':>9}{'rebuilt':>9}"
        )
        for name, r in parts["degraded"].items():
            h, g = list(r["medians"].values())
            print(
                f"{name:<10}{fmt(h['stream_gbps']):>14}{fmt(g['stream_gbps']):>15}{fmt(r['ratio'], '.2f'):>7}"
                f"{fmt(r['ratio_with_open'], '.2f'):>9}{fmt(g['rebuilt_blocks'], '.0f'):>9}"
                f"  {verdict(r['pass'])}"
            )
    if "encode" in parts:
        e = parts["encode"]
        print("\n(b) parity encode (target >= 1 GB/s of data encoded)")
        for name, r in e["encode_into"].items():
            print(f"{name:<22}{fmt(r['medians']['gbps']):>8} GB/s  (alone: one thread, in-process)")
        print(f"{'save (fsync)':<22}{'GB/s':>8}{'seconds':>9}{'encode GB/s':>13}{'encode share':>14}")
        for name, r in e["save"].items():
            m = r["medians"]
            ok = None if m["encode_gbps"] is None else m["encode_gbps"] >= 1.0
            print(
                f"{name:<22}{fmt(m['gbps']):>8}{fmt(m['seconds'], '.2f'):>9}{fmt(m['encode_gbps']):>13}"
                f"{fmt(m['encode_share'], '.3f'):>14}  {verdict(ok) if ok is not None else ''}"
            )
    if "slow" in parts:
        print("\n(c) one source at X/10 vs all at X, parity (target <= 1.30x healthy time)")
        print(f"tuned: open({cfg['slow_tuned']}) for both variants of the pair")
        head = f"{'store':<16}{'healthy s':>11}{'one slow s':>12}{'ratio':>7}{'w/ open':>9}{'ideal':>7}"
        print(head + f"{'hedged':>8}{'rebuilt':>9}")
        for name, r in parts["slow"].items():
            h, s = list(r["medians"].values())
            print(
                f"{name:<16}{fmt(h['stream_s'], '.2f'):>11}{fmt(s['stream_s'], '.2f'):>12}"
                f"{fmt(r['time_ratio'], '.2f'):>7}{fmt(r['time_ratio_with_open'], '.2f'):>9}"
                f"{fmt(r['ideal_ratio'], '.2f'):>7}{fmt(s['hedged_reads'], '.0f'):>8}"
                f"{fmt(s['rebuilt_blocks'], '.0f'):>9}  {verdict(r['pass'])}"
            )
    if "scaling" in parts:
        print("\n(d) k throttled sources at X each, no parity (target >= 0.85 k X)")
        print(f"{'k':<6}{'k X GB/s':>10}{'GB/s':>8}{'x kX':>7}{'w/ open':>9}")
        for name, r in parts["scaling"].items():
            print(
                f"{name:<6}{fmt(r['limit_gbps']):>10}{fmt(r['medians']['stream_gbps']):>8}"
                f"{fmt(r['fraction_of_kX'], '.2f'):>7}{fmt(r['fraction_with_open'], '.2f'):>9}"
                f"  {verdict(r['pass'])}"
            )


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add, dflt = ap.add_argument, " (default %(default)s)"
    add("--size", type=parse_size, default="512MiB", help="checkpoint for degraded/encode" + dflt)
    add("--small-size", type=parse_size, default="256MiB", help="checkpoint for save/slow/scaling" + dflt)
    add("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    add("--parity-configs", default="4:1,6:2", help="k:P stores for degraded and encode" + dflt)
    add("--slow-configs", default="4:1,6:2,8:2", help="k:P stores for the slow-source part" + dflt)
    add("--block-size", default="16MiB", help="block size, degraded and encode parts" + dflt)
    add("--throttled-block-size", default="2MiB", help="block size, slow and scaling parts" + dflt)
    add("--budget", default="256MiB", help="budget, degraded loads and saves" + dflt)
    add("--throttled-budget", default="128MiB", help="budget, throttled loads (< the checkpoint)" + dflt)
    add("--bandwidth", type=parse_size, default="50MB", help="X: bytes/s per throttled source" + dflt)
    add("--latency", type=float, default=0.002, help="seconds added per throttled read" + dflt)
    add("--hedge", type=float, help="open(hedge=...) for throttled loads (default: the library's)")
    add("--reads-per-source", type=int, help="open(reads_per_source=...) for throttled loads")
    add(
        "--slow-tuned",
        default="reads_per_source=2",
        help="extra open() options for a second pair of slow-part variants ('' for none)" + dflt,
    )
    add("--repeat", type=int, default=3, help="samples per variant (median)" + dflt)
    add("--timeout", type=float, default=300, help="seconds allowed per subprocess" + dflt)
    add("--workdir", type=Path, help="use and keep this dir (default: temp dir under /tmp)")
    add("--out", type=Path, help="raw JSON (default bench/results/reliability-<timestamp>.json)")
    add("--run-sample", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_sample:
        print(json.dumps(run_sample(*args.run_sample)))
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if bad := sorted(set(parts) - set(PARTS)):
        ap.error(f"unknown parts {bad}; choose from {', '.join(PARTS)}")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="asyncload-rel-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "bench" / "results" / f"reliability-{stamp}.json"
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "run_sample"}
    result: dict[str, Any] = {
        "created": stamp,
        "command": " ".join(["python", "bench/bench_reliability.py", *sys.argv[1:]]),
        "config": config | {"parts": parts, "workdir": str(work)},
        "env": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
        "parts": {},
    }
    t_start = time.perf_counter()
    try:
        st = work / "model.safetensors"
        result["checkpoint"] = generate(st, args.size, False)
        tst = work / "small.safetensors"
        if {"encode", "slow", "scaling"} & set(parts):
            result["small_checkpoint"] = generate(tst, args.small_size, False)
        runners = {
            "degraded": part_degraded,
            "encode": part_encode,
            "slow": part_slow,
            "scaling": part_scaling,
        }
        for part in parts:
            t0 = time.perf_counter()
            print(f"\n== {part}", flush=True)
            src = st if part == "degraded" else tst
            result["parts"][part] = runners[part](args, src, work)
            print(f"== {part}: {time.perf_counter() - t0:.0f}s", flush=True)
        result["total_s"] = time.perf_counter() - t_start
        print_report(result)
        print(f"\ntotal {result['total_s']:.0f}s")
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"raw results: {out}")
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
