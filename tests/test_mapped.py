"""Mapped slots: a block of a local file that the page cache holds whole is mapped into its
slot (read-only, zero copy) instead of copied there.

The mirror maps a file range over both halves of a slot and puts the ring's own pages back;
the loader maps only cached, page-aligned, plain blocks and reads the rest into slots that
get their own memory back first. Files are evicted for real (fsync, then
``POSIX_FADV_DONTNEED``), truncated and corrupted on disk; every load is checked byte for byte.
"""

from __future__ import annotations

import mmap
import os
import pathlib
import sys
from collections.abc import Callable

import anyio
import numpy as np
import pytest
from _stores import KiB, MiB, block_files, block_path, evict, random_bytes, warm, write_synced

import asyncload
from asyncload import ChecksumError, TruncatedBlockError
from asyncload._loader import LoaderStatistics
from asyncload._mirror import Mirror
from asyncload._ring import Ring

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memfd, mincore")
pytestmark = linux_only

PAGE = mmap.PAGESIZE


def _prepare_all(root: pathlib.Path, prepare: Callable[[pathlib.Path], None]) -> None:
    """``warm`` or ``evict`` every block file under ``root``."""
    for f in block_files(root):
        prepare(f)


# --------------------------------------------------------------------------- the mirror


def test_a_mapped_range_shows_the_file_in_both_halves_and_restore_brings_the_ring_back(
    tmp_path: pathlib.Path,
) -> None:
    n = 8 * PAGE
    mirror = Mirror.create(n)
    assert mirror is not None
    mem = mirror.array
    mem[:n] = 7  # the ring's own bytes
    data = random_bytes(3 * PAGE, 1)
    write_synced(tmp_path / "f", b"x" * PAGE + data)
    warm(tmp_path / "f")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert mirror.map_file(2 * PAGE, 3 * PAGE, fd, PAGE)
    finally:
        os.close(fd)  # the mapping outlives the fd
    assert mem[2 * PAGE : 5 * PAGE].tobytes() == data
    assert mem[n + 2 * PAGE : n + 5 * PAGE].tobytes() == data  # the mirror shows the file too
    assert (mem[: 2 * PAGE] == 7).all() and (mem[5 * PAGE : n] == 7).all()  # the rest is untouched
    mirror.restore(2 * PAGE, 3 * PAGE)
    assert (mem[:n] == 7).all() and (mem[n:] == 7).all()
    mem[2 * PAGE] = 9  # writable again, and still one set of pages for both halves
    assert mem[n + 2 * PAGE] == 9


def test_a_range_the_page_cache_does_not_hold_whole_is_not_mapped(tmp_path: pathlib.Path) -> None:
    n = 8 * PAGE
    mirror = Mirror.create(n)
    assert mirror is not None
    mirror.array[:n] = 5
    write_synced(tmp_path / "f", random_bytes(4 * PAGE, 2))
    evict(tmp_path / "f")
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert not mirror.map_file(0, 4 * PAGE, fd, 0)
        assert not mirror.map_file(PAGE + 1, PAGE, fd, 0)  # unaligned: refused before any mapping
        assert not mirror.map_file(0, PAGE, fd, 1)
    finally:
        os.close(fd)
    assert (mirror.array == 5).all()  # the ring's pages are back, in both halves
    mirror.array[0] = 6
    assert mirror.array[n] == 6


def test_a_refused_mapping_gives_a_slot_its_own_memory_back(tmp_path: pathlib.Path) -> None:
    """A slot still showing a longer earlier file, then refused a new one, is writable again."""
    ring = Ring(4 * PAGE, 4, mirrored=True)
    assert ring.mappable
    slot = ring._slots[1]
    write_synced(tmp_path / "warm", random_bytes(4 * PAGE, 3))
    write_synced(tmp_path / "cold", random_bytes(2 * PAGE, 4))
    warm(tmp_path / "warm")
    evict(tmp_path / "cold")
    for name, nbytes, mapped in (("warm", 4 * PAGE, True), ("cold", 2 * PAGE, False)):
        fd = os.open(tmp_path / name, os.O_RDONLY)
        try:
            assert ring.map_file(slot, fd, 0, nbytes) is mapped
        finally:
            os.close(fd)
        assert slot.mapped is mapped
    slot.memory[:] = 3  # would fault on a read-only page left behind
    assert (slot.memory == 3).all()


