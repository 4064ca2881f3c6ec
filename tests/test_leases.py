"""Zero-copy leases over several blocks: the mirrored ring, slots in order, byte-exact views.

A tensor spread over consecutive blocks is handed to a ``copy=False`` consumer as one
read-only view of the ring when the ring's memory is mapped twice back to back (so
slots that wrap are adjacent) and the slots are taken in index order. These tests
check the pieces (mirror, order, spans) and the whole (bytes, views, slots back,
mappings and RSS let go), and that every case a lease cannot cover is copied instead.
"""

from __future__ import annotations

import gc
import pathlib
import sys

import anyio
import numpy as np
import pytest
from _stores import block_files
from _stores import warm as read_into_cache
from hypothesis import given, settings
from hypothesis import strategies as st

import asyncload
from asyncload._assemble import lease_spans
from asyncload._format import BlockRef, TensorInfo
from asyncload._mirror import mirrored_memory
from asyncload._plan import plan_load
from asyncload._ring import Ring

KiB = 1 << 10
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memfd and /proc/self")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _ring_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("asyncload-ring" in line for line in f)


# --------------------------------------------------------------------------- the mirror


@linux_only
def test_both_halves_of_mirrored_memory_are_the_same_bytes() -> None:
    n = 64 * KiB
    mem = mirrored_memory(n)
    assert mem is not None and mem.size == 2 * n and mem.flags.writeable
    mem[:n] = np.arange(n, dtype=np.uint64).astype(np.uint8)
    assert np.array_equal(mem[n:], mem[:n])
    mem[2 * n - 1] = 77  # a write through the second half shows in the first
    assert mem[n - 1] == 77
    assert mirrored_memory(n + 1) is None  # not a whole number of pages: no mirror


@linux_only
def test_mirrored_memory_is_unmapped_when_its_last_view_goes() -> None:
    gc.collect()  # rings of earlier tests that only the collector frees
    before = _ring_mappings()
    mem = mirrored_memory(256 * KiB)
    view = mem[10:20]  # type: ignore[index]
    del mem
    gc.collect()
    assert _ring_mappings() == before + 2  # a view keeps both halves mapped
    del view
    gc.collect()
    assert _ring_mappings() == before


@linux_only
def test_a_wrapped_span_counts_in_rss_only_until_it_is_forgotten() -> None:
    m, count = 1 << 20, 16
    ring = Ring(m, count, mirrored=True)
    assert ring.mirrored
    slots = [ring.try_acquire() for _ in range(count)]
    last = slots[-1]
    assert last is not None and last.index == count - 1
    for slot in slots:
        slot.memory.fill(slot.index)  # reads land: the ring's own pages are resident
    base = _status("RssShmem")
    span = ring.span(last, 9)  # the last slot and, through the mirror, slots 0-7
    assert span.size == 9 * m and not np.shares_memory(span[m:], ring._memory)  # past the ring's end
    int(span[::4096].sum())  # read every page: the mirror's pages get mapped
    assert _status("RssShmem") - base >= 8 * m
    ring.forget_span(last, 9)
    assert _status("RssShmem") - base < m
    assert span[-1] == 7  # still readable (faulted back in): slot 7's bytes


def test_a_span_that_wraps_needs_the_mirror() -> None:
    ring = Ring(100, 4)  # 400 bytes: not whole pages, so never mirrored
    assert not ring.mirrored
    slots = [ring.try_acquire() for _ in range(4)]
    assert slots[1] is not None and slots[3] is not None
    assert ring.span(slots[1], 3).size == 300
    with pytest.raises(ValueError, match="mirrored"):
        ring.span(slots[3], 2)
    with pytest.raises(ValueError, match="longer than the ring"):
        ring.span(slots[1], 5)


# --------------------------------------------------------------------------- slots in order


