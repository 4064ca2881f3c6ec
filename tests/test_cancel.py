"""Leaving a stream early, cancelling a load, and zero-copy leases: every slot comes back, no task
is left behind, and the model keeps working."""

from __future__ import annotations

import pathlib

import anyio
import numpy as np
import pytest
from _stores import (
    KiB,
    assert_same,
    data_blocks,
    make_tensors,
    read_manifest,
    save_store,
    task_count,
    wait_until,
)

import asyncload
from asyncload.sources import Source
from asyncload.testing import FaultySource

LOAD_BUDGET = 16 * KiB  # 4 slots of 4 KiB: small enough that a stream is always mid-flight


@pytest.fixture
async def store(tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    tensors = make_tensors(60, seed=5)
    return await save_store(tmp_path, tensors), tensors


def assert_idle(model: asyncload.Model) -> None:
    st = model.statistics()
    assert st.slots_in_use == 0
    assert st.bytes_in_slots == 0
    assert st.bytes_in_flight == 0
    assert st.reads_in_flight == 0
    assert st.reads_waiting_for_slot == 0


@pytest.mark.anyio
async def test_break_then_aclose(store: tuple[pathlib.Path, dict[str, np.ndarray]]) -> None:
    path, tensors = store
    async with asyncload.open(path, budget=LOAD_BUDGET) as model:
        tasks_before = task_count()
        stream = model.stream()
        seen = 0
        async for name, arr in stream:
            assert_same(name, arr, tensors)
            seen += 1
            if seen == 3:
                break
        assert model.statistics().slots_in_use > 0  # reads were still running ahead
        await stream.aclose()
        assert_idle(model)
        assert task_count() == tasks_before
        # A closed stream stays closed.
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        # The model starts a new stream and it returns every tensor, correctly.
        got = await model.load()
        assert sorted(got) == sorted(tensors)
        for name, arr in got.items():
            assert_same(name, arr, tensors)
        assert_idle(model)


@pytest.mark.anyio
async def test_break_inside_async_with_stream(store: tuple[pathlib.Path, dict[str, np.ndarray]]) -> None:
    path, tensors = store
    async with asyncload.open(path, budget=LOAD_BUDGET) as model:
        tasks_before = task_count()
        async with model.stream() as s:
            async for name, arr in s:
                assert_same(name, arr, tensors)
                break
        assert_idle(model)
        assert task_count() == tasks_before
        got = await model.load(list(tensors)[:5])
        assert list(got) == list(tensors)[:5]


@pytest.mark.anyio
async def test_break_then_only_leave_the_model(
    store: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    path, tensors = store
    tasks_before = task_count()
    async with asyncload.open(path, budget=LOAD_BUDGET) as model:
        async for name, arr in model.stream():
            assert_same(name, arr, tensors)
            break
        assert model.statistics().slots_in_use > 0
    assert_idle(model)
    assert task_count() == tasks_before
    with pytest.raises(asyncload.ClosedError):
        model.stream()


@pytest.mark.anyio
async def test_leave_the_model_while_a_read_is_stuck(
    store: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    path, tensors = store
    stuck = data_blocks(read_manifest(path))[1]
    made: list[FaultySource] = []

    def wrap(src: Source) -> Source:
        made.append(FaultySource(src, stall_keys=[stuck.key]))
        return made[-1]

    tasks_before = task_count()
    with anyio.fail_after(10):  # nothing releases the stall: leaving must cancel it
        async with asyncload.open(path, budget=LOAD_BUDGET, wrap_source=wrap) as model:
            stream = model.stream()
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as consumer:

                    async def give_up() -> None:
                        await next(s for s in made if s.id == stuck.source).stall_started.wait()
                        consumer.cancel()

                    tg.start_soon(give_up)
                    async for name, arr in stream:
                        assert_same(name, arr, tensors)
    assert_idle(model)
    assert task_count() == tasks_before
    assert all(s.reads_started == s.reads_finished for s in made)


@pytest.mark.anyio
async def test_cancel_a_load_from_outside(store: tuple[pathlib.Path, dict[str, np.ndarray]]) -> None:
    path, _ = store
    stuck = data_blocks(read_manifest(path))[-3]
    made: list[FaultySource] = []

    def wrap(src: Source) -> Source:
        made.append(FaultySource(src, stall_keys=[stuck.key]))
        return made[-1]

    async with asyncload.open(path, budget=LOAD_BUDGET, wrap_source=wrap) as model:
        tasks_before = task_count()
        src = next(s for s in made if s.id == stuck.source)
        result: list[dict[str, np.ndarray]] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:

                async def run_load() -> None:
                    result.append(await model.load())

                async def cancel_after_first_item() -> None:
                    await src.stall_started.wait()

                    def delivered() -> int:
                        a = model.statistics().assembly
                        return 0 if a is None else a.tensors_delivered

                    await wait_until(lambda: delivered() >= 1, what="load() received an item")
                    tg.cancel_scope.cancel()

                tg.start_soon(run_load)
                tg.start_soon(cancel_after_first_item)
        assert not result
        assert src.stalled_now == 0
        assert_idle(model)
        assert task_count() == tasks_before
        src.release_stalls()
        assert len(await model.load()) == 60


# --------------------------------------------------------------------------- zero-copy leases


@pytest.fixture
async def one_tensor_per_block(tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    """Each tensor is exactly one 4 KiB data block, so every one of them can be leased."""
    rng = np.random.default_rng(11)
    tensors = {f"t{i:02d}": rng.integers(0, 1 << 30, size=1024).astype(np.int32) for i in range(24)}
    return await save_store(tmp_path, tensors), tensors


@pytest.mark.anyio
async def test_lease_holds_its_slot_until_the_next_item(
    one_tensor_per_block: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    path, tensors = one_tensor_per_block
    async with asyncload.open(path, budget=LOAD_BUDGET) as model:
        stream = model.stream(["t00", "t01"], copy=False)
        first, a = await stream.__anext__()
        assert not a.flags.writeable and not a.flags.owndata
        await wait_until(lambda: model.statistics().blocks_read == 2, what="both blocks are read")
        # One slot leased to the consumer, one holding the tensor that waits to be taken.
        assert model.statistics().slots_in_use == 2
        assert_same(first, a, tensors)
        second, b = await stream.__anext__()
        assert {first, second} == {"t00", "t01"}
        assert model.statistics().slots_in_use == 1  # advancing returned the first lease
        assert_same(second, b, tensors)
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        assert_idle(model)


@pytest.mark.anyio
async def test_leased_bytes_are_not_overwritten_while_held(
    one_tensor_per_block: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    """While the consumer holds a lease the reads run ahead and fill every other slot: the leased
    bytes stay intact until the consumer asks for the next item."""
    path, tensors = one_tensor_per_block
    n = len(tensors)
    async with asyncload.open(path, budget=LOAD_BUDGET) as model:
        seen = []
        async with model.stream(copy=False) as s:
            async for name, arr in s:
                assert not arr.flags.writeable
                assert_same(name, arr, tensors)
                await wait_until(
                    lambda: (
                        model.statistics().reads_waiting_for_slot > 0 or model.statistics().blocks_read == n
                    ),
                    what="the reads have run ahead as far as the ring allows",
                )
                assert model.statistics().slots_in_use >= 1
                assert_same(name, arr, tensors)
                seen.append(name)
        assert sorted(seen) == sorted(tensors)
        assert model.statistics().slot_waits > 0
        assert_idle(model)


@pytest.mark.anyio
async def test_break_while_holding_a_lease(
    one_tensor_per_block: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    path, tensors = one_tensor_per_block
    async with asyncload.open(path, budget=LOAD_BUDGET) as model:
        stream = model.stream(copy=False)
        async for _name, _arr in stream:
            break
        await stream.aclose()
        assert_idle(model)
        got = await model.load()
        for name, arr in got.items():
            assert_same(name, arr, tensors)
            assert arr.flags.writeable  # load() returns owned arrays


@pytest.mark.anyio
async def test_next_load_closes_a_finished_stream_that_still_holds_leases(tmp_path: pathlib.Path) -> None:
    """A lease stream whose reads are done but whose items were not all taken keeps slots;
    the next load() must close it (it used to wait for those slots forever)."""
    tensors = {f"t{i:02d}": np.full(1024, i, dtype=np.float32) for i in range(16)}
    path = await asyncload.save(tensors, tmp_path / "m.json", sources=[tmp_path / "d0"], block_size=4096)
    with anyio.fail_after(10):
        async with asyncload.open(path, budget=16 * 4096) as model:
            stream = model.stream(copy=False)
            async for _name, _arr in stream:
                break
            # All reads finish; the 15 untaken tensors sit in the ring as leases.
            await wait_until(lambda: not stream.active, what="the stream's reads are done")
            assert model.statistics().slots_in_use == model.statistics().slots_total
            arrays = await model.load()
            assert {k: v.tobytes() for k, v in arrays.items()} == {k: v.tobytes() for k, v in tensors.items()}
            with pytest.raises(asyncload.ClosedError):
                await stream.__anext__()
            assert model.statistics().slots_in_use == 0
