#!/usr/bin/env python3
"""Load benchmark: asyncload against its peers on one synthetic LLaMA-like checkpoint.

One run generates a safetensors checkpoint (--size), packs it with `asyncload pack` over
--sources directories, then loads the whole checkpoint with each method:

  pread-reused        os.preadv into ONE reused, pre-touched 64 MiB buffer: the physical
                      limit (page-cache copy speed, no fresh memory to fault in)
  pread-fresh-4t      4 threads preadv 16 MiB chunks into one fresh np.empty of the file size
  safetensors.numpy   safetensors.numpy.load_file(path)
  asyncload-manifest  python -m asyncload load MANIFEST --budget B --json
  asyncload-direct    python -m asyncload load FILE.safetensors --budget B --json

Why: the ratios to the two baselines say how close asyncload gets to the hardware and whether
it beats the obvious library; peak RSS growth checks the bounded-memory promise.

How: every sample runs in a FRESH subprocess, methods are interleaved (order rotated per
repetition) and medians over --repeat are reported. Warm phase: one untimed read of every file
first; --cold adds a phase that evicts every file (POSIX_FADV_DONTNEED) before each sample.
Baseline runners time only the read, after imports; RSS growth is VmHWM after the work minus
VmRSS before it (HWM reset via /proc/self/clear_refs when permitted). pread-reused allocates
its buffer before the clock but counts it in RSS growth. A method that fails (asyncload not
ready, say) is reported as "failed" and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
METHODS = ["pread-reused", "pread-fresh-4t", "safetensors.numpy"]
METHODS += ["asyncload-manifest", "asyncload-direct"]
REUSED_BUF, FRESH_CHUNK, FRESH_THREADS = 64 * MiB, 16 * MiB, 4
Sample = dict[str, Any]
Read = tuple[float, int, int, object]  # seconds, bytes, tensors, result kept alive


def parse_size(text: str | int) -> int:
    """Bytes from an int or a string such as 512MiB, 4GiB, 1.5GB, 1048576."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?)b?|b?)\s*", str(text), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (try 512MiB, 4GiB, 1000000)")
    power = "kmgt".index(m[2].lower()) + 1 if m[2] else 0
    return int(float(m[1]) * (1024 if m[3] else 1000) ** power)


