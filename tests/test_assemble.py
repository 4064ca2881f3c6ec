"""The assembly under scrambled completion orders: every tensor once, right bytes, no deadlock.

Reads complete in an order chosen by hypothesis (a wrapper source yields to the
event loop a random number of times before each read), so blocks of one tensor
arrive before, between and after blocks of others; consumers drop, hold or keep
the arrays they get. A deadlock in the reservation logic shows up as a timeout.
"""

from __future__ import annotations

import pathlib
import random
import tempfile

import anyio
import anyio.lowlevel
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncload
from asyncload.sources import Source

KiB = 1 << 10


class ScrambledSource(Source):
    """Delegates to ``inner`` after yielding to the loop 0-20 times (seeded)."""

    def __init__(self, inner: Source, seed: int) -> None:
        super().__init__(inner.id, inner.location)
        self.inner = inner
        self.rng = random.Random(seed)

    async def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        for _ in range(self.rng.randrange(21)):
            await anyio.lowlevel.checkpoint()
        self.inner.threads = self.threads
        return await self.inner.read_into(key, offset, buf)

    async def size(self, key: str) -> int:
        return await self.inner.size(key)


# Runs of similar multi-block tensors make reservations wait on each other.
sizes = st.lists(
    st.one_of(st.integers(0, 40 * KiB), st.sampled_from([3 * KiB, 9 * KiB, 12 * KiB, 16 * KiB + 5])),
    min_size=1,
    max_size=30,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=sizes,
    k=st.integers(1, 3),
    extra_slots=st.integers(0, 4),
    consumer=st.sampled_from(["drop", "hold", "keep", "lease", "slow"]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.anyio
async def test_scrambled_completion_order_never_deadlocks(
    sizes: list[int], k: int, extra_slots: int, consumer: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    tensors = {f"t{i:02d}": rng.integers(0, 256, size=n, dtype=np.uint8) for i, n in enumerate(sizes)}
    m = 4 * KiB
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        path = await asyncload.save(
            tensors, root / "m.json", sources=[root / f"d{i}" for i in range(k)], block_size=m
        )
        budget = (k + extra_slots) * m
        counter = iter(range(1 << 30))
        seen: dict[str, bytes] = {}
        held: list[np.ndarray] = []
        with anyio.fail_after(20):
            async with asyncload.open(
                path, budget=budget, wrap_source=lambda s: ScrambledSource(s, seed + next(counter))
            ) as model:
                async with model.stream(copy=consumer != "lease") as stream:
                    async for name, arr in stream:
                        assert name not in seen
                        seen[name] = arr.tobytes()
                        if consumer == "keep":
                            held.append(arr)
                        elif consumer == "hold":  # keep the last two alive
                            held = [*held[-1:], arr]
                        elif consumer == "slow":  # let the reads run ahead between items
                            for _ in range(rng.integers(0, 30)):
                                await anyio.lowlevel.checkpoint()
                        del arr
                assert model.statistics().slots_in_use == 0
        assert seen == {n: t.tobytes() for n, t in tensors.items()}


@pytest.mark.anyio
async def test_every_block_waiting_for_a_tensor_wakes_when_another_block_reserves_it() -> None:
    """Regression: a block waiting to reserve tensor T must wake when a
    second block of T reserves it directly (it used to wait forever: a 1 GiB stream hung)."""
    from asyncload._assemble import _Assembly
    from asyncload._format import BlockRef, TensorInfo
    from asyncload._plan import plan_load
    from asyncload._ring import Ring

    m = 4 * KiB
    blocks = [BlockRef(i, "s0", f"b{i}", i * m, m, None) for i in range(4)]
    t0 = TensorInfo("t0", "U8", (m,), 0, m)  # one block
    t1 = TensorInfo("t1", "U8", (3 * m,), m, 4 * m)  # three blocks, the largest
    asm = _Assembly(plan_load(blocks, [t0, t1]), Ring(m, 4), copy=True)
    assert asm.try_reserve(0)
    asm.push(0, asm.outs[0], None)
    item = asm.take()  # the consumer now holds t0: t1 does not fit next to it
    assert item is not None and asm.held == m

    first_block_done = anyio.Event()

    async def first_block() -> None:
        await asm.reserve(1)
        first_block_done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(first_block)
            await anyio.wait_all_tasks_blocked()
            assert not first_block_done.is_set()  # t1 waits for the consumer to let go of t0
            del item  # the consumer drops t0: a finalizer clears `held`, waking nobody
            assert asm.held == 0
            assert asm.try_reserve(1)  # a second block of t1 arrives and reserves it directly
            await first_block_done.wait()  # the first block must not be left waiting
