"""Worker threads for blocking work (syscalls, checksums, copies), kept out of the loop's way.

Every blocking call asyncload makes goes through :func:`run_sync`. It runs on
anyio's worker threads under the caller's limiter, and lowers the priority of
each worker thread it uses (Linux ``setpriority`` on the thread id, nice +5 by
default, ``ASYNCLOAD_WORKER_NICE`` to change, 0 to disable). On a machine with
as many busy workers as cores, the event-loop thread then wins the CPU as soon
as it wakes, instead of waiting out a worker's time slice: the measured loop
lag p99 drops while throughput stays the same. Niceness can only go up for an
unprivileged process, so those worker threads stay lowered afterwards.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread

__all__ = ["WORKER_NICE", "lower_this_thread", "run_sync"]

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


async def run_sync(fn: Callable[..., T], *args: object, limiter: anyio.CapacityLimiter | None = None) -> T:
    """``fn(*args)`` on a worker thread; waits for it even when cancelled (slot memory is in use)."""
    return await anyio.to_thread.run_sync(_call, fn, *args, limiter=limiter)
