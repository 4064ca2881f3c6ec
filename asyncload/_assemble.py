"""Slots -> tensors: copy-out into owned arrays, or zero-copy leases on a slot.

Memory rule. Bytes live in three places: the ring (S, fixed), output arrays
being assembled or waiting for the consumer (the *assembly allowance* A), and
arrays the consumer holds (its business). A tensor gets its output array only
by reserving its size from A, and reservations are granted in stream order,
one tensor at a time; the head of the queue always gets one when nothing else
is reserved, so a tensor larger than A (or than S) still loads, piece by
piece. A reservation is returned when the consumer takes the tensor, but the
last array handed over still counts against A until the next one is taken
(``async for`` keeps it bound while it asks for the next). With
A = max(largest tensor, slot size), a streaming consumer that drops each
array therefore peaks at about S + A. The head of the queue is granted beyond A
only when nothing else is reserved and either the consumer has dropped the
last array (tracked with a weakref finalizer) or is waiting for the next one:
a consumer that keeps arrays (``load()``) never deadlocks, and one that drops
them (``del arr``) never has two large tensors alive at once. Because reservations follow stream
order and reads are issued in stream order, the tensor holding the allowance
always has its blocks in flight, so the pipeline cannot deadlock.
"""

from __future__ import annotations

import mmap
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import numpy as np

from ._dtypes import numpy_dtype
from ._exceptions import ClosedError
from ._format import BlockRef, TensorInfo
from ._mirror import map_private
from ._plan import BlockPlan, LoadPlan, Segment
from ._ring import Ring, Slot
from ._scheduler import INLINE_BYTES, BlockReader, unwrap_group
from ._threads import Workers, lower_this_thread, run_sync

__all__ = ["AssemblyStatistics", "TensorStream"]


@dataclass(frozen=True, slots=True)
class AssemblyStatistics:
    allowance: int
    reserved_bytes: int
    tensors_ready: int
    tensors_delivered: int
    outputs_recycled: int = 0  # owned arrays assembled into memory of arrays the consumer dropped


def as_array(info: TensorInfo, raw: np.ndarray) -> np.ndarray:
    """View raw uint8 bytes as the tensor's dtype and shape (no copy)."""
    dt = numpy_dtype(info.dtype, tensor=info.name)
    return raw.view(dt).reshape(info.shape)


# Output arrays from this size up get their own anonymous mapping (see OutputPool).
OWN_MAPPING_BYTES = 1 << 20


