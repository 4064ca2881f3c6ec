"""Parity on the data path: real stores on disk, real faults, every array compared.

Stores are saved with ``parity=P`` over k source directories (4 KiB blocks, tensors whose sizes do
not divide the block size, one tensor longer than several stripes). Faults are real: source
directories renamed away or deleted, bits flipped in block files, manifests damaged byte by byte,
or reads routed through :class:`FaultySource` (errors, stalls, short reads, flipped bytes) or a
wrapper that makes one source slow. Every load must return byte-identical arrays or raise; no
array built from a lost or corrupt stripe may ever come out, and every model ends with no slot
held and no read in flight.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import anyio
import numpy as np
import pytest
from _stores import assert_same, block_path, read_manifest, source_dir, task_count
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import asyncload
from asyncload import (
    AsyncloadError,
    ChecksumError,
    IntegrityError,
    Manifest,
    ManifestError,
    SourceUnavailableError,
)
from asyncload._format import BlockRef, Stripe
from asyncload.codecs import StripeError
from asyncload.sources import Source, SourceStatistics
from asyncload.testing import FaultySource

BS = 4096
GEOMETRIES = [(3, 1), (4, 2), (6, 2), (10, 4)]  # (k sources, P parity blocks per stripe)


def make_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Sizes that do not divide 4 KiB, a scalar, and ``big`` (96,864 bytes: ~4 stripes at k=10, P=4)."""
    rng = np.random.default_rng(seed)
    return {
        "big": rng.integers(0, 1 << 30, size=(24, 1009), dtype=np.int32),
        "a.u8": rng.integers(0, 256, size=100, dtype=np.uint8),
        "b.f16": rng.integers(0, 1 << 10, size=1501).astype(np.float16),
        "c.f32": rng.integers(0, 1 << 20, size=(7, 429)).astype(np.float32),
        "d.i64": rng.integers(-(1 << 40), 1 << 40, size=3, dtype=np.int64),
        "f.u16": rng.integers(0, 1 << 16, size=2048, dtype=np.uint16),  # exactly 4 KiB, unaligned
        "g.scalar": np.array(-7, dtype=np.int64),
    }


def make_small(seed: int) -> dict[str, np.ndarray]:
    """About 26 KB: a handful of blocks, for the tests that visit every block one by one."""
    rng = np.random.default_rng(seed)
    return {
        "a.u8": rng.integers(0, 256, size=5000, dtype=np.uint8),
        "b.f32": rng.integers(0, 1 << 20, size=(3, 1001)).astype(np.float32),
        "c.i16": rng.integers(-(1 << 15), 1 << 15, size=4321, dtype=np.int16),
        "d.i64": rng.integers(-(1 << 40), 1 << 40, size=5, dtype=np.int64),
    }


def budget_for(k: int) -> int:
    return 2 * k * BS


async def save(
    root: pathlib.Path, k: int, parity: int, tensors: Mapping[str, np.ndarray], **kw: Any
) -> pathlib.Path:
    dirs = [root / f"d{i}" for i in range(k)]
    kw.setdefault("budget", budget_for(k))
    path = await asyncload.save(
        tensors, root / "m.asyncload.json", sources=dirs, block_size=BS, parity=parity, **kw
    )
    return pathlib.Path(path)


