#!/usr/bin/env python3
"""Load benchmark: asyncload against its peers on one synthetic LLaMA-like checkpoint.

One run generates a safetensors checkpoint (--size), packs it with `asyncload pack` over
--sources directories, then loads the whole checkpoint with each method:

  pread-reused        os.preadv into ONE reused, pre-touched 64 MiB buffer: the physical
                      limit (page-cache copy speed, no fresh memory to fault in)
  pread-fresh-4t      4 threads preadv 16 MiB chunks into one fresh np.empty of the file size
  safetensors.numpy   safetensors.numpy.load_file(path)
  safetensors.torch   safetensors.torch.load_file(path), one byte of every 4 KiB page read  [peers]
  runai-clone         Run:ai SafetensorsStreamer, owned=False, each tensor .clone()d and kept [peers]
  runai-noclone       same, each tensor dropped                                              [peers]
  tensorizer          TensorDeserializer(FILE.tensors, device="cpu"); FILE.tensors written
                      once per run by TensorSerializer, not timed                           [peers]
  asyncload-manifest  python -m asyncload load MANIFEST --budget B --json   (--mode load)
  asyncload-direct    python -m asyncload load FILE.safetensors --budget B --json
  asyncload-stream    python -m asyncload load MANIFEST --mode stream ...  (owned arrays, dropped)
  asyncload-lease     python -m asyncload load MANIFEST --mode lease ...   (zero-copy views)

--save adds a save phase (the tensors loaded untimed first, in each fresh process):
  save-safetensors        safetensors.numpy.save_file(tensors, FILE)  (page cache, no fsync)
  save-safetensors+fsync  the same, then fsync of the file and its directory
  save-asyncload          asyncload.save(tensors, ...) over --sources dirs, --block-size blocks:
                          sha256-keyed blocks, each fsynced before the manifest commit

[peers] methods live in bench/_peers.py and need torch plus the `peers` extra; without them
they report "unavailable: <reason>" and the run goes on. --plots adds two warm sweeps of
asyncload-stream (budget 64/128/256/512 MiB; 1/2/4/8 sources, each packed for the sweep) and,
when matplotlib is installed, writes PNGs of throughput against each next to the JSON.

Why: the ratios to the two baselines say how close asyncload gets to the hardware and whether
it beats the obvious library; peak RSS growth checks the bounded-memory promise.

How: every sample runs in a FRESH subprocess, methods are interleaved (order rotated per
repetition) and medians over --repeat are reported. Warm phase: an untimed read of every file
before each sample; --cold adds a phase that evicts every file (POSIX_FADV_DONTNEED) before each sample.
Baseline runners time only the read, after imports; RSS growth is VmHWM after the work minus
VmRSS before it (HWM reset via /proc/self/clear_refs when permitted). pread-reused allocates
its buffer before the clock but counts it in RSS growth. A method that fails (asyncload not
ready, say) is reported as "failed" and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peers  # beside this script: the torch-based peers (torch is imported lazily inside)

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
METHODS = ["pread-reused", "pread-fresh-4t", "safetensors.numpy", *_peers.READERS]
METHODS += ["asyncload-manifest", "asyncload-direct", "asyncload-stream", "asyncload-lease"]
ASYNCLOAD_MODE = {"asyncload-stream": "stream", "asyncload-lease": "lease"}  # others: load
SWEEP_BUDGETS = [64, 128, 256, 512]  # MiB, --plots
SWEEP_SOURCES = [1, 2, 4, 8]  # --plots
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
    **_peers.READERS,
}


# --save: each sample loads the checkpoint untimed, then times writing it out again. Where
# to comes from the environment the parent sets (SAVE_ENV), so --run-sample keeps two args.
SAVE_ENV = "ASYNCLOAD_BENCH_SAVE"  # JSON: {"dir": ..., "sources": k, "block_size": ..., "budget": ...}
SAVE_METHODS = ["save-safetensors", "save-safetensors+fsync", "save-asyncload"]


_RSS_BASE: list[int] = [0]  # set by a save sample after its untimed input load


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(method: str, path: str) -> Read:
    from safetensors.numpy import load_file, save_file

    cfg = json.loads(os.environ[SAVE_ENV])
    out = Path(cfg["dir"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tensors = load_file(path)  # untimed: the input in memory, as a trainer holds it
    nbytes = sum(int(a.nbytes) for a in tensors.values())
    # RSS growth counts from here: what the save adds to the input it is given.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    _RSS_BASE[0] = _proc_status("VmRSS")
    try:
        t0 = time.perf_counter()
        if method.startswith("save-safetensors"):
            save_file(tensors, str(out / "model.safetensors"))
            if method.endswith("+fsync"):  # the durability asyncload's save gives
                _fsync_path(out / "model.safetensors")
                _fsync_path(out)
        else:
            import anyio

            import asyncload  # importable: run_cmd puts the repository on PYTHONPATH

            dirs = [out / f"d{i}" for i in range(cfg["sources"])]
            anyio.run(
                lambda: asyncload.save(
                    tensors,
                    out / "model.asyncload.json",
                    sources=dirs,
                    block_size=cfg["block_size"],  # "16MiB": save parses sizes itself
                    budget=cfg["budget"],
                ),
                backend_options={"use_uvloop": True},
            )
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return seconds, nbytes, len(tensors), None


for _m in SAVE_METHODS:
    READERS[_m] = lambda path, _m=_m: _save(_m, path)


def run_sample(method: str, path: str) -> Sample:
    """One baseline or peer sample, in the JSON shape of `asyncload load --json` (lag_ms: null);
    {"unavailable": reason} when a peer's package is missing."""
    if method == "safetensors.numpy" or method.startswith("save-"):  # import before the RSS baseline
        import safetensors.numpy  # noqa: F401

        with contextlib.suppress(ImportError):
            import ml_dtypes  # noqa: F401  (teaches numpy bf16, for --bf16 checkpoints)
    try:
        _peers.import_all(method)  # peers: torch and the library, before the baseline
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        rss0 = _proc_status("VmRSS")
        seconds, nbytes, tensors, _alive = READERS[method](path)
    except _peers.Unavailable as e:
        return {"unavailable": str(e)}
    growth = _proc_status("VmHWM") - (_RSS_BASE[0] or rss0)
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
    out: list[tuple[str, tuple[int, ...], str]] = [("model.embed_tokens.weight", (vocab, hidden), "float16")]
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
            if isinstance(obj, dict) and "unavailable" in obj:
                return None, f"unavailable: {obj['unavailable']}", wall
            if isinstance(obj, dict) and "gbps" in obj:
                return obj, "", wall
    return None, f"no JSON object with 'gbps' on stdout: {p.stdout[-300:]!r}", wall