# --------------------------------------------------------------------------- loads


async def _save(tmp_path: pathlib.Path, *, replicas: int = 1, **kw: object) -> tuple[pathlib.Path, dict]:
    rng = np.random.default_rng(5)
    sizes = [3 * KiB, 40 * KiB + 3, 9 * KiB, 64 * KiB, 17 * KiB + 1, 5, 33 * KiB]
    tensors = {f"t{i}": rng.integers(0, 256, size=n, dtype=np.uint8) for i, n in enumerate(sizes)}
    dirs = [tmp_path / "a", tmp_path / "b"]
    path = await asyncload.save(
        tensors, tmp_path / "m.json", sources=dirs, block_size=16 * KiB, replicas=replicas, **kw
    )  # type: ignore[arg-type]
    return pathlib.Path(path), {n: t.tobytes() for n, t in tensors.items()}


async def _stream(path: pathlib.Path, *, copy: bool, budget: int, **kw: object) -> tuple[dict, object]:
    got: dict[str, bytes] = {}
    async with asyncload.open(path, budget=budget, **kw) as model:  # type: ignore[arg-type]
        with anyio.fail_after(20):
            async with model.stream(copy=copy) as stream:
                async for name, arr in stream:
                    got[name] = arr.tobytes()
        stats = model.statistics()
    assert stats.slots_in_use == 0
    return got, stats


@pytest.mark.anyio
@pytest.mark.parametrize("copy", [False, True])
async def test_warm_blocks_are_mapped_and_every_byte_is_exact(tmp_path: pathlib.Path, copy: bool) -> None:
    path, want = await _save(tmp_path)
    _prepare_all(tmp_path, warm)
    got, stats = await _stream(path, copy=copy, budget=4 * 16 * KiB)
    assert got == want
    assert stats.mapped_blocks == stats.blocks_read > 0  # type: ignore[attr-defined]
    assert sum(s.mapped_reads for s in stats.sources.values()) == stats.blocks_read  # type: ignore[attr-defined]
    got, stats = await _stream(path, copy=copy, budget=4 * 16 * KiB, map_files=False)
    assert got == want and stats.mapped_blocks == 0  # type: ignore[attr-defined]


@pytest.mark.anyio
@pytest.mark.parametrize("copy", [False, True])
async def test_cold_and_warm_blocks_share_slots_byte_for_byte(tmp_path: pathlib.Path, copy: bool) -> None:
    """Every other block file evicted, a ring of 3 slots: slots go from mapped to read and back,
    and a read never lands in (or faults on) pages of a file mapped there before. A block read
    from the disk is in the page cache afterwards, and mapped over its slot then."""
    path, want = await _save(tmp_path)
    files = block_files(tmp_path)
    for i, f in enumerate(files):
        (evict if i % 2 else warm)(f)
    got, stats = await _stream(path, copy=copy, budget=3 * 16 * KiB)
    assert got == want
    uncached = sum(s.uncached_reads for s in stats.sources.values())  # type: ignore[attr-defined]
    assert stats.mapped_blocks == stats.blocks_read  # type: ignore[attr-defined]
    mapped_reads = sum(s.mapped_reads for s in stats.sources.values())  # type: ignore[attr-defined]
    assert 0 < mapped_reads < stats.blocks_read and uncached > 0