# ------------------------------------------------------------ sample runner (fresh subprocess)
def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from file `offset` (short only at EOF); return the bytes read."""
    done = 0
    while done < len(view) and (n := os.preadv(fd, [view[done:]], offset + done)) > 0:
        done += n
    return done


def _read_reused(path: str) -> Read:
    fd = os.open(path, os.O_RDONLY)
    buf = np.empty(REUSED_BUF, np.uint8)
    buf.fill(1)  # pre-touched: no page faults inside the timing
    t0, off = time.perf_counter(), 0
    while (n := _pread_into(fd, buf.data, off)) > 0:
        off += n
    seconds = time.perf_counter() - t0
    os.close(fd)
    return seconds, off, 0, buf


def _read_fresh(path: str) -> Read:
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    t0 = time.perf_counter()
    out = np.empty(size, np.uint8)
    view, starts = out.data, range(0, size, FRESH_CHUNK)

    def stripe(i: int) -> int:
        return sum(_pread_into(fd, view[s : s + FRESH_CHUNK], s) for s in starts[i::FRESH_THREADS])

    with ThreadPoolExecutor(FRESH_THREADS) as pool:
        nbytes = sum(pool.map(stripe, range(FRESH_THREADS)))
    seconds = time.perf_counter() - t0
    os.close(fd)
    return seconds, nbytes, 0, out


def _read_safetensors(path: str) -> Read:
    from safetensors.numpy import load_file

    t0 = time.perf_counter()
    tensors = load_file(path)
    seconds = time.perf_counter() - t0
    return seconds, sum(int(a.nbytes) for a in tensors.values()), len(tensors), tensors


READERS: dict[str, Callable[[str], Read]] = {
    "pread-reused": _read_reused,
    "pread-fresh-4t": _read_fresh,
    "safetensors.numpy": _read_safetensors,
}


def run_sample(method: str, path: str) -> Sample:
    """One baseline sample, in the JSON shape of `asyncload load --json` (lag_ms: null)."""
    if method == "safetensors.numpy":  # import before the RSS baseline
        import safetensors.numpy  # noqa: F401

        with contextlib.suppress(ImportError):
            import ml_dtypes  # noqa: F401  (teaches numpy bf16, for --bf16 checkpoints)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    rss0 = _proc_status("VmRSS")
    seconds, nbytes, tensors, _alive = READERS[method](path)
    growth = _proc_status("VmHWM") - rss0
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "gbps": nbytes / seconds / 1e9,
        "peak_rss_growth": growth,
        "lag_ms": None,
        "tensors": tensors,
    }


# ------------------------------------------------------------ checkpoint generation
def llama_layout(target: int, bf16: bool) -> list[tuple[str, tuple[int, ...], str]]:
    """LLaMA-style (name, shape, dtype) list totalling about `target` bytes; vocab fills."""
    for hidden in (8192, 4096, 2048, 1024, 512, 256):  # widest that fits >= 4 layers
        inter = -(-(8 * hidden // 3) // 256) * 256
        layer = (4 * hidden * hidden + 3 * hidden * inter) * 2 + 2 * hidden * 4
        if target >= 4 * layer + 2 * 32000 * hidden * 2:
            break
    n_layers = max(1, (target - 2 * 32000 * hidden * 2 - hidden * 4) // layer)
    vocab = max(256, (target - n_layers * layer - hidden * 4) // (4 * hidden) // 64 * 64)
    mlp = "bfloat16" if bf16 else "float16"
    out: list[tuple[str, tuple[int, ...], str]] = [
        ("model.embed_tokens.weight", (vocab, hidden), "float16")
    ]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", (hidden,), "float32"))
        out += [(p + f"self_attn.{x}_proj.weight", (hidden, hidden), "float16") for x in "qkvo"]
        out.append((p + "post_attention_layernorm.weight", (hidden,), "float32"))
        out += [(p + f"mlp.{x}_proj.weight", (inter, hidden), mlp) for x in ("gate", "up")]
        out.append((p + "mlp.down_proj.weight", (hidden, inter), mlp))
    out.append(("model.norm.weight", (hidden,), "float32"))
    out.append(("lm_head.weight", (vocab, hidden), "float16"))
    return out


def generate(path: Path, target: int, bf16: bool) -> dict[str, Any]:
    from safetensors.numpy import save_file

    dtypes: dict[str, Any] = {"float16": np.float16}
    if bf16:
        import ml_dtypes  # only needed to *write* bf16 through safetensors.numpy

        dtypes["bfloat16"] = ml_dtypes.bfloat16
    bitgen = np.random.default_rng(0).bit_generator
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for name, shape, dt in llama_layout(target, bf16):
        count = int(np.prod(shape))
        if dt == "float32":  # norms
            tensors[name] = np.ones(shape, np.float32)
            continue
        bits = bitgen.random_raw(-(-count // 4)).view(np.uint16)[:count]  # ~2 GB/s
        bits &= 0xBFFF  # clear the top exponent bit: finite values, |x| < 2
        tensors[name] = bits.view(dtypes[dt]).reshape(shape)
    save_file(tensors, str(path))
    big = max(tensors, key=lambda k: tensors[k].nbytes)
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size,
        "tensors": len(tensors),
        "tensor_bytes": sum(int(a.nbytes) for a in tensors.values()),
        "largest_tensor": big,
        "largest_bytes": int(tensors[big].nbytes),
        "dtypes": sorted({str(a.dtype) for a in tensors.values()}),
    }


# ------------------------------------------------------------ orchestration
def all_files(roots: list[Path]) -> list[Path]:
    return [f for r in roots for f in ([r] if r.is_file() else sorted(r.rglob("*"))) if f.is_file()]


def warm_up(files: list[Path]) -> None:
    buf = bytearray(16 * MiB)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def evict(files: list[Path]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())  # dirty pages cannot be dropped
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def run_cmd(cmd: list[str], timeout: float) -> tuple[Sample | None, str, float]:
    """Run `cmd` with the in-tree package importable; (JSON object or None, error, wall s)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f}s", time.perf_counter() - t0
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-6:])
        return None, f"exit {p.returncode}: {tail}", wall
    for text in (p.stdout, *reversed(p.stdout.splitlines())):  # whole stdout, else last line
        with contextlib.suppress(ValueError):
            obj = json.loads(text)
            if isinstance(obj, dict) and "gbps" in obj:
                return obj, "", wall
    return None, f"no JSON object with 'gbps' on stdout: {p.stdout[-300:]!r}", wall