def sample_cmd(method: str, st: Path, manifest: Path, budget: str) -> list[str]:
    if method.startswith("asyncload-"):
        src = st if method == "asyncload-direct" else manifest
        mode = ASYNCLOAD_MODE.get(method, "load")
        cmd = [sys.executable, "-m", "asyncload", "load", str(src), "--budget", budget]
        return [*cmd, "--mode", mode, "--json"]
    return [sys.executable, str(Path(__file__).resolve()), "--run-sample", method, str(st)]


def summarize(samples: list[Sample]) -> Sample:
    ok = [s for s in samples if not s["error"]]
    if not ok:
        err = samples[-1]["error"] if samples else ""
        status = "unavailable" if err.startswith("unavailable:") else "failed"
        return {"status": status, "n": 0, "error": err}

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
        "lag_max_unstolen_ms": med("lag_ms", "max_unstolen"),
        "steal_ms": med("lag_ms", "steal"),
    }


def print_table(title: str, medians: dict[str, Sample]) -> None:
    def cell(v: float | None, scale: float = 1.0, spec: str = ".2f") -> str:
        return "-" if v is None else format(v / scale, spec)

    ref_st = medians.get("safetensors.numpy", {}).get("gbps")
    ref_raw = medians.get("pread-reused", {}).get("gbps")
    head = ("GB/s", "x st.np", "x pread", "RSS+MiB", "lag p99", "lag max", "max*", "steal", "n")
    print(f"\n{title}\n{'method':<20}" + "".join(f"{h:>9}" for h in head))
    for method, m in medians.items():
        if m["status"] == "unavailable":
            print(f"{method:<20} {m['error'].splitlines()[0][:100]}")
            continue
        if m["status"] == "failed":
            print(f"{method:<20}{'failed':>9}  {(m['error'].splitlines() or [''])[0][:70]}")
            continue
        g = m["gbps"]
        row = (
            cell(g),
            cell(g, ref_st) if ref_st else "-",
            cell(g, ref_raw) if ref_raw else "-",
            cell(m["peak_rss_growth"], MiB, ".0f"),
            cell(m["lag_p99_ms"], spec=".1f"),
            cell(m["lag_max_ms"], spec=".1f"),
            cell(m.get("lag_max_unstolen_ms"), spec=".1f"),
            cell(m.get("steal_ms"), spec=".0f"),
            str(m["n"]),
        )
        print(f"{method:<20}" + "".join(f"{c:>9}" for c in row))


