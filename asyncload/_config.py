"""Small value objects and size parsing; the public entry points own the defaults."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ._exceptions import BudgetError

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_BUDGET",
    "DEFAULT_HEDGE",
    "DEFAULT_READS_PER_SOURCE",
    "DEFAULT_RETRIES",
    "DEFAULT_THREADS",
    "DEFAULT_TIMEOUT",
    "MIN_BLOCK_SIZE",
    "Limits",
    "format_size",
    "parse_size",
]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

DEFAULT_BLOCK_SIZE = 16 * MiB
MIN_BLOCK_SIZE = 4 * KiB
DEFAULT_BUDGET = 256 * MiB
DEFAULT_READS_PER_SOURCE = 4
DEFAULT_TIMEOUT = 60.0  # seconds one read attempt may take before it counts as failed
DEFAULT_RETRIES = 2
DEFAULT_HEDGE = 4.0
# Worker threads for reads, checksums and copies: page-cache reads and memcpy are CPU
# work, so more threads than cores only adds scheduling lag to the event loop.
DEFAULT_THREADS = max(2, os.cpu_count() or 2)

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": KiB,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": MiB,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": GiB,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, *, what: str = "size") -> int:
    """Return a byte count from an int or a string such as ``"256MiB"`` or ``"1.5GB"``."""
    if isinstance(value, bool):
        raise BudgetError(f"{what}: expected bytes as int or str, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise BudgetError(f"{what}: must not be negative, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m is None or m.group(2).lower() not in _UNITS:
            raise BudgetError(f"{what}: cannot parse {value!r} (use e.g. 4096, '16MiB', '1GiB')")
        return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise BudgetError(f"{what}: expected bytes as int or str, got {type(value).__name__}")


def format_size(n: int) -> str:
    """Human-readable binary size, e.g. ``16.0 MiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True, slots=True)
class Limits:
    """How much memory and concurrency a load or save may use.

    ``budget`` is S, the total bytes of the slot ring; ``block_size`` is m, the
    size of one slot. ``reads_per_source`` bounds concurrent reads (or writes) on
    one source; ``threads`` bounds the worker threads doing syscalls, checksums
    and copies for one model (default: the number of cores, at least 2).
    """

    budget: int = DEFAULT_BUDGET
    block_size: int = DEFAULT_BLOCK_SIZE
    reads_per_source: int = DEFAULT_READS_PER_SOURCE
    threads: int = DEFAULT_THREADS
    overhead: int = 0  # bytes a stored block carries beyond m (the GCM tag of an encrypted store)
    # Faults: one read attempt may take ``timeout`` seconds (None: no limit); a transient
    # failure (not a missing block) is retried ``retries`` times with backoff and jitter when
    # no other copy or parity can serve the block; with parity, a source whose reads take
    # more than ``hedge`` times as long as its peers' is read around (0 turns that off).
    timeout: float | None = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    hedge: float = DEFAULT_HEDGE
    # Blocks of local files that the page cache holds whole are mapped into their slot
    # (read-only, no copy) instead of read into it; False reads every block (see Ring.map_file).
    map_files: bool = True

    @property
    def slot_size(self) -> int:
        return self.block_size + self.overhead

    def check(self, sources: int) -> None:
        """Raise :class:`BudgetError` unless the ring holds one slot per source."""
        if self.block_size < 1:
            raise BudgetError(f"block size must be positive, got {self.block_size}")
        if self.threads < 1:
            raise BudgetError(f"threads must be >= 1, got {self.threads}")
        if self.reads_per_source < 1:
            raise BudgetError(f"reads_per_source must be >= 1, got {self.reads_per_source}")
        if self.timeout is not None and not self.timeout > 0:
            raise BudgetError(f"timeout must be a positive number of seconds or None, got {self.timeout}")
        if self.retries < 0 or self.hedge < 0:
            raise BudgetError(f"retries and hedge must not be negative, got {self.retries}, {self.hedge}")
        need = sources * self.slot_size
        if self.budget < need:
            tag = f" + {self.overhead}-byte tag" if self.overhead else ""
            raise BudgetError(
                f"budget S={self.budget} bytes ({format_size(self.budget)}) is smaller than "
                f"k x m = {sources} sources x {self.block_size} bytes block size{tag} = {need} bytes "
                f"({format_size(need)}); raise the budget or lower the block size"
            )

    @property
    def slots(self) -> int:
        return self.budget // self.slot_size

    def parity_slots(self, sources: int, parity: int) -> int:
        """Slots of the budget set aside for parity blocks: P per stripe that may hold them at once.

        Up to four stripes (as many as the budget has room for at k slots each)
        hold parity at a time; the rest of the ring (at least k - P slots, by
        the rule S >= k x m) holds data blocks.
        """
        if not parity:
            return 0
        return parity * max(1, min(4, self.slots // max(1, sources)))