def sample_cmd(method: str, st: Path, manifest: Path, budget: str) -> list[str]:
    if method.startswith("asyncload-"):
        src = manifest if method == "asyncload-manifest" else st
        return [sys.executable, "-m", "asyncload", "load", str(src), "--budget", budget, "--json"]
    return [sys.executable, str(Path(__file__).resolve()), "--run-sample", method, str(st)]


def summarize(samples: list[Sample]) -> Sample:
    ok = [s for s in samples if not s["error"]]
    if not ok:
        return {"status": "failed", "n": 0, "error": samples[-1]["error"] if samples else ""}

    def med(key: str, sub: str | None = None) -> float | None:
        vals = [s.get(key) if sub is None else (s.get(key) or {}).get(sub) for s in ok]
        nums = [float(v) for v in vals if v is not None]
        return statistics.median(nums) if nums else None

    status = "ok" if len(ok) == len(samples) else "partial"
    return {
        "status": status,
        "n": len(ok),
        "gbps": med("gbps"),
        "seconds": med("seconds"),
        "bytes": med("bytes"),
        "peak_rss_growth": med("peak_rss_growth"),
        "lag_p99_ms": med("lag_ms", "p99"),
        "lag_max_ms": med("lag_ms", "max"),
    }


def print_table(title: str, medians: dict[str, Sample]) -> None:
    def cell(v: float | None, scale: float = 1.0, spec: str = ".2f") -> str:
        return "-" if v is None else format(v / scale, spec)

    ref_st = medians.get("safetensors.numpy", {}).get("gbps")
    ref_raw = medians.get("pread-reused", {}).get("gbps")
    head = ("GB/s", "x st.np", "x pread", "RSS+MiB", "lag p99", "lag max", "n")
    print(f"\n{title}\n{'method':<20}" + "".join(f"{h:>9}" for h in head))
    for method, m in medians.items():
        if m["status"] == "failed":
            print(f"{method:<20}{'failed':>9}  {m['error'].splitlines()[0][:70]}")
            continue
        g = m["gbps"]
        row = (
            cell(g),
            cell(g, ref_st) if ref_st else "-",
            cell(g, ref_raw) if ref_raw else "-",
            cell(m["peak_rss_growth"], MiB, ".0f"),
            cell(m["lag_p99_ms"], spec=".1f"),
            cell(m["lag_max_ms"], spec=".1f"),
            str(m["n"]),
        )
        print(f"{method:<20}" + "".join(f"{c:>9}" for c in row))


