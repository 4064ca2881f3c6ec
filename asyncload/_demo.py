"""``asyncload demo``: the whole path on an embedded default, local directories as sources."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ._config import format_size
from ._loader import open as open_model
from ._loader import save
from ._metrics import LagMonitor, current_rss, peak_rss, reset_peak_rss
from ._threads import run_sync
from ._tools import verify

__all__ = ["run_demo", "synthetic_layout"]

Layout = list[tuple[str, np.dtype[Any], tuple[int, ...]]]


def synthetic_layout(size: int) -> Layout:
    """A LLaMA-like tensor list (fp16 weights, fp32 norms, a bf16 head) of about ``size`` bytes."""
    hidden = 1024 if size >= 64 << 20 else 256
    inter = hidden * 8 // 3 // 64 * 64
    f16: np.dtype[Any] = np.dtype(np.float16)
    f32: np.dtype[Any] = np.dtype(np.float32)
    bf16: np.dtype[Any] = np.dtype(ml_dtypes.bfloat16)
    layer = [
        ("self_attn.q_proj.weight", f16, (hidden, hidden)),
        ("self_attn.k_proj.weight", f16, (hidden, hidden)),
        ("self_attn.v_proj.weight", f16, (hidden, hidden)),
        ("self_attn.o_proj.weight", f16, (hidden, hidden)),
        ("mlp.gate_proj.weight", f16, (inter, hidden)),
        ("mlp.up_proj.weight", f16, (inter, hidden)),
        ("mlp.down_proj.weight", f16, (hidden, inter)),
        ("input_layernorm.weight", f32, (hidden,)),
        ("post_attention_layernorm.weight", f32, (hidden,)),
    ]
    per_layer = sum(int(np.prod(s)) * d.itemsize for _, d, s in layer)
    vocab = 8192
    fixed = 2 * vocab * hidden * 2 + hidden * 4
    layers = max(1, (size - fixed) // per_layer)
    out: Layout = [("model.embed_tokens.weight", f16, (vocab, hidden))]
    for i in range(layers):
        out.extend((f"model.layers.{i}.{n}", d, s) for n, d, s in layer)
    out.append(("model.norm.weight", f32, (hidden,)))
    out.append(("lm_head.weight", bf16, (vocab, hidden)))
    return out


def _tensor(i: int, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.frombuffer(np.random.default_rng(i).bytes(n), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def _digest(arr: np.ndarray) -> str:
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return hashlib.blake2b(flat.data, digest_size=16).hexdigest()


async def _tensors(layout: Layout, digests: dict[str, str]) -> AsyncIterator[tuple[str, np.ndarray]]:
    for i, (name, dtype, shape) in enumerate(layout):
        arr = _tensor(i, dtype, shape)
        digests[name] = await run_sync(_digest, arr)
        yield name, arr


async def _stream_checked(manifest: str, budget: int, digests: dict[str, str]) -> tuple[int, Any]:
    """Stream every tensor back and compare its digest; (tensors that matched, statistics)."""
    checked = 0
    async with open_model(manifest, budget=budget) as model:
        async for name, arr in model.stream():
            if await run_sync(_digest, arr) != digests[name]:
                print(f"  MISMATCH in {name}")
                return -1, model.statistics()
            checked += 1
            del arr
        return checked, model.statistics()


async def run_demo(
    *,
    size: int,
    budget: int,
    block_size: int,
    sources: int,
    keep: str | None,
    quiet: bool,
    parity: int = 1,
) -> int:
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="asyncload-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        layout = synthetic_layout(size)
        total = sum(int(np.prod(s)) * d.itemsize for _, d, s in layout)
        largest = max(int(np.prod(s)) * d.itemsize for _, d, s in layout)
        dirs = [root / f"disk{i}" for i in range(sources)]
        parity = parity if sources > parity else 0
        scheme = f", parity {parity} (any {parity} of {sources} may be lost)" if parity else ""
        what = f"{len(layout)} tensors, {format_size(total)}, {sources} sources{scheme}"
        print(f"asyncload demo: {what} under {root}")
        digests: dict[str, str] = {}
        t0 = time.perf_counter()
        manifest = await save(
            _tensors(layout, digests),
            root / "model.asyncload.json",
            sources=dirs,
            block_size=block_size,
            budget=budget,
            parity=parity,
        )
        dt = time.perf_counter() - t0
        print(
            f"  save   : {dt:.2f} s ({total / dt / 1e9:.2f} GB/s, tensors generated on the fly) -> {manifest}"
        )

        baseline = current_rss()
        reset_peak_rss()
        checked = 0
        t0 = time.perf_counter()
        async with open_model(manifest, budget=budget) as model, LagMonitor() as lag:
            async for name, arr in model.stream():
                if await run_sync(_digest, arr) != digests[name]:
                    print(f"  MISMATCH in {name}")
                    return 1
                checked += 1
                del arr  # a streaming consumer lets go before asking for the next
            stats = model.statistics()
        dt = time.perf_counter() - t0
        growth = peak_rss() - baseline
        lg = lag.summary()
        if checked != len(layout):
            print(f"  only {checked} of {len(layout)} tensors came back")
            return 1
        print(
            f"  load   : {checked} tensors, every byte verified, {dt:.2f} s ({total / dt / 1e9:.2f} GB/s "
            "including the check)"
        )
        print(
            f"  memory : budget {format_size(budget)} in {stats.slots_total} slots of "
            f"{format_size(stats.slot_size)}; peak RSS growth {format_size(growth)} for a "
            f"{format_size(total)} model (S + largest tensor = {format_size(budget + largest)}); "
            f"{stats.slot_waits} waits for a free slot"
        )
        print(
            f"  loop   : heartbeat lag p50 {lg.p50_ms:.2f} ms, p99 {lg.p99_ms:.2f} ms, max {lg.max_ms:.2f} ms"
        )
        per = ", ".join(f"{k} {format_size(v)}" for k, v in stats.bytes_read_per_source.items())
        print(f"  sources: {per}")
        report = await verify(manifest, budget=budget)
        print(f"  verify : {report.blocks} blocks, crc32c {'OK' if report.ok else 'FAILED'}")
        if not report.ok:
            return 1
        if not parity:
            return 0
        # A lost disk: rename one source away, load anyway, then repair into a new directory.
        lost = dirs[-1]
        gone = lost.with_name(lost.name + ".lost")
        lost.rename(gone)
        t0 = time.perf_counter()
        checked, stats = await _stream_checked(manifest, budget, digests)
        dt = time.perf_counter() - t0
        if checked != len(layout):
            print(f"  degraded load failed: {checked} of {len(layout)} tensors")
            return 1
        print(
            f"  lost   : {lost.name} taken away; {checked} tensors still every byte verified in {dt:.2f} s "
            f"({stats.rebuilt_blocks} blocks rebuilt from parity)"
        )
        new = lost.with_name(lost.name + ".new")
        sid = f"s{len(dirs) - 1}"
        fixed = await verify(manifest, budget=budget, repair=True, sources={sid: str(new)})
        again = await verify(manifest, budget=budget)
        print(
            f"  repair : {sum(b.repaired for b in fixed.bad)} blocks rebuilt into {new.name} "
            f"(asyncload verify --repair --source {sid}=...); verify again: {'OK' if again.ok else 'FAILED'}"
        )
        return 0 if again.ok and fixed.healthy else 1
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