UNAVAILABLE: dict[str, str] = {}  # method -> "unavailable: reason", found once, not retried


def run_rounds(
    tag: str,
    cmds: dict[str, list[str] | str],
    repeat: int,
    timeout: float,
    cold: list[Path] | None = None,
    warm: list[Path] | None = None,
) -> dict[str, list[Sample]]:
    """`repeat` rounds over `cmds`, each sample a fresh subprocess, order rotated per round.

    A str instead of a command is an error recorded for every sample without running anything
    (pack failed, say). `cold`: files evicted from the page cache before each sample; `warm`:
    files read (untimed) before each sample, so that what an earlier sample's memory pushed
    out of the page cache is back (safetensors.numpy's 8 GiB did, for part of the store)."""
    names = list(cmds)
    samples: dict[str, list[Sample]] = {m: [] for m in names}
    for rep in range(repeat):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            cmd, obj, wall, known = cmds[name], None, 0.0, name in UNAVAILABLE
            if isinstance(cmd, str):
                err = cmd
            elif known:
                err = UNAVAILABLE[name]
            else:
                if cold is not None:
                    evict(cold)
                if warm is not None:
                    warm_up(warm)
                obj, err, wall = run_cmd(cmd, timeout)
                if err.startswith("unavailable:"):
                    UNAVAILABLE[name] = err
            if err and not known and not any(s["error"] for s in samples[name]):  # each failure once
                print(f"[{tag}] {name} {'' if err.startswith('unavailable:') else 'failed: '}{err}")
            samples[name].append((obj or {}) | {"rep": rep, "wall_s": wall, "error": err})
            shown = f"{obj['gbps']:.2f} GB/s" if obj else err.split(":")[0] if err else "failed"
            print(f"  [{tag} rep {rep}] {name:<20} {shown}", flush=True)
    return samples


def run_phase(
    phase: str, args: argparse.Namespace, methods: list[str], paths: dict[str, Any], errors: dict[str, str]
) -> dict[str, Any]:
    """All repetitions of one phase ("warm" or "cold"), methods round-robin. `errors`: method ->
    why it cannot run this time (its store failed to pack, say)."""
    cmds: dict[str, list[str] | str] = {
        m: errors.get(m) or sample_cmd(m, paths["st"], paths["manifest"], args.budget) for m in methods
    }
    cold = paths["files"] if phase == "cold" else None
    warm = paths["files"] if phase == "warm" else None
    samples = run_rounds(phase, cmds, args.repeat, args.timeout, cold, warm)
    medians = {m: summarize(s) for m, s in samples.items()}
    size_gb = paths["ck"]["file_bytes"] / 1e9
    title = f"{phase} page cache, median of {args.repeat} ({size_gb:.2f} GB, budget {args.budget})"
    print_table(title, medians)
    for m, med in medians.items():
        if med.get("bytes") not in (None, paths["ck"]["tensor_bytes"], paths["ck"]["file_bytes"]):
            print(f"note: {m} read {med['bytes']:.0f} bytes, not the tensor or file size")
    return {"samples": samples, "medians": medians}


