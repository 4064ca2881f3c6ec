"""Shared helpers for the behavioural tests: real block stores on disk, the page cache, and
condition waits."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import anyio
import numpy as np

import asyncload
from asyncload import Manifest
from asyncload._format import BlockRef

KiB = 1 << 10
MiB = 1 << 20

_DTYPES = (np.float32, np.int64, np.float16, np.int8, np.uint16)


def make_tensors(count: int, *, seed: int = 0, max_bytes: int = 12 * KiB) -> dict[str, np.ndarray]:
    """``count`` tensors of assorted dtypes, shapes and sizes, filled with random integers."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(count):
        dt = np.dtype(_DTYPES[i % len(_DTYPES)])
        n = int(rng.integers(1, max_bytes // dt.itemsize + 1))
        a = rng.integers(0, 100, size=n).astype(dt)
        if n % 4 == 0:
            a = a.reshape(4, n // 4)
        out[f"layer{i:03d}.weight"] = a
    return out


async def save_store(
    root: pathlib.Path,
    tensors: Mapping[str, np.ndarray],
    *,
    k: int = 3,
    block_size: int = 4 * KiB,
    budget: int = 64 * KiB,
) -> pathlib.Path:
    dirs = [root / f"d{i}" for i in range(k)]
    path = await asyncload.save(
        tensors, root / "m.asyncload.json", sources=dirs, block_size=block_size, budget=budget
    )
    return pathlib.Path(path)


def read_manifest(path: pathlib.Path) -> Manifest:
    return Manifest.from_json(path.read_bytes(), name=str(path))


def block_path(path: pathlib.Path, block: BlockRef) -> pathlib.Path:
    """The file holding ``block`` of the manifest at ``path``."""
    doc = json.loads(path.read_bytes())
    loc = next(s["location"] for s in doc["sources"] if s["id"] == block.source)
    base = pathlib.Path(loc)
    base = base if base.is_absolute() else path.parent / base
    return base.joinpath(*block.key.split("/"))


def source_dir(path: pathlib.Path, source_id: str) -> pathlib.Path:
    doc = json.loads(path.read_bytes())
    loc = next(s["location"] for s in doc["sources"] if s["id"] == source_id)
    base = pathlib.Path(loc)
    return base if base.is_absolute() else path.parent / base


def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


def write_synced(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it: its pages are clean, so :func:`evict` drops them."""
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(path: pathlib.Path) -> None:
    """Drop ``path``'s clean pages from the page cache (``POSIX_FADV_DONTNEED``, no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: pathlib.Path) -> None:
    """Bring every page of ``path`` into the page cache."""
    path.read_bytes()


def block_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Every stored file under ``root`` (blocks of the source directories; not manifests)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix != ".json")


def data_blocks(m: Manifest) -> list[BlockRef]:
    """Blocks that carry tensor bytes (save() puts the header in its own blocks first)."""
    data_start = min((t.begin for t in m.tensors), default=m.total_size)
    return [b for b in m.blocks if b.offset >= data_start]


def tensors_touching(m: Manifest, blocks: Sequence[BlockRef]) -> set[str]:
    return {
        t.name
        for t in m.tensors
        for b in blocks
        if t.nbytes and t.begin < b.offset + b.length and b.offset < t.end
    }


def assert_same(name: str, arr: np.ndarray, originals: Mapping[str, np.ndarray]) -> None:
    want = originals[name]
    assert arr.dtype == want.dtype, name
    assert arr.shape == want.shape, name
    assert np.array_equal(arr, want), f"{name}: wrong bytes"


def task_count() -> int:
    return len(asyncio.all_tasks())


async def wait_until(pred: Callable[[], bool], *, what: str, patience: float = 20.0) -> None:
    """Wait (by polling state, not by guessing a delay) until ``pred()`` holds; fail on timeout."""
    with anyio.move_on_after(patience):
        # Loader statistics have no events to wait on; polling a condition is not timing.
        while not pred():  # noqa: ASYNC110
            await anyio.sleep(0.0005)
    assert pred(), f"timed out waiting until {what}"
