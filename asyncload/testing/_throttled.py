"""A source wrapper that behaves like a device of a given bandwidth and latency.

Used to measure multi-source scaling and a single slow source on one machine,
where every directory is really backed by the same page cache: wrap each source
in a :class:`ThrottledSource` and the loader sees k independent devices.

The sleeps here *are* the simulated device (time spent "on the wire"), not
synchronisation: nothing waits on them to observe a state change.
"""

from __future__ import annotations

import random

import anyio

from ..sources import Source
from ._wrapper import WrappedSource

__all__ = ["ThrottledSource"]

_CHUNK_SECONDS = 0.01  # one bucket grant covers ~10 ms of transfer: ~100 sleeps/s per source
_BURST_SECONDS = 0.1  # credit an idle device may bank; also absorbs late wake-ups of the sleeps
_MIN_CHUNK = 64 << 10


class _TokenBucket:
    """``rate`` bytes per second shared by every caller of :meth:`take`, FIFO.

    A caller takes its bytes in chunks of ``chunk`` (~10 ms of transfer); the
    lock is held while a chunk waits for its credit, so concurrent reads
    interleave chunk by chunk and together never exceed ``rate``. The bucket
    starts empty and banks up to ``capacity`` bytes of credit while idle (~100 ms,
    at least 4 chunks): the burst an idle device may deliver at once, and the
    slack that keeps a sleep that wakes late (a busy event loop) from lowering
    the rate. Credit is
    debited only after the wait, so a cancelled read takes nothing it did not get.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.chunk = max(_MIN_CHUNK, int(rate * _CHUNK_SECONDS))
        self.capacity = max(4 * self.chunk, int(rate * _BURST_SECONDS))
        self._tokens = 0.0  # a fresh device banks no credit: no burst at the start of a measurement
        self._stamp: float | None = None
        self._lock: anyio.Lock | None = None

    def _refill(self) -> None:
        now = anyio.current_time()
        if self._stamp is not None:
            self._tokens = min(float(self.capacity), self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, nbytes: int) -> float:
        """Wait until ``nbytes`` of credit were granted; return the seconds that took (queueing
        behind other reads of the source included)."""
        if self._lock is None:
            self._lock = anyio.Lock()
        start = anyio.current_time()
        while nbytes > 0:
            chunk = min(nbytes, self.chunk)
            async with self._lock:
                self._refill()
                if self._tokens < chunk:
                    delay = (chunk - self._tokens) / self.rate
                    await anyio.sleep(delay)
                    self._refill()
                self._tokens -= chunk
            nbytes -= chunk
        return anyio.current_time() - start


class ThrottledSource(WrappedSource):
    """Wraps ``inner`` so that its reads take as long as on a slower device.

    * ``bandwidth``: bytes per second for all reads of this source together (a
      token bucket shared by its concurrent reads), or ``None`` for no limit.
      k sources throttled to X each deliver up to k·X together.
    * ``latency``: seconds added to every read (concurrent reads wait theirs at
      the same time, like a device with a queue); with ``jitter`` J each read
      waits a uniform draw from ``latency * [1 - J, 1 + J]``, from
      ``random.Random(seed)``.

    A read first waits its latency, then reads from ``inner`` into the caller's
    buffer, then waits until the bucket granted the bytes it read; every wait is
    cancellable. Bytes are passed through unchanged. Writes, sizes, deletes and
    everything else go straight to ``inner``. :meth:`statistics` is the inner
    source's; :attr:`throttled_s` is the total time reads waited for bandwidth
    (summed over concurrent reads, so it can exceed the wall time),
    :attr:`reads_started` / :attr:`reads_finished` count reads entered and left
    (returned, raised or cancelled).
    """

    def __init__(
        self,
        inner: Source,
        *,
        bandwidth: float | None = None,
        latency: float = 0.0,
        jitter: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s or None, got {bandwidth}")
        if not latency >= 0:
            raise ValueError(f"latency must be >= 0 seconds, got {latency}")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be within [0, 1], got {jitter}")
        super().__init__(inner)
        self.bandwidth = bandwidth
        self.latency = latency
        self.jitter = jitter
        self._bucket = _TokenBucket(bandwidth) if bandwidth is not None else None
        self._rng = random.Random(seed)
        self.throttled_s = 0.0
        self.reads_started = 0
        self.reads_finished = 0  # returned, raised or was cancelled

    def _latency(self) -> float:
        if not self.jitter:
            return self.latency
        return self.latency * (1.0 + self.jitter * (2.0 * self._rng.random() - 1.0))

    async def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        self.reads_started += 1
        try:
            if self.latency:
                await anyio.sleep(self._latency())
            n = await super().read_into(key, offset, buf)
            if self._bucket is not None and n:
                self.throttled_s += await self._bucket.take(n)
            return n
        finally:
            self.reads_finished += 1

    def __repr__(self) -> str:
        bw = "unlimited" if self.bandwidth is None else f"{self.bandwidth / 1e6:g} MB/s"
        return f"<ThrottledSource {bw}, {self.latency * 1e3:g} ms wrapping {self.inner!r}>"
