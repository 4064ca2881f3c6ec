"""Concurrent block reads into ring slots, with backpressure and prefetch.

The driver walks the planned blocks in stream order. For each it first takes
a free slot from the ring (waiting if none: backpressure), then starts a read
task under the block's source limiter. Reads therefore run ahead of the
consumer exactly as far as the ring allows (prefetch). Each read lands in the
slot memory (``preadv`` in a worker thread for local files), its length and
crc32c are checked in a worker thread, and the slot is handed to ``on_block``,
which owns it until it calls :meth:`Ring.release` (directly or through the
reader's bookkeeping).
"""

from __future__ import annotations

import hashlib
import mmap
import random
import statistics as _stats
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import anyio
import crc32c as _crc32c

from ._config import Limits
from ._exceptions import (
    AsyncloadError,
    AsyncloadErrorGroup,
    AuthenticationError,
    BlockNotFoundError,
    ChecksumError,
    DecryptionError,
    IntegrityError,
    SourceError,
    SourceUnavailableError,
    TruncatedBlockError,
)
from ._format import BlockRef, Manifest, Stripe
from ._ring import Ring, Slot
from ._threads import Workers, run_sync
from .sources import Source

if TYPE_CHECKING:
    from ._security import BlockCipher

__all__ = ["BlockReader", "ReaderStatistics", "crc32c_of", "open_reader", "unwrap_group"]

# Below this, hashing or copying on the event loop costs less than a thread hop.
INLINE_BYTES = 64 * 1024


def sha256_hex(data: memoryview) -> str:
    """SHA-256 of ``data`` (hashlib releases the GIL for large buffers)."""
    return hashlib.sha256(data).hexdigest()


def crc32c_of(data: memoryview) -> int:
    return int(_crc32c.crc32c(data))


async def checksum(data: memoryview, threads: Workers | None = None) -> int:
    """crc32c of ``data``; large buffers are hashed in a worker thread (the GIL is released)."""
    if len(data) <= INLINE_BYTES:
        return crc32c_of(data)
    return await run_sync(crc32c_of, data, workers=threads)


@dataclass(frozen=True, slots=True)
class ReaderStatistics:
    blocks_read: int
    bytes_in_flight: int  # bytes of reads started and not yet landed
    reads_in_flight: int
    checksum_failures: int
    degraded_reads: int  # blocks served by another copy or rebuilt from parity after a failure
    rebuilt_blocks: int = 0  # blocks decoded from their stripe (a subset of degraded_reads)
    hedged_reads: int = 0  # reads given up on (or never issued) because their source lagged
    retries: int = 0  # read attempts repeated after a transient failure
    timeouts: int = 0  # read attempts that ran past the timeout
    slow_sources: tuple[str, ...] = ()  # sources read around right now (far slower than peers)
    down_sources: tuple[str, ...] = ()  # sources whose last read failed
    mapped_blocks: int = 0  # block reads served by mapping cached file pages into the slot (no copy)


class ReadAround(SourceUnavailableError):
    """A read given up before it started: its source lags far behind its peers (internal)."""


class _Health:
    """What the reader has seen of one source: read speed (EWMA of seconds per byte) and failures."""

    __slots__ = ("active", "failures", "probe", "sec_per_byte", "slow")

    def __init__(self) -> None:
        self.sec_per_byte: float | None = None
        self.failures = 0  # consecutive failed reads
        self.slow = False
        self.probe = 0  # units since the source was last read directly while slow or down
        self.active = 0  # reads running on the source now

    def record(self, seconds: float, nbytes: int, sharing: float = 1.0) -> None:
        """A read of ``nbytes`` took ``seconds`` while ``sharing`` reads (itself included) ran on the source.

        The pace kept is the source's, not the read's: reads that share a source share
        its bandwidth, so four at once each take four times as long on a healthy source.
        """
        if nbytes <= 0:
            return
        x = seconds / nbytes / max(1.0, sharing)
        if self.sec_per_byte is None or x < self.sec_per_byte:
            self.sec_per_byte = x  # a fast read counts at once: a source recovers from one hiccup
        else:
            self.sec_per_byte = 0.7 * self.sec_per_byte + 0.3 * x
        self.failures = 0


