"""The slot ring: preallocated, reused memory of total size S in slots of size m.

State changes (acquire, release) are synchronous and O(1); waiting for a free
slot is the only await, and it is how backpressure works: no read starts
without a slot. The memory is allocated once and touched up front, so reads
land in pages that are already faulted in.
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections import deque
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import numpy as np

from ._exceptions import ClosedError
from ._mirror import Mirror

__all__ = ["Ring", "RingStatistics", "Slot"]


def ring_memory(nbytes: int, *, touch: bool = True) -> np.ndarray:
    """``nbytes`` of slot memory: one private anonymous mapping, faulted in up front if ``touch``.

    ``MAP_POPULATE`` has the kernel fault every page in during the ``mmap`` call itself:
    256 MiB in 63-66 ms on the development VM, every time. ``np.empty`` + a write to each
    page took 35 to 740 ms for the same 256 MiB: numpy asks for transparent huge pages on
    large arrays, and with THP defrag on "madvise" (a common default) a huge-page fault
    can stall in direct compaction. The ring's open is in every load's timed path.
    """
    populate = getattr(mmap, "MAP_POPULATE", 0)
    if nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):
        memory = np.empty(nbytes, dtype=np.uint8)
        if touch:
            memory.fill(0)
        return memory
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (populate if touch else 0)
    memory = np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), dtype=np.uint8)
    if touch and not populate:
        memory.fill(0)
    return memory


@dataclass(frozen=True, slots=True)
class RingStatistics:
    """A snapshot of the ring."""

    slots_total: int
    slots_in_use: int
    slot_size: int
    bytes_total: int
    bytes_in_use: int  # slot bytes currently holding (or about to hold) data
    waiting: int  # tasks waiting for a free slot right now
    waits: int  # acquisitions that had to wait, since creation
    acquisitions: int
    peak_slots_in_use: int


class Slot:
    """One slot: a fixed view of the ring's memory. ``used`` is how many bytes hold data."""

    __slots__ = ("_free", "_refs", "file", "index", "memory", "used")

    def __init__(self, index: int, memory: np.ndarray) -> None:
        self.index = index
        self.memory = memory  # uint8 view, length = slot size
        self.used = 0
        # (fd, offset): the slot shows this file's cached pages from offset (read-only), see
        # Ring.map_file. The fd is the ring's own (a dup), closed when the slot is remapped.
        self.file: tuple[int, int] | None = None
        self._refs = 0
        self._free = True

    @property
    def mapped(self) -> bool:
        return self.file is not None

    def view(self, n: int | None = None) -> memoryview:
        return self.memory.data[: self.used if n is None else n]

    def __repr__(self) -> str:
        return f"<Slot {self.index} used={self.used}>"


class _Waiter:
    __slots__ = ("event", "slot")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.slot: Slot | None = None


