"""The worker pool every blocking call of a load or save runs on (``_threads.Workers``).

What it must do: run each job on one of at most ``threads`` threads, in the order given;
hand back results and exceptions; start the next queued job without the event loop's help;
wait for a started job even when its caller is cancelled (the job may be writing into a
slot); and let its threads go when closed or collected. Every wait here is bounded.
"""

from __future__ import annotations

import gc
import threading
import time

import anyio
import anyio.lowlevel
import pytest

from asyncload._threads import Workers, run_sync

pytestmark = pytest.mark.anyio

WAIT = 10.0  # seconds any blocking wait may take before the test fails (never reached when it passes)


def _named(prefix: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(prefix + "-")]


async def _settled(pool: Workers, done: int) -> None:
    """Yield to the loop until ``done`` jobs of ``pool`` finished (bounded)."""
    deadline = time.monotonic() + WAIT
    while pool.statistics().done < done:
        assert time.monotonic() < deadline, pool.statistics()
        await anyio.sleep(0.001)


async def test_results_and_exceptions_come_back() -> None:
    pool = Workers(2, "t-results")
    assert await pool.run(sum, [1, 2, 3]) == 6
    assert await run_sync(pow, 2, 10, workers=pool) == 1024
    with pytest.raises(ZeroDivisionError):
        await pool.run(divmod, 1, 0)
    assert await pool.run(str.upper, "still works") == "STILL WORKS"
    stats = pool.statistics()
    assert (stats.threads, stats.busy, stats.queued, stats.done) == (2, 0, 0, 4)
    assert 1 <= stats.started <= 2
    pool.close()


async def test_never_more_jobs_at_once_than_threads_and_in_order() -> None:
    pool = Workers(2, "t-bound")
    gate = threading.Event()
    lock = threading.Lock()
    running = peak = 0
    started: list[int] = []

    def job(i: int) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            started.append(i)
        assert gate.wait(WAIT)
        with lock:
            running -= 1
        return i

    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await pool.run(job, i)

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(one, i)
            await anyio.lowlevel.checkpoint()  # queued in this order
        deadline = time.monotonic() + WAIT
        while pool.statistics().busy < 2:
            assert time.monotonic() < deadline
            await anyio.sleep(0.001)
        stats = pool.statistics()
        assert (stats.busy, stats.queued) == (2, 6)
        gate.set()
    assert results == {i: i for i in range(8)}
    assert peak == 2
    assert started[:2] in ([0, 1], [1, 0]) and started[2:] == sorted(started[2:])
    assert len(_named("t-bound")) == 2
    pool.close()


async def test_a_finished_worker_takes_the_next_job_without_the_loop() -> None:
    """The point of the pool: with the event loop blocked, queued jobs still run one after another."""
    pool = Workers(1, "t-handoff")
    first_may_end = threading.Event()
    second_started = threading.Event()

    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run, first_may_end.wait, WAIT)
        tg.start_soon(pool.run, second_started.set)
        deadline = time.monotonic() + WAIT
        while pool.statistics().queued + pool.statistics().busy < 2:
            assert time.monotonic() < deadline
            await anyio.lowlevel.checkpoint()
        # Block the loop thread itself: only the worker can start the second job now.
        first_may_end.set()
        assert second_started.wait(WAIT), "the second job waited for the event loop"
    pool.close()


async def test_a_cancelled_caller_still_waits_for_its_job() -> None:
    pool = Workers(1, "t-cancel")
    release = threading.Event()
    finished = threading.Event()
    scopes: list[anyio.CancelScope] = []
    seen: list[object] = []

    def job() -> None:
        assert release.wait(WAIT)
        finished.set()

    async def caller() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            try:
                await pool.run(job)
            finally:
                seen.append(finished.is_set())  # back only once the job has ended
            await anyio.lowlevel.checkpoint()  # the cancellation lands here
            seen.append("not cancelled")
        seen.append(scope.cancelled_caught)

    async with anyio.create_task_group() as tg:
        tg.start_soon(caller)
        deadline = time.monotonic() + WAIT
        while pool.statistics().busy < 1:
            assert time.monotonic() < deadline
            await anyio.sleep(0.001)
        scopes[0].cancel()
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        assert seen == []  # the caller is still waiting for its job
        release.set()
    assert seen == [True, True]
    pool.close()


async def test_an_already_cancelled_caller_queues_nothing() -> None:
    pool = Workers(1, "t-precancel")
    ran = threading.Event()
    with anyio.CancelScope() as scope:
        scope.cancel()
        await pool.run(ran.set)
    assert scope.cancelled_caught
    assert pool.statistics().done == 0 and not ran.is_set()
    pool.close()


async def test_closed_pool_refuses_work_and_its_threads_end() -> None:
    pool = Workers(3, "t-close")
    for i in range(6):
        await pool.run(abs, -i)
    threads = _named("t-close")
    assert threads
    pool.close()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        await pool.run(abs, 1)


async def test_threads_end_when_the_pool_is_collected() -> None:
    pool = Workers(2, "t-gc")
    await pool.run(abs, -1)
    threads = _named("t-gc")
    assert threads
    del pool
    gc.collect()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()


def test_a_pool_needs_a_thread() -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        Workers(0)


async def test_worker_threads_run_at_lower_priority() -> None:
    import os

    from asyncload._threads import WORKER_NICE

    if not WORKER_NICE or not hasattr(os, "getpriority"):
        pytest.skip("worker niceness disabled or unsupported here")
    pool = Workers(1, "t-nice")
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    theirs = await pool.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    assert theirs == min(19, mine + WORKER_NICE)
    pool.close()