@pytest.mark.anyio
async def test_a_truncated_block_file_is_refused_not_mapped(tmp_path: pathlib.Path) -> None:
    path, _ = await _save(tmp_path)
    async with asyncload.open(path) as probe:
        block = next(b for b in probe.manifest.blocks if b.length == 16 * KiB)
    victim = block_path(path, block)
    os.truncate(victim, PAGE + 10)  # a page past the new end would be SIGBUS if it were mapped
    _prepare_all(tmp_path, warm)  # the blocks before it are mapped into the two slots it may land in
    with pytest.raises(TruncatedBlockError, match=f"block {block.index} "):
        await _stream(path, copy=False, budget=2 * 16 * KiB)


@pytest.mark.anyio
@pytest.mark.parametrize("copy", [False, True])
async def test_a_source_that_cannot_map_reads_into_slots_that_showed_a_file(
    tmp_path: pathlib.Path, copy: bool
) -> None:
    from asyncload.testing._wrapper import WrappedSource

    path, want = await _save(tmp_path)
    _prepare_all(tmp_path, warm)

    def wrap(src: asyncload.sources.Source) -> asyncload.sources.Source:
        return WrappedSource(src) if src.id == "s1" else src  # reads only, like a remote source

    got, stats = await _stream(path, copy=copy, budget=2 * 16 * KiB, wrap_source=wrap)
    assert got == want
    assert 0 < stats.mapped_blocks < stats.blocks_read  # type: ignore[attr-defined]


@pytest.mark.anyio
@pytest.mark.parametrize("replicas", [1, 2])
async def test_a_corrupt_block_file_under_a_mapping_is_refused_or_read_from_its_copy(
    tmp_path: pathlib.Path, replicas: int
) -> None:
    path, want = await _save(tmp_path, replicas=replicas)
    async with asyncload.open(path) as probe:
        block = probe.manifest.blocks[2]
    victim = block_path(path, block)
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 0xFF
    victim.write_bytes(bytes(raw))
    _prepare_all(tmp_path, warm)  # every block (the corrupt one too) is mapped, then checked
    if replicas == 1:
        with pytest.raises(ChecksumError, match=f"block {block.index} "):
            await _stream(path, copy=False, budget=4 * 16 * KiB)
        return
    got, stats = await _stream(path, copy=False, budget=4 * 16 * KiB)
    assert got == want
    assert stats.degraded_reads == 1 and stats.checksum_failures == 1  # type: ignore[attr-defined]
    assert stats.mapped_blocks == stats.blocks_read + 1  # the bad copy was mapped, then the good one  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_encrypted_blocks_are_read_never_mapped(tmp_path: pathlib.Path) -> None:
    key = bytes(range(32))
    path, want = await _save(tmp_path, key=key)
    _prepare_all(tmp_path, warm)
    got, stats = await _stream(path, copy=False, budget=8 * 16 * KiB, key=key)
    assert got == want and stats.mapped_blocks == 0  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- owned arrays


def _backing(arr: np.ndarray, at: int) -> str:
    """What /proc/self/maps says is mapped at byte ``at`` of ``arr``: a file path, or ''."""
    addr = arr.ctypes.data + at
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                return fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError("address not mapped")


async def _save_big(tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict[str, bytes]]:
    """Tensors of 1-3 MiB over 256 KiB blocks; the first starts 24 bytes into a page."""
    rng = np.random.default_rng(9)
    sizes = [24, 3 * MiB + 8, 1 * MiB + 4096, 2 * MiB + 40, 1000, 700 * KiB + 16]
    tensors = {f"t{i}": rng.integers(0, 256, size=n, dtype=np.uint8) for i, n in enumerate(sizes)}
    path = await asyncload.save(
        tensors, tmp_path / "m.json", sources=[tmp_path / "a", tmp_path / "b"], block_size=256 * KiB
    )
    return path, {n: t.tobytes() for n, t in tensors.items()}


async def _load_big(path: pathlib.Path, **kw: object) -> tuple[dict[str, np.ndarray], LoaderStatistics]:
    """``model.load()`` of a store from :func:`_save_big` (8 slots), and the model's statistics."""
    async with asyncload.open(path, budget=8 * 256 * KiB, **kw) as model:  # type: ignore[arg-type]
        with anyio.fail_after(20):
            got = await model.load()
        return got, model.statistics()


