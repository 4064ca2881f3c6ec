"""Mirrored ring memory: n bytes mapped twice, back to back, so a span that wraps is contiguous.

The slot ring lives in the first n bytes. The same pages appear again at
[n, 2n), so slots i, i+1, ..., i+j-1 (mod the slot count) are one contiguous
range of addresses even when they wrap past the last slot. That is what lets a
tensor spread over several consecutive blocks be leased as one zero-copy view.

Linux only (``memfd_create`` and ``mmap`` with ``MAP_FIXED`` through ctypes);
:func:`mirrored_memory` returns None elsewhere, or when the kernel refuses, and
the ring falls back to plain memory (leases within one block only).

Memory: the pages exist once (a memfd), faulted in by the first reads. Pages
of the second mapping get page-table entries only when a wrapped span is read
through them, and count in RSS again then; :meth:`Mirror.forget` drops those
entries once a wrapped lease is released.

:meth:`Mirror.map_file` puts a range of a file, where the page cache holds all
of it, over a range of the ring in both halves (``MAP_FIXED``, read-only):
the ring then shows the file's cached pages themselves, with no copy, and
:meth:`Mirror.restore` puts the ring's own pages back before anything is
written there. See ``Ring.map_file`` for when the loader does this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys

import numpy as np

__all__ = ["Mirror", "forget_mirror", "map_private", "mirrored_memory"]

_MAP_FIXED = 0x10
_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22  # Linux 5.14+; older kernels refuse it (EINVAL) and reads fault pages in
_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or not hasattr(os, "memfd_create"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    c_int = ctypes.c_int
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, c_int, c_int, c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


_LIBC = _libc()


def _mapping_type(total: int, fd: int) -> type[ctypes.Array[ctypes.c_uint8]]:
    """A ctypes array type over ``total`` bytes that unmaps them (and closes ``fd``) when the
    last view is gone."""

    class Mapping(ctypes.c_uint8 * total):  # type: ignore[misc]
        def __del__(self) -> None:
            if _LIBC is not None:
                _LIBC.munmap(ctypes.addressof(self), total)
            os.close(fd)

    return Mapping


class Mirror:
    """``nbytes`` of a memfd mapped twice, back to back: :attr:`array` is all ``2 * nbytes``."""

    def __init__(self, array: np.ndarray, fd: int, nbytes: int) -> None:
        self.array = array
        self.nbytes = nbytes
        self._fd = fd  # the memfd: kept open (closed with the mapping) so ranges can be restored
        self._base: int = array.ctypes.data

    @classmethod
    def create(cls, nbytes: int) -> Mirror | None:
        """A mirror of ``nbytes`` (a multiple of the page size), or None where unsupported.

        Nothing is faulted in here: the first reads do it (``MAP_POPULATE`` of shared
        memory took ~100 ms per 256 MiB, see Ring).
        """
        made = _mirrored(nbytes)
        return None if made is None else cls(made[0], made[1], nbytes)

    def map_file(self, start: int, nbytes: int, fd: int, offset: int) -> bool:
        """Show ``nbytes`` of file ``fd`` from ``offset`` at ``[start, start + nbytes)`` of both halves.

        Only when the page cache holds every page of the range (``mincore``) is
        True returned; otherwise the ring's own pages stay (or are put back) and
        the answer is False. Nothing is faulted in here: the first read of each
        page (the block's crc32c) maps it from the page cache, 64 KiB of
        fault-around at a time, which costs less than ``MADV_POPULATE_READ`` up
        front (two threads over a 4 GiB store's 16 MiB blocks: 11.5 GB/s
        populated then hashed, 12.2-12.7 hashed as they fault in). ``start`` and
        ``offset`` must be page aligned; the file must be at least ``offset +
        nbytes`` long (a page past its end is SIGBUS).
        The mapping is read-only: call :meth:`restore` before writing there.
        """
        libc = _LIBC
        page = mmap.PAGESIZE
        if libc is None or start % page or offset % page or nbytes <= 0 or start + nbytes > self.nbytes:
            return False
        length = -(-nbytes // page) * page
        ro, flags = mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED
        first, second = self._base + start, self._base + self.nbytes + start
        if libc.mmap(first, length, ro, flags, fd, offset) != first:
            self.restore(start, nbytes)
            return False
        resident = (ctypes.c_ubyte * (length // page))()
        if libc.mincore(first, length, resident) != 0 or not all(b & 1 for b in bytes(resident)):
            self.restore(start, nbytes)
            return False
        if libc.mmap(second, length, ro, flags, fd, offset) != second:
            self.restore(start, nbytes)
            return False
        return True

    def restore(self, start: int, nbytes: int) -> None:
        """Put the ring's own (writable) pages back at ``[start, start + nbytes)`` of both halves."""
        libc = _LIBC
        assert libc is not None
        page = mmap.PAGESIZE
        start = start // page * page
        length = -(-(nbytes + start % page) // page) * page
        rw, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED
        for addr in (self._base + start, self._base + self.nbytes + start):
            if libc.mmap(addr, length, rw, flags, self._fd, start) != addr:
                err = ctypes.get_errno()
                raise OSError(err, f"cannot restore ring memory: {os.strerror(err)}")

    def forget(self, start: int, stop: int) -> None:
        forget_mirror(self.array, start, stop)


def mirrored_memory(nbytes: int) -> np.ndarray | None:
    """A uint8 array of ``2 * nbytes`` whose halves are the same pages, or None where unsupported.

    ``nbytes`` must be a multiple of the page size (see :meth:`Mirror.create`).
    """
    made = _mirrored(nbytes)
    return None if made is None else made[0]


def _mirrored(nbytes: int) -> tuple[np.ndarray, int] | None:
    libc = _LIBC
    if libc is None or nbytes <= 0 or nbytes % mmap.PAGESIZE:
        return None
    try:
        fd = os.memfd_create("asyncload-ring", os.MFD_CLOEXEC)
    except OSError:
        return None
    try:
        os.ftruncate(fd, nbytes)
        # Reserve 2n of address space, then put the memfd at both halves of it.
        base = libc.mmap(None, 2 * nbytes, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if base is None or base == _FAILED:
            os.close(fd)
            return None
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        first = libc.mmap(base, nbytes, rw, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
        second = libc.mmap(base + nbytes, nbytes, rw, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
        if first != base or second != base + nbytes:
            libc.munmap(base, 2 * nbytes)
            os.close(fd)
            return None
    except BaseException:
        os.close(fd)
        raise
    mapping = _mapping_type(2 * nbytes, fd).from_address(base)  # closes fd when unmapped
    return np.frombuffer(memoryview(mapping).cast("B"), dtype=np.uint8), fd


def map_private(addr: int, nbytes: int, fd: int, offset: int) -> bool:
    """Map ``nbytes`` of file ``fd`` from ``offset`` at ``addr`` (page aligned), private and writable.

    Copy-on-write: the range then shows the file's cached pages, and a write there
    makes a private copy of the page it touches, never reaching the file. Replaces
    whatever was mapped at ``[addr, addr + nbytes)`` (which must belong to the caller).
    False when refused; the range is then as it was.
    """
    libc = _LIBC
    page = mmap.PAGESIZE
    if libc is None or addr % page or offset % page or nbytes <= 0 or nbytes % page:
        return False
    rw, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED
    if libc.mmap(addr, nbytes, rw, flags, fd, offset) != addr:
        return False
    # Populated for reading: the pages are in the page tables when the load returns (as a
    # copy's would be, and counted in RSS the same way), not faulted in by the consumer's
    # first reads. Not MAP_POPULATE: on a writable private mapping it faults every page in
    # for writing, i.e. copies it (0.25-0.5 GB/s for a 4 GiB load, against 6-7).
    libc.madvise(addr, nbytes, _MADV_POPULATE_READ)
    return True


def forget_mirror(memory: np.ndarray, start: int, stop: int) -> None:
    """Drop the page-table entries of ``memory[start:stop]`` (second half; the bytes stay).

    Reading the range again faults the same pages back in; this only keeps RSS
    from counting the ring's pages twice after a wrapped span was read.
    """
    if _LIBC is None or stop <= start:
        return
    page = mmap.PAGESIZE
    start = start // page * page
    stop = -(-stop // page) * page
    addr = memory.ctypes.data + start
    _LIBC.madvise(addr, stop - start, _MADV_DONTNEED)
