"""The storage source interface: ranged reads into a caller's buffer, writes, sizes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .._threads import Workers

__all__ = ["Source", "SourceStatistics"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SourceStatistics:
    """What one source has done since it was opened."""

    id: str
    reads: int
    bytes_read: int
    writes: int
    bytes_written: int
    errors: int
    in_flight: int
    uncached_reads: int = 0  # reads that had to wait for a disk (LocalSource: not in the page cache)
    mapped_reads: int = 0  # reads served by mapping cached file pages, no copy (LocalSource.map_into)


class Source(ABC):
    """A place that stores blocks under keys (a directory, later a URL or bucket).

    Implementations map their own errors into the asyncload exception tree at
    this boundary: a missing key or location raises
    :class:`~asyncload.BlockNotFoundError`, other failures
    :class:`~asyncload.SourceUnavailableError`. Concurrency is limited by the
    caller (one limiter per source, owned by the loader), not here.
    """

    supports_writes: bool = False
    supports_ranges: bool = True
    supports_mapping: bool = False  # map_into can place stored bytes without copying them

    def __init__(self, id: str, location: str) -> None:
        self.id = id
        self.location = location
        self._reads = self._bytes_read = self._writes = self._bytes_written = 0
        self._errors = self._in_flight = 0
        # Worker-thread limiter shared by everything one model or save does; set by the owner.
        self.threads: Workers | None = None

    @abstractmethod
    async def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        """Read up to ``len(buf)`` bytes of ``key`` starting at ``offset`` into ``buf``.

        Returns the number of bytes read, which is less than ``len(buf)`` only
        at the end of the object.
        """

    async def map_into(
        self,
        key: str,
        offset: int,
        nbytes: int,
        place: Callable[[int, int, int], bool],
        *,
        counted: bool = True,
    ) -> bool:
        """Offer ``nbytes`` of ``key`` from ``offset`` to be mapped instead of read (zero copy).

        A source that keeps blocks in local files calls ``place(fd, offset, nbytes)``
        in a worker thread, with a read-only fd of the file, once it knows the file
        is at least ``offset + nbytes`` long, and returns what ``place`` returned.
        False (the default, and the answer of every source without
        ``supports_mapping``): nothing was placed, read the bytes with :meth:`read_into`.
        ``counted=False``: the bytes were just read (and counted) already.
        """
        return False

    async def write(self, key: str, data: memoryview) -> None:
        """Store ``data`` under ``key`` durably; the key appears whole or not at all."""
        raise NotImplementedError(f"source {self.id!r} ({type(self).__name__}) does not accept writes")

    @abstractmethod
    async def size(self, key: str) -> int:
        """Size in bytes of the object stored under ``key``."""

    async def exists(self, key: str) -> bool:
        from .._exceptions import BlockNotFoundError

        try:
            await self.size(key)
        except BlockNotFoundError:
            return False
        return True

    async def delete(self, key: str) -> None:
        raise NotImplementedError(f"source {self.id!r} does not support delete")

    async def sync(self) -> None:  # noqa: B027 - optional hook
        """Make every completed write durable (e.g. fsync directories)."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections or handles."""

    async def _counted(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run one request of this source, counted in flight and, if it raises, as an error."""
        self._in_flight += 1
        try:
            return await op()
        except Exception:  # a cancelled request is not an error
            self._errors += 1
            raise
        finally:
            self._in_flight -= 1

    async def _counted_read(self, op: Callable[[], Awaitable[int]]) -> int:
        """:meth:`_counted` for a read returning its byte count, which is added to the totals."""
        n = await self._counted(op)
        self._reads += 1
        self._bytes_read += n
        return n

    async def _counted_write(self, op: Callable[[], Awaitable[None]], nbytes: int) -> None:
        """:meth:`_counted` for a write of ``nbytes``, added to the totals when it succeeds."""
        await self._counted(op)
        self._writes += 1
        self._bytes_written += nbytes

    def statistics(self) -> SourceStatistics:
        return SourceStatistics(
            self.id,
            self._reads,
            self._bytes_read,
            self._writes,
            self._bytes_written,
            self._errors,
            self._in_flight,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} at {self.location!r}>"