def assert_all_same(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    assert list(got) == list(sorted(want, key=list(got).index)) and set(got) == set(want)
    for name, arr in got.items():
        assert_same(name, arr, want)


def assert_idle(st: asyncload.LoaderStatistics) -> None:
    assert st.slots_in_use == 0, st
    assert st.bytes_in_slots == 0, st
    assert st.bytes_in_flight == 0, st
    assert st.reads_in_flight == 0, st
    assert st.reads_waiting_for_slot == 0, st


@contextlib.contextmanager
def renamed_away(dirs: Sequence[pathlib.Path]) -> Iterator[None]:
    """The directories vanish (renamed aside) for the duration, then come back."""
    moved: list[tuple[pathlib.Path, pathlib.Path]] = []
    try:
        for d in dirs:
            aside = d.with_name(d.name + ".gone")
            d.rename(aside)
            moved.append((d, aside))
        yield
    finally:
        for d, aside in moved:
            aside.rename(d)


def flip_bit(f: pathlib.Path, bit: int) -> None:
    data = bytearray(f.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    f.write_bytes(bytes(data))


def file_size(f: pathlib.Path) -> int:
    return f.stat().st_size


def parity_path(path: pathlib.Path, stripe: Stripe, r: int) -> pathlib.Path:
    p = stripe.parity[r]
    return source_dir(path, p.source).joinpath(*p.key.split("/"))


def stripe_sources(m: Manifest, stripe: Stripe) -> list[str]:
    return [m.blocks[b].source for b in stripe.blocks] + [p.source for p in stripe.parity]


def touching(m: Manifest, blocks: Sequence[BlockRef]) -> set[str]:
    return {t.name for t in m.tensors for b in blocks if t.nbytes and t.begin < b.end and b.offset < t.end}


def full_stripes(m: Manifest) -> list[Stripe]:
    width = len(m.sources) - m.parity
    return [s for s in m.stripes if len(s.blocks) == width]


def all_files(dirs: Sequence[pathlib.Path]) -> dict[str, bytes]:
    return {
        str(f.relative_to(d.parent)): f.read_bytes()
        for d in dirs
        for f in sorted(d.rglob("*"))
        if f.is_file()
    }


async def load_all(path: pathlib.Path, budget: int, **open_kw: Any) -> tuple[dict[str, np.ndarray], Any]:
    async with asyncload.open(path, budget=budget, **open_kw) as model:
        got = await model.load()
        st = model.statistics()
    return got, st


async def stream_until_error(
    path: pathlib.Path,
    originals: Mapping[str, np.ndarray],
    exc: type[BaseException],
    budget: int,
    **open_kw: Any,
) -> tuple[BaseException, set[str], Any]:
    """Stream everything, comparing each array as it comes; return (error, names yielded, statistics)."""
    yielded: set[str] = set()
    async with asyncload.open(path, budget=budget, **open_kw) as model:
        with anyio.fail_after(30), pytest.raises(exc) as info:
            async with model.stream() as s:
                async for name, arr in s:
                    assert_same(name, arr, originals)
                    yielded.add(name)
        st = model.statistics()
    return info.value, yielded, st


# --------------------------------------------------------------------------- losing whole sources


@pytest.mark.anyio
@pytest.mark.parametrize(("k", "parity"), GEOMETRIES, ids=[f"k{k}p{p}" for k, p in GEOMETRIES])
async def test_every_loss_of_p_sources_loads_byte_identical(
    tmp_path: pathlib.Path, k: int, parity: int
) -> None:
    tensors = make_tensors()
    path = await save(tmp_path, k, parity, tensors)
    m = read_manifest(path)
    assert m.parity == parity
    # More than k - P sources hold data a load reads: every loss pattern forces a rebuild.
    assert len({b.source for b in m.blocks if touching(m, [b])}) > k - parity
    assert all(len(s.parity) == parity for s in m.stripes)
    assert max(t.nbytes for t in m.tensors) > 3 * (k - parity) * BS  # a tensor spanning several stripes
    dirs = [source_dir(path, s.id) for s in m.sources]
    patterns = 0
    for lost in itertools.combinations(range(k), parity):
        lost_ids = {m.sources[i].id for i in lost}
        with renamed_away([dirs[i] for i in lost]):
            got, st = await load_all(path, budget_for(k))
        assert_all_same(got, tensors)
        assert_idle(st)
        assert st.rebuilt_blocks > 0, lost_ids
        assert set(st.down_sources) <= lost_ids
        assert all(st.bytes_read_per_source[i] == 0 for i in lost_ids)
        patterns += 1
    assert patterns == len(list(itertools.combinations(range(k), parity)))


@pytest.mark.anyio
@pytest.mark.parametrize(("k", "parity"), GEOMETRIES, ids=[f"k{k}p{p}" for k, p in GEOMETRIES])
async def test_losing_p_plus_one_sources_raises_stripe_error_and_no_wrong_bytes(
    tmp_path: pathlib.Path, k: int, parity: int
) -> None:
    tensors = make_tensors()
    path = await save(tmp_path, k, parity, tensors)
    m = read_manifest(path)
    dirs = [source_dir(path, s.id) for s in m.sources]
    tasks_before = task_count()
    for lost in itertools.combinations(range(k), parity + 1):
        lost_ids = {m.sources[i].id for i in lost}
        dead = [s for s in m.stripes if sum(src in lost_ids for src in stripe_sources(m, s)) > parity]
        assert dead  # every full stripe spans all k sources
        with renamed_away([dirs[i] for i in lost]):
            err, yielded, st = await stream_until_error(path, tensors, IntegrityError, budget_for(k))
        assert isinstance(err, StripeError) and isinstance(err, AsyncloadError), repr(err)
        msg = str(err)
        named = re.match(r"stripe (\d+) ", msg)
        assert named is not None, msg
        stripe = m.stripes[int(named.group(1))]
        assert stripe in dead, msg
        for src in set(stripe_sources(m, stripe)) & lost_ids:
            assert repr(src) in msg, (src, msg)
        assert not yielded & touching(m, [m.blocks[b] for s in dead for b in s.blocks])
        assert_idle(st)
    assert task_count() == tasks_before


@pytest.mark.anyio
@pytest.mark.parametrize(("k", "parity"), GEOMETRIES, ids=[f"k{k}p{p}" for k, p in GEOMETRIES])
async def test_p_plus_one_lost_blocks_of_one_stripe_fail_only_that_stripe(
    tmp_path: pathlib.Path, k: int, parity: int
) -> None:
    tensors = make_tensors()
    path = await save(tmp_path, k, parity, tensors)
    m = read_manifest(path)
    stripes = full_stripes(m)
    victim = stripes[len(stripes) // 2]
    # P + 1 of its members vanish: data blocks first, then parity when P + 1 > the data count.
    files = [block_path(path, m.blocks[b]) for b in victim.blocks]
    files += [parity_path(path, victim, r) for r in range(parity)]
    sources = stripe_sources(m, victim)[: parity + 1]
    for f in files[: parity + 1]:
        f.unlink()
    hurt = touching(m, [m.blocks[b] for b in victim.blocks])
    err, yielded, st = await stream_until_error(path, tensors, StripeError, budget_for(k))
    msg = str(err)
    assert msg.startswith(f"stripe {victim.index} ("), msg
    for src in sources:
        assert repr(src) in msg, (src, msg)
    assert not yielded & hurt
    assert_idle(st)
    # The other stripes still load, byte-identical.
    rest = [n for n in tensors if n not in hurt]
    async with asyncload.open(path, budget=budget_for(k)) as model:
        got = await model.load(rest)
        assert_idle(model.statistics())
    assert set(got) == set(rest)
    for name, arr in got.items():
        assert_same(name, arr, tensors)


@pytest.mark.anyio
@pytest.mark.parametrize(("k", "parity"), [(3, 1), (4, 2), (10, 4)], ids=["k3p1", "k4p2", "k10p4"])
async def test_the_smallest_budget_rebuilds_inside_k_slots(
    tmp_path: pathlib.Path, k: int, parity: int
) -> None:
    """S = k x m (the rule, checked up front) is enough to rebuild: data and parity slots never exceed k."""
    tensors = make_tensors(seed=13)
    path = await save(tmp_path, k, parity, tensors, budget=k * BS)
    m = read_manifest(path)
    dirs = [source_dir(path, s.id) for s in m.sources]
    patterns = list(itertools.combinations(range(k), parity))
    for lost in patterns[:: max(1, len(patterns) // 30)]:
        with renamed_away([dirs[i] for i in lost]):
            with anyio.fail_after(20):
                async with asyncload.open(path, budget=k * BS) as model:
                    got = await model.load()
                    st = model.statistics()
        assert_all_same(got, tensors)
        assert_idle(st)
        assert st.slots_total == k and st.peak_slots_in_use <= k and st.rebuilt_blocks > 0
    with pytest.raises(asyncload.BudgetError, match=f"{k} sources"):
        async with asyncload.open(path, budget=k * BS - 1):
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("seal", ["encrypted", "signed"])
async def test_sealed_stores_rebuild_every_loss_of_p_sources(tmp_path: pathlib.Path, seal: str) -> None:
    """Encrypted blocks (stored 16 bytes longer) and signed manifests (a sha256 per block) with parity."""
    tensors = make_tensors(seed=11)
    k, parity = 4, 2
    budget = 2 * k * (BS + 16)
    if seal == "encrypted":
        key = os.urandom(32)
        path = await save(tmp_path, k, parity, tensors, budget=budget, key=key)
        open_kw: dict[str, Any] = {"key": key}
    else:
        signer = Ed25519PrivateKey.generate()
        path = await save(tmp_path, k, parity, tensors, sign_key=signer)
        open_kw = {"verify_key": signer.public_key()}
    m = read_manifest(path)
    dirs = [source_dir(path, s.id) for s in m.sources]
    for lost in itertools.combinations(range(k), parity):
        with renamed_away([dirs[i] for i in lost]):
            got, st = await load_all(path, budget, **open_kw)
        assert_all_same(got, tensors)
        assert_idle(st)
        assert st.rebuilt_blocks > 0


@pytest.mark.anyio
@pytest.mark.parametrize("victim", ["s0", "s1", "s2", "s3"])
async def test_deleted_source_directory_loads_and_streams_without_copies(
    tmp_path: pathlib.Path, victim: str
) -> None:
    tensors = make_tensors(seed=5)
    path = await save(tmp_path, 4, 1, tensors)
    shutil.rmtree(source_dir(path, victim))
    got, st = await load_all(path, budget_for(4))
    assert_all_same(got, tensors)
    assert_idle(st)
    assert st.down_sources == (victim,) and st.rebuilt_blocks > 0
    assert st.bytes_read_per_source[victim] == 0
    seen: set[str] = set()
    async with asyncload.open(path, budget=budget_for(4)) as model:
        async with model.stream(copy=False) as s:
            async for name, arr in s:  # a view is valid until the next item: compare it now
                assert_same(name, arr, tensors)
                seen.add(name)
        assert_idle(model.statistics())
        assert model.statistics().down_sources == (victim,)
    assert seen == set(tensors)


@pytest.mark.anyio
async def test_cancelled_rebuild_gives_back_the_parity_slots_it_took(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: a rebuild cancelled between taking its first and its last parity slot leaked the
    ones it held (seen once in ~750 loads losing P + 1 of 10 sources). The cancellation is injected
    right after the first parity slot is handed out, where a sibling stripe's error can land."""
    tensors = make_tensors(seed=12)
    path = await save(tmp_path, 4, 2, tensors)
    m = read_manifest(path)
    (victim,) = data_keys_on(m, "s1", 1)
    async with asyncload.open(
        path, budget=budget_for(4), hedge=0, wrap_source=wrap_one("s1", {}, fail_keys=[victim.key])
    ) as model:
        ring = model._parity_ring
        assert ring is not None
        take = ring.acquire
        with anyio.CancelScope() as scope:

            async def acquire_then_cancel() -> Any:
                slot = await take()
                scope.cancel()  # what the task group does when another stripe fails
                return slot

            monkeypatch.setattr(ring, "acquire", acquire_then_cancel)
            await model.load()
        assert scope.cancelled_caught
        monkeypatch.undo()
        assert_idle(model.statistics())
        assert_all_same(await model.load(), tensors)  # and the model still works
        assert_idle(model.statistics())


# --------------------------------------------------------------------------- flipped bits in blocks


@pytest.mark.anyio
async def test_flipped_bit_in_any_block_without_parity_is_detected_on_every_read(
    tmp_path: pathlib.Path,
) -> None:
    tensors = make_small(seed=2)
    path = await save(tmp_path, 3, 0, tensors)
    m = read_manifest(path)
    rng = np.random.default_rng(11)
    read_blocks = [b for b in m.blocks if touching(m, [b])]
    assert len(read_blocks) >= 6
    for b in read_blocks:
        f = block_path(path, b)
        bit = int(rng.integers(0, 8 * b.length))
        flip_bit(f, bit)
        hurt = touching(m, [b])
        async with asyncload.open(path, budget=budget_for(3)) as model:
            for attempt in (1, 2):  # every read checks, not just the first
                with pytest.raises(ChecksumError) as info:
                    await model.load()
                msg = str(info.value)
                assert b.key in msg and repr(b.source) in msg and f"{b.crc32c:08x}" in msg, msg
                assert f"block {b.index} " in msg, msg
                st = model.statistics()
                assert st.checksum_failures == attempt
                assert_idle(st)
            # The tensors that do not need the block are still right.
            fine = [n for n in tensors if n not in hurt]
            got = await model.load(fine)
            for name, arr in got.items():
                assert_same(name, arr, tensors)
        flip_bit(f, bit)  # restore


@pytest.mark.anyio
@pytest.mark.parametrize(("k", "parity"), [(3, 1), (4, 2)], ids=["k3p1", "k4p2"])
async def test_flipped_bit_in_any_data_block_with_parity_is_rebuilt_on_every_read(
    tmp_path: pathlib.Path, k: int, parity: int
) -> None:
    tensors = make_small(seed=3)
    path = await save(tmp_path, k, parity, tensors)
    m = read_manifest(path)
    rng = np.random.default_rng(12)
    read_blocks = [b for b in m.blocks if touching(m, [b])]
    for b in read_blocks:
        f = block_path(path, b)
        bit = int(rng.integers(0, 8 * b.length))
        flip_bit(f, bit)
        async with asyncload.open(path, budget=budget_for(k), hedge=0) as model:
            for attempt in (1, 2):
                assert_all_same(await model.load(), tensors)
                st = model.statistics()
                assert st.checksum_failures == attempt, (b.index, st)
                assert st.rebuilt_blocks == attempt and st.degraded_reads == attempt
                assert_idle(st)
        flip_bit(f, bit)


@pytest.mark.anyio
@pytest.mark.parametrize(("k", "parity"), [(3, 1), (4, 2)], ids=["k3p1", "k4p2"])
async def test_flipped_bit_in_any_parity_block_is_never_used(
    tmp_path: pathlib.Path, k: int, parity: int
) -> None:
    """A healthy load does not read parity; when a rebuild needs a corrupt parity block, its checksum
    refuses it: with P = 1 the stripe fails (StripeError, nothing wrong yielded); with P = 2 the other
    parity block serves."""
    tensors = make_small(seed=4)
    path = await save(tmp_path, k, parity, tensors)
    m = read_manifest(path)
    rng = np.random.default_rng(13)
    rejected = 0
    for stripe in m.stripes:
        wanted = [m.blocks[b] for b in stripe.blocks if touching(m, [m.blocks[b]])]
        if not wanted:
            continue  # the header's stripe: a load never reads it
        failing = wanted[0]
        for r in range(parity):
            f = parity_path(path, stripe, r)
            bit = int(rng.integers(0, 8 * file_size(f)))
            flip_bit(f, bit)
            got, st = await load_all(path, budget_for(k), hedge=0)  # no hedging: no rebuild at all
            assert_all_same(got, tensors)
            assert st.checksum_failures == 0 and st.rebuilt_blocks == 0

            def wrap(src: Source, key: str = failing.key, sid: str = failing.source) -> Source:
                return FaultySource(src, fail_keys=[key]) if src.id == sid else src

            if parity == 1:
                err, yielded, st = await stream_until_error(
                    path, tensors, StripeError, budget_for(k), wrap_source=wrap, hedge=0
                )
                assert f"stripe {stripe.index} " in str(err) and "crc32c" in str(err), str(err)
                assert not yielded & touching(m, wanted)
            else:
                got, st = await load_all(path, budget_for(k), wrap_source=wrap, hedge=0)
                assert_all_same(got, tensors)
                assert st.rebuilt_blocks >= 1
            assert_idle(st)
            rejected += st.checksum_failures
            flip_bit(f, bit)
    assert rejected > 0  # the corrupt parity was read, and refused, at least once


# --------------------------------------------------------------------------- injected read faults


def wrap_one(source_id: str, holder: dict[str, Source], **faults: Any) -> Any:
    def wrap(src: Source) -> Source:
        if src.id != source_id:
            return src
        holder[src.id] = FaultySource(src, **faults)
        return holder[src.id]

    return wrap


@pytest.mark.anyio
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_errors_on_one_source_with_parity_load_exactly(
    tmp_path: pathlib.Path, seed: int
) -> None:
    tensors = make_tensors(seed=6)
    path = await save(tmp_path, 4, 1, tensors)
    held: dict[str, Source] = {}
    got, st = await load_all(
        path, budget_for(4), wrap_source=wrap_one("s1", held, seed=seed, error_rate=0.2), retries=0
    )
    assert_all_same(got, tensors)
    assert_idle(st)
    faulty = held["s1"]
    assert isinstance(faulty, FaultySource) and faulty.reads_failed > 0
    assert st.degraded_reads >= 1 and st.rebuilt_blocks >= 1


@pytest.mark.anyio
async def test_random_errors_on_one_source_with_replicas_load_exactly(tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(seed=6)
    root = tmp_path
    path = pathlib.Path(
        await asyncload.save(
            tensors,
            root / "m.json",
            sources=[root / f"d{i}" for i in range(3)],
            block_size=BS,
            budget=budget_for(3),
            replicas=2,
        )
    )
    held: dict[str, Source] = {}
    got, st = await load_all(
        path, budget_for(3), wrap_source=wrap_one("s1", held, seed=1, error_rate=0.2), retries=0
    )
    assert_all_same(got, tensors)
    assert_idle(st)
    faulty = held["s1"]
    assert isinstance(faulty, FaultySource) and faulty.reads_failed > 0
    assert st.degraded_reads >= faulty.reads_failed


@pytest.mark.anyio
async def test_random_errors_without_redundancy_fail_cleanly(tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(seed=6)
    path = await save(tmp_path, 3, 0, tensors)
    held: dict[str, Source] = {}
    err, yielded, st = await stream_until_error(
        path,
        tensors,
        SourceUnavailableError,
        budget_for(3),
        wrap_source=wrap_one("s1", held, seed=1, error_rate=0.2),
        retries=0,
    )
    assert "'s1'" in str(err) and "injected failure" in str(err)
    m = read_manifest(path)
    assert not yielded & touching(m, [b for b in m.blocks if b.key in str(err)])
    assert_idle(st)
    faulty = held["s1"]
    assert isinstance(faulty, FaultySource) and faulty.reads_failed > 0


def data_keys_on(m: Manifest, source_id: str, count: int) -> list[BlockRef]:
    """``count`` blocks on ``source_id`` that a load reads, each in a different stripe when striped."""
    picked: list[BlockRef] = []
    stripes: set[int] = set()
    stripe_of = {b: s.index for s in m.stripes for b in s.blocks}
    for b in m.blocks:
        if b.source == source_id and touching(m, [b]) and stripe_of.get(b.index, -1 - b.index) not in stripes:
            picked.append(b)
            stripes.add(stripe_of.get(b.index, -1 - b.index))
    assert len(picked) >= count
    return picked[:count]


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["timeout", "hedge"])
async def test_stalled_reads_with_parity_complete(tmp_path: pathlib.Path, how: str) -> None:
    tensors = make_tensors(seed=7)
    path = await save(tmp_path, 4, 1, tensors)
    m = read_manifest(path)
    stalled = data_keys_on(m, "s2", 3)
    held: dict[str, Source] = {}
    kw: dict[str, Any] = {"timeout": 0.5, "hedge": 0} if how == "timeout" else {"timeout": None}
    try:
        with anyio.fail_after(10):  # a stall must cost a timeout or a hedge, never the whole test
            got, st = await load_all(
                path,
                budget_for(4),
                wrap_source=wrap_one("s2", held, stall_keys=[b.key for b in stalled]),
                **kw,
            )
        assert_all_same(got, tensors)
        assert_idle(st)
        faulty = held["s2"]
        assert isinstance(faulty, FaultySource) and faulty.stalls >= 1 and faulty.stalled_now == 0
        if how == "timeout":
            assert st.read_timeouts >= 1
        else:
            assert st.hedged_reads >= 1
        assert st.rebuilt_blocks >= 1
    finally:
        for src in held.values():
            assert isinstance(src, FaultySource)
            src.release_stalls()


@pytest.mark.anyio
@pytest.mark.parametrize("retries", [0, 1])
async def test_stalled_read_without_redundancy_times_out_cleanly(
    tmp_path: pathlib.Path, retries: int
) -> None:
    tensors = make_tensors(seed=7)
    path = await save(tmp_path, 3, 0, tensors)
    m = read_manifest(path)
    (stalled,) = data_keys_on(m, "s1", 1)
    held: dict[str, Source] = {}
    try:
        with anyio.fail_after(15):
            err, yielded, st = await stream_until_error(
                path,
                tensors,
                SourceUnavailableError,
                budget_for(3),
                wrap_source=wrap_one("s1", held, stall_keys=[stalled.key]),
                timeout=0.5,
                retries=retries,
            )
        msg = str(err)
        assert "within 0.5 s" in msg and "'s1'" in msg and stalled.key in msg, msg
        assert st.read_timeouts == 1 + retries and st.read_retries == retries
        assert_idle(st)
        faulty = held["s1"]
        assert isinstance(faulty, FaultySource) and faulty.stalled_now == 0
        assert not yielded & touching(m, [stalled])
    finally:
        for src in held.values():
            assert isinstance(src, FaultySource)
            src.release_stalls()


@pytest.mark.anyio
async def test_truncated_and_corrupted_reads_with_parity_load_exactly(tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(seed=8)
    path = await save(tmp_path, 4, 2, tensors)
    m = read_manifest(path)
    # Two bad reads in one stripe (P = 2), and one in another stripe, on several sources.
    stripe = full_stripes(m)[1]
    a, b = (m.blocks[i] for i in stripe.blocks[:2])
    (c,) = [m.blocks[i] for i in full_stripes(m)[3].blocks[:1]]
    holders: dict[str, Source] = {}

    def wrap(src: Source) -> Source:
        truncate = [x.key for x in (a, c) if x.source == src.id]
        corrupt = [b.key] if b.source == src.id else []
        if not truncate and not corrupt:
            return src
        holders[src.id] = FaultySource(src, truncate_keys=truncate, corrupt_keys=corrupt)
        return holders[src.id]

    got, st = await load_all(path, budget_for(4), wrap_source=wrap, hedge=0)
    assert_all_same(got, tensors)
    assert_idle(st)
    assert st.checksum_failures >= 1  # b's flipped byte
    assert st.rebuilt_blocks >= 3


# --------------------------------------------------------------------------- a slow source


class SlowSource(Source):
    """Simulates a slow device: every read of ``inner`` first waits ``latency`` seconds."""

    def __init__(self, inner: Source, latency: float) -> None:
        super().__init__(inner.id, inner.location)
        self.inner = inner
        self.latency = latency
        self.reads_started = 0
        self.reads_done = 0
        self.running = 0
        self.peak_running = 0  # most reads in progress at once

    async def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        self.reads_started += 1
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            await anyio.sleep(self.latency)  # the simulated device latency, not synchronisation
            self.inner.threads = self.threads
            n = await self.inner.read_into(key, offset, buf)
        finally:
            self.running -= 1
        self.reads_done += 1
        return n

    async def size(self, key: str) -> int:
        return await self.inner.size(key)

    async def aclose(self) -> None:
        await self.inner.aclose()

    def statistics(self) -> SourceStatistics:
        return self.inner.statistics()


@pytest.mark.anyio
async def test_slow_source_is_hedged_and_read_around(tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(seed=9) | {"more": np.random.default_rng(1).integers(0, 255, 200_000, np.uint8)}
    path = await save(tmp_path, 4, 1, tensors)
    held: dict[str, SlowSource] = {}

    def wrap(src: Source) -> Source:
        if src.id != "s3":
            return src
        held["s3"] = SlowSource(src, latency=0.25)
        return held["s3"]

    with anyio.fail_after(30):
        got, st = await load_all(path, budget_for(4), wrap_source=wrap)
    assert_all_same(got, tensors)
    assert_idle(st)
    assert st.hedged_reads > 0
    assert "s3" in st.slow_sources
    assert st.rebuilt_blocks > 0
    m = read_manifest(path)
    on_s3 = [b for b in m.blocks if b.source == "s3" and touching(m, [b])]
    assert held["s3"].reads_done < len(on_s3)  # most of its blocks were rebuilt, not waited for
    # Slow start: a source gets a second read at once only after a first one at a healthy
    # pace, so the slow one never had more than one (reads_per_source is 4).
    assert held["s3"].peak_running == 1


def test_a_source_pace_is_its_own_not_one_read_s() -> None:
    from asyncload._scheduler import _Health

    alone, shared = _Health(), _Health()
    alone.record(0.4, 100)
    shared.record(0.4, 100, sharing=4)  # four reads at once, each a quarter of the bandwidth
    assert alone.sec_per_byte == pytest.approx(0.004)
    assert shared.sec_per_byte == pytest.approx(0.001)


@pytest.mark.anyio
@pytest.mark.parametrize("redundant", [False, True])
async def test_sources_start_with_one_read_only_where_blocks_can_be_read_elsewhere(
    tmp_path: pathlib.Path, redundant: bool
) -> None:
    from asyncload._config import Limits
    from asyncload._scheduler import BlockReader, open_reader
    from asyncload.sources import LocalSource

    tensors = make_tensors(seed=4)
    path = await save(tmp_path, 4, 1 if redundant else 0, tensors)
    m = read_manifest(path)
    sources = {s.id: LocalSource(s.id, source_dir(path, s.id)) for s in m.sources}
    limits = Limits(budget=budget_for(4), block_size=m.block_size, reads_per_source=3)
    reader: BlockReader = await open_reader(m, sources, limits)
    try:
        assert {lim.total_tokens for lim in reader.limiters.values()} == {1 if redundant else 3}
        if redundant:
            block = next(b for b in m.blocks if not b.missing)
            slot = reader.ring.try_acquire()
            assert slot is not None
            for grown in (2, 3, 3):  # each healthy read adds one, up to reads_per_source
                await reader.read_copy(block, block.source, slot)
                assert reader.limiters[block.source].total_tokens == grown
            reader.ring.release(slot)
    finally:
        reader.close()


# --------------------------------------------------------------------------- resume and dedupe


@pytest.mark.anyio
async def test_saving_the_same_tensors_again_reuses_every_block(tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(seed=10)
    dirs = [tmp_path / f"d{i}" for i in range(4)]
    await save(tmp_path, 4, 1, tensors)
    before = all_files(dirs)
    again = await asyncload.save(
        tensors, tmp_path / "m.asyncload.json", sources=dirs, block_size=BS, budget=budget_for(4), parity=1
    )
    elsewhere = await asyncload.save(
        tensors,
        tmp_path / "other.asyncload.json",
        sources=dirs,
        block_size=BS,
        budget=budget_for(4),
        parity=1,
    )
    assert again.bytes_written == 0 and elsewhere.bytes_written == 0
    assert again.bytes_reused == sum(len(v) for v in before.values())
    assert again.blocks_reused == len(before)
    assert all_files(dirs) == before  # no new file, none changed
    got, st = await load_all(pathlib.Path(again), budget_for(4))
    assert_all_same(got, tensors)
    assert_idle(st)


@pytest.mark.anyio
async def test_first_save_writes_what_a_second_reuses(tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(seed=10)
    dirs = [tmp_path / f"d{i}" for i in range(4)]
    first = await asyncload.save(
        tensors, tmp_path / "m.asyncload.json", sources=dirs, block_size=BS, budget=budget_for(4), parity=2
    )
    assert first.bytes_reused == 0 and first.bytes_written == sum(len(v) for v in all_files(dirs).values())
    second = await asyncload.save(
        tensors, tmp_path / "m.asyncload.json", sources=dirs, block_size=BS, budget=budget_for(4), parity=2
    )
    assert second.bytes_reused == first.bytes_written and second.bytes_written == 0


def stored_objects(m: Manifest) -> dict[tuple[str, str], int]:
    """(source, key) -> stored length of every data and parity object of a striped manifest."""
    out = {(b.source, b.key): b.length + m.block_overhead for b in m.blocks}
    for s in m.stripes:
        out.update({(p.source, p.key): s.length for p in s.parity})
    return out


@pytest.mark.anyio
async def test_a_new_version_with_one_tensor_changed_reuses_the_other_blocks(tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(seed=10)
    dirs = [tmp_path / f"d{i}" for i in range(4)]
    v1 = pathlib.Path(
        await asyncload.save(
            tensors,
            tmp_path / "v1.asyncload.json",
            sources=dirs,
            block_size=BS,
            budget=budget_for(4),
            parity=1,
        )
    )
    changed = dict(tensors)
    changed["c.f32"] = tensors["c.f32"] + 1  # same name, dtype and shape: only its bytes differ
    v2 = await asyncload.save(
        changed, tmp_path / "v2.asyncload.json", sources=dirs, block_size=BS, budget=budget_for(4), parity=1
    )
    m1, m2 = read_manifest(v1), read_manifest(pathlib.Path(v2))
    old, new = stored_objects(m1), stored_objects(m2)
    fresh = {k: n for k, n in new.items() if k not in old}
    # Only the blocks holding the changed tensor, and the parity of their stripes, are new.
    hurt = [b for b in m2.blocks if touching(m2, [b]) & {"c.f32"}]
    hurt_stripes = [s for s in m2.stripes if set(s.blocks) & {b.index for b in hurt}]
    allowed = {(b.source, b.key) for b in hurt} | {(p.source, p.key) for s in hurt_stripes for p in s.parity}
    assert fresh and set(fresh) <= allowed
    assert v2.bytes_written == sum(fresh.values())
    assert v2.blocks_reused == len(new) - len(fresh)
    assert v2.bytes_reused == sum(new.values()) - sum(fresh.values())
    assert v2.bytes_reused > 3 * v2.bytes_written  # most of the store is shared
    for p, want in ((v1, tensors), (pathlib.Path(v2), changed)):
        got, _ = await load_all(p, budget_for(4))
        assert_all_same(got, want)


@pytest.mark.anyio
@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
async def test_a_damaged_block_is_rewritten_not_reused(tmp_path: pathlib.Path, damage: str) -> None:
    tensors = make_tensors(seed=10)
    path = await save(tmp_path, 4, 1, tensors)
    m = read_manifest(path)
    dirs = [source_dir(path, s.id) for s in m.sources]
    victim = [b for b in m.blocks if touching(m, [b])][5]
    f = block_path(path, victim)
    good = f.read_bytes()
    total = sum(len(v) for v in all_files(dirs).values())
    if damage == "flip":
        flip_bit(f, 8 * victim.length // 2 + 3)
    elif damage == "truncate":
        f.write_bytes(good[:-1])
    else:
        f.unlink()
    again = await asyncload.save(
        tensors, tmp_path / "m.asyncload.json", sources=dirs, block_size=BS, budget=budget_for(4), parity=1
    )
    assert again.bytes_written == victim.length
    assert again.bytes_reused == total - victim.length
    assert read_manifest(pathlib.Path(again)).blocks == m.blocks
    assert f.read_bytes() == good
    got, st = await load_all(pathlib.Path(again), budget_for(4), hedge=0)
    assert_all_same(got, tensors)
    assert st.checksum_failures == 0 and st.rebuilt_blocks == 0
    report = await asyncload.verify(again, budget=budget_for(4))  # every data and parity block
    assert report.ok and report.parity_blocks > 0, report


# --------------------------------------------------------------------------- flipped manifest bytes


async def small_store(root: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """A plain (unsealed) k=3, P=1 store whose manifest is about 2.5 KB."""
    rng = np.random.default_rng(3)
    tensors: dict[str, np.ndarray] = {
        "a": rng.integers(0, 256, size=5000, dtype=np.uint8),
        "b": rng.integers(0, 1 << 20, size=(3, 700), dtype=np.int32),
    }
    dirs = [root / f"d{i}" for i in range(3)]
    path = await asyncload.save(
        tensors, root / "m.asyncload.json", sources=dirs, block_size=BS, budget=6 * BS, parity=1
    )
    return pathlib.Path(path), tensors


def flipped(data: bytes, i: int, bit: int) -> bytes:
    out = bytearray(data)
    out[i] ^= 1 << bit
    return bytes(out)


@pytest.mark.anyio
async def test_every_flipped_manifest_bit_is_rejected(tmp_path: pathlib.Path) -> None:
    """Every bit of every byte, through the parser; through ``open()``, one bit of every 16th byte."""
    path, _ = await small_store(tmp_path)
    original = path.read_bytes()
    assert b'"digest"' in original and b'"stripes"' in original
    Manifest.from_json(original)
    accepted = []
    for i in range(len(original)):
        for bit in range(8):
            try:
                Manifest.from_json(flipped(original, i, bit))
            except ManifestError:
                continue
            accepted.append((i, bit, original[max(0, i - 20) : i + 4]))
    assert not accepted, f"{len(accepted)} flipped bits parse, e.g. {accepted[:5]}"
    try:
        for i in range(0, len(original), 16):
            path.write_bytes(flipped(original, i, i % 8))
            with pytest.raises(ManifestError, match=re.escape(str(path))):
                async with asyncload.open(path, budget=6 * BS):
                    pass
    finally:
        path.write_bytes(original)


def without_digest(data: bytes) -> bytes:
    """The manifest as a writer from before the digest would have left it (old manifests still load)."""
    doc = json.loads(data)
    del doc["digest"]
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


@pytest.mark.anyio
async def test_flipped_bit_in_a_manifest_without_digest_never_yields_wrong_bytes(
    tmp_path: pathlib.Path,
) -> None:
    """An old manifest has no digest, so some flips parse (a block or parity key, a parity crc32c, a
    source location, the id, a file path, a tensor name, block_size, a stripe length). Whatever one
    flipped bit does, a load either raises or returns, for each tensor the altered manifest names,
    exactly the bytes stored at its offsets: a lost key is rebuilt from parity and checked."""
    path, tensors = await small_store(tmp_path)
    original = without_digest(path.read_bytes())
    m0 = Manifest.from_json(original)
    stream = bytearray(m0.total_size)
    for t in m0.tensors:
        stream[t.begin : t.end] = tensors[t.name].tobytes()
    loaded = 0
    try:
        for i in range(len(original)):
            data = flipped(original, i, i % 8)
            try:
                m = Manifest.from_json(data)
            except ManifestError:
                continue
            if m == m0:
                continue  # e.g. a crc32c hex digit's case
            path.write_bytes(data)
            try:
                got, st = await load_all(path, 6 * BS)
            except AsyncloadError:
                continue
            assert_idle(st)
            assert set(got) == {t.name for t in m.tensors}
            for t in m.tensors:
                assert got[t.name].tobytes() == bytes(stream[t.begin : t.end]), (i, t)
            loaded += 1
    finally:
        path.write_bytes(original)
    assert loaded > 0  # without a digest such flips do get through: the digest is what rejects them
