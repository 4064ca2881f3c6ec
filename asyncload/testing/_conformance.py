"""One conformance suite for every :class:`~asyncload.sources.Source`: subclass it in a test module.

::

    import pytest
    from asyncload.testing import SourceConformance

    class TestMySource(SourceConformance):
        @pytest.fixture
        async def source(self, tmp_path):            # a fresh, empty, writable source
            src = MySource("t", ...)
            yield src
            await src.aclose()

        @pytest.fixture
        def unreachable_source(self):                # optional: one whose backend cannot be reached
            return MySource("gone", "...")

Every test is an ``anyio`` test (the project runs them on asyncio and uvloop).
Keys are fresh per test, so a source may share its backend with other tests.
What is checked: ranged reads at every boundary (offset 0, 1, the last
byte, the exact end, past the end, empty and odd-sized buffers), bytes past
the count returned left untouched, missing and unsafe keys as
:class:`~asyncload.BlockNotFoundError`, writes then reads, overwrites,
empty objects, sizes, ``exists``, ``delete``, many concurrent reads and
writes, statistics, and an unreachable backend as a
:class:`~asyncload.SourceError`, never a foreign exception.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator

import anyio
import numpy as np
import pytest

from .._exceptions import AsyncloadError, BlockNotFoundError, SourceError
from ..sources import Source

__all__ = ["SourceConformance"]

_SIZE = 10_007  # odd, prime: no read size divides it
_FILL = 0xA5  # what a buffer holds before a read; bytes past the count must still hold it


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class SourceConformance:
    """Base class of the source conformance tests; see the module docstring for how to use it."""

    pytestmark = pytest.mark.anyio

    #: Seconds an operation on :meth:`unreachable_source` may take to fail.
    unreachable_within: float = 30.0

    @pytest.fixture
    async def source(self) -> AsyncIterator[Source]:
        """Override: yield a fresh, empty, writable source (and close it afterwards)."""
        raise NotImplementedError("subclass SourceConformance and define the `source` fixture")
        yield  # pragma: no cover

    @pytest.fixture
    def unreachable_source(self) -> Source | None:
        """Override: a source whose backend cannot be reached; ``None`` skips that test."""
        return None

    @staticmethod
    def key(name: str = "obj") -> str:
        """A fresh key, nested like block keys are (``<checkpoint>/<name>``)."""
        return f"t{uuid.uuid4().hex[:12]}/{name}"

    @staticmethod
    async def put(source: Source, key: str, data: bytes) -> None:
        await source.write(key, memoryview(data))

    # -- writes, sizes, existence ------------------------------------------------------
    async def test_write_then_size_exists_and_read(self, source: Source) -> None:
        key, data = self.key(), _data(_SIZE, 1)
        assert not await source.exists(key)
        await self.put(source, key, data)
        assert await source.exists(key)
        assert await source.size(key) == _SIZE
        buf = bytearray(_SIZE)
        assert await source.read_into(key, 0, memoryview(buf)) == _SIZE
        assert bytes(buf) == data

    async def test_overwrite_replaces_the_whole_object(self, source: Source) -> None:
        key = self.key()
        await self.put(source, key, _data(_SIZE, 2))
        shorter = _data(_SIZE // 3, 3)
        await self.put(source, key, shorter)
        assert await source.size(key) == len(shorter)
        buf = bytearray(_SIZE)
        assert await source.read_into(key, 0, memoryview(buf)) == len(shorter)
        assert bytes(buf[: len(shorter)]) == shorter

    async def test_empty_object(self, source: Source) -> None:
        key = self.key("empty")
        await self.put(source, key, b"")
        assert await source.exists(key)
        assert await source.size(key) == 0
        buf = bytearray([_FILL] * 8)
        assert await source.read_into(key, 0, memoryview(buf)) == 0
        assert bytes(buf) == bytes([_FILL] * 8)

    async def test_write_from_a_slice_of_a_larger_buffer(self, source: Source) -> None:
        big = _data(3 * 4096, 4)
        key = self.key()
        await source.write(key, memoryview(big)[1000:5097])
        buf = bytearray(4097)
        assert await source.read_into(key, 0, memoryview(buf)) == 4097
        assert bytes(buf) == big[1000:5097]

    async def test_deeply_nested_key(self, source: Source) -> None:
        key = self.key("a/b/c/d.bin")
        await self.put(source, key, b"nested")
        buf = bytearray(6)
        assert await source.read_into(key, 0, memoryview(buf)) == 6 and bytes(buf) == b"nested"

    async def test_delete(self, source: Source) -> None:
        key = self.key()
        await self.put(source, key, b"gone soon")
        await source.delete(key)
        assert not await source.exists(key)
        with pytest.raises(BlockNotFoundError):
            await source.read_into(key, 0, memoryview(bytearray(4)))
        await source.delete(key)  # deleting what is not there is not an error

    # -- reads ---------------------------------------------------------------------------
    @pytest.mark.parametrize(
        "offset",
        [0, 1, 4095, 4096, 4097, _SIZE // 2, _SIZE - 2, _SIZE - 1, _SIZE, _SIZE + 1, 10 * _SIZE],
    )
    async def test_ranged_reads_at_every_boundary(self, source: Source, offset: int) -> None:
        key, data = self.key(), _data(_SIZE, 5)
        await self.put(source, key, data)
        for length in (0, 1, 2, 7, 4096, 4097, _SIZE - offset, _SIZE - offset + 1, _SIZE, _SIZE + 13):
            if length < 0:
                continue
            buf = bytearray([_FILL]) * length
            n = await source.read_into(key, offset, memoryview(buf))
            want = data[offset : offset + length]
            assert n == len(want), f"offset {offset} length {length}: {n} bytes, want {len(want)}"
            assert bytes(buf[:n]) == want, f"offset {offset} length {length}: wrong bytes"
            assert buf[n:] == bytearray([_FILL]) * (length - n), "bytes past the count were written"

    async def test_read_into_numpy_memory(self, source: Source) -> None:
        key, data = self.key(), _data(3 * 4096 + 5, 6)
        await self.put(source, key, data)
        arr = np.full(len(data) + 100, _FILL, dtype=np.uint8)
        view = arr.data[50 : 50 + len(data)]
        assert await source.read_into(key, 0, view) == len(data)
        assert arr[50 : 50 + len(data)].tobytes() == data
        assert (arr[:50] == _FILL).all() and (arr[50 + len(data) :] == _FILL).all()

    async def test_large_object_in_one_read(self, source: Source) -> None:
        key, data = self.key(), _data(3 * 1024 * 1024 + 17, 7)
        await self.put(source, key, data)
        buf = bytearray(len(data))
        assert await source.read_into(key, 0, memoryview(buf)) == len(data)
        assert buf == data

    async def test_many_concurrent_reads(self, source: Source) -> None:
        keys = [self.key(f"c{i}") for i in range(4)]
        datas = [_data(64 * 1024 + i, 10 + i) for i in range(4)]
        for k, d in zip(keys, datas, strict=True):
            await self.put(source, k, d)
        rng = random.Random(8)
        jobs = []
        for _ in range(64):
            i = rng.randrange(4)
            off = rng.randrange(len(datas[i]) + 10)
            jobs.append((i, off, rng.randrange(1, 20_000)))
        results: list[tuple[int, bytes]] = [(0, b"")] * len(jobs)

        async def one(j: int) -> None:
            i, off, n = jobs[j]
            buf = bytearray(n)
            got = await source.read_into(keys[i], off, memoryview(buf))
            results[j] = (got, bytes(buf[:got]))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for j in range(len(jobs)):
                    tg.start_soon(one, j)
        for (i, off, n), (got, b) in zip(jobs, results, strict=True):
            assert b == datas[i][off : off + n] and got == len(b)
        assert source.statistics().in_flight == 0

    async def test_many_concurrent_writes(self, source: Source) -> None:
        items = {self.key(f"w{i}"): _data(1000 + 37 * i, 30 + i) for i in range(24)}
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for k, d in items.items():
                    tg.start_soon(self.put, source, k, d)
        for k, d in items.items():
            buf = bytearray(len(d))
            assert await source.read_into(k, 0, memoryview(buf)) == len(d) and buf == d

    async def test_statistics_count_reads_and_writes(self, source: Source) -> None:
        before = source.statistics()
        key = self.key()
        await self.put(source, key, b"x" * 100)
        await source.read_into(key, 10, memoryview(bytearray(50)))
        st = source.statistics()
        assert st.writes == before.writes + 1 and st.bytes_written == before.bytes_written + 100
        assert st.reads == before.reads + 1 and st.bytes_read == before.bytes_read + 50
        assert st.in_flight == 0

    # -- errors ----------------------------------------------------------------------------
    async def test_missing_key_is_block_not_found(self, source: Source) -> None:
        key = self.key("missing")
        for op in ("read", "size", "empty-read"):
            with pytest.raises(BlockNotFoundError) as info:
                if op == "read":
                    await source.read_into(key, 0, memoryview(bytearray(10)))
                elif op == "size":
                    await source.size(key)
                else:
                    await source.read_into(key, 0, memoryview(bytearray(0)))
            err = info.value
            assert isinstance(err, FileNotFoundError) and isinstance(err, AsyncloadError)
            assert key in str(err) and repr(source.id) in str(err), str(err)
        assert not await source.exists(key)

    @pytest.mark.parametrize("bad", ["../escape", "a/../../escape", "/abs", "a//b", "./a", "a/"])
    async def test_unsafe_keys_are_not_found(self, source: Source, bad: str) -> None:
        with pytest.raises(BlockNotFoundError):
            await source.read_into(bad, 0, memoryview(bytearray(4)))

    async def test_unreachable_backend_is_a_source_error(self, unreachable_source: Source | None) -> None:
        if unreachable_source is None:
            pytest.skip("this source has no unreachable backend to test")
        src = unreachable_source
        try:
            for op in ("read", "size", "write"):
                with anyio.fail_after(self.unreachable_within), pytest.raises(SourceError) as info:
                    if op == "read":
                        await src.read_into(self.key(), 0, memoryview(bytearray(10)))
                    elif op == "size":
                        await src.size(self.key())
                    else:
                        await src.write(self.key(), memoryview(b"data"))
                assert repr(src.id) in str(info.value), str(info.value)
            assert src.statistics().in_flight == 0
        finally:
            await src.aclose()
