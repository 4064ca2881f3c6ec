"""A network source's own I/O loop (asyncload/sources/_ioloop.py): results, errors, cancellation.

The property that matters for memory safety: when a caller is cancelled, ``IoLoop.call``
does not return until the coroutine on the I/O thread has stopped, so nothing writes into a
buffer (a ring slot) after its owner has given it back.
"""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest

from asyncload import SourceUnavailableError
from asyncload.sources._ioloop import IoLoop

pytestmark = pytest.mark.anyio


async def test_call_runs_on_its_own_thread_and_returns_results_and_errors() -> None:
    io = IoLoop("t")
    try:
        here = threading.get_ident()

        async def where() -> int:
            await asyncio.sleep(0)
            return threading.get_ident()

        there = await io.call(where)
        assert there != here
        assert await io.call(where) == there  # one thread, reused

        async def boom() -> None:
            raise KeyError("block 7")

        with pytest.raises(KeyError, match="block 7"):
            await io.call(boom)
    finally:
        io.close()
    assert io.loop is None


async def test_a_cancelled_caller_returns_only_after_the_remote_coroutine_has_stopped() -> None:
    io = IoLoop("t")
    started = threading.Event()
    stopped = threading.Event()
    buf = bytearray(8)

    async def writer() -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            # A slow cleanup on the I/O thread that still touches the caller's buffer.
            await asyncio.sleep(0.05)
            buf[:] = b"AAAAAAAA"
            stopped.set()

    try:
        async with anyio.create_task_group() as tg:

            async def caller() -> None:
                with pytest.raises(anyio.get_cancelled_exc_class()):
                    await io.call(writer)
                # Back here only once the remote coroutine is done with the buffer.
                assert stopped.is_set() and bytes(buf) == b"AAAAAAAA"
                raise anyio.get_cancelled_exc_class()()

            tg.start_soon(caller)
            await anyio.to_thread.run_sync(started.wait)
            tg.cancel_scope.cancel()
        assert stopped.is_set()
    finally:
        io.close()


async def test_fail_after_around_a_call_still_waits_for_the_remote_side() -> None:
    io = IoLoop("t")
    stopped = threading.Event()

    async def stuck() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    try:
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.2):
                await io.call(stuck)
        assert stopped.is_set()
        # The loop is still usable afterwards.

        async def one() -> int:
            return 1

        assert await io.call(one) == 1
    finally:
        io.close()


async def test_closing_the_loop_under_a_running_call_fails_it_cleanly() -> None:
    io = IoLoop("net0")
    started = threading.Event()

    async def stuck() -> None:
        started.set()
        await asyncio.Event().wait()

    async with anyio.create_task_group() as tg:
        errors: list[BaseException] = []

        async def caller() -> None:
            try:
                await io.call(stuck)
            except SourceUnavailableError as e:
                errors.append(e)

        tg.start_soon(caller)
        await anyio.to_thread.run_sync(started.wait)
        await anyio.to_thread.run_sync(io.close)
    assert len(errors) == 1 and "net0" in str(errors[0]) and "closed" in str(errors[0])


async def test_the_thread_ends_on_close_and_a_new_one_starts_on_next_use() -> None:
    io = IoLoop("t")

    async def name() -> str:
        return threading.current_thread().name

    assert await io.call(name) == "asyncload-io-t"
    first = [t for t in threading.enumerate() if t.name == "asyncload-io-t"]
    assert len(first) == 1
    await anyio.to_thread.run_sync(io.close)
    assert not first[0].is_alive()
    assert await io.call(name) == "asyncload-io-t"
    io.close()
    assert not [t for t in threading.enumerate() if t.name == "asyncload-io-t"]


def test_stop_soon_from_another_thread_ends_the_thread() -> None:
    io = IoLoop("gc")
    ran = threading.Event()

    async def one() -> int:
        return 1

    assert asyncio.run(io.call(one)) == 1
    thread = next(t for t in threading.enumerate() if t.name == "asyncload-io-gc")
    io.stop_soon(ran.set)
    thread.join(timeout=10)
    assert ran.is_set() and not thread.is_alive()
