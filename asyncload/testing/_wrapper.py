"""The part every testing wrapper shares: a source that passes everything on to ``inner``."""

from __future__ import annotations

from ..sources import Source, SourceStatistics

__all__ = ["WrappedSource"]


class WrappedSource(Source):
    """Forwards writes, sizes, deletes, sync and close to ``inner``; subclasses change reads.

    The owner sets ``threads`` (the worker-thread limiter) on the wrapper; it is
    handed on to ``inner`` before each read or write.
    """

    supports_writes = True

    def __init__(self, inner: Source) -> None:
        super().__init__(inner.id, inner.location)
        self.inner = inner
        self.supports_writes = inner.supports_writes
        self.supports_ranges = inner.supports_ranges

    async def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        self.inner.threads = self.threads
        return await self.inner.read_into(key, offset, buf)

    async def write(self, key: str, data: memoryview) -> None:
        self.inner.threads = self.threads
        await self.inner.write(key, data)

    async def size(self, key: str) -> int:
        return await self.inner.size(key)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def sync(self) -> None:
        await self.inner.sync()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def statistics(self) -> SourceStatistics:
        return self.inner.statistics()