def run_save_phase(args: argparse.Namespace, paths: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """--save: every save method round-robin, each sample in a fresh process, median."""
    cfg = {"dir": str(workdir / "save-out"), "sources": args.sources}
    cfg |= {"block_size": args.block_size, "budget": args.budget}
    os.environ[SAVE_ENV] = json.dumps(cfg)
    try:
        cmds: dict[str, list[str] | str] = {
            m: [sys.executable, str(Path(__file__).resolve()), "--run-sample", m, str(paths["st"])]
            for m in SAVE_METHODS
        }
        samples = run_rounds("save", cmds, args.repeat, args.timeout)
    finally:
        del os.environ[SAVE_ENV]
    medians = {m: summarize(s) for m, s in samples.items()}
    ref = medians["save-safetensors"].get("gbps")
    ref_sync = medians["save-safetensors+fsync"].get("gbps")
    print(f"\nsave, median of {args.repeat} ({paths['ck']['file_bytes'] / 1e9:.2f} GB)")
    print(f"{'method':<24}{'GB/s':>9}{'x st.save':>11}{'x st+fsync':>12}{'RSS+MiB':>9}{'n':>4}")
    for m, med in medians.items():
        if med["status"] in ("failed", "unavailable"):
            print(f"{m:<24}{'failed':>9}  {(med['error'].splitlines() or [''])[0][:70]}")
            continue
        g = med["gbps"]
        r1 = f"{g / ref:.2f}" if ref else "-"
        r2 = f"{g / ref_sync:.2f}" if ref_sync else "-"
        rss = med["peak_rss_growth"] / MiB
        print(f"{m:<24}{g:>9.2f}{r1:>11}{r2:>12}{rss:>9.0f}{med['n']:>4}")
    return {"samples": samples, "medians": medians}


def pack_store(
    st: Path, sources: list[Path], manifest: Path, block_size: str, timeout: float
) -> tuple[str, float]:
    """`asyncload pack` st over fresh `sources`; (error or "", wall seconds)."""
    for d in sources:
        d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "asyncload", "pack", str(st), "--to", *map(str, sources)]
    _, err, seconds = run_cmd([*cmd, "-o", str(manifest), "--block-size", block_size], timeout)
    return ("" if err.startswith("no JSON object") else err), seconds  # pack need not print JSON


def stream_cmd(manifest: Path, budget: str) -> list[str]:
    cmd = [sys.executable, "-m", "asyncload", "load", str(manifest), "--budget", budget]
    return [*cmd, "--mode", "stream", "--json"]


