"""Mirrored ring memory: n bytes mapped twice, back to back, so a span that wraps is contiguous.

The slot ring lives in the first n bytes. The same pages appear again at
[n, 2n), so slots i, i+1, ..., i+j-1 (mod the slot count) are one contiguous
range of addresses even when they wrap past the last slot. That is what lets a
tensor spread over several consecutive blocks be leased as one zero-copy view.

Linux only (``memfd_create`` and ``mmap`` with ``MAP_FIXED`` through ctypes);
:func:`mirrored_memory` returns None elsewhere, or when the kernel refuses, and
the ring falls back to plain memory (leases within one block only).

Memory: the pages exist once (a memfd), and the first mapping is faulted in up
front. Pages of the second mapping get page-table entries only when a wrapped
span is read through them, and count in RSS again then; :func:`forget_mirror`
drops those entries once a wrapped lease is released.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys

import numpy as np

__all__ = ["forget_mirror", "mirrored_memory"]

_MAP_FIXED = 0x10
_MADV_DONTNEED = 4
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
    return libc


_LIBC = _libc()


def _mapping_type(total: int) -> type[ctypes.Array[ctypes.c_uint8]]:
    """A ctypes array type over ``total`` bytes that unmaps them when the last view is gone."""

    class Mapping(ctypes.c_uint8 * total):  # type: ignore[misc]
        def __del__(self) -> None:
            if _LIBC is not None:
                _LIBC.munmap(ctypes.addressof(self), total)

    return Mapping


def mirrored_memory(nbytes: int) -> np.ndarray | None:
    """A uint8 array of ``2 * nbytes`` whose halves are the same pages, or None where unsupported.

    ``nbytes`` must be a multiple of the page size. Nothing is faulted in here: the first
    reads do it (``MAP_POPULATE`` of shared memory took ~100 ms per 256 MiB, see Ring).
    """
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
            return None
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        first = libc.mmap(base, nbytes, rw, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
        second = libc.mmap(base + nbytes, nbytes, rw, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
        if first != base or second != base + nbytes:
            libc.munmap(base, 2 * nbytes)
            return None
    finally:
        os.close(fd)  # the mappings keep the memory
    mapping = _mapping_type(2 * nbytes).from_address(base)
    return np.frombuffer(memoryview(mapping).cast("B"), dtype=np.uint8)


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
