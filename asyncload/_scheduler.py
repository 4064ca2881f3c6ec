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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import crc32c as _crc32c

from ._config import Limits
from ._exceptions import (
    AsyncloadError,
    AsyncloadErrorGroup,
    AuthenticationError,
    ChecksumError,
    DecryptionError,
    IntegrityError,
    SourceError,
    TruncatedBlockError,
)
from ._format import BlockRef
from ._ring import Ring, Slot
from ._threads import run_sync
from .sources import Source

if TYPE_CHECKING:
    from ._security import BlockCipher

__all__ = ["BlockReader", "ReaderStatistics", "crc32c_of", "unwrap_group"]

# Below this, hashing or copying on the event loop costs less than a thread hop.
INLINE_BYTES = 64 * 1024


def sha256_hex(data: memoryview) -> str:
    """SHA-256 of ``data`` (hashlib releases the GIL for large buffers)."""
    return hashlib.sha256(data).hexdigest()


def crc32c_of(data: memoryview) -> int:
    return int(_crc32c.crc32c(data))


async def checksum(data: memoryview, threads: anyio.CapacityLimiter | None = None) -> int:
    """crc32c of ``data``; large buffers are hashed in a worker thread (the GIL is released)."""
    if len(data) <= INLINE_BYTES:
        return crc32c_of(data)
    return await run_sync(crc32c_of, data, limiter=threads)


@dataclass(frozen=True, slots=True)
class ReaderStatistics:
    blocks_read: int
    bytes_in_flight: int  # bytes of reads started and not yet landed
    reads_in_flight: int
    checksum_failures: int
    degraded_reads: int  # blocks served by another copy after one failed


class BlockReader:
    """Reads blocks from their sources into slots of ``ring``, checking every byte."""

    def __init__(
        self,
        ring: Ring,
        sources: Mapping[str, Source],
        limiters: Mapping[str, anyio.CapacityLimiter],
        threads: anyio.CapacityLimiter | None = None,
        cipher: BlockCipher | None = None,
        overhead: int = 0,
        verify_hashes: bool = False,
    ) -> None:
        self.verify_hashes = verify_hashes  # a signed manifest: check every block's SHA-256
        self.ring = ring
        self.sources = sources
        self.limiters = limiters
        self.threads = threads
        self.cipher = cipher
        # Stored bytes beyond the stream bytes (GCM tag). Without a cipher (verify without
        # the key) the stored bytes are still read whole and checked against their crc32c.
        self.overhead = cipher.overhead if cipher is not None else overhead
        for s in sources.values():
            s.threads = threads
        self._blocks_read = 0
        self._bytes_in_flight = 0
        self._reads_in_flight = 0
        self._checksum_failures = 0
        self._degraded_reads = 0

    @classmethod
    def for_sources(
        cls,
        ring: Ring,
        sources: Mapping[str, Source],
        limits: Limits,
        threads: anyio.CapacityLimiter | None = None,
        cipher: BlockCipher | None = None,
        overhead: int = 0,
        verify_hashes: bool = False,
    ) -> BlockReader:
        """A reader with one limiter per source and one worker-thread limiter, from ``limits``."""
        limiters = {k: anyio.CapacityLimiter(limits.reads_per_source) for k in sources}
        threads = threads or anyio.CapacityLimiter(limits.threads)
        return cls(ring, sources, limiters, threads, cipher, overhead, verify_hashes)

    def statistics(self) -> ReaderStatistics:
        return ReaderStatistics(
            self._blocks_read,
            self._bytes_in_flight,
            self._reads_in_flight,
            self._checksum_failures,
            self._degraded_reads,
        )

    async def read_block(self, block: BlockRef, slot: Slot) -> None:
        """Fill ``slot`` with ``block``'s bytes, verified; raise an IntegrityError/SourceError otherwise.

        A block stored on several sources (``block.copies``) is read from the
        next copy when one fails (missing, I/O error, wrong length, checksum or
        tag): a degraded read, counted in :meth:`statistics`. Only when every
        copy fails is the first error raised, with the others as notes.
        """
        errors: list[Exception] = []
        for source_id in (block.source, *block.copies):  # primary first
            try:
                await self.read_copy(block, source_id, slot)
            except (SourceError, IntegrityError) as e:
                errors.append(e)
                continue
            if errors:
                self._degraded_reads += 1
            return
        for other in errors[1:]:
            errors[0].add_note(f"also: {other}")
        raise errors[0]

    async def read_copy(self, block: BlockRef, source_id: str, slot: Slot) -> None:
        """Read and verify the copy of ``block`` on ``source_id`` into ``slot``."""
        source = self.sources[source_id]
        stored = block.length + self.overhead  # an encrypted block carries its GCM tag
        buf = slot.memory.data[:stored]
        self._bytes_in_flight += block.length
        self._reads_in_flight += 1
        try:
            async with self.limiters[source_id]:
                n = await source.read_into(block.key, block.key_offset, buf)
        finally:
            self._bytes_in_flight -= block.length
            self._reads_in_flight -= 1
        if n != stored:
            raise TruncatedBlockError(
                f"block {block.index} ({block.key!r} on source {source_id!r}) is truncated: "
                f"read {n} of {stored} bytes"
            )
        slot.used = n
        if block.crc32c is not None:
            got = await checksum(buf, self.threads)
            if got != block.crc32c:
                self._checksum_failures += 1
                raise ChecksumError(
                    f"block {block.index} ({block.key!r} on source {source_id!r}) is corrupt: "
                    f"crc32c {got:08x}, manifest says {block.crc32c:08x}"
                )
        if self.verify_hashes:
            where = f"block {block.index} ({block.key!r} on source {source_id!r})"
            if block.sha256 is None:
                raise AuthenticationError(
                    f"{where} carries no sha256: its signature does not cover its bytes"
                )
            if await run_sync(sha256_hex, buf, limiter=self.threads) != block.sha256:
                raise AuthenticationError(f"{where}: SHA-256 differs from the signed manifest (altered)")
        if self.cipher is None:
            slot.used = block.length if self.overhead == 0 else stored
        else:
            try:
                await run_sync(self.cipher.open, block.index, slot.memory, stored, limiter=self.threads)
            except DecryptionError as e:
                raise DecryptionError(
                    f"block {block.index} ({block.key!r} on source {source_id!r}): {e}"
                ) from None
            slot.used = block.length
        self._blocks_read += 1

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