@pytest.mark.anyio
async def test_owned_arrays_take_mapped_blocks_copy_on_write(tmp_path: pathlib.Path) -> None:
    """A full load of warm blocks: each large array shows its blocks' file pages (private), is
    exact, writable, and a write stays in the array (the block files keep their bytes)."""
    path, want = await _save_big(tmp_path)
    _prepare_all(tmp_path, warm)
    got, stats = await _load_big(path)
    assert stats.mapped_blocks == stats.blocks_read
    assert {n: a.tobytes() for n, a in got.items()} == want
    big = got["t1"]
    assert big.flags.writeable and big.flags.owndata is False
    mid = big.nbytes // 2
    assert _backing(big, mid).startswith(str(tmp_path))  # a block file's pages, not a copy
    assert _backing(big, 0) == ""  # its first bytes (not a whole page of it) were copied
    big[mid : mid + 5000] = 7  # copy-on-write: the array changes ...
    assert (big[mid : mid + 5000] == 7).all()
    assert _backing(got["t2"], got["t2"].nbytes // 2).startswith(str(tmp_path))
    small = got["t5"]  # under 1 MiB: numpy's own memory, never a place for file pages
    assert not _backing(small, small.nbytes // 2).startswith(str(tmp_path))
    # ... the files do not: a second load still gets (and checks) the stored bytes.
    again, _ = await _load_big(path)
    assert {n: a.tobytes() for n, a in again.items()} == want


@pytest.mark.anyio
async def test_owned_arrays_outlive_the_model_and_the_files(tmp_path: pathlib.Path) -> None:
    path, want = await _save_big(tmp_path)
    _prepare_all(tmp_path, warm)
    got, _ = await _load_big(path)
    for f in block_files(tmp_path):
        f.unlink()  # a mapping keeps its file's pages; only truncating a file under it is unsafe
    assert {n: a.tobytes() for n, a in got.items()} == want


@pytest.mark.anyio
async def test_owned_arrays_take_the_pages_of_blocks_read_from_the_disk(tmp_path: pathlib.Path) -> None:
    """Cold blocks are read (in I/O threads), then mapped over their slots from the page cache,
    and the arrays take those pages as they take warm ones."""
    path, want = await _save_big(tmp_path)
    _prepare_all(tmp_path, evict)
    got, stats = await _load_big(path)
    assert {n: a.tobytes() for n, a in got.items()} == want
    assert sum(s.uncached_reads for s in stats.sources.values()) == stats.blocks_read
    assert sum(s.mapped_reads for s in stats.sources.values()) == 0
    assert stats.mapped_blocks == stats.blocks_read
    assert _backing(got["t1"], got["t1"].nbytes // 2).startswith(str(tmp_path))


@pytest.mark.anyio
async def test_out_of_file_descriptors_blocks_are_read_instead(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapped slot keeps a dup of its file's fd; where none is left, the block is read."""
    from asyncload import _ring

    path, want = await _save_big(tmp_path)
    _prepare_all(tmp_path, warm)

    def dup(fd: int) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(_ring.os, "dup", dup)
    got, stats = await _load_big(path)
    assert stats.mapped_blocks == 0
    assert {n: a.tobytes() for n, a in got.items()} == want


@pytest.mark.anyio
async def test_without_map_files_owned_arrays_are_copies(tmp_path: pathlib.Path) -> None:
    path, want = await _save_big(tmp_path)
    _prepare_all(tmp_path, warm)
    got, stats = await _load_big(path, map_files=False)
    assert stats.mapped_blocks == 0
    assert {n: a.tobytes() for n, a in got.items()} == want
    for a in got.values():
        if a.nbytes >= MiB:
            assert _backing(a, a.nbytes // 2) == ""
