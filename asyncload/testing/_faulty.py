"""A source wrapper that injects faults: errors, stalls, short reads and flipped bytes.

Faults are real from the loader's point of view: the wrapped source's read
fails, never returns, returns fewer bytes than asked, or lands corrupted bytes
in the caller's buffer. Stalls wait on an event that only :meth:`release_stalls`
sets (never a timer), so a test decides exactly when, or whether, they end, and
a stalled read is cancellable like any other await.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable

import anyio

from .._exceptions import SourceUnavailableError
from ..sources import Source, SourceStatistics
from ._wrapper import WrappedSource

__all__ = ["FaultySource"]


def _keys(keys: Iterable[str]) -> frozenset[str]:
    if isinstance(keys, str):
        raise TypeError("pass a collection of keys, not a single string")
    return frozenset(keys)


class FaultySource(WrappedSource):
    """Wraps ``inner`` and injects faults into its reads (writes and sizes pass through).

    A block key matches an entry of ``fail_keys``, ``stall_keys``,
    ``truncate_keys`` or ``corrupt_keys`` when it equals the entry or when its
    last path component does (``"3f2a…"`` matches ``"3f/3f2a…"``, a content-addressed key).
    Per read, in this order:

    * ``fail_keys``, or a draw below ``error_rate`` from ``random.Random(seed)``:
      raise :class:`~asyncload.SourceUnavailableError`;
    * ``stall_keys``: set :attr:`stall_started` and wait until :meth:`release_stalls`;
    * read from ``inner``;
    * ``truncate_keys``: report half the bytes read;
    * ``corrupt_keys``: flip every bit of one byte of what was read.
    """

    def __init__(
        self,
        inner: Source,
        *,
        seed: int = 0,
        error_rate: float = 0.0,
        stall_keys: Iterable[str] = (),
        truncate_keys: Iterable[str] = (),
        corrupt_keys: Iterable[str] = (),
        fail_keys: Iterable[str] = (),
    ) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be within [0, 1], got {error_rate}")
        super().__init__(inner)
        self.error_rate = error_rate
        self.stall_keys = _keys(stall_keys)
        self.truncate_keys = _keys(truncate_keys)
        self.corrupt_keys = _keys(corrupt_keys)
        self.fail_keys = _keys(fail_keys)
        self._rng = random.Random(seed)
        self._stall_started: anyio.Event | None = None
        self._released: anyio.Event | None = None
        self.reads_started = 0
        self.reads_finished = 0  # returned, raised or was cancelled
        self.reads_failed = 0  # injected errors only
        self.stalls = 0  # reads that entered a stall
        self.stalled_now = 0  # reads waiting in a stall right now

    # -- control -----------------------------------------------------------------------
    @property
    def stall_started(self) -> anyio.Event:
        """Set once a read has entered a stall (``await src.stall_started.wait()``)."""
        if self._stall_started is None:
            self._stall_started = anyio.Event()
        return self._stall_started

    def _release_event(self) -> anyio.Event:
        if self._released is None:
            self._released = anyio.Event()
        return self._released

    def release_stalls(self) -> None:
        """Let every stalled read, and every later one, proceed."""
        self._release_event().set()

    @staticmethod
    def _matches(key: str, keys: frozenset[str]) -> bool:
        return key in keys or key.rsplit("/", 1)[-1] in keys

    # -- Source --------------------------------------------------------------------------
    async def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        self.reads_started += 1
        try:
            if self._matches(key, self.fail_keys) or (
                self.error_rate and self._rng.random() < self.error_rate
            ):
                self.reads_failed += 1
                raise SourceUnavailableError(
                    f"source {self.id!r}: injected failure reading {key!r} at {offset}"
                )
            if self._matches(key, self.stall_keys):
                released = self._release_event()
                if not released.is_set():
                    self.stalls += 1
                    self.stalled_now += 1
                    self.stall_started.set()
                    try:
                        await released.wait()
                    finally:
                        self.stalled_now -= 1
            n = await super().read_into(key, offset, buf)
            if self._matches(key, self.truncate_keys):
                n //= 2
            if n and self._matches(key, self.corrupt_keys):
                buf[n // 2] ^= 0xFF
            return n
        finally:
            self.reads_finished += 1

    def statistics(self) -> SourceStatistics:
        s = self.inner.statistics()
        return dataclasses.replace(s, errors=s.errors + self.reads_failed)

    def __repr__(self) -> str:
        return f"<FaultySource wrapping {self.inner!r}>"
