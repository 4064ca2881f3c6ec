"""Block files written with O_DIRECT: exact bytes whatever the length and alignment, and a
clean fall back to the page cache where direct I/O is refused.

``os.write`` is wrapped to record, for every call, how many bytes it was given and whether
the file descriptor had ``O_DIRECT`` set at that moment; the file's bytes are then read back.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import pathlib
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncload.sources import _local
from asyncload.sources._local import DIRECT_ALIGN, write_file_atomic_at

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux's"
)


def _aligned(n: int) -> np.ndarray:
    """``n`` bytes of page-aligned memory (an anonymous mapping), filled with a pattern."""
    mem = np.frombuffer(mmap.mmap(-1, max(n, 1)), dtype=np.uint8)[:n]
    mem[:] = (np.arange(n) * 7 + 3) % 251
    return mem


def _record_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """From now on, every ``os.write``: (bytes given, whether its fd had O_DIRECT set)."""
    calls: list[tuple[int, bool]] = []
    real = os.write

    def recording_write(fd: int, buf: memoryview | bytes) -> int:
        calls.append((len(buf), bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)))
        return real(fd, buf)

    monkeypatch.setattr(os, "write", recording_write)
    return calls


def _write(tmp: pathlib.Path, data: memoryview, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    calls = _record_writes(monkeypatch)
    dfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        write_file_atomic_at(dfd, "block", data, direct=True)
    finally:
        os.close(dfd)
        monkeypatch.undo()
    return calls


@settings(max_examples=30)
@given(n=st.integers(0, 5 * DIRECT_ALIGN + 100), shift=st.sampled_from([0, 0, 1, 512]))
def test_direct_writes_store_exact_bytes(
    tmp_path_factory: pytest.TempPathFactory, n: int, shift: int
) -> None:
    tmp = tmp_path_factory.mktemp("direct")
    mem = _aligned(n + shift)
    data = memoryview(mem[shift:])
    with pytest.MonkeyPatch.context() as mp:
        calls = _write(tmp, data, mp)
    assert (tmp / "block").read_bytes() == data.tobytes()
    assert sum(size for size, _ in calls) == n
    head = n // DIRECT_ALIGN * DIRECT_ALIGN
    direct = [size for size, on in calls if on]
    if shift == 0 and head:
        assert sum(direct) == head  # the aligned head went around the page cache
    else:
        assert direct == []  # unaligned memory or under a page: all of it buffered
    assert all(not on for size, on in calls[len(direct) :])  # the tail never with O_DIRECT


def test_a_file_system_without_direct_io_gets_buffered_writes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fd: int, on: bool) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(_local, "_set_direct", refuse)
    data = memoryview(_aligned(3 * DIRECT_ALIGN + 5))
    calls = _write(tmp_path, data, monkeypatch)
    assert (tmp_path / "block").read_bytes() == data.tobytes()
    assert calls and not any(on for _, on in calls)


def test_another_error_from_direct_io_fails_the_write_and_leaves_no_file(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int, on: bool) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_local, "_set_direct", broken)
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError, match="Input/output"):
            write_file_atomic_at(dfd, "block", memoryview(_aligned(2 * DIRECT_ALIGN)), direct=True)
    finally:
        os.close(dfd)
    assert list(tmp_path.iterdir()) == []  # neither the block nor its temporary


@pytest.mark.anyio
async def test_save_writes_its_blocks_around_the_page_cache(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncload

    calls = _record_writes(monkeypatch)
    tensors = {"a": np.arange(40_000, dtype=np.float32), "b": np.arange(1001, dtype=np.uint8)}
    path = await asyncload.save(tensors, tmp_path / "m.json", sources=[tmp_path / "d0"], block_size="64KiB")
    monkeypatch.undo()
    flags = [direct for _, direct in calls]
    assert any(flags)  # the blocks' aligned heads
    assert not flags[-1]  # the manifest, last, through the page cache
    got = await asyncload.load(path)
    assert {n: a.tobytes() for n, a in got.items()} == {n: a.tobytes() for n, a in tensors.items()}
