"""Owned output arrays recycled from those the consumer dropped (asyncload._assemble.OutputPool).

What must hold: memory is reused only once *every* view of an array is gone (a slice or a
typed view the consumer keeps keeps its bytes), never more than ``cap`` bytes are kept, and
a stream whose consumer drops each array assembles later tensors into recycled memory.
"""

from __future__ import annotations

import gc
import pathlib

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asyncload
from asyncload._assemble import OWN_MAPPING_BYTES, OutputPool

MiB = 1 << 20


def test_a_dropped_array_is_reused_and_a_live_view_is_not() -> None:
    pool = OutputPool(cap=64 * MiB)
    a = pool.array(4 * MiB)
    a[:] = 1
    addr = a.ctypes.data
    del a
    gc.collect()
    b = pool.array(4 * MiB)
    assert b.ctypes.data == addr and pool.reused == 1  # the same pages, already faulted in
    # A typed view of a slice outlives the array it came from: its memory is not reused.
    b[:] = 2
    kept = b[MiB : 2 * MiB].view(np.float32)[3:]
    del b
    gc.collect()
    c = pool.array(4 * MiB)
    c[:] = 3
    assert c.ctypes.data != addr and pool.reused == 1
    assert (kept.view(np.uint8) == 2).all()
    del kept
    gc.collect()
    d = pool.array(4 * MiB)
    assert d.ctypes.data == addr and pool.reused == 2
    pool.close()


def test_sizes_that_fit_cap_and_close() -> None:
    pool = OutputPool(cap=10 * MiB)
    small = pool.array(OWN_MAPPING_BYTES - 1)  # below the threshold: plain numpy memory
    assert small.base is None or not isinstance(small.base, memoryview)
    a, b, c = pool.array(4 * MiB), pool.array(4 * MiB), pool.array(4 * MiB)
    del a, b, c
    gc.collect()
    assert pool._kept == 8 * MiB  # the third did not fit under the cap
    # Too small for a kept mapping (over 2x): everything kept is let go, a new one is made.
    e = pool.array(1 * MiB + 1)
    assert pool.reused == 0 and pool._kept == 0
    del e
    gc.collect()
    f = pool.array(3 * MiB)  # fits the 1 MiB+1 mapping? no (too small): fresh
    assert pool.reused == 0
    del f
    gc.collect()
    g = pool.array(2 * MiB)  # fits the 3 MiB one (<= 2x)
    assert pool.reused == 1 and g.size == 2 * MiB
    pool.close()
    del g
    gc.collect()
    assert pool._kept == 0  # after close nothing is kept


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("outputs")
    rng = np.random.default_rng(7)
    tensors = {
        f"t{i:02d}": rng.integers(0, 2**16, size=int(n), dtype=np.uint16)
        for i, n in enumerate(rng.choice([MiB // 2, 700_000, MiB, 3 * MiB // 2], size=24))
    }
    dirs = [root / "d0", root / "d1"]
    for d in dirs:
        d.mkdir()
    path = anyio.run(
        lambda: asyncload.save(
            tensors, root / "m.asyncload.json", sources=dirs, block_size=MiB, budget=8 * MiB
        )
    )
    return pathlib.Path(path), tensors


@pytest.mark.anyio
async def test_a_dropping_consumer_gets_recycled_memory_with_exact_bytes(
    store: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    """Blocks read, not mapped (as from a remote source): arrays go back to the pool."""
    path, tensors = store
    async with asyncload.open(path, budget=8 * MiB, map_files=False) as model:
        async with model.stream() as s:
            async for name, arr in s:
                assert np.array_equal(arr, tensors[name]), name
                del arr
            recycled = model.statistics().assembly.outputs_recycled  # type: ignore[union-attr]
    assert recycled > 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keep=st.lists(st.sampled_from(["drop", "slice", "whole", "view"]), min_size=24, max_size=24),
    map_files=st.booleans(),
)
def test_whatever_the_consumer_keeps_stays_byte_identical(
    store: tuple[pathlib.Path, dict[str, np.ndarray]], keep: list[str], map_files: bool
) -> None:
    """Recycled memory (blocks read) or file pages placed copy-on-write (blocks mapped)."""
    path, tensors = store

    async def run() -> dict[str, np.ndarray]:
        kept: dict[str, np.ndarray] = {}
        async with asyncload.open(path, budget=8 * MiB, map_files=map_files) as model:
            async with model.stream() as s:
                i = 0
                async for name, arr in s:
                    how = keep[i % len(keep)]
                    i += 1
                    if how == "slice":
                        kept[name] = arr[len(arr) // 3 :]
                    elif how == "whole":
                        kept[name] = arr
                    elif how == "view":
                        kept[name] = arr.view(np.uint8)[7:].view(np.uint8)
                    del arr
                    gc.collect()  # finalizers run now, so reuse happens as early as it can
        return kept

    kept = anyio.run(run)
    for name, part in kept.items():
        whole = tensors[name]
        if part.dtype == np.uint8:
            assert bytes(part) == whole.tobytes()[7:], name
        else:
            assert np.array_equal(part, whole[len(whole) - len(part) :]), name


def test_mappings_let_go_are_unmapped_off_the_calling_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """munmap of a large array stalls whoever runs it: never the event loop's thread."""
    import asyncload._assemble as asm

    handed: list[int] = []
    real = asm._UNMAPPER.drop
    monkeypatch.setattr(asm._UNMAPPER, "drop", lambda mem: (handed.append(len(mem)), real(mem)))
    pool = OutputPool(cap=4 * MiB)
    a, b = pool.array(4 * MiB), pool.array(3 * MiB)
    del a, b
    gc.collect()
    assert handed == [3 * MiB]  # over the cap: let go; the 4 MiB one is kept
    c = pool.array(MiB + 1)  # nothing fits (over 2x): the kept one is let go too
    assert handed == [3 * MiB, 4 * MiB]
    pool.close()
    del c
    gc.collect()
    assert handed == [3 * MiB, 4 * MiB, MiB + 1]