@pytest.mark.anyio
async def test_a_sequential_ring_hands_out_slots_in_index_order() -> None:
    ring = Ring(8, 4)
    ring.sequential = True
    a, b, c, d = (ring.try_acquire() for _ in range(4))
    assert [s.index for s in (a, b, c, d) if s is not None] == [0, 1, 2, 3]
    assert a is not None and c is not None and b is not None
    ring.release(c)  # slot 2 is free, but slot 0 comes next
    assert ring.try_acquire() is None
    got: list[int] = []

    async def take() -> None:
        s = await ring.acquire()
        got.append(s.index)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            tg.start_soon(take)
            await anyio.wait_all_tasks_blocked()
            assert got == [] and ring.statistics().waiting == 2
            ring.release(a)  # slot 0: the first waiter; slot 1 is still held
            await anyio.wait_all_tasks_blocked()
            assert got == [0]
            ring.release(b)  # slot 1, then slot 2 (already free) for the second waiter
    assert got == [0, 1]
    assert ring.statistics().slots_in_use == 3


@given(releases=st.permutations(range(6)), rounds=st.integers(1, 3))
def test_sequential_acquisitions_follow_the_index_whatever_the_release_order(
    releases: list[int], rounds: int
) -> None:
    ring = Ring(8, 6)
    ring.sequential = True
    taken: list[int] = []
    for _ in range(rounds):
        slots = []
        while (s := ring.try_acquire()) is not None:
            slots.append(s)
        taken += [s.index for s in slots]
        for i in releases:
            ring.release(slots[i])
    assert taken == list(range(6)) * rounds


# --------------------------------------------------------------------------- which tensors


def _blocks(lengths: list[int]) -> list[BlockRef]:
    out, pos = [], 0
    for i, n in enumerate(lengths):
        out.append(BlockRef(i, "s0", f"b{i}", pos, n, None))
        pos += n
    return out


