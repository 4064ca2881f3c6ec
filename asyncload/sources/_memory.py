"""An in-memory source, for tests and for staging."""

from __future__ import annotations

import anyio.lowlevel

from .._exceptions import BlockNotFoundError
from ._base import Source

__all__ = ["MemorySource"]


class MemorySource(Source):
    """Blocks kept in a dict of bytes; reads copy into the caller's buffer."""

    supports_writes = True

    def __init__(self, id: str = "memory", location: str = "memory:") -> None:
        super().__init__(id, location)
        self.objects: dict[str, bytes] = {}

    def _get(self, key: str) -> bytes:
        try:
            return self.objects[key]
        except KeyError:
            raise BlockNotFoundError(f"source {self.id!r}: block {key!r} not found") from None

    async def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        await anyio.lowlevel.checkpoint()
        data = self._get(key)
        chunk = data[offset : offset + len(buf)]
        buf[: len(chunk)] = chunk
        self._reads += 1
        self._bytes_read += len(chunk)
        return len(chunk)

    async def write(self, key: str, data: memoryview) -> None:
        await anyio.lowlevel.checkpoint()
        self.objects[key] = bytes(data)
        self._writes += 1
        self._bytes_written += len(data)

    async def size(self, key: str) -> int:
        await anyio.lowlevel.checkpoint()
        return len(self._get(key))

    async def delete(self, key: str) -> None:
        await anyio.lowlevel.checkpoint()
        self.objects.pop(key, None)
