"""LagMonitor: how late a heartbeat wakes, and which late beats the hypervisor caused.

The steal counter is replaced by a scripted one, so the test decides during which beats
the machine "lost" CPU time; the loop is blocked on purpose (the stall being measured).
"""

from __future__ import annotations

import time

import anyio
import anyio.lowlevel
import pytest

from asyncload import _metrics
from asyncload._metrics import LagMonitor

pytestmark = pytest.mark.anyio


async def _beats(lag: LagMonitor, n: int) -> None:
    with anyio.fail_after(10):
        while len(lag._lags) < n:
            await anyio.lowlevel.checkpoint()


async def test_a_late_beat_with_host_steal_is_kept_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = [100]
    monkeypatch.setattr(_metrics, "_steal_ticks", lambda: ticks[0])
    async with LagMonitor() as lag:
        await _beats(lag, 3)
        ticks[0] += 5  # the host takes CPU time while the loop is blocked (50 ms at 100 Hz)
        time.sleep(0.06)  # noqa: ASYNC251 - the stall under test: the event loop blocked
        await _beats(lag, len(lag._lags) + 1)
        time.sleep(0.03)  # noqa: ASYNC251 - a stall of the program's own, no steal
        await _beats(lag, len(lag._lags) + 3)
    s = lag.summary()
    assert s.max_ms >= 55  # the stolen stall
    assert 25 <= s.max_unstolen_ms < 55  # the program's own stall, the stolen one set apart
    assert s.steal_ms == pytest.approx(5 * _metrics._TICK_S * 1000)


async def test_without_a_steal_counter_every_beat_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_metrics, "_steal_ticks", lambda: None)
    async with LagMonitor() as lag:
        await _beats(lag, 2)
        time.sleep(0.03)  # noqa: ASYNC251 - the stall under test
        await _beats(lag, len(lag._lags) + 2)
    s = lag.summary()
    assert s.max_unstolen_ms == s.max_ms >= 25 and s.steal_ms == 0
