"""A source's own I/O thread: an event loop in a background thread that does its socket work.

Why: receiving a response body is a copy from the kernel into slot memory, and
on the caller's event loop every source's copies run one after another on one
core (and delay the caller's own tasks). Each network source instead runs its
connections on a loop of its own, in its own thread; ``recv_into`` releases
the GIL, so k sources receive on up to k cores. Measured on nginx over
loopback (docs/remote.md): two servers on one loop 1.65-2.0 GB/s, on two I/O
loops 2.3-2.4 GB/s.

:meth:`IoLoop.call` runs a coroutine there and awaits it from the caller's
loop. A cancelled caller cancels the coroutine on the I/O loop *and waits
until it has stopped*, so a read never writes into a buffer its caller has
already given back (a ring slot handed to the next block).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from .._exceptions import SourceUnavailableError

__all__ = ["IoLoop"]

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return asyncio.new_event_loop()


class IoLoop:
    """One background thread with an event loop, started on first use and stopped by :meth:`close`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # touched on the I/O thread only

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is not None:
                return self._loop
            started = threading.Event()
            box: list[asyncio.AbstractEventLoop] = []

            def main() -> None:
                loop = _new_loop()
                asyncio.set_event_loop(loop)
                box.append(loop)
                started.set()
                try:
                    loop.run_forever()
                finally:
                    # Closed with work still running (a source closed under a read): stop it.
                    for t in list(self._tasks):
                        t.cancel()
                    if self._tasks:
                        loop.run_until_complete(asyncio.wait(list(self._tasks)))
                    loop.run_until_complete(loop.shutdown_asyncgens())
                    loop.close()

            thread = threading.Thread(target=main, name=f"asyncload-io-{self.name}", daemon=True)
            thread.start()
            started.wait()
            self._loop, self._thread = box[0], thread
            return self._loop

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` on the I/O loop; its result or exception comes back here."""
        loop = self._ensure()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        state: dict[str, Any] = {"cancel": False}

        def finish(task: asyncio.Task[T]) -> None:
            self._tasks.discard(task)
            if task.cancelled():
                err = (
                    asyncio.CancelledError()
                    if state["cancel"]
                    else SourceUnavailableError(
                        f"I/O loop {self.name!r} was closed while a request was running"
                    )
                )
                done.set_exception(err)
            elif (exc := task.exception()) is not None:
                done.set_exception(exc)
            else:
                done.set_result(task.result())

        async def run() -> T:
            return await fn()

        def start() -> None:
            task = loop.create_task(run())
            state["task"] = task
            self._tasks.add(task)
            task.add_done_callback(finish)

        def cancel() -> None:
            state["cancel"] = True
            task = state.get("task")
            if task is not None:
                task.cancel()

        loop.call_soon_threadsafe(start)
        waiter = asyncio.wrap_future(done)
        try:
            return await asyncio.shield(waiter)
        except BaseException:
            # Cancelled here (or the wait failed): stop the request there, and do not return
            # until it has stopped touching the caller's buffers. start() ran before cancel()
            # (both queued from this thread, in order), so the task exists by then.
            if not waiter.done():
                loop.call_soon_threadsafe(cancel)
                with anyio.CancelScope(shield=True):
                    await asyncio.wait([waiter])
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # retrieved: the caller's cancellation is what propagates
            raise

    def close(self) -> None:
        """Stop the loop (cancelling what still runs there) and join its thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if thread is threading.current_thread():  # pragma: no cover - never closed from inside
            loop.stop()
            return
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # already closed
            pass
        thread.join()

    def stop_soon(self, before: Callable[[], None] | None = None) -> None:
        """From any thread, without waiting: run ``before`` on the I/O thread, then stop its loop."""
        with self._lock:
            loop = self._loop
            self._loop = self._thread = None
        if loop is None:
            return
        try:
            if before is not None:
                loop.call_soon_threadsafe(before)
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # already closed
            pass