class BlockReader:
    """Reads blocks from their sources into slots of ``ring``, checking every byte.

    With ``stripes`` (a manifest with parity), blocks are read stripe by
    stripe: a block whose read fails, times out or lags far behind its peers is
    rebuilt from the other blocks of its stripe and its parity, read into
    ``parity_ring`` (P slots of the budget).
    """

    def __init__(
        self,
        ring: Ring,
        sources: Mapping[str, Source],
        limiters: Mapping[str, anyio.CapacityLimiter],
        threads: Workers | None = None,
        cipher: BlockCipher | None = None,
        overhead: int = 0,
        verify_hashes: bool = False,
        limits: Limits | None = None,
        stripes: Sequence[Stripe] = (),
        parity_ring: Ring | None = None,
        block_table: Sequence[BlockRef] = (),
    ) -> None:
        self.verify_hashes = verify_hashes  # a signed manifest: check every block's SHA-256
        self.ring = ring
        self.sources = sources
        self.limiters = limiters
        self.threads = threads
        self.cipher = cipher
        self.limits = limits or Limits()
        # Stored bytes beyond the stream bytes (GCM tag). Without a cipher (verify without
        # the key) the stored bytes are still read whole and checked against their crc32c.
        self.overhead = cipher.overhead if cipher is not None else overhead
        for s in sources.values():
            s.threads = threads
        self.stripes = tuple(stripes)
        self.parity_ring = parity_ring
        self.block_table = tuple(block_table)  # every block of the manifest, by index
        if self.stripes and parity_ring is None:
            raise ValueError("a reader of a striped manifest needs a parity ring")
        self._stripe_of: dict[int, tuple[Stripe, int]] = {
            b: (st, pos) for st in self.stripes for pos, b in enumerate(st.blocks)
        }
        self._health = {k: _Health() for k in sources}
        # Per source, the direct stripe reads in progress: id -> give it up if its stripe can spare it.
        self._running: dict[str, dict[int, Callable[[], None]]] = {}
        self._blocks_read = 0
        self._bytes_in_flight = 0
        self._reads_in_flight = 0
        self._checksum_failures = 0
        self._degraded_reads = 0
        self._rebuilt = 0
        self._hedged = 0
        self._retries = 0
        self._timeouts = 0
        self._mapped = 0

    @classmethod
    def for_sources(
        cls,
        ring: Ring,
        sources: Mapping[str, Source],
        limits: Limits,
        threads: Workers | None = None,
        cipher: BlockCipher | None = None,
        overhead: int = 0,
        verify_hashes: bool = False,
        stripes: Sequence[Stripe] = (),
        parity_ring: Ring | None = None,
        block_table: Sequence[BlockRef] = (),
    ) -> BlockReader:
        """A reader with one limiter per source and one worker-thread limiter, from ``limits``.

        Where a block can be read elsewhere (copies or parity), each source's limiter
        starts at one read and grows by one with each read the source serves at a
        healthy pace, up to ``reads_per_source`` (a slow start): until the first reads
        show which source lags, no more than one read waits on it.
        """
        redundant = bool(stripes) or any(b.copies for b in block_table)
        first = 1 if redundant else limits.reads_per_source
        limiters = {k: anyio.CapacityLimiter(first) for k in sources}
        threads = threads or Workers(limits.threads)
        return cls(
            ring,
            sources,
            limiters,
            threads,
            cipher,
            overhead,
            verify_hashes,
            limits,
            stripes,
            parity_ring,
            block_table,
        )

    def close(self) -> None:
        """Close the rings (waiters see :class:`~asyncload.ClosedError`)."""
        self.ring.close()
        if self.parity_ring is not None:
            self.parity_ring.close()

    def statistics(self) -> ReaderStatistics:
        return ReaderStatistics(
            self._blocks_read,
            self._bytes_in_flight,
            self._reads_in_flight,
            self._checksum_failures,
            self._degraded_reads,
            self._rebuilt,
            self._hedged,
            self._retries,
            self._timeouts,
            tuple(sorted(k for k, h in self._health.items() if h.slow)),
            tuple(sorted(k for k, h in self._health.items() if h.failures)),
            self._mapped,
        )

    # -- one stored object ------------------------------------------------------------
    async def _read_stored(
        self,
        source_id: str,
        key: str,
        offset: int,
        buf: memoryview,
        what: str,
        *,
        retry: bool,
        on_start: Callable[[], None] | None = None,
        skip_if_slow: bool = False,
        slot: Slot | None = None,
        hashed: list[int] | None = None,
    ) -> int:
        """Read ``buf`` from ``key`` on ``source_id`` under its limiter, with timeout and retries.

        ``buf`` is the start of ``slot``'s memory when given: the bytes may then be
        mapped there instead of copied (see :meth:`_land`).

        Retries (only when ``retry``: nothing else can serve these bytes) repeat
        transient failures, never a missing key. Every attempt's duration feeds
        the source's speed estimate; a failure marks the source down until a
        read succeeds again. ``skip_if_slow``: a read whose turn on the source
        comes after the source was found slow gives up at once (:class:`ReadAround`)
        instead of queueing its block behind it; ``on_start`` is called when the
        read gets its turn (the time spent waiting for it is not the source's pace).
        """
        source = self.sources[source_id]
        health = self._health[source_id]
        timeout = self.limits.timeout
        attempts = 1 + (self.limits.retries if retry else 0)
        for attempt in range(attempts):
            if attempt:
                self._retries += 1
                await anyio.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))  # full jitter
            self._bytes_in_flight += len(buf)
            self._reads_in_flight += 1
            try:
                async with self.limiters[source_id]:
                    if skip_if_slow and health.slow:
                        raise ReadAround(
                            f"{what}: read around, source {source_id!r} lags far behind its peers"
                        )
                    if on_start is not None:
                        on_start()
                    t0 = time.monotonic()
                    health.active += 1
                    sharing: float = health.active
                    try:
                        with anyio.fail_after(timeout):
                            n = await self._land(source, key, offset, buf, slot, hashed)
                    except TimeoutError:
                        self._timeouts += 1
                        raise SourceUnavailableError(
                            f"{what}: no answer from source {source_id!r} within {timeout:g} s"
                        ) from None
                    finally:
                        sharing = (sharing + health.active) / 2  # reads beside it, at its start and end
                        health.active -= 1
                    health.record(time.monotonic() - t0, n, sharing)
                    limiter = self.limiters[source_id]
                    if limiter.total_tokens < self.limits.reads_per_source and not self._lags(source_id):
                        limiter.total_tokens += 1  # slow start (see for_sources)
                    return n
            except ReadAround:
                raise
            except BlockNotFoundError:
                health.failures += 1
                raise
            except SourceError:
                health.failures += 1
                if attempt == attempts - 1:
                    raise
            finally:
                self._bytes_in_flight -= len(buf)
                self._reads_in_flight -= 1
        raise AssertionError("unreachable")

    async def _land(
        self,
        source: Source,
        key: str,
        offset: int,
        buf: memoryview,
        slot: Slot | None,
        hashed: list[int] | None = None,
    ) -> int:
        """Bring ``len(buf)`` bytes of ``key`` into ``buf``: mapped into ``slot`` when allowed, else read.

        Mapped (zero copy) only for plain stored bytes (no cipher, no tag) from a
        source that supports it, at a page-aligned offset into a ring that can
        (:meth:`Ring.map_file`), while the page cache holds every page. A slot
        still showing an earlier file's pages gets its own memory back first.
        A block that had to be read (not cached) is in the page cache afterwards:
        it is mapped over its slot then, so owned arrays can take its pages
        instead of copies (see ``_assemble._place``; the copy into fresh memory,
        not the disk, set the pace of a cold full load).

        ``hashed`` (a list, emptied first): a mapped block's crc32c is appended,
        computed in the same worker call right after the mapping. Its pages are
        then faulted in while they are hashed, and the block costs the event
        loop one thread hop instead of two (between the two, with a ring of a
        few slots, the workers sat idle ~20% of a leased load). The attempt's
        time, and so the source's pace, then includes the hash: ~3 ms per
        16 MiB block, still far ahead of any read that has to copy.
        """
        if slot is None:
            return await source.read_into(key, offset, buf)
        ring = self.ring
        mappable = self.maps_files and source.supports_mapping and offset % mmap.PAGESIZE == 0
        if hashed is not None:
            hashed.clear()  # what an attempt given up on (timed out) computed is not this one's

        def place(fd: int, file_offset: int, nbytes: int) -> bool:
            if not ring.map_file(slot, fd, file_offset, nbytes):
                return False
            if hashed is not None:
                hashed.append(crc32c_of(buf))
            return True

        if mappable and await source.map_into(key, offset, len(buf), place):
            self._mapped += 1
            return len(buf)
        ring.writable(slot)
        n = await source.read_into(key, offset, buf)
        if mappable and n == len(buf):
            try:
                if await source.map_into(key, offset, n, place, counted=False):
                    self._mapped += 1
            except (SourceError, OSError):
                if hashed is not None:
                    hashed.clear()
                ring.writable(slot)  # the file went since: the bytes read are still in the slot
        return n

    @property
    def maps_files(self) -> bool:
        """Whether blocks may be mapped into their slots (plain stored bytes from a source that
        can, a ring that can)."""
        return (
            self.limits.map_files
            and self.cipher is None
            and self.overhead == 0
            and self.ring.mappable
            and any(s.supports_mapping for s in self.sources.values())
        )

    def _lags(self, source_id: str) -> bool:
        """Whether a source is marked slow, or its pace now looks far slower than its peers'."""
        return self._health[source_id].slow or self.paced_slower(source_id)

    def paced_slower(self, source_id: str) -> bool:
        """Whether a source's pace is over ``hedge`` x the median of its peers' (two known at least)."""
        own = self._health[source_id].sec_per_byte
        peers = [h.sec_per_byte for k, h in self._health.items() if k != source_id]
        known = [p for p in peers if p is not None]
        if not self.limits.hedge or own is None or len(known) < 2:
            return False
        return own > self.limits.hedge * _stats.median(known)

    async def _verify(
        self, what: str, data: memoryview, crc: int | None, sha: str | None, got: int | None = None
    ) -> None:
        """Check ``data`` against its crc32c (``got``: already computed) and, when asked, its SHA-256."""
        if crc is not None:
            if got is None:
                got = await checksum(data, self.threads)
            if got != crc:
                self._checksum_failures += 1
                raise ChecksumError(f"{what} is corrupt: crc32c {got:08x}, manifest says {crc:08x}")
        if self.verify_hashes:
            if sha is None:
                raise AuthenticationError(f"{what} carries no sha256: its signature does not cover its bytes")
            if await run_sync(sha256_hex, data, workers=self.threads) != sha:
                raise AuthenticationError(f"{what}: SHA-256 differs from the signed manifest (altered)")

    def _where(self, block: BlockRef, source_id: str) -> str:
        return f"block {block.index} ({block.key!r} on source {source_id!r})"

    async def _fetch(
        self,
        block: BlockRef,
        source_id: str,
        slot: Slot,
        *,
        retry: bool,
        on_start: Callable[[], None] | None = None,
        skip_if_slow: bool = False,
    ) -> None:
        """Read and verify the stored bytes of ``block`` from ``source_id`` (not yet decrypted)."""
        stored = block.length + self.overhead  # an encrypted block carries its GCM tag
        buf = slot.memory.data[:stored]
        where = self._where(block, source_id)
        hashed: list[int] = []  # the crc32c of a mapped block, computed where it was mapped
        n = await self._read_stored(
            source_id,
            block.key,
            block.key_offset,
            buf,
            where,
            retry=retry,
            on_start=on_start,
            skip_if_slow=skip_if_slow,
            slot=slot,
            hashed=hashed if block.crc32c is not None else None,
        )
        if n != stored:
            raise TruncatedBlockError(f"{where} is truncated: read {n} of {stored} bytes")
        slot.used = n
        await self._verify(where, buf, block.crc32c, block.sha256, hashed[-1] if hashed else None)

    async def _finish(self, block: BlockRef, source_id: str, slot: Slot) -> None:
        """Decrypt a fetched block in place (when keyed) and mark the slot's stream bytes."""
        stored = block.length + self.overhead
        if self.cipher is None:
            slot.used = block.length if self.overhead == 0 else stored
        else:
            try:
                await run_sync(self.cipher.open, block.index, slot.memory, stored, workers=self.threads)
            except DecryptionError as e:
                raise DecryptionError(f"{self._where(block, source_id)}: {e}") from None
            slot.used = block.length
        self._blocks_read += 1

    async def read_block(self, block: BlockRef, slot: Slot) -> None:
        """Fill ``slot`` with ``block``'s bytes, verified; raise an IntegrityError/SourceError otherwise.

        A block stored on several sources (``block.copies``) is read from the
        next copy when one fails (missing, I/O error, timeout, wrong length,
        checksum or tag): a degraded read, counted in :meth:`statistics`. Only
        when every copy fails is the first error raised, with the others as notes.
        """
        errors: list[Exception] = []
        copies = (block.source, *block.copies)  # primary first, unless it is down or lagging
        if block.copies:
            copies = tuple(
                sorted(copies, key=lambda c: bool(self._health[c].failures or self._health[c].slow))
            )
        for source_id in copies:
            try:
                await self.read_copy(block, source_id, slot, retry=len(copies) == 1)
            except (SourceError, IntegrityError) as e:
                errors.append(e)
                continue
            if errors:
                self._degraded_reads += 1
            return
        for other in errors[1:]:
            errors[0].add_note(f"also: {other}")
        raise errors[0]

    async def read_copy(self, block: BlockRef, source_id: str, slot: Slot, *, retry: bool = False) -> None:
        """Read, verify and (when keyed) decrypt the copy of ``block`` on ``source_id`` into ``slot``."""
        await self._fetch(block, source_id, slot, retry=retry)
        await self._finish(block, source_id, slot)

    async def read_parity(self, stripe: Stripe, r: int, buf: memoryview) -> None:
        """Read and verify parity block ``r`` of ``stripe`` into ``buf`` (``stripe.length`` bytes)."""
        p = stripe.parity[r]
        where = f"parity block {r} of stripe {stripe.index} ({p.key!r} on source {p.source!r})"
        n = await self._read_stored(p.source, p.key, 0, buf[: stripe.length], where, retry=False)
        if n != stripe.length:
            raise TruncatedBlockError(f"{where} is truncated: read {n} of {stripe.length} bytes")
        await self._verify(where, buf[: stripe.length], p.crc32c, p.sha256)

    # -- the driver ----------------------------------------------------------------------
    async def run(
        self,
        blocks: Sequence[BlockRef],
        on_block: Callable[[BlockRef, Slot], Awaitable[None]],
    ) -> None:
        """Read every block (concurrently, in slot order) and hand each to ``on_block``.

        ``on_block`` must release the slot it is given (once). If anything fails,
        every other read is cancelled and every slot still held here is released
        before the error propagates.
        """
        if self.stripes:
            from ._degraded import run_striped

            await run_striped(self, blocks, on_block)
            return
        held: dict[int, Slot] = {}

        async def one(block: BlockRef, slot: Slot) -> None:
            try:
                await self.read_block(block, slot)
            except BaseException:
                if held.pop(slot.index, None) is not None:
                    self.ring.release(slot)
                raise
            held.pop(slot.index, None)
            await on_block(block, slot)  # ownership of the slot passes to on_block

        try:
            async with anyio.create_task_group() as tg:
                for block in blocks:
                    slot = await self.ring.acquire()
                    held[slot.index] = slot
                    tg.start_soon(one, block, slot)
        finally:
            # Tasks cancelled before they ever ran never reached their own cleanup.
            for slot in held.values():
                self.ring.release(slot)
            held.clear()


