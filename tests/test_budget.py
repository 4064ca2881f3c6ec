"""The memory budget S: refused when it cannot hold one block per source, never exceeded, and a
slow consumer stops the reads (backpressure) instead of letting them pile up."""

from __future__ import annotations

import pathlib
import re

import anyio
import numpy as np
import pytest
from _stores import KiB, assert_same, data_blocks, make_tensors, read_manifest, save_store, wait_until

import asyncload
from asyncload import BudgetError, LoaderStatistics

BLOCK = 4 * KiB
BUDGET = 16 * KiB  # 4 slots for 3 sources


def _names_the_numbers(msg: str, s: int, k: int, m: int) -> None:
    assert re.search(rf"\b{s}\b", msg), msg
    assert re.search(rf"\b{k} sources\b", msg), msg
    assert re.search(rf"\b{m}\b", msg), msg


@pytest.mark.anyio
async def test_open_refuses_a_budget_below_k_blocks(tmp_path: pathlib.Path) -> None:
    path = await save_store(tmp_path, make_tensors(5), block_size=BLOCK, budget=BUDGET)
    too_small = 3 * BLOCK - 1
    with pytest.raises(BudgetError) as info:
        async with asyncload.open(path, budget=too_small):
            pytest.fail("opened with S < k x m")
    assert isinstance(info.value, ValueError)
    _names_the_numbers(str(info.value), too_small, 3, BLOCK)
    # Exactly k x m is enough.
    async with asyncload.open(path, budget=3 * BLOCK) as model:
        assert model.statistics().slots_total == 3


@pytest.mark.anyio
async def test_save_refuses_a_budget_below_k_blocks(tmp_path: pathlib.Path) -> None:
    dirs = [tmp_path / f"d{i}" for i in range(3)]
    target = tmp_path / "m.asyncload.json"
    with pytest.raises(ValueError, match="sources") as info:
        await asyncload.save(make_tensors(3), target, sources=dirs, block_size=BLOCK, budget="8KiB")
    assert isinstance(info.value, BudgetError)
    _names_the_numbers(str(info.value), 8 * KiB, 3, BLOCK)
    assert not target.exists()
    assert not any(d.exists() and any(d.iterdir()) for d in dirs)


@pytest.mark.anyio
async def test_slow_consumer_gets_backpressure_not_unbounded_memory(tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(100, seed=3, max_bytes=14 * KiB)
    tensors["big.embedding"] = np.arange(40 * KiB // 4, dtype=np.int32).reshape(-1, 16)  # > S
    path = await save_store(tmp_path, tensors, block_size=BLOCK, budget=64 * KiB)
    manifest = read_manifest(path)
    n_blocks = len(data_blocks(manifest))
    assert n_blocks >= 150

    samples: list[LoaderStatistics] = []

    async with asyncload.open(path, budget=BUDGET) as model:
        assert model.statistics().slots_total * model.statistics().slot_size <= BUDGET

        def sample() -> LoaderStatistics:
            st = model.statistics()
            samples.append(st)
            assert st.bytes_in_slots <= st.budget == BUDGET
            assert st.slots_in_use <= st.slots_total
            if st.assembly is not None:
                # Output arrays waiting for the consumer stay within the allowance, except
                # the one tensor at the head of the queue, which may exceed it.
                assert st.assembly.reserved_bytes <= max(
                    st.assembly.allowance, tensors["big.embedding"].nbytes
                )
            return st

        def blocked() -> bool:
            st = sample()
            return st.reads_waiting_for_slot > 0 or st.blocks_read == n_blocks

        got: dict[str, np.ndarray] = {}
        gates = [anyio.Event() for _ in tensors]
        took = [anyio.Event() for _ in tensors]
        stalled_at: list[int] = []  # blocks_read each time the consumer held the reads back

        async def slow_consumer() -> None:
            i = 0
            async for name, arr in model.stream():
                got[name] = arr
                took[i].set()
                await gates[i].wait()
                i += 1

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow_consumer)
                for i in range(len(tensors)):
                    await took[i].wait()
                    # The consumer now sits on item i: the reads must stop for lack of a slot
                    # (or because everything has been read), never run past the budget.
                    await wait_until(blocked, what="the reads stop behind the stalled consumer")
                    st = sample()
                    if st.blocks_read < n_blocks:
                        assert st.reads_waiting_for_slot == 1
                        assert st.slots_in_use == st.slots_total
                        assert st.slot_waits > 0
                        stalled_at.append(st.blocks_read)
                    gates[i].set()

        final = model.statistics()
        assert final.slots_in_use == 0 and final.bytes_in_flight == 0
        assert final.blocks_read == n_blocks
        assert final.peak_slots_in_use <= final.slots_total

    # The reads were held back many times and resumed each time the consumer moved on: every
    # stall happened further into the stream than the one before it, up to the end.
    assert len(set(stalled_at)) >= 10, stalled_at
    assert stalled_at == sorted(stalled_at)
    assert stalled_at[-1] < n_blocks
    assert sorted(got) == sorted(t.name for t in manifest.tensors)  # each once, as it completes
    for name, arr in got.items():
        assert_same(name, arr, tensors)
    assert max(s.bytes_in_slots for s in samples) <= BUDGET
    assert any(s.bytes_in_slots == BUDGET for s in samples)