@settings(max_examples=200)
@given(
    m=st.sampled_from([1024, 4096]),
    count=st.integers(1, 10),
    sizes=st.lists(st.integers(0, 9000), min_size=1, max_size=12),
    short_at=st.sets(st.integers(0, 20), max_size=3),
    copy=st.booleans(),
)
def test_lease_spans_cover_only_blocks_that_sit_end_to_end(
    m: int, count: int, sizes: list[int], short_at: set[int], copy: bool
) -> None:
    total = sum(sizes)
    lengths: list[int] = []
    while sum(lengths) < total:  # some blocks shorter than a slot (a file's end)
        lengths.append(min(m // 2 if len(lengths) in short_at else m, total - sum(lengths)))
    blocks = _blocks(lengths)
    tensors, pos = [], 0
    for i, n in enumerate(sizes):
        tensors.append(TensorInfo(f"t{i}", "U8", (n,), pos, pos + n))
        pos += n
    plan = plan_load(blocks, tensors)
    ring = Ring(m, count, mirrored=True)
    if sys.platform.startswith("linux"):
        assert ring.mirrored == (m * count % 4096 == 0)
    spans = lease_spans(plan, ring, copy=copy)
    for ti, t in enumerate(plan.tensors):
        mine = [b for b in blocks if b.offset < t.end and t.begin < b.end] if t.nbytes else []
        if copy or not mine:
            assert spans[ti] == 0
        elif len(mine) == 1:
            assert spans[ti] == 1
        elif spans[ti]:
            assert spans[ti] == len(mine) <= count - 1
            assert all(b.length == m for b in mine[:-1])  # end to end in adjacent slots
        else:
            # not mirrored (the ring is not whole pages), too long, or a short block inside
            assert not ring.mirrored or len(mine) > count - 1 or any(b.length != m for b in mine[:-1])
    assert lease_spans(plan, ring, copy=copy, across_blocks=False) == [
        0 if copy else int(p == 1) for p in plan.pieces
    ]


# --------------------------------------------------------------------------- end to end


async def _lease_all(
    path: pathlib.Path, budget: int, mapped: list[int] | None = None, map_files: bool = True
) -> tuple[dict[str, bytes], list[str], list[str], int]:
    """Stream with copy=False: bytes of each tensor, those viewed in the mirror / anywhere in the ring.

    ``mapped`` gets the number of blocks mapped into their slots rather than read, and of all
    blocks read."""
    got: dict[str, bytes] = {}
    in_ring: list[str] = []
    wrapped: list[str] = []
    async with asyncload.open(path, budget=budget, map_files=map_files) as model:
        ring = model._ring
        assert ring is not None
        mirror = ring._mirror if ring._mirror is not None else ring._memory
        with anyio.fail_after(20):
            async with model.stream(copy=False) as stream:
                async for name, arr in stream:
                    got[name] = arr.tobytes()
                    if np.shares_memory(arr, mirror):
                        assert not arr.flags.writeable, name
                        in_ring.append(name)
                        if not np.shares_memory(arr.reshape(-1)[-1:], ring._memory):
                            wrapped.append(name)  # starts in the ring, ends in its mirror
                    else:
                        assert arr.flags.writeable, name
        in_use = model.statistics().slots_in_use
        if mapped is not None:
            mapped += [model.statistics().mapped_blocks, model.statistics().blocks_read]
    return got, in_ring, wrapped, in_use


@linux_only
@pytest.mark.anyio
@pytest.mark.parametrize("warm", [False, True], ids=["read", "mapped"])
async def test_tensors_over_several_blocks_are_leased_as_views_byte_for_byte(
    tmp_path: pathlib.Path, warm: bool
) -> None:
    """Blocks read into the slots (``map_files=False``), or mapped there (the views then show
    the files' cached pages)."""
    m = 4 * KiB
    rng = np.random.default_rng(7)
    # 1 to 11 blocks each, unaligned; the ring has 8 slots, so spans of up to 7 blocks are leased.
    sizes = [3 * KiB, 9 * KiB + 5, 13 * KiB, 2 * KiB + 1, 16 * KiB, 21 * KiB + 3, 7 * KiB, 40 * KiB + 1] * 4
    tensors = {f"t{i:02d}": rng.integers(0, 256, size=n, dtype=np.uint8) for i, n in enumerate(sizes)}
    path = await asyncload.save(
        tensors, tmp_path / "m.json", sources=[tmp_path / "a", tmp_path / "b"], block_size=m
    )
    if warm:
        for f in block_files(tmp_path):
            read_into_cache(f)  # so the load maps them
    mapped: list[int] = []
    got, in_ring, wrapped, in_use = await _lease_all(path, 8 * m, mapped, map_files=warm)
    assert got == {n: t.tobytes() for n, t in tensors.items()}
    assert in_use == 0
    async with asyncload.open(path, budget=8 * m) as model:
        blocks = model.manifest.blocks
        over = {
            n
            for n, t in model.tensors.items()
            if sum(b.offset < t.end and t.begin < b.end for b in blocks) > 1
        }
        too_long = {
            n
            for n, t in model.tensors.items()
            if sum(b.offset < t.end and t.begin < b.end for b in blocks) > 7
        }
    assert over - too_long and too_long
    assert over - too_long <= set(in_ring)  # every tensor over 2-7 blocks was a view
    assert not too_long & set(in_ring)  # longer ones were copied
    assert wrapped  # and some of those views ran across the ring's end
    assert mapped[0] == (mapped[1] if warm else 0)


@linux_only
@pytest.mark.anyio
async def test_without_the_mirror_tensors_over_several_blocks_are_copied(tmp_path: pathlib.Path) -> None:
    m = 5000  # 8 slots of 5000 bytes: not whole pages, so the ring is not mirrored
    rng = np.random.default_rng(3)
    sizes = [3000, 12000, 700, 15100]
    tensors = {f"t{i}": rng.integers(0, 256, size=n, dtype=np.uint8) for i, n in enumerate(sizes)}
    path = await asyncload.save(tensors, tmp_path / "m.json", sources=[tmp_path / "a"], block_size=m)
    got, in_ring, wrapped, in_use = await _lease_all(path, 8 * m)
    assert got == {n: t.tobytes() for n, t in tensors.items()}
    assert set(in_ring) == {"t0", "t2"} and not wrapped and in_use == 0


@linux_only
@pytest.mark.anyio
async def test_a_stream_closed_mid_lease_gives_every_slot_back(tmp_path: pathlib.Path) -> None:
    m = 4 * KiB
    tensors = {f"t{i}": np.full(10 * KiB + i, i, dtype=np.uint8) for i in range(12)}
    path = await asyncload.save(tensors, tmp_path / "m.json", sources=[tmp_path / "a"], block_size=m)
    async with asyncload.open(path, budget=8 * m) as model:
        for stop_after in range(4):
            with anyio.fail_after(10):
                async with model.stream(copy=False) as stream:
                    seen = 0
                    async for name, arr in stream:
                        assert arr.tobytes() == tensors[name].tobytes()
                        seen += 1
                        if seen > stop_after:
                            break
            assert model.statistics().slots_in_use == 0
        loaded = await model.load()  # and a copying stream after it still loads every byte
        assert {n: a.tobytes() for n, a in loaded.items()} == {n: t.tobytes() for n, t in tensors.items()}


@linux_only
@pytest.mark.anyio
@pytest.mark.parametrize("replicas", [1, 2])
async def test_a_corrupt_block_under_a_lease_is_read_again_or_refused(
    tmp_path: pathlib.Path, replicas: int
) -> None:
    """A block of a tensor leased over several blocks fails its checksum on one source: with a
    second copy the view still shows exact bytes; without, the stream raises ChecksumError.
    Either way every slot comes back."""
    from asyncload.testing import FaultySource

    m = 4 * KiB
    rng = np.random.default_rng(11)
    tensors = {
        f"t{i}": rng.integers(0, 256, size=n, dtype=np.uint8)
        for i, n in enumerate([5 * KiB, 14 * KiB, 9 * KiB])
    }
    dirs = [tmp_path / f"d{i}" for i in range(2)]
    path = await asyncload.save(tensors, tmp_path / "m.json", sources=dirs, block_size=m, replicas=replicas)
    async with asyncload.open(path, budget=8 * m) as probe:
        t1 = probe.tensors["t1"]
        inside = [b for b in probe.manifest.blocks if t1.begin < b.offset and b.end < t1.end]
    bad = inside[0]  # a block wholly inside t1: t1 is leased over 4-5 blocks
    faulty: dict[str, FaultySource] = {}

    def wrap(src: asyncload.sources.Source) -> asyncload.sources.Source:
        if src.id != bad.source:
            return src
        faulty[src.id] = FaultySource(src, corrupt_keys=[bad.key])
        return faulty[src.id]

    got: dict[str, bytes] = {}
    async with asyncload.open(path, budget=8 * m, wrap_source=wrap) as model:
        with anyio.fail_after(20):
            if replicas == 2:
                async with model.stream(copy=False) as stream:
                    async for name, arr in stream:
                        if name == "t1":
                            assert not arr.flags.writeable  # still a lease
                        got[name] = arr.tobytes()
                assert got == {n: t.tobytes() for n, t in tensors.items()}
                assert model.statistics().degraded_reads >= 1
            else:
                with pytest.raises(asyncload.ChecksumError, match=f"block {bad.index}"):
                    async with model.stream(copy=False) as stream:
                        async for name, arr in stream:
                            got[name] = arr.tobytes()
                assert all(got[n] == tensors[n].tobytes() for n in got)  # nothing wrong before the error
        assert model.statistics().slots_in_use == 0
    assert faulty[bad.source].reads_started >= 1
