"""Worker threads for blocking work (syscalls, checksums, copies), kept out of the loop's way.

Every blocking call asyncload makes goes through :func:`run_sync`: on a
:class:`Workers` pool when the caller has one (a model's CPU threads, a
source's I/O threads), else on anyio's worker threads.

A :class:`Workers` pool is a fixed number of threads that take jobs from one
FIFO queue. A worker that finishes a job takes the next queued one at once;
the event loop only hears of each result. With anyio's threads under a
``CapacityLimiter``, the next job could only start after the loop had run the
finished job's task, released the limiter and woken the next waiter: with two
workers on two cores, the machine sat idle 0.15 s of a 0.5 s warm leased load
(4 GiB store); with the pool, 0.08 s (docs/performance.md, *Measured decisions*).

Worker threads run at lower priority (Linux ``setpriority`` on the thread id,
nice +5 by default, ``ASYNCLOAD_WORKER_NICE`` to change, 0 to disable). On a
machine with as many busy workers as cores, the event-loop thread then wins
the CPU as soon as it wakes, instead of waiting out a worker's time slice: the
measured loop lag p99 drops while throughput stays the same. Niceness can only
go up for an unprivileged process, so anyio's threads stay lowered afterwards.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

__all__ = ["WORKER_NICE", "Workers", "WorkersStatistics", "lower_this_thread", "run_sync"]

T = TypeVar("T")


def _nice_from_env() -> int:
    try:
        return max(0, min(19, int(os.environ.get("ASYNCLOAD_WORKER_NICE", "5"))))
    except ValueError:
        return 5


WORKER_NICE = _nice_from_env()
_state = threading.local()


def lower_this_thread() -> None:
    """Lower the calling thread's priority by WORKER_NICE (once; see the module docstring)."""
    _state.lowered = True
    if not WORKER_NICE or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + WORKER_NICE))
    except OSError:  # not permitted or not supported: run at normal priority
        pass


def _call(fn: Callable[..., T], *args: object) -> T:
    if not getattr(_state, "lowered", False):
        lower_this_thread()
    return fn(*args)


@dataclass(frozen=True, slots=True)
class WorkersStatistics:
    threads: int  # the most threads the pool runs
    started: int  # threads started so far (lazily, one per job until all are)
    busy: int  # jobs running now
    queued: int  # jobs waiting for a thread
    done: int  # jobs finished (returned or raised)


# A job: the function, its arguments, and where its outcome goes (loop, future).
_Job = tuple[Callable[..., Any], tuple[object, ...], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class Workers:
    """``threads`` worker threads taking jobs from one FIFO queue (see the module docstring).

    Threads start as jobs arrive, up to ``threads``, and are daemons: one stuck in
    a system call cannot hold up the interpreter's exit. They stop when the pool
    is closed or garbage collected.
    """

    def __init__(self, threads: int, name: str = "asyncload") -> None:
        if threads < 1:
            raise ValueError(f"a worker pool needs at least one thread, got {threads}")
        self.threads = threads
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._counts = [0, 0, 0]  # busy, queued, done (shared with the threads, not with self)
        self._lock = threading.Lock()
        self._started = [0]  # threads started: shared with the finalizer, which stops that many
        self._closed = False
        self._stop = weakref.finalize(self, _stop_threads, self._jobs, self._started)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` on one of the pool's threads; waits for it even when cancelled.

        A caller already cancelled is cancelled here, before the job is queued.
        Once queued, the job runs to the end and this waits for it (shielded):
        the memory it works on (a slot, an array) must not be reused under it.
        """
        if self._closed:
            raise RuntimeError("this worker pool is closed")
        await anyio.lowlevel.checkpoint_if_cancelled()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._counts[1] += 1
            if self._started[0] < self.threads:
                self._started[0] += 1
                threading.Thread(
                    target=_work,
                    args=(self._jobs, self._counts, self._lock),
                    name=f"{self._name}-{self._started[0]}",
                    daemon=True,
                ).start()
        self._jobs.put((fn, args, loop, future))
        with anyio.CancelScope(shield=True):
            result = await future
        return result

    def statistics(self) -> WorkersStatistics:
        with self._lock:
            busy, queued, done = self._counts
        return WorkersStatistics(self.threads, self._started[0], busy, queued, done)

    def close(self) -> None:
        """Stop the threads once the jobs queued so far are done; later :meth:`run` calls fail."""
        self._closed = True
        self._stop()


def _stop_threads(jobs: queue.SimpleQueue[_Job | None], started: list[int]) -> None:
    for _ in range(started[0]):
        jobs.put(None)


def _settle(future: asyncio.Future[Any], result: object, error: BaseException | None) -> None:
    if future.done():  # its waiter went away (the loop is closing)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _work(jobs: queue.SimpleQueue[_Job | None], counts: list[int], lock: threading.Lock) -> None:
    """A worker thread: run jobs until told to stop (a None). Holds no reference to its pool."""
    lower_this_thread()
    while (job := jobs.get()) is not None:
        fn, args, loop, future = job
        with lock:
            counts[0] += 1
            counts[1] -= 1
        result: object = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as e:  # handed to the waiting task, whatever it is
            error = e
        with lock:
            counts[0] -= 1
            counts[2] += 1
        try:
            loop.call_soon_threadsafe(_settle, future, result, error)
        except RuntimeError:  # the loop is closed: nobody waits for this any more
            pass
        del job, fn, args, loop, future, result, error


async def run_sync(fn: Callable[..., T], *args: object, workers: Workers | None = None) -> T:
    """``fn(*args)`` on a worker thread (of ``workers``, else anyio's); waits for it even when
    cancelled (slot memory is in use)."""
    if workers is not None:
        return await workers.run(fn, *args)
    return await anyio.to_thread.run_sync(_call, fn, *args)
