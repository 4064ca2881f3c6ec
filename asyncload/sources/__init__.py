"""Storage sources: one backend per module, one interface."""

from __future__ import annotations

from ._base import Source, SourceStatistics
from ._local import LocalSource
from ._memory import MemorySource

__all__ = ["LocalSource", "MemorySource", "Source", "SourceStatistics"]
