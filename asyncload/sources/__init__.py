"""Storage sources: one backend per module, one interface."""

from __future__ import annotations

from ._base import Source, SourceStatistics
from ._http import HttpSource
from ._local import LocalSource
from ._memory import MemorySource
from ._s3 import S3Options, S3Source

__all__ = ["HttpSource", "LocalSource", "MemorySource", "S3Options", "S3Source", "Source", "SourceStatistics"]