async def open_reader(
    manifest: Manifest,
    sources: Mapping[str, Source],
    limits: Limits,
    *,
    cipher: BlockCipher | None = None,
    verify_hashes: bool = False,
) -> BlockReader:
    """A reader for ``manifest`` with its own rings: data slots, and parity slots when striped.

    The rings are allocated (and touched) in a worker thread; :meth:`BlockReader.close` frees them.
    """
    held_for_parity = limits.parity_slots(len(sources), manifest.parity)
    # Mirrored, so that a lease may span consecutive blocks (see _mirror); not when striped.
    ring = await run_sync(
        partial(Ring, mirrored=not manifest.stripes), limits.slot_size, limits.slots - held_for_parity
    )
    parity_ring = await run_sync(Ring, limits.slot_size, held_for_parity) if held_for_parity else None
    return BlockReader.for_sources(
        ring,
        sources,
        limits,
        cipher=cipher,
        overhead=manifest.block_overhead,
        verify_hashes=verify_hashes,
        stripes=manifest.stripes,
        parity_ring=parity_ring,
        block_table=manifest.blocks,
    )


def unwrap_group(exc: BaseException) -> BaseException:
    """The single real error inside (nested) exception groups, or the group itself.

    Cancellations of sibling tasks are noise once one task has failed; when
    exactly one other error remains it is raised as is, so callers can write
    ``except ChecksumError``. Several errors of one type (the same fault seen
    by concurrent reads, e.g. a missing source directory) become the first of
    them, with the others added as notes. Asyncload errors of different types
    become one :class:`AsyncloadErrorGroup` (caught by ``except AsyncloadError``
    and by ``except*``); anything else stays the group it was.
    """
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    real = [e for e in _leaves(exc) if not isinstance(e, anyio.get_cancelled_exc_class())]
    if len(real) == 1:
        return real[0]
    if real and all(type(e) is type(real[0]) for e in real):
        for other in real[1:]:
            real[0].add_note(f"also: {other}")
        return real[0]
    if real and all(isinstance(e, AsyncloadError) for e in real):
        return AsyncloadErrorGroup(f"{len(real)} errors: " + "; ".join(map(str, real[:3])), real)  # type: ignore[arg-type]
    return exc


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for e in exc.exceptions:
            out.extend(_leaves(e))
        return out
    return [exc]
