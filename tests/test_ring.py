"""Tests for asyncload._ring.Ring: slots, backpressure in FIFO order, refcounts, cancellation, close.

Synchronisation is by ring statistics and anyio events only: ``_until`` yields to the
event loop (no sleeping) until a condition on the ring holds, under a deadline.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable

import anyio
import anyio.abc
import anyio.lowlevel
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncload._exceptions import ClosedError
from asyncload._ring import Ring, Slot, ring_memory


async def _until(cond: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not cond():
            await anyio.lowlevel.checkpoint()


@contextlib.asynccontextmanager
async def _group() -> AsyncIterator[anyio.abc.TaskGroup]:
    """A task group under a deadline, so a stranded slot fails the test instead of hanging it."""
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            yield tg


# --------------------------------------------------------------------------- sync state


def test_ring_rejects_empty_configs() -> None:
    for size, count in [(0, 1), (1, 0), (-1, 3)]:
        with pytest.raises(ValueError):
            Ring(size, count)


def test_slots_are_disjoint_views_of_one_allocation() -> None:
    ring = Ring(16, 3)
    slots = [ring.try_acquire() for _ in range(3)]
    assert all(s is not None for s in slots)
    assert sorted(s.index for s in slots) == [0, 1, 2]
    for i, s in enumerate(slots):
        assert s.memory.dtype == np.uint8 and len(s.memory) == 16
        s.memory[:] = i + 1
    for i, s in enumerate(slots):
        assert (s.memory == i + 1).all()
    assert np.shares_memory(slots[0].memory.base, slots[2].memory.base)
    slots[1].used = 5
    assert bytes(slots[1].view()) == b"\x02" * 5
    assert bytes(slots[1].view(2)) == b"\x02" * 2


def test_try_acquire_release_statistics() -> None:
    ring = Ring(8, 3)
    st0 = ring.statistics()
    assert (st0.slots_total, st0.slots_in_use, st0.slot_size, st0.bytes_total, st0.bytes_in_use) == (
        3,
        0,
        8,
        24,
        0,
    )
    assert (st0.waiting, st0.waits, st0.acquisitions, st0.peak_slots_in_use) == (0, 0, 0, 0)
    a, b, c = ring.try_acquire(), ring.try_acquire(), ring.try_acquire()
    assert a is not None and b is not None and c is not None
    assert ring.try_acquire() is None  # full: never waits
    s = ring.statistics()
    assert (s.slots_in_use, s.bytes_in_use, s.acquisitions, s.peak_slots_in_use, s.waits) == (3, 24, 3, 3, 0)
    a.used = 8
    ring.release(a)
    ring.release(b)
    s = ring.statistics()
    assert (s.slots_in_use, s.bytes_in_use, s.peak_slots_in_use) == (1, 8, 3)
    d = ring.try_acquire()
    assert d is a and d.used == 0  # reused, and reset
    s = ring.statistics()
    assert (s.slots_in_use, s.acquisitions, s.peak_slots_in_use) == (2, 4, 3)


def test_retain_release_refcounts() -> None:
    ring = Ring(8, 1)
    s = ring.try_acquire()
    assert s is not None
    ring.retain(s)
    ring.retain(s)
    ring.release(s)
    ring.release(s)
    assert ring.statistics().slots_in_use == 1  # one holder left
    assert ring.try_acquire() is None
    ring.release(s)
    assert ring.statistics().slots_in_use == 0
    with pytest.raises(RuntimeError, match="released more often"):
        ring.release(s)  # double release
    with pytest.raises(RuntimeError, match="not acquired"):
        ring.retain(s)  # retain of a free slot
    assert ring.statistics().slots_in_use == 0
    assert ring.try_acquire() is s


def test_double_release_does_not_corrupt_the_free_list() -> None:
    ring = Ring(8, 2)
    a = ring.try_acquire()
    assert a is not None
    ring.release(a)
    with pytest.raises(RuntimeError):
        ring.release(a)
    got = [ring.try_acquire(), ring.try_acquire(), ring.try_acquire()]
    assert got[2] is None and got[0] is not got[1]


@given(st.lists(st.tuples(st.sampled_from(["acq", "retain", "release"]), st.integers(0, 7)), max_size=60))
def test_refcount_model(ops: list[tuple[str, int]]) -> None:
    """Random acquire/retain/release against a plain refcount model."""
    ring = Ring(4, 3, touch=False)
    held: dict[int, tuple[Slot, int]] = {}
    peak = 0
    for op, pick in ops:
        if op == "acq":
            s = ring.try_acquire()
            if len(held) == 3:
                assert s is None
            else:
                assert s is not None and s.index not in held
                held[s.index] = (s, 1)
        elif held:
            idx = sorted(held)[pick % len(held)]
            s, refs = held[idx]
            if op == "retain":
                ring.retain(s)
                held[idx] = (s, refs + 1)
            else:
                ring.release(s)
                if refs == 1:
                    del held[idx]
                else:
                    held[idx] = (s, refs - 1)
        peak = max(peak, len(held))
        stats = ring.statistics()
        assert stats.slots_in_use == len(held)
        assert stats.peak_slots_in_use == peak


# --------------------------------------------------------------------------- async


@pytest.mark.anyio
async def test_acquire_without_contention_does_not_wait() -> None:
    ring = Ring(8, 2)
    a = await ring.acquire()
    b = await ring.acquire()
    assert a is not b
    s = ring.statistics()
    assert (s.waits, s.waiting, s.slots_in_use, s.acquisitions) == (0, 0, 2, 2)


@pytest.mark.anyio
async def test_backpressure_fifo() -> None:
    ring = Ring(8, 1)
    held = await ring.acquire()
    order: list[int] = []
    got: dict[int, Slot] = {}
    let_go = [anyio.Event() for _ in range(4)]

    async def waiter(i: int) -> None:
        s = await ring.acquire()
        order.append(i)
        got[i] = s
        await let_go[i].wait()
        ring.release(s)

    async with _group() as tg:
        for i in range(4):
            tg.start_soon(waiter, i)
            await _until(lambda i=i: ring.statistics().waiting == i + 1)  # queued in this order
        assert order == []  # all blocked: no slot free
        s = ring.statistics()
        assert (s.waiting, s.waits, s.slots_in_use) == (4, 4, 1)
        assert ring.try_acquire() is None  # queued tasks are served first

        ring.release(held)
        await _until(lambda: len(order) == 1)
        assert order == [0] and got[0] is held
        assert ring.statistics().waiting == 3
        for i in range(1, 4):
            let_go[i - 1].set()
            await _until(lambda i=i: len(order) == i + 1)
            assert order == list(range(i + 1))
            assert ring.statistics().slots_in_use == 1
        let_go[3].set()
    s = ring.statistics()
    assert (s.slots_in_use, s.waiting, s.waits, s.acquisitions, s.peak_slots_in_use) == (0, 0, 4, 5, 1)


@pytest.mark.anyio
async def test_retained_slot_is_handed_on_only_after_last_release() -> None:
    ring = Ring(8, 1)
    s = await ring.acquire()
    ring.retain(s)  # e.g. a zero-copy lease
    result: list[Slot] = []

    async def waiter() -> None:
        result.append(await ring.acquire())

    async with _group() as tg:
        tg.start_soon(waiter)
        await _until(lambda: ring.statistics().waiting == 1)
        ring.release(s)
        for _ in range(10):
            await anyio.lowlevel.checkpoint()
        assert result == [] and ring.statistics().waiting == 1  # a holder is left
        ring.release(s)
    assert result == [s]
    ring.release(s)
    assert ring.statistics().slots_in_use == 0


@pytest.mark.anyio
async def test_cancel_waiting_acquire_leaves_no_waiter() -> None:
    ring = Ring(8, 1)
    held = await ring.acquire()
    outcome: list[str] = []

    async def waiter(scope: anyio.CancelScope) -> None:
        with scope:
            await ring.acquire()
            outcome.append("acquired")
        outcome.append("cancelled" if scope.cancelled_caught else "done")

    scope = anyio.CancelScope()
    async with _group() as tg:
        tg.start_soon(waiter, scope)
        await _until(lambda: ring.statistics().waiting == 1)
        scope.cancel()
    assert outcome == ["cancelled"]
    assert ring.statistics().waiting == 0
    ring.release(held)
    s = ring.statistics()
    assert s.slots_in_use == 0
    assert ring.try_acquire() is held  # the free list got it, not a ghost waiter


@pytest.mark.anyio
@pytest.mark.parametrize("others", [0, 1, 2])
@pytest.mark.parametrize("order", ["cancel-then-handoff", "handoff-then-cancel"])
async def test_cancel_around_handoff_never_strands_the_slot(others: int, order: str) -> None:
    """The slot is handed to a waiter that is cancelled in the same step, before it runs.

    cancel-then-handoff: the waiter is already cancelled when release() hands it the
    slot, so it wakes with the cancellation holding a slot it must pass on.
    handoff-then-cancel: anyio cancels at the next checkpoint, so the waiter may keep
    the slot (it then gives it back); either way nothing is stranded.
    """
    ring = Ring(8, 1)
    held = await ring.acquire()
    got: list[tuple[str, Slot]] = []
    release_others = anyio.Event()

    async def victim(scope: anyio.CancelScope) -> None:
        with scope:
            s = await ring.acquire()
            got.append(("victim", s))
            ring.release(s)

    async def other(i: int) -> None:
        s = await ring.acquire()
        got.append((f"other{i}", s))
        await release_others.wait()
        ring.release(s)

    scope = anyio.CancelScope()
    async with _group() as tg:
        tg.start_soon(victim, scope)
        await _until(lambda: ring.statistics().waiting == 1)
        for i in range(others):
            tg.start_soon(other, i)
            await _until(lambda i=i: ring.statistics().waiting == i + 2)
        if order == "cancel-then-handoff":
            scope.cancel()
            ring.release(held)
        else:
            ring.release(held)
            scope.cancel()
        if others:
            await _until(lambda: any(who == "other0" for who, _ in got))
        release_others.set()
    if order == "cancel-then-handoff":
        assert scope.cancelled_caught
        assert all(who != "victim" for who, _ in got)
    assert [who for who, _ in got if who != "victim"] == [f"other{i}" for i in range(others)]
    assert all(s is held for _, s in got)
    s = ring.statistics()
    assert (s.slots_in_use, s.waiting) == (0, 0)
    assert ring.try_acquire() is held


@pytest.mark.anyio
async def test_cancel_many_waiters_then_release() -> None:
    ring = Ring(8, 2)
    a, b = await ring.acquire(), await ring.acquire()
    scopes = [anyio.CancelScope() for _ in range(5)]

    async def waiter(scope: anyio.CancelScope) -> None:
        with scope:
            s = await ring.acquire()
            ring.release(s)

    async with _group() as tg:
        for i, sc in enumerate(scopes):
            tg.start_soon(waiter, sc)
            await _until(lambda i=i: ring.statistics().waiting == i + 1)
        ring.release(a)  # handed to waiter 0
        for sc in scopes[::2]:
            sc.cancel()
    ring.release(b)
    s = ring.statistics()
    assert (s.slots_in_use, s.waiting) == (0, 0)
    assert {ring.try_acquire().index, ring.try_acquire().index} == {0, 1}  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_close_wakes_waiters_with_closed_error() -> None:
    ring = Ring(8, 1)
    held = await ring.acquire()
    errors: list[BaseException] = []

    async def waiter() -> None:
        try:
            await ring.acquire()
        except ClosedError as e:
            errors.append(e)

    async with _group() as tg:
        for i in range(3):
            tg.start_soon(waiter)
            await _until(lambda i=i: ring.statistics().waiting == i + 1)
        ring.close()
    assert len(errors) == 3 and all(isinstance(e, RuntimeError) for e in errors)
    assert ring.statistics().waiting == 0
    with pytest.raises(ClosedError):
        await ring.acquire()
    with pytest.raises(ClosedError):
        ring.try_acquire()
    ring.release(held)  # releasing after close is allowed and returns the slot
    assert ring.statistics().slots_in_use == 0


@pytest.mark.anyio
async def test_peak_statistics() -> None:
    ring = Ring(8, 4)
    slots = [await ring.acquire() for _ in range(3)]
    for s in slots[:2]:
        ring.release(s)
    s4 = await ring.acquire()
    stats = ring.statistics()
    assert (stats.slots_in_use, stats.peak_slots_in_use, stats.acquisitions) == (2, 3, 4)
    more = [await ring.acquire() for _ in range(2)]
    assert ring.statistics().peak_slots_in_use == 4
    for s in [s4, slots[2], *more]:
        ring.release(s)
    stats = ring.statistics()
    assert (stats.slots_in_use, stats.peak_slots_in_use) == (0, 4)


# --------------------------------------------------------------------------- groups


@pytest.mark.anyio
async def test_groups_never_hold_part_each() -> None:
    """Two jobs that each need the whole ring finish one after the other (no deadlock)."""
    ring = Ring(8, 2)
    done: list[str] = []

    async def job(name: str) -> None:
        got: list[Slot] = []
        await ring.acquire_group(2, got)
        assert len(got) == 2
        await anyio.lowlevel.checkpoint()
        done.append(name)
        for s in got:
            ring.release(s)

    async with _group() as tg:
        tg.start_soon(job, "a")
        tg.start_soon(job, "b")
    assert sorted(done) == ["a", "b"]
    assert ring.statistics().slots_in_use == 0


@pytest.mark.anyio
async def test_a_cancelled_group_wait_leaves_the_taken_slots_to_release() -> None:
    ring = Ring(8, 2)
    held = await ring.acquire()
    got: list[Slot] = []
    async with _group() as tg:
        tg.start_soon(ring.acquire_group, 2, got)
        await _until(lambda: ring.statistics().waiting == 1)  # it holds one, waits for the second
        tg.cancel_scope.cancel()
    assert len(got) == 1 and ring.statistics().slots_in_use == 2
    ring.release(got[0])
    ring.release(held)
    assert ring.statistics().slots_in_use == 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_ring_memory_is_faulted_in_up_front_only_when_asked() -> None:
    n = 64 << 20
    before = _rss()
    touched = ring_memory(n)
    grown = _rss() - before
    assert touched.dtype == np.uint8 and touched.size == n and touched.flags.writeable
    assert grown >= 0.9 * n, f"only {grown} of {n} bytes resident after allocation"
    assert not touched[:: 1 << 20].any()  # zero-filled
    before = _rss()
    lazy = ring_memory(n, touch=False)
    assert _rss() - before < 0.1 * n
    lazy[:] = 7
    assert lazy[-1] == 7 and _rss() - before >= 0.9 * n
    assert ring_memory(0).size == 0