def run_sweeps(
    args: argparse.Namespace, paths: dict[str, Any], pack_err: str, workdir: Path
) -> dict[str, Any]:
    """--plots: asyncload-stream, warm, over budgets (the main store, --sources sources) and over
    source counts (--budget; each count packed into its own store, measured, then removed: the
    counts run one after another so only one extra copy of the checkpoint is on disk at a time)."""
    sweeps: dict[str, Any] = {}
    warm_up(paths["store"])
    labels = {f"S={b}MiB": b for b in SWEEP_BUDGETS}
    cmds: dict[str, list[str] | str] = {
        label: f"pack failed: {pack_err}" if pack_err else stream_cmd(paths["manifest"], f"{b}MiB")
        for label, b in labels.items()
    }
    samples = run_rounds("budget", cmds, args.repeat, args.timeout)
    sweeps["budget"] = {"x": list(labels.values()), "labels": list(labels), "samples": samples}

    samples = {}
    for k in SWEEP_SOURCES:
        label, d = f"k={k}", workdir / f"sweep-k{k}"
        if k == args.sources:
            manifest, err, store = paths["manifest"], pack_err, paths["store"]
        else:
            shutil.rmtree(d, ignore_errors=True)
            srcs, manifest = [d / f"src{i}" for i in range(k)], d / "model.asyncload.json"
            err, _ = pack_store(paths["st"], srcs, manifest, args.block_size, args.timeout)
            store = [manifest, *srcs]
        if not err:
            warm_up(all_files(store))
        cmd: list[str] | str = f"pack failed: {err}" if err else stream_cmd(manifest, args.budget)
        samples |= run_rounds("sources", {label: cmd}, args.repeat, args.timeout)
        shutil.rmtree(d, ignore_errors=True)
    sweeps["sources"] = {"x": SWEEP_SOURCES, "labels": [f"k={k}" for k in SWEEP_SOURCES], "samples": samples}

    for key, title in (("budget", f"{args.sources} sources"), ("sources", f"budget {args.budget}")):
        sw = sweeps[key]
        sw["medians"] = {label: summarize(sw["samples"][label]) for label in sw["labels"]}
        head = f"--plots: asyncload-stream over {key}, warm, median of {args.repeat} ({title})"
        print_table(head, sw["medians"])
    return sweeps