def run_phase(
    phase: str, args: argparse.Namespace, methods: list[str], paths: dict[str, Any], pack_err: str
) -> dict[str, Any]:
    """All repetitions of one phase ("warm" or "cold"), methods round-robin."""
    if phase == "warm":
        warm_up(paths["files"])
    samples: dict[str, list[Sample]] = {m: [] for m in methods}
    for rep in range(args.repeat):
        k = rep % len(methods)
        for method in methods[k:] + methods[:k]:
            obj: Sample | None = None
            err, wall = (f"pack failed: {pack_err}", 0.0) if pack_err else ("", 0.0)
            if not (pack_err and method == "asyncload-manifest"):
                if phase == "cold":
                    evict(paths["files"])
                cmd = sample_cmd(method, paths["st"], paths["manifest"], args.budget)
                obj, err, wall = run_cmd(cmd, args.timeout)
            if err and not any(s["error"] for s in samples[method]):  # print each failure once
                print(f"[{phase}] {method} failed: {err}")
            samples[method].append((obj or {}) | {"rep": rep, "wall_s": wall, "error": err})
            shown = f"{obj['gbps']:.2f} GB/s" if obj else "failed"
            print(f"  [{phase} rep {rep}] {method:<20} {shown}", flush=True)
    medians = {m: summarize(s) for m, s in samples.items()}
    size_gb = paths["ck"]["file_bytes"] / 1e9
    title = f"{phase} page cache, median of {args.repeat} ({size_gb:.2f} GB, budget {args.budget})"
    print_table(title, medians)
    for m, med in medians.items():
        if med.get("bytes") not in (None, paths["ck"]["tensor_bytes"], paths["ck"]["file_bytes"]):
            print(f"note: {m} read {med['bytes']:.0f} bytes, not the tensor or file size")
    return {"samples": samples, "medians": medians}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add, dflt = ap.add_argument, " (default %(default)s)"
    add("--size", type=parse_size, default="1GiB", help="bytes, or 512MiB, 4GiB, 1.5GB" + dflt)
    add("--workdir", type=Path, help="use and keep this dir (default: temp dir under /tmp)")
    add("--keep", action="store_true", help="keep the default temp workdir")
    add("--sources", type=int, default=4, help="source directories to pack over" + dflt)
    add("--block-size", default="16MiB", help="asyncload pack --block-size" + dflt)
    add("--budget", default="256MiB", help="asyncload load --budget" + dflt)
    add("--repeat", type=int, default=3, help="samples per method and phase (median)" + dflt)
    add("--methods", default=",".join(METHODS), help="comma-separated subset" + dflt)
    add("--cold", action="store_true", help="add a phase evicting page cache before each sample")
    add("--bf16", action="store_true", help="store MLP weights as bf16 (needs ml_dtypes)")
    add("--timeout", type=float, default=600, help="seconds allowed per subprocess" + dflt)
    add("--out", type=Path, help="raw JSON (default bench/results/load-<timestamp>.json)")
    add("--run-sample", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_sample:  # internal: we are the fresh subprocess of one baseline sample
        print(json.dumps(run_sample(*args.run_sample)))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if bad := sorted(set(methods) - set(METHODS)):
        ap.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="asyncload-bench-", dir="/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    st, manifest = workdir / "model.safetensors", workdir / "model.asyncload.json"
    sources = [workdir / f"src{i}" for i in range(args.sources)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or REPO / "bench" / "results" / f"load-{stamp}.json"
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    config |= {"methods": methods, "workdir": str(workdir)}
    del config["run_sample"]
    result: dict[str, Any] = {
        "created": stamp,
        "config": config,
        "env": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
        },
    }
    try:
        import safetensors

        result["env"]["safetensors"] = safetensors.__version__
        t0 = time.perf_counter()
        ck = generate(st, args.size, args.bf16) | {"generate_s": time.perf_counter() - t0}
        result["checkpoint"] = ck
        print(
            f"checkpoint: {ck['tensors']} tensors, {ck['file_bytes']} bytes "
            f"({ck['file_bytes'] / MiB:.1f} MiB), largest {ck['largest_tensor']} "
            f"{ck['largest_bytes'] / MiB:.1f} MiB, {'+'.join(ck['dtypes'])}, "
            f"generated in {ck['generate_s']:.1f}s"
        )

        for d in sources:
            d.mkdir(exist_ok=True)
        pack_cmd = [sys.executable, "-m", "asyncload", "pack", str(st), "--to", *map(str, sources)]
        pack_cmd += ["-o", str(manifest), "--block-size", args.block_size]
        _, pack_err, pack_s = run_cmd(pack_cmd, args.timeout)
        if pack_err.startswith("no JSON object"):  # pack need not print JSON
            pack_err = ""
        result["pack"] = {"seconds": pack_s, "ok": not pack_err, "error": pack_err}
        gbps = ck["file_bytes"] / pack_s / 1e9
        print(
            f"pack: FAILED ({pack_err})"
            if pack_err
            else f"pack: {pack_s:.2f}s wall ({gbps:.2f} GB/s)"
        )

        files = all_files([st, manifest, *sources])
        paths = {"st": st, "manifest": manifest, "files": files, "ck": ck}
        phases = ["warm", "cold"] if args.cold else ["warm"]
        result["phases"] = {ph: run_phase(ph, args, methods, paths, pack_err) for ph in phases}
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nraw results: {out}")
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept workdir: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
