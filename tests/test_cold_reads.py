"""LocalSource reads: what the page cache holds is read in a worker thread, what must come
from the disk waits in one of the source's I/O threads; bytes are exact either way.

Files are evicted from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` after an
fsync (clean pages are dropped at once), so the cold path is exercised for real.
"""

from __future__ import annotations

import errno
import gc
import os
import pathlib
import sys

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from _stores import evict, random_bytes, write_synced

from asyncload.sources import LocalSource, _local

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not sys.platform.startswith("linux") or not _local._RWF_NOWAIT, reason="RWF_NOWAIT"),
]

MiB = 1 << 20


async def test_a_cold_read_waits_for_the_disk_in_an_io_thread(tmp_path: pathlib.Path) -> None:
    data = random_bytes(8 * MiB + 123)
    write_synced(tmp_path / "blk", data)
    evict(tmp_path / "blk")
    src = LocalSource("s", tmp_path)
    buf = bytearray(len(data))
    assert await src.read_into("blk", 0, memoryview(buf)) == len(data)
    assert buf == data
    assert src.statistics().uncached_reads == 1 and src._io_threads is not None
    buf[:] = bytes(len(buf))
    assert await src.read_into("blk", 0, memoryview(buf)) == len(data)  # now in the page cache
    assert buf == data
    assert src.statistics().uncached_reads == 1


async def test_a_warm_read_never_needs_an_io_thread(tmp_path: pathlib.Path) -> None:
    data = random_bytes(3 * MiB, 1)
    write_synced(tmp_path / "blk", data)
    (tmp_path / "blk").read_bytes()  # cached
    src = LocalSource("s", tmp_path)
    buf = bytearray(4 * MiB)  # longer than the file: a short read at its end is not a miss
    assert await src.read_into("blk", 0, memoryview(buf)) == len(data)
    assert bytes(buf[: len(data)]) == data
    assert (
        await src.read_into("blk", MiB, memoryview(buf)[:10]) == 10
        and bytes(buf[:10]) == data[MiB : MiB + 10]
    )
    assert src.statistics().uncached_reads == 0 and src._io_threads is None


async def test_ranged_reads_of_a_partly_cached_file_are_exact(tmp_path: pathlib.Path) -> None:
    data = random_bytes(6 * MiB + 7, 2)
    write_synced(tmp_path / "blk", data)
    src = LocalSource("s", tmp_path)
    rng = np.random.default_rng(3)
    for _ in range(20):
        evict(tmp_path / "blk")
        lo = int(rng.integers(0, len(data)))
        n = int(rng.integers(0, len(data) - lo + 1))
        await src.read_into("blk", lo, memoryview(bytearray(n // 2)))  # warm some of it
        buf = bytearray(len(data) - lo)
        assert await src.read_into("blk", lo, memoryview(buf)) == len(data) - lo
        assert buf == data[lo:]


async def test_a_file_system_without_nonblocking_reads_is_read_plainly(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random_bytes(2 * MiB + 5, 4)
    write_synced(tmp_path / "blk", data)
    real = os.preadv
    refused: list[int] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        if flags:
            refused.append(flags)
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    src = LocalSource("s", tmp_path)
    for _ in range(3):
        buf = bytearray(len(data))
        assert await src.read_into("blk", 0, memoryview(buf)) == len(data)
        assert buf == data
    assert len(refused) == 1  # asked once, then never again


async def test_cancelled_cold_reads_leave_no_file_open(tmp_path: pathlib.Path) -> None:
    data = random_bytes(4 * MiB, 5)
    write_synced(tmp_path / "blk", data)
    src = LocalSource("s", tmp_path)
    gc.collect()  # fds that earlier tests' rings hold until collected go now, not mid-count
    before = len(os.listdir("/proc/self/fd"))
    for i in range(10):
        evict(tmp_path / "blk")
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(src.read_into, "blk", 0, memoryview(bytearray(len(data))))
                for _ in range(i):
                    await anyio.lowlevel.checkpoint()
                scope.cancel()
    assert len(os.listdir("/proc/self/fd")) == before
    assert src.statistics().in_flight == 0