def write_plots(result: dict[str, Any], json_out: Path) -> list[Path]:
    """PNG per sweep beside the JSON: median GB/s (line), each sample (dots), warm references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, ck = result["config"], result["checkpoint"]
    warm = result.get("phases", {}).get("warm", {}).get("medians", {})
    refs = [
        (m, warm[m]["gbps"]) for m in ("pread-reused", "safetensors.numpy") if (warm.get(m) or {}).get("gbps")
    ]
    written = []
    axes = {
        "budget": ("budget S (MiB)", f"{cfg['sources']} sources"),
        "sources": ("sources k", f"budget {cfg['budget']}"),
    }
    for key, (xlabel, fixed) in axes.items():
        sw = result["sweeps"][key]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        pts = [(x, sw["medians"][lb]["gbps"]) for x, lb in zip(sw["x"], sw["labels"], strict=True)]
        pts = [(x, g) for x, g in pts if g is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", color="C0", label="asyncload stream (median)")
        dots = [
            (x, s["gbps"])
            for x, lb in zip(sw["x"], sw["labels"], strict=True)
            for s in sw["samples"][lb]
            if not s["error"]
        ]
        if dots:
            ax.scatter(*zip(*dots, strict=True), s=12, alpha=0.35, color="C0", label="samples")
        for i, (name, g) in enumerate(refs):
            ax.axhline(g, ls="--", lw=1, color=f"C{i + 1}", label=f"{name} (warm median)")
        if key == "budget":
            ax.set_xscale("log", base=2)
        ax.set_xticks(sw["x"], [str(x) for x in sw["x"]])
        ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("GB/s (decimal)")
        ax.set_title(
            f"asyncload stream, warm: {ck['file_bytes'] / 1e9:.2f} GB, block {cfg['block_size']}, {fixed}",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        path = json_out.with_name(f"{json_out.stem}-{key}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps the legend below the axes
        plt.close(fig)
        written.append(path)
    return written


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
    add(
        "--save",
        action="store_true",
        help="add a save phase: safetensors.numpy.save_file (with and without fsync) against "
        "asyncload.save (every block fsynced) of the same tensors, over --sources dirs",
    )
    add("--bf16", action="store_true", help="store MLP weights as bf16 (needs ml_dtypes)")
    add("--timeout", type=float, default=600, help="seconds allowed per subprocess" + dflt)
    add("--out", type=Path, help="raw JSON (default bench/results/load-<timestamp>.json)")
    add(
        "--plots",
        action="store_true",
        help="add warm asyncload-stream sweeps over budget (64-512MiB) and sources (1-8); "
        "PNGs beside the JSON when matplotlib is installed",
    )
    add("--run-sample", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    add("--prepare-tensorizer", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_sample:  # internal: we are the fresh subprocess of one baseline sample
        print(json.dumps(run_sample(*args.run_sample)))
        return 0
    if args.prepare_tensorizer:  # internal: serialize the checkpoint for the tensorizer method
        try:
            print(json.dumps(_peers.prepare_tensorizer(args.prepare_tensorizer)))
        except _peers.Unavailable as e:
            print(json.dumps({"unavailable": str(e)}))
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
    del config["run_sample"], config["prepare_tensorizer"]
    plots_ok = importlib.util.find_spec("matplotlib") is not None
    if args.plots and not plots_ok:
        print("--plots: matplotlib not installed (pip install -e '.[bench]'): sweeps run, no PNGs")
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
        for dist in ("torch", "runai-model-streamer", "tensorizer"):  # peers, without importing them
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                result["env"][dist] = importlib.metadata.version(dist)
        t0 = time.perf_counter()
        ck = generate(st, args.size, args.bf16) | {"generate_s": time.perf_counter() - t0}
        result["checkpoint"] = ck
        print(
            f"checkpoint: {ck['tensors']} tensors, {ck['file_bytes']} bytes "
            f"({ck['file_bytes'] / MiB:.1f} MiB), largest {ck['largest_tensor']} "
            f"{ck['largest_bytes'] / MiB:.1f} MiB, {'+'.join(ck['dtypes'])}, "
            f"generated in {ck['generate_s']:.1f}s"
        )

        pack_err, pack_s = pack_store(st, sources, manifest, args.block_size, args.timeout)
        result["pack"] = {"seconds": pack_s, "ok": not pack_err, "error": pack_err}
        gbps = ck["file_bytes"] / pack_s / 1e9
        print(f"pack: FAILED ({pack_err})" if pack_err else f"pack: {pack_s:.2f}s wall ({gbps:.2f} GB/s)")

        # the methods that read the packed store cannot run without it
        errors = {m: f"pack failed: {pack_err}" for m in methods if pack_err and m.startswith("asyncload-")}
        errors.pop("asyncload-direct", None)
        if "tensorizer" in methods:  # its own format: serialize once, untimed for the table
            tz_cmd = [sys.executable, str(Path(__file__).resolve()), "--prepare-tensorizer", str(st)]
            tz, tz_err, _ = run_cmd(tz_cmd, args.timeout)
            result["tensorizer_serialize"] = tz or {"error": tz_err}
            if tz_err:
                errors["tensorizer"] = tz_err if tz_err.startswith("unavailable:") else f"serialize: {tz_err}"
                print(f"tensorizer serialize: {tz_err}")
            else:
                print(f"tensorizer serialize: {tz['seconds']:.2f}s ({tz['gbps']:.2f} GB/s), not timed below")

        store = [manifest, *sources]
        tz_file = _peers.tensorizer_path(st)
        files = all_files([st, *store, *([tz_file] if tz_file.exists() else [])])
        paths = {"st": st, "manifest": manifest, "files": files, "store": all_files(store), "ck": ck}
        phases = ["warm", "cold"] if args.cold else ["warm"]
        result["phases"] = {ph: run_phase(ph, args, methods, paths, errors) for ph in phases}
        if args.save:
            result["phases"]["save"] = run_save_phase(args, paths, workdir)
        if args.plots:
            result["sweeps"] = run_sweeps(args, paths, pack_err, workdir)
            if plots_ok:
                out.parent.mkdir(parents=True, exist_ok=True)
                try:
                    for png in write_plots(result, out):
                        print(f"plot: {png}")
                except Exception as e:  # the measurements still go to the JSON
                    print(f"--plots: writing PNGs failed: {type(e).__name__}: {e}")
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