class Ring:
    """``count`` slots of ``slot_size`` bytes carved out of one allocation.

    Slots are handed out in any free order, or, while :attr:`sequential` is set,
    strictly in index order (0, 1, ..., count-1, 0, ...): consecutive
    acquisitions then get adjacent memory, and with ``mirrored`` memory (the
    ring mapped twice back to back) :meth:`span` gives up to ``count``
    consecutive slots as one view even across the wrap.
    """

    def __init__(self, slot_size: int, count: int, *, touch: bool = True, mirrored: bool = False) -> None:
        if slot_size < 1 or count < 1:
            raise ValueError("a ring needs at least one slot of at least one byte")
        self.slot_size = slot_size
        self._group_lock: anyio.Lock | None = None
        nbytes = slot_size * count
        # Plain memory: every page faulted in once, here, not on the first read. Mirrored
        # memory (shared pages of a memfd, never huge pages) is left to fault in on the
        # first reads, in the reading threads: a 4 GiB lease load ran at 4.1-4.5 GB/s with
        # MAP_POPULATE (about 100 ms for 256 MiB, in the timed path) and 4.9-5.0 without.
        self._mirrors = Mirror.create(nbytes) if mirrored else None
        mirror = self._mirror = self._mirrors.array if self._mirrors is not None else None
        self._memory = mirror[:nbytes] if mirror is not None else ring_memory(nbytes, touch=touch)
        self._slots = [Slot(i, self._memory[i * slot_size : (i + 1) * slot_size]) for i in range(count)]
        weakref.finalize(self, _close_files, self._slots)  # fds of slots still mapped at the end
        self._free: deque[Slot] = deque(self._slots)
        self._sequential = False
        self._next = 0  # the slot a sequential acquisition takes next
        self._waiters: deque[_Waiter] = deque()
        self._closed = False
        self._waits = 0
        self._acquisitions = 0
        self._peak = 0

    @property
    def mirrored(self) -> bool:
        """Whether the memory is mapped twice, so spans of slots that wrap are contiguous."""
        return self._mirror is not None

    @property
    def sequential(self) -> bool:
        return self._sequential

    @sequential.setter
    def sequential(self, on: bool) -> None:
        """Hand out slots strictly in index order from now on (or stop doing so)."""
        self._sequential = on
        self._serve()

    def span(self, first: Slot, count: int) -> np.ndarray:
        """The memory of ``count`` consecutive slots from ``first`` (wrapping), as one view."""
        start = first.index * self.slot_size
        stop = start + count * self.slot_size
        if count > len(self._slots):
            raise ValueError(f"a span of {count} slots is longer than the ring ({len(self._slots)})")
        if stop <= len(self._memory):
            return self._memory[start:stop]
        if self._mirror is None:
            raise ValueError("slots that wrap past the ring's end are contiguous only in mirrored memory")
        return self._mirror[start:stop]

    def forget_span(self, first: Slot, count: int) -> None:
        """After a wrapped :meth:`span` is dropped: let RSS stop counting its mirrored pages."""
        stop = (first.index + count) * self.slot_size
        if self._mirrors is not None and stop > len(self._memory):
            self._mirrors.forget(len(self._memory), stop)

    # -- file pages in place of slot memory -----------------------------------------
    @property
    def mappable(self) -> bool:
        """Whether :meth:`map_file` can work here (mirrored memory, slots whole pages)."""
        return self._mirrors is not None and self.slot_size % mmap.PAGESIZE == 0

    def map_file(self, slot: Slot, fd: int, offset: int, nbytes: int) -> bool:
        """Let ``slot`` show ``nbytes`` of file ``fd`` from ``offset``, if the page cache holds them all.

        Zero copy: the slot's addresses (and their mirror) then map the file's
        cached pages, read-only, instead of receiving a copy of them; a load
        from warm local files reads each byte once, for its checksum, instead of
        copying it first (a 4 GiB store leased: see docs/performance.md). Returns
        False, with the slot's own memory in place, when any page is not cached
        (a read that must wait for the disk goes the usual way, in an I/O thread)
        or when the ring or the range does not allow it. The caller holds the
        slot, checked that the file is at least ``offset + nbytes`` long (so no
        mapped page lies past its end) and calls :meth:`writable` before the slot
        is written again. Runs in a worker thread (a few syscalls).
        """
        if not self.mappable or nbytes > self.slot_size:
            return False
        assert self._mirrors is not None
        start = slot.index * self.slot_size
        if self._mirrors.map_file(start, nbytes, fd, offset):
            # (What lies past nbytes may still show an earlier file: writable() restores it all.)
            _close_file(slot)
            try:
                slot.file = (os.dup(fd), offset)
            except OSError:  # out of file descriptors (a ring of many slots): read it instead
                self._mirrors.restore(start, self.slot_size)
        elif slot.mapped:  # refused: an earlier file may still show past nbytes
            self.writable(slot)
        return slot.mapped

    def writable(self, slot: Slot) -> None:
        """Give ``slot`` its own memory back if it shows a file's pages (before writing into it)."""
        if slot.mapped:
            assert self._mirrors is not None
            self._mirrors.restore(slot.index * self.slot_size, self.slot_size)
            _close_file(slot)

    # -- synchronous state machine -------------------------------------------------
    def try_acquire(self) -> Slot | None:
        """A free slot, or None. Never waits; tasks already waiting are served first."""
        if self._closed:
            raise ClosedError("the slot ring is closed")
        if self._waiters:
            return None
        return self._take_free()

    def _take_free(self) -> Slot | None:
        if self._sequential:
            slot = self._slots[self._next]
            if not slot._free:
                return None
            self._free.remove(slot)  # a handful of slots: O(count) is nothing
            self._next = (self._next + 1) % len(self._slots)
        elif self._free:
            slot = self._free.popleft()
        else:
            return None
        return self._take(slot)

    def _take(self, slot: Slot) -> Slot:
        slot._refs = 1
        slot._free = False
        slot.used = 0
        self._acquisitions += 1
        self._peak = max(self._peak, len(self._slots) - len(self._free))
        return slot

    def _serve(self) -> None:
        """Hand free slots to waiters, first come first served, while the order allows."""
        while self._waiters and not self._closed:
            slot = self._take_free()
            if slot is None:
                return
            waiter = self._waiters.popleft()
            waiter.slot = slot
            waiter.event.set()

    def retain(self, slot: Slot) -> None:
        """Add a holder (e.g. a zero-copy lease) to an acquired slot."""
        if slot._refs < 1:
            raise RuntimeError(f"{slot!r} is not acquired")
        slot._refs += 1

    def release(self, slot: Slot) -> None:
        """Drop one holder; when the last lets go the slot goes to the first waiter, or back to free."""
        if slot._refs < 1:
            raise RuntimeError(f"{slot!r} released more often than acquired")
        slot._refs -= 1
        if slot._refs:
            return
        slot.used = 0
        slot._free = True
        self._free.append(slot)
        self._serve()

    # -- the one await --------------------------------------------------------------
    async def acquire_group(self, n: int, into: list[Slot]) -> None:
        """Take ``n`` slots for one job, appending each to ``into`` as it is taken.

        Group takers queue behind one another, so two never hold part of a group
        each while waiting for the rest (a deadlock when the ring has room for
        fewer than two groups). A cancelled wait leaves the slots already taken
        in ``into``, for the caller to release.
        """
        if self._group_lock is None:  # made on the event loop (the ring may be built in a thread)
            self._group_lock = anyio.Lock()
        async with self._group_lock:
            for _ in range(n):
                into.append(await self.acquire())

    async def acquire(self) -> Slot:
        """A free slot, waiting in FIFO order until one is released (backpressure)."""
        await anyio.lowlevel.checkpoint()
        slot = self.try_acquire()
        if slot is not None:
            return slot
        self._waits += 1
        waiter = _Waiter()
        self._waiters.append(waiter)
        try:
            await waiter.event.wait()
        except BaseException:
            if waiter.slot is not None:  # handed a slot, then cancelled: pass it on
                self.release(waiter.slot)
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        if waiter.slot is None:
            raise ClosedError("the slot ring was closed while waiting for a slot")
        return waiter.slot

    def close(self) -> None:
        """Refuse new acquisitions and wake every waiter with :class:`ClosedError`."""
        self._closed = True
        while self._waiters:
            self._waiters.popleft().event.set()

    def statistics(self) -> RingStatistics:
        in_use = len(self._slots) - len(self._free)
        return RingStatistics(
            slots_total=len(self._slots),
            slots_in_use=in_use,
            slot_size=self.slot_size,
            bytes_total=self.slot_size * len(self._slots),
            bytes_in_use=self.slot_size * in_use,
            waiting=len(self._waiters),
            waits=self._waits,
            acquisitions=self._acquisitions,
            peak_slots_in_use=self._peak,
        )


def _close_file(slot: Slot) -> None:
    if slot.file is not None:
        fd, slot.file = slot.file[0], None
        os.close(fd)


def _close_files(slots: list[Slot]) -> None:
    for slot in slots:
        _close_file(slot)