class _Unmapper:
    """One daemon thread that drops mappings handed to it, so their ``munmap`` never runs on
    the event loop: unmapping a 310 MiB array stalled the loop for 9 ms in-process and up to
    35 ms under page-cache pressure (bench_load, 4 GiB, a 1 ms heartbeat)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[mmap.mmap | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def drop(self, mem: mmap.mmap) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="asyncload-unmap", daemon=True)
                self._thread.start()
        self._queue.put(mem)

    def _run(self) -> None:
        lower_this_thread()  # unmapping is kernel work: it must not outrank the event loop either
        while True:
            mem = self._queue.get()
            del mem  # the last reference: unmapped here


_UNMAPPER = _Unmapper()


class OutputPool:
    """Output arrays for one stream, recycling the memory of those the consumer has dropped.

    Large arrays are backed by their own anonymous mapping, so their memory goes
    back to the OS when the consumer drops them. From numpy's usual malloc, glibc
    keeps freed chunks below its dynamic mmap threshold (up to 32 MiB) in the
    heap, and a streaming consumer's peak RSS drifts tens of MiB past S + largest
    tensor.

    A streaming consumer drops each array before it asks for the next, and
    writing into fresh memory costs a page fault per 4 KiB: on the development VM
    that, not the copy, sets the pace of a load into new arrays. So when every view
    of an array is gone, its mapping comes back here (a ``weakref.finalize`` on the
    buffer owner that numpy gives every view of the array), and the next tensor
    that fits is assembled into pages that are already faulted in. Memory stays
    where it was: a mapping is taken for a tensor of its size up to half of it; a
    request that none fits first lets every kept mapping go, and no more than
    ``cap`` bytes are ever kept. :meth:`close` lets go of them all.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._free: list[mmap.mmap] = []
        self._kept = 0
        self._lock = threading.Lock()
        self._closed = False
        self.reused = 0  # arrays assembled into recycled memory

    def array(self, size: int, lead: int | None = None) -> np.ndarray:
        """A writable uint8 array of ``size`` bytes to assemble a tensor into.

        With ``lead`` (0 to a page), the array starts ``lead`` bytes into a fresh
        mapping of its own, never recycled: the pages of blocks mapped from
        files can then be placed into it (see :func:`_place`), since its
        addresses fall on the same page offsets as the tensor's bytes in its files.
        """
        if size < OWN_MAPPING_BYTES or not hasattr(mmap, "MAP_PRIVATE"):
            return np.empty(size, dtype=np.uint8)
        if lead is not None:
            own = mmap.mmap(-1, lead + size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            arr = np.frombuffer(own, dtype=np.uint8, count=size, offset=lead)
            weakref.finalize(arr.base, _UNMAPPER.drop, own)  # file pages in it: not for reuse
            return arr
        mem = self._take(size)
        if mem is None:
            # Private, not mmap's default shared mapping: shmem pages get no huge pages and
            # unmap slowly. No MADV_HUGEPAGE: with THP defrag on "madvise" (a common
            # default) each huge-page fault may stall in direct compaction; measured 0.4-1.3
            # GB/s with it, a steady 2.0 GB/s without, for a warm 1 GiB load into owned arrays.
            mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arr = np.frombuffer(mem, dtype=np.uint8, count=size)
        # Every view of ``arr`` (the consumer's typed array, its slices) keeps arr.base alive.
        weakref.finalize(arr.base, self._give_back, mem)
        return arr

    def _take(self, size: int) -> mmap.mmap | None:
        with self._lock:
            fits = [m for m in self._free if size <= len(m) <= 2 * size]
            if fits:
                mem = min(fits, key=len)
                self._free.remove(mem)
                self._kept -= len(mem)
                self.reused += 1
                return mem
            # Nothing fits: what is kept goes back to the OS before a new mapping is made.
            for mem in self._free:
                _UNMAPPER.drop(mem)
            self._free.clear()
            self._kept = 0
            return None

    def _give_back(self, mem: mmap.mmap) -> None:
        # Runs in whichever thread dropped the last view; a mapping not kept goes to the
        # unmapper thread (not unmapped here, which is usually the event loop).
        with self._lock:
            if not self._closed and self._kept + len(mem) <= self.cap:
                self._free.append(mem)
                self._kept += len(mem)
                return
        _UNMAPPER.drop(mem)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for mem in self._free:
                _UNMAPPER.drop(mem)
            self._free.clear()
            self._kept = 0


Lease = tuple[Slot, ...]  # the slots a zero-copy view keeps, in block order


def lease_spans(plan: LoadPlan, ring: Ring, *, copy: bool, across_blocks: bool = True) -> list[int]:
    """Per tensor, how many blocks its zero-copy lease holds (0: not leased, copied).

    Without ``copy``, a tensor inside one block is leased. A tensor over several
    blocks is leased too when the ring is mirrored (slots given in order, so
    consecutive blocks sit side by side even across the wrap) and every block but
    its last fills a slot exactly (no GCM tag between), over up to all the ring's
    slots but one, which keeps the reader going while the consumer holds the lease.
    (Half the slots at most had left a 512 MiB ring copying the bench's 310 MiB
    tensors: 4.5-4.7 GB/s against 5.1-5.25 leasing them.)
    """
    if copy:
        return [0] * len(plan.tensors)
    spans = [1 if p == 1 else 0 for p in plan.pieces]
    if not (across_blocks and ring.mirrored):
        return spans
    limit = ring.statistics().slots_total - 1  # a lease never needs every slot at once
    short: set[int] = set()  # tensors with a block that does not fill its slot, before their last
    last_block: dict[int, int] = {}
    for bp in plan.blocks:
        for seg in bp.segments:
            last_block[seg.tensor] = bp.block.index
    for bp in plan.blocks:
        if bp.block.length != ring.slot_size:
            short.update(s.tensor for s in bp.segments if last_block[s.tensor] != bp.block.index)
    for ti, p in enumerate(plan.pieces):
        if 1 < p <= limit and ti not in short:
            spans[ti] = p
    return spans


# One piece of a tensor to assemble: out[t0 : t0 + n] = src[b0 : b0 + n], where src is a slot's
# memory, which may show a file's pages: (fd, offset of src[0] in the file), else None.
Job = tuple[np.ndarray, int, np.ndarray, int, int, tuple[int, int] | None]


def _copy_segments(jobs: list[Job]) -> None:
    for out, t0, src, b0, n, file in jobs:
        if file is None or not _place(out, t0, src, b0, n, file):
            out[t0 : t0 + n] = src[b0 : b0 + n]


def _place(out: np.ndarray, t0: int, src: np.ndarray, b0: int, n: int, file: tuple[int, int]) -> bool:
    """Map the whole pages of the piece from its file into ``out`` (private), copying only its ends.

    Works where ``out[t0]`` and the piece's first byte in the file share their
    offset within a page (what ``OutputPool.array(size, lead)`` arranges);
    False otherwise, or when the kernel refuses, and the caller copies.
    """
    page = mmap.PAGESIZE
    fd, offset = file
    addr = out.ctypes.data + t0
    pos = offset + b0  # the piece's first byte in the file
    if (addr - pos) % page:
        return False
    first = -(-addr // page) * page
    last = (addr + n) // page * page
    if last - first < page or not map_private(first, last - first, fd, pos + (first - addr)):
        return False
    head, tail = first - addr, addr + n - last
    out[t0 : t0 + head] = src[b0 : b0 + head]
    out[t0 + n - tail : t0 + n] = src[b0 + n - tail : b0 + n]
    return True


class _Assembly:
    """The per-stream state: reservations, partial tensors, the ready queue."""

    def __init__(
        self,
        plan: LoadPlan,
        ring: Ring,
        *,
        copy: bool,
        threads: Workers | None = None,
        across_blocks: bool = True,
        place_files: bool = False,
    ) -> None:
        self.plan = plan
        self.threads = threads
        self.ring = ring
        self.copy = copy
        tensors = plan.tensors
        # A tensor is leased (copy=False) when it sits whole inside one block, or, in a
        # ring that hands out slots in order, when its blocks fill their slots end to end.
        self.spans = lease_spans(plan, ring, copy=copy, across_blocks=across_blocks)
        self.leased = [n > 0 for n in self.spans]
        self.sequential = any(n > 1 for n in self.spans)
        self.lease_start: dict[int, int] = {}  # tensor -> its offset in its first block
        self.first_block: dict[int, int] = {}
        for bp in plan.blocks:
            for seg in bp.segments:
                if self.spans[seg.tensor] > 1 and seg.tensor_start == 0:
                    self.lease_start[seg.tensor] = seg.block_start
                    self.first_block[seg.tensor] = bp.block.index
        self.parts: dict[int, list[Slot | None]] = {}  # multi-block leases still being read
        self.order = [i for i, t in enumerate(tensors) if t.nbytes and not self.leased[i]]
        self.pos = {ti: k for k, ti in enumerate(self.order)}
        largest = max((tensors[i].nbytes for i in self.order), default=0)
        self.allowance = max(largest, ring.slot_size)
        self.outputs = OutputPool(cap=self.allowance)
        self.next_res = 0
        self.reserved = 0  # bytes of output arrays allocated and not yet delivered
        self.held = 0  # bytes of the last array delivered: the consumer still holds it
        self.outs: dict[int, np.ndarray] = {}
        # place_files: blocks mapped into their slots may be mapped on into the owned arrays
        # too (see _place); each array then starts at its tensor's first byte's page offset.
        # Only arrays with a mapping of their own: never pages of numpy's malloc heap.
        self.leads: dict[int, int] = {}
        if place_files:
            for bp in plan.blocks:
                for seg in bp.segments:
                    t = seg.tensor
                    if (
                        seg.tensor_start == 0
                        and not self.leased[t]
                        and tensors[t].nbytes >= OWN_MAPPING_BYTES
                    ):
                        lead = (bp.block.key_offset + seg.block_start) % mmap.PAGESIZE
                        if lead % 8 == 0:  # keeps every dtype aligned
                            self.leads[seg.tensor] = lead
        self.remaining = list(plan.pieces)
        self.res_waiters: dict[int, anyio.Event] = {}
        self.ready: deque[tuple[int, np.ndarray, Lease | None]] = deque()
        self.delivered = 0
        self.wakeup = anyio.Event()
        self.consumer_waiting = False
        self._held_token = 0

    # -- reservations (synchronous state) ------------------------------------------
    def try_reserve(self, ti: int) -> bool:
        k = self.pos[ti]
        if k < self.next_res:
            return True
        if k > self.next_res:
            return False
        size = self.plan.tensors[ti].nbytes
        if self.reserved or (self.held and not self.consumer_waiting):
            # Beyond the head-of-line grant, everything must fit in the allowance
            # next to the array the consumer was handed last (while it holds it).
            if self.reserved + self.held + size > self.allowance:
                return False
        self.outs[ti] = self.outputs.array(size, self.leads.get(ti))
        self.reserved += size
        self.next_res += 1
        ev = self.res_waiters.pop(ti, None)  # other blocks of this tensor waiting for it
        if ev is not None:
            ev.set()
        self._wake_reserver()
        return True

    def _wake_reserver(self) -> None:
        if self.next_res < len(self.order):
            ev = self.res_waiters.pop(self.order[self.next_res], None)
            if ev is not None:
                ev.set()

    async def reserve(self, ti: int) -> None:
        while not self.try_reserve(ti):
            # Several blocks may wait for the same tensor: they share one event.
            ev = self.res_waiters.get(ti)
            if ev is None:
                ev = self.res_waiters[ti] = anyio.Event()
            await ev.wait()

    # -- ready queue -------------------------------------------------------------------
    def push(self, ti: int, raw: np.ndarray, lease: Lease | None) -> None:
        self.ready.append((ti, raw, lease))
        self.wakeup.set()

    def let_go(self, lease: Lease) -> None:
        """Release the slots a lease holds (a wrapped span also drops its mirrored pages)."""
        for slot in lease:
            self.ring.release(slot)
        if len(lease) > 1:
            self.ring.forget_span(lease[0], len(lease))

    def take(self) -> tuple[int, np.ndarray, Lease | None] | None:
        if not self.ready:
            return None
        ti, raw, lease = self.ready.popleft()
        self.held = 0
        self._held_token += 1
        if lease is None and ti in self.outs:
            del self.outs[ti]
            size = self.plan.tensors[ti].nbytes
            self.reserved -= size
            self.held = size
            # When the consumer lets go of the array, it no longer counts.
            weakref.finalize(raw, self._dropped, self._held_token)
        self._wake_reserver()
        self.delivered += 1
        return ti, raw, lease

    def _dropped(self, token: int) -> None:
        # May run on any thread that drops the last reference: only plain stores here;
        # a waiting reservation is re-checked when the consumer next waits.
        if token == self._held_token:
            self.held = 0

    def set_consumer_waiting(self, waiting: bool) -> None:
        self.consumer_waiting = waiting
        if waiting:
            self._wake_reserver()

    def drop_leases(self) -> None:
        """Release every slot held for the consumer: queued leases and leases left half read."""
        while self.ready:
            _, _, lease = self.ready.popleft()
            if lease is not None:
                self.let_go(lease)
        for parts in self.parts.values():
            for slot in parts:
                if slot is not None:
                    self.ring.release(slot)
        self.parts.clear()

    def _lease_part(self, seg: Segment, bp: BlockPlan, slot: Slot) -> None:
        """One block of a leased tensor has landed; push the tensor's view once all have."""
        self.ring.retain(slot)
        ti = seg.tensor
        n = self.spans[ti]
        if n == 1:
            self.push(ti, slot.memory[seg.block_start : seg.block_start + seg.length], (slot,))
            return
        parts = self.parts.setdefault(ti, [None] * n)
        parts[bp.block.index - self.first_block[ti]] = slot
        self.remaining[ti] -= 1
        if self.remaining[ti]:
            return
        del self.parts[ti]
        lease = tuple(p for p in parts if p is not None)
        first = lease[0]
        count = self.ring.statistics().slots_total
        if len(lease) != n or any(s.index != (first.index + k) % count for k, s in enumerate(lease)):
            for s in lease:
                self.ring.release(s)
            name = self.plan.tensors[ti].name
            raise RuntimeError(f"tensor {name!r}: its blocks did not get adjacent slots")
        start = self.lease_start[ti]
        self.push(ti, self.ring.span(first, n)[start : start + self.plan.tensors[ti].nbytes], lease)

    # -- one block -----------------------------------------------------------------
    async def on_block(self, bp: BlockPlan, slot: Slot) -> None:
        try:
            jobs: list[Job] = []
            done: list[Segment] = []
            for seg in bp.segments:
                ti = seg.tensor
                if self.leased[ti]:
                    self._lease_part(seg, bp, slot)
                    continue
                if not self.try_reserve(ti):
                    await self._flush(jobs, done)
                    await self.reserve(ti)
                file = slot.file if ti in self.leads else None
                jobs.append((self.outs[ti], seg.tensor_start, slot.memory, seg.block_start, seg.length, file))
                done.append(seg)
            await self._flush(jobs, done)
        finally:
            self.ring.release(slot)

    async def _flush(self, jobs: list[Any], done: list[Segment]) -> None:
        if not jobs:
            return
        if sum(j[4] for j in jobs) <= INLINE_BYTES:
            _copy_segments(jobs)
        else:
            await run_sync(_copy_segments, list(jobs), workers=self.threads)
        for seg in done:
            self.remaining[seg.tensor] -= 1
            if self.remaining[seg.tensor] == 0:
                self.push(seg.tensor, self.outs[seg.tensor], None)
        jobs.clear()
        done.clear()


class TensorStream:
    """``async for name, array in model.stream()``: tensors as their blocks complete.

    The reads run in a task of the model's task group, in their own cancel
    scope. Leaving the loop early (break, an exception, cancellation) and then
    closing the stream — explicitly with ``aclose()``/``async with``, or
    implicitly when the next stream of the model starts or the model closes —
    cancels every read and releases every slot. (Garbage collection cannot do
    it: the running reads keep the stream alive.)

    With ``copy=False`` a tensor that sits inside one block, or over
    consecutive blocks that fill their slots (see :func:`lease_spans`), is
    returned as a read-only view into the ring (a zero-copy lease), valid
    until the next item is requested or the stream closes; the others are
    owned arrays.
    """

    def __init__(
        self,
        plan: LoadPlan,
        reader: BlockReader,
        spawn: Callable[[Callable[[], Any]], None],
        *,
        copy: bool,
        on_finish: Callable[[TensorStream], None],
    ) -> None:
        self._plan = plan
        self._reader = reader
        self._spawn = spawn
        # A striped manifest's reader takes slots a stripe at a time, not in block order.
        self._asm = _Assembly(
            plan,
            reader.ring,
            copy=copy,
            threads=reader.threads,
            across_blocks=not reader.stripes,
            place_files=reader.maps_files,
        )
        self._on_finish = on_finish
        self._scope: anyio.CancelScope | None = None
        self._done = anyio.Event()
        self._started = False
        self._finished = False
        self._closed = False
        self._superseded = False
        self._error: BaseException | None = None
        self._lease: Lease | None = None
        self._blocks: dict[int, BlockPlan] = {bp.block.index: bp for bp in plan.blocks}

    # -- producer --------------------------------------------------------------------
    async def _produce(self) -> None:
        asm = self._asm
        try:
            with anyio.CancelScope() as scope:
                self._scope = scope
                for ti, t in enumerate(self._plan.tensors):
                    if t.nbytes == 0:
                        asm.push(ti, np.empty(0, dtype=np.uint8), None)

                async def on_block(block: BlockRef, slot: Slot) -> None:
                    await asm.on_block(self._blocks[block.index], slot)

                # Leases over several blocks need each block's slot next to the one before.
                self._reader.ring.sequential = asm.sequential
                await self._reader.run([bp.block for bp in self._plan.blocks], on_block)
        except Exception as exc:  # surfaced to the consumer, not to the model's task group
            self._error = unwrap_group(exc)
        finally:
            self._finished = True
            if self._closed:
                asm.drop_leases()
            self._done.set()
            asm.wakeup.set()
            self._on_finish(self)

    def _start(self) -> None:
        if self._closed:
            raise ClosedError("this stream is closed")
        self._started = True
        self._spawn(self._produce)

    # -- consumer --------------------------------------------------------------------
    def __aiter__(self) -> TensorStream:
        return self

    async def __anext__(self) -> tuple[str, np.ndarray]:
        if self._superseded:
            raise ClosedError("this stream was closed because a newer stream of the same model started")
        if self._closed:
            raise StopAsyncIteration
        if not self._started:
            self._start()
        self._release_lease()
        asm = self._asm
        while True:
            item = asm.take()
            if item is not None:
                ti, raw, lease = item
                info = self._plan.tensors[ti]
                try:
                    arr = as_array(info, raw)
                except BaseException:
                    if lease is not None:
                        asm.let_go(lease)
                    await self.aclose()
                    raise
                if lease is not None:
                    self._lease = lease
                    arr.flags.writeable = False
                return info.name, arr
            if self._error is not None:
                err, self._error = self._error, None
                await self.aclose()
                raise err
            if self._finished:
                await self.aclose()
                raise StopAsyncIteration
            asm.wakeup = anyio.Event()
            asm.set_consumer_waiting(True)
            try:
                await asm.wakeup.wait()
            finally:
                asm.set_consumer_waiting(False)

    def _release_lease(self) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            self._asm.let_go(lease)

    def cancel(self, *, superseded: bool = False) -> None:
        """Stop the reads now (synchronous); slots come back as the reads unwind."""
        if superseded and not self._closed and (not self._finished or self._asm.ready):
            self._superseded = True
        self._closed = True
        self._release_lease()
        if self._scope is not None:
            self._scope.cancel()
        if self._finished:
            self._asm.drop_leases()

    async def aclose(self) -> None:
        """Cancel outstanding reads and wait until every slot is back in the ring."""
        self.cancel()
        if self._started and not self._finished:
            with anyio.CancelScope(shield=True):
                await self._done.wait()
        self._asm.drop_leases()
        self._asm.outputs.close()  # arrays the consumer drops from now on go back to the OS

    async def __aenter__(self) -> TensorStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def active(self) -> bool:
        return self._started and not self._finished

    @property
    def closing(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        if self._started and not self._finished:
            with anyio.CancelScope(shield=True):
                await self._done.wait()

    def statistics(self) -> AssemblyStatistics:
        a = self._asm
        return AssemblyStatistics(a.allowance, a.reserved, len(a.ready), a.delivered, a.outputs.reused)
