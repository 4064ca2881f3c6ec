"""ThrottledSource: bytes pass through unchanged, one bandwidth bucket is shared by all reads of a
source, latency is added per read, and every wait is cancellable.

Times are only ever checked from below (a throttled read cannot be faster than its bytes allow);
a loaded machine may always be slower, so no test asserts an upper time bound.
"""

from __future__ import annotations

import pathlib

import anyio
import numpy as np
import pytest
from _stores import KiB, assert_same, make_tensors, wait_until

import asyncload
from asyncload import BlockNotFoundError
from asyncload.sources import Source
from asyncload.sources._memory import MemorySource
from asyncload.testing import ThrottledSource

pytestmark = pytest.mark.anyio


def _memory(key: str, nbytes: int, seed: int = 0) -> tuple[MemorySource, bytes]:
    data = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    src = MemorySource("m0")
    src.objects[key] = data
    return src, data


async def _read(src: Source, key: str, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    n = await src.read_into(key, offset, memoryview(buf))
    return bytes(buf[:n])


async def test_reads_are_byte_identical_and_short_only_at_the_end() -> None:
    inner, data = _memory("a/blk", 300 * KiB + 7, seed=3)
    src = ThrottledSource(inner, bandwidth=64e6, latency=0.001, jitter=0.5, seed=1)
    for offset, length in [(0, len(data)), (0, 1), (4095, 8193), (len(data) - 10, 10), (100, 1 << 20)]:
        got = await _read(src, "a/blk", offset, length)
        assert got == data[offset : offset + length], (offset, length)
    assert await _read(src, "a/blk", len(data), 16) == b""
    with pytest.raises(BlockNotFoundError):
        await _read(src, "a/missing", 0, 16)
    assert src.reads_started == src.reads_finished == 7
    assert src.statistics() == inner.statistics()  # forwarded: the inner source counts the bytes


async def test_writes_sizes_and_deletes_pass_through() -> None:
    inner = MemorySource("m0")
    src = ThrottledSource(inner, bandwidth=1e6)
    assert src.supports_writes and src.id == "m0" and src.location == inner.location
    await src.write("k/x", memoryview(b"hello world"))
    assert inner.objects["k/x"] == b"hello world"
    assert await src.size("k/x") == 11
    assert await src.exists("k/x")
    await src.delete("k/x")
    assert not await src.exists("k/x")
    assert src.statistics().writes == 1


@pytest.mark.parametrize(
    "kwargs", [{"bandwidth": 0}, {"bandwidth": -1.0}, {"latency": -0.1}, {"jitter": 1.5}]
)
def test_bad_arguments_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ThrottledSource(MemorySource(), **kwargs)


async def test_one_read_takes_at_least_its_bytes_over_the_bandwidth() -> None:
    rate, n = float(1 << 20), 512 * KiB
    inner, data = _memory("b", n)
    src = ThrottledSource(inner, bandwidth=rate)
    burst = src._bucket.capacity if src._bucket else 0  # credit an idle device starts with
    t0 = anyio.current_time()
    assert await _read(src, "b", 0, n) == data
    assert anyio.current_time() - t0 >= 0.9 * (n - burst) / rate
    assert src.throttled_s > 0


async def test_the_bucket_is_shared_by_concurrent_reads() -> None:
    """Two concurrent reads of N bytes at X B/s take about 2N/X, not N/X: the bandwidth is the
    source's, not each read's."""
    rate, n = float(1 << 20), 512 * KiB
    inner, data = _memory("b", n)
    src = ThrottledSource(inner, bandwidth=rate)
    burst = src._bucket.capacity if src._bucket else 0
    got: list[bytes] = []

    async def one() -> None:
        got.append(await _read(src, "b", 0, n))

    t0 = anyio.current_time()
    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        tg.start_soon(one)
    elapsed = anyio.current_time() - t0
    assert got == [data, data]
    assert elapsed >= 0.9 * (2 * n - burst) / rate


async def test_latency_is_added_to_every_read() -> None:
    inner, data = _memory("c", 1000)
    src = ThrottledSource(inner, latency=0.05)
    t0 = anyio.current_time()
    for _ in range(3):
        assert await _read(src, "c", 0, 1000) == data
    assert anyio.current_time() - t0 >= 0.9 * 3 * 0.05


async def test_a_read_waiting_for_latency_is_cancellable() -> None:
    inner, _ = _memory("d", 1000)
    src = ThrottledSource(inner, latency=3600.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(_read, src, "d", 0, 1000)
        await wait_until(lambda: src.reads_started == 1, what="the read started")
        tg.cancel_scope.cancel()
    assert src.reads_finished == 1
    assert inner.statistics().reads == 0  # cancelled before it reached the inner source


async def test_reads_waiting_for_bandwidth_are_cancellable_and_release_the_bucket() -> None:
    """Two reads queue on a bucket that would take hours; cancelling them ends both, and the
    bucket is not left locked: a small read then completes."""
    inner, data = _memory("e", 4 << 20)
    src = ThrottledSource(inner, bandwidth=1000.0)  # 4 MiB at 1 kB/s: over an hour each
    async with anyio.create_task_group() as tg:
        tg.start_soon(_read, src, "e", 0, 4 << 20)
        tg.start_soon(_read, src, "e", 0, 4 << 20)
        await wait_until(lambda: inner.statistics().reads == 2, what="both reads reached the bucket")
        tg.cancel_scope.cancel()
    assert src.reads_started == src.reads_finished == 2
    # The bucket is not left locked and no credit was lost to the cancelled waits: a 16-byte read
    # needs 16 ms of credit at 1 kB/s and completes (a stuck lock would hang until the test timeout).
    assert await _read(src, "e", 0, 16) == data[:16]
    assert src.reads_finished == 3


async def test_a_store_with_parity_loads_byte_identical_through_throttled_sources(
    tmp_path: pathlib.Path,
) -> None:
    tensors = make_tensors(40, seed=7, max_bytes=24 * KiB)
    dirs = [tmp_path / f"d{i}" for i in range(4)]
    path = await asyncload.save(
        tensors, tmp_path / "m.asyncload.json", sources=dirs, block_size=4 * KiB, budget=64 * KiB, parity=1
    )
    wrapped: list[ThrottledSource] = []

    def wrap(s: Source) -> Source:
        slow = not wrapped  # the first source is 10x slower than the rest
        wrapped.append(ThrottledSource(s, bandwidth=2e6 if slow else 20e6, latency=0.0005, seed=len(wrapped)))
        return wrapped[-1]

    async with asyncload.open(path, budget=64 * KiB, wrap_source=wrap) as model:
        got = await model.load()
        stats = model.statistics()
    assert set(got) == set(tensors)
    for name, arr in got.items():
        assert_same(name, arr, tensors)
    assert len(wrapped) == 4
    assert all(w.reads_started == w.reads_finished for w in wrapped)
    assert stats.slots_in_use == 0 and stats.reads_in_flight == 0
