"""Measuring what the CLI and the benchmarks report: event-loop lag and peak RSS."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import anyio
import anyio.abc
import numpy as np

__all__ = ["LagMonitor", "LagSummary", "current_rss", "peak_rss", "reset_peak_rss"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(field.encode() + b":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident set size since start (or since :func:`reset_peak_rss`), in bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True, slots=True)
class LagSummary:
    """How late a periodic heartbeat woke up, in milliseconds.

    ``max_unstolen_ms`` is the largest lag among heartbeats during which the machine
    lost no CPU time to its hypervisor (``steal`` in ``/proc/stat``), and ``steal_ms``
    the CPU time stolen over the whole run (all CPUs; 0 where not reported). A virtual
    machine whose vCPUs the host deschedules stops every thread at once, the event
    loop's too, for as long as that lasts: no program can shorten such a stall.
    """

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    max_unstolen_ms: float = 0.0
    steal_ms: float = 0.0


_TICK_S = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def _steal_ticks() -> int | None:
    """CPU time stolen by the hypervisor since boot, in clock ticks, or None where unknown."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return None


class LagMonitor:
    """A task that sleeps ``interval`` seconds in a loop and records how late it wakes.

    ``async with LagMonitor() as lag: ...`` then ``lag.summary()``. The lag is
    the time the event loop was busy with something else: a blocking call on
    the loop shows up here directly.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self._lags: list[float] = []
        self._stolen: list[bool] = []  # per heartbeat: did the machine lose CPU time meanwhile
        self._steal0: int | None = None
        self._steal1: int | None = None
        self._scope: anyio.CancelScope | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    async def _run(self) -> None:
        with anyio.CancelScope() as scope:
            self._scope = scope
            steal = self._steal0 = _steal_ticks()
            while True:
                t0 = time.perf_counter()
                await anyio.sleep(self.interval)
                self._lags.append(max(0.0, time.perf_counter() - t0 - self.interval))
                now = _steal_ticks()
                self._stolen.append(now is not None and steal is not None and now > steal)
                steal = self._steal1 = now

    async def __aenter__(self) -> LagMonitor:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._run)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)

    def summary(self) -> LagSummary:
        if not self._lags:
            return LagSummary(0, 0.0, 0.0, 0.0)
        a = np.asarray(self._lags) * 1000.0
        clean = a[~np.asarray(self._stolen, dtype=bool)]
        steal = 0.0
        if self._steal0 is not None and self._steal1 is not None:
            steal = (self._steal1 - self._steal0) * _TICK_S * 1000.0
        return LagSummary(
            len(a),
            float(np.percentile(a, 50)),
            float(np.percentile(a, 99)),
            float(a.max()),
            float(clean.max()) if clean.size else 0.0,
            steal,
        )
