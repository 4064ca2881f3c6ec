"""Faults on a real block store: every one raises its own exception, names what broke, returns no
wrong bytes, and leaves no slot, read or task behind.

Faults are injected for real: block files truncated, corrupted or deleted on disk, a source
directory removed, manifests damaged; or reads routed through :class:`FaultySource`, which fails
or stalls them.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import anyio
import numpy as np
import pytest
from _stores import (
    KiB,
    assert_same,
    block_path,
    data_blocks,
    make_tensors,
    read_manifest,
    save_store,
    source_dir,
    task_count,
    tensors_touching,
    wait_until,
)

import asyncload
from asyncload import (
    BlockNotFoundError,
    ChecksumError,
    ManifestError,
    SourceUnavailableError,
    TruncatedBlockError,
)
from asyncload._format import BlockRef
from asyncload.sources import Source
from asyncload.testing import FaultySource

LOAD_BUDGET = 32 * KiB  # 8 slots of 4 KiB


@pytest.fixture
async def store(tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    tensors = make_tensors(40, seed=1)
    path = await save_store(tmp_path, tensors)
    return path, tensors


async def stream_expecting(
    path: pathlib.Path,
    originals: dict[str, np.ndarray],
    exc: type[BaseException],
    *,
    wrap: Any = None,
    **open_kw: Any,
) -> tuple[BaseException, set[str]]:
    """Stream everything; return the error (which must be ``exc``) and the names yielded first.

    Every yielded array is compared with the original, the model must end with no slot held and
    no read in flight, and closing it must leave no task behind.
    """
    tasks_before = task_count()
    yielded: set[str] = set()
    async with asyncload.open(path, budget=LOAD_BUDGET, wrap_source=wrap, **open_kw) as model:
        with anyio.fail_after(30):
            with pytest.raises(exc) as info:
                async for name, arr in model.stream():
                    assert_same(name, arr, originals)
                    yielded.add(name)
        st = model.statistics()
        assert st.slots_in_use == 0
        assert st.bytes_in_slots == 0
        assert st.bytes_in_flight == 0
        assert st.reads_in_flight == 0
        assert st.reads_waiting_for_slot == 0
    assert task_count() == tasks_before
    return info.value, yielded


def middle_block(path: pathlib.Path, *, source: str | None = None) -> BlockRef:
    blocks = data_blocks(read_manifest(path))
    if source is not None:
        blocks = [b for b in blocks if b.source == source]
    return blocks[len(blocks) // 2]


# --------------------------------------------------------------------------- faults on disk


@pytest.mark.anyio
async def test_truncated_block_file(store: tuple[pathlib.Path, dict[str, np.ndarray]]) -> None:
    path, tensors = store
    bad = middle_block(path)
    f = block_path(path, bad)
    os.truncate(f, bad.length // 2)
    err, yielded = await stream_expecting(path, tensors, TruncatedBlockError)
    msg = str(err)
    assert bad.key in msg and repr(bad.source) in msg
    assert f"read {bad.length // 2} of {bad.length}" in msg
    assert not yielded & tensors_touching(read_manifest(path), [bad])


@pytest.mark.anyio
async def test_flipped_byte_in_block_file(store: tuple[pathlib.Path, dict[str, np.ndarray]]) -> None:
    path, tensors = store
    bad = middle_block(path)
    f = block_path(path, bad)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))
    err, yielded = await stream_expecting(path, tensors, ChecksumError)
    msg = str(err)
    assert bad.key in msg and repr(bad.source) in msg and f"{bad.crc32c:08x}" in msg
    assert not yielded & tensors_touching(read_manifest(path), [bad])


@pytest.mark.anyio
async def test_checksum_failure_is_counted(store: tuple[pathlib.Path, dict[str, np.ndarray]]) -> None:
    path, _ = store
    bad = middle_block(path)
    f = block_path(path, bad)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x80
    f.write_bytes(bytes(data))
    async with asyncload.open(path, budget=LOAD_BUDGET) as model:
        with pytest.raises(ChecksumError):
            await model.load()
        assert model.statistics().checksum_failures == 1
        assert model.statistics().slots_in_use == 0


@pytest.mark.anyio
async def test_deleted_block_file(store: tuple[pathlib.Path, dict[str, np.ndarray]]) -> None:
    path, tensors = store
    bad = middle_block(path)
    block_path(path, bad).unlink()
    err, yielded = await stream_expecting(path, tensors, BlockNotFoundError)
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    assert bad.key in msg and repr(bad.source) in msg
    assert not yielded & tensors_touching(read_manifest(path), [bad])


@pytest.mark.anyio
async def test_deleted_source_directory(store: tuple[pathlib.Path, dict[str, np.ndarray]]) -> None:
    path, tensors = store
    d = source_dir(path, "s1")
    shutil.rmtree(d)
    err, yielded = await stream_expecting(path, tensors, BlockNotFoundError)
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    assert "'s1'" in msg and str(d) in msg
    m = read_manifest(path)
    lost = tensors_touching(m, [b for b in m.blocks if b.source == "s1"])
    assert not yielded & lost


@pytest.mark.anyio
async def test_missing_blocks_only_hurt_the_tensors_that_need_them(
    store: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    path, tensors = store
    m = read_manifest(path)
    bad = middle_block(path)
    block_path(path, bad).unlink()
    hurt = tensors_touching(m, [bad])
    fine = [n for n in tensors if n not in hurt]
    async with asyncload.open(path, budget=LOAD_BUDGET) as model:
        got = await model.load(fine)
        assert list(got) == [t.name for t in m.tensors if t.name in set(fine)]
        for name, arr in got.items():
            assert_same(name, arr, tensors)
        with pytest.raises(BlockNotFoundError):
            await model.load(sorted(hurt))
        assert model.statistics().slots_in_use == 0


# --------------------------------------------------------------------------- damaged manifests


def _flip_structural_byte(data: bytes) -> bytes:
    i = data.index(b'":')  # the colon after the first key
    out = bytearray(data)
    out[i + 1] ^= 0x01  # ':' -> ';'
    return bytes(out)


def _wrong_type(field: str) -> Any:
    def damage(data: bytes) -> bytes:
        doc = json.loads(data)
        if field == "block_size":
            doc["block_size"] = str(doc["block_size"])
        elif field == "block.length":
            doc["blocks"][1]["length"] = str(doc["blocks"][1]["length"])
        elif field == "block.crc32c":
            doc["blocks"][0]["crc32c"] = int(doc["blocks"][0]["crc32c"], 16)
        elif field == "tensor.shape":
            doc["tensors"][0]["shape"] = str(doc["tensors"][0]["shape"])
        elif field == "tensor.offsets":
            doc["tensors"][0]["offsets"] = [float(o) for o in doc["tensors"][0]["offsets"]]
        elif field == "source.location":
            doc["sources"][0]["location"] = 5
        elif field == "blocks":
            doc["blocks"] = {"0": doc["blocks"][0]}
        else:  # pragma: no cover
            raise AssertionError(field)
        return json.dumps(doc).encode()

    return damage


DAMAGES = {
    "truncated": lambda data: data[: len(data) // 2],
    "truncated-to-one-byte": lambda data: data[:1],
    "flipped-byte": _flip_structural_byte,
    "not-utf8": lambda data: data[:10] + b"\xff\xfe" + data[12:],
    **{
        f"wrong-type-{f}": _wrong_type(f)
        for f in (
            "block_size",
            "block.length",
            "block.crc32c",
            "tensor.shape",
            "tensor.offsets",
            "source.location",
            "blocks",
        )
    },
}


@pytest.mark.anyio
@pytest.mark.parametrize("damage", sorted(DAMAGES))
async def test_damaged_manifest(store: tuple[pathlib.Path, dict[str, np.ndarray]], damage: str) -> None:
    path, _ = store
    path.write_bytes(DAMAGES[damage](path.read_bytes()))
    tasks_before = task_count()
    with pytest.raises(ManifestError) as info:
        async with asyncload.open(path, budget=LOAD_BUDGET):
            pytest.fail("a damaged manifest was opened")
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)
    assert task_count() == tasks_before


@pytest.mark.anyio
async def test_manifest_with_a_wrong_checksum(
    store: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    """A manifest that is valid JSON but records another crc32c: the block is refused."""
    path, tensors = store
    bad = middle_block(path)
    doc = json.loads(path.read_bytes())
    assert bad.crc32c is not None
    crc = f"{bad.crc32c ^ 1:08x}"
    doc["blocks"][bad.index]["crc32c"] = crc
    doc.pop("digest", None)  # edited on purpose: the accident guard would catch it first
    path.write_text(json.dumps(doc))
    err, yielded = await stream_expecting(path, tensors, ChecksumError)
    assert bad.key in str(err) and crc in str(err)
    assert not yielded & tensors_touching(read_manifest(path), [bad])


# --------------------------------------------------------------------------- FaultySource


def wrap_one(source_id: str, **faults: Any) -> tuple[dict[str, FaultySource], Any]:
    made: dict[str, FaultySource] = {}

    def wrap(src: Source) -> Source:
        if src.id != source_id:
            return src
        made[src.id] = FaultySource(src, **faults)
        return made[src.id]

    return made, wrap


@pytest.mark.anyio
async def test_faulty_source_without_faults_is_transparent(
    store: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    path, tensors = store
    made, wrap = wrap_one("s1")
    async with asyncload.open(path, budget=LOAD_BUDGET, wrap_source=wrap) as model:
        got = await model.load()
        st = model.statistics()
    assert list(got) == [t.name for t in read_manifest(path).tensors]
    for name, arr in got.items():
        assert_same(name, arr, tensors)
    src = made["s1"]
    assert src.reads_started == src.reads_finished > 0
    assert st.bytes_read_per_source["s1"] > 0


@pytest.mark.anyio
async def test_source_error_mid_stream(store: tuple[pathlib.Path, dict[str, np.ndarray]]) -> None:
    path, tensors = store
    bad = middle_block(path, source="s1")
    for retries in (0, 2):  # a block with no other copy is retried, then the error stands
        made, wrap = wrap_one("s1", fail_keys=[bad.key.rsplit("/", 1)[-1]])
        err, yielded = await stream_expecting(
            path, tensors, SourceUnavailableError, wrap=wrap, retries=retries
        )
        assert bad.key in str(err) and "'s1'" in str(err)
        assert not yielded & tensors_touching(read_manifest(path), [bad])
        src = made["s1"]
        assert src.reads_failed == 1 + retries
        assert src.reads_started == src.reads_finished
        assert src.statistics().errors == 1 + retries


@pytest.mark.anyio
async def test_random_source_errors(store: tuple[pathlib.Path, dict[str, np.ndarray]]) -> None:
    path, tensors = store
    made, wrap = wrap_one("s2", seed=7, error_rate=0.2)
    await stream_expecting(path, tensors, SourceUnavailableError, wrap=wrap, retries=0)
    assert made["s2"].reads_failed >= 1
    assert made["s2"].reads_started == made["s2"].reads_finished


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fault", "exc"), [("truncate_keys", TruncatedBlockError), ("corrupt_keys", ChecksumError)]
)
async def test_short_and_corrupt_reads(
    store: tuple[pathlib.Path, dict[str, np.ndarray]], fault: str, exc: type[Exception]
) -> None:
    path, tensors = store
    bad = middle_block(path, source="s0")
    _, wrap = wrap_one("s0", **{fault: [bad.key]})
    err, yielded = await stream_expecting(path, tensors, exc, wrap=wrap)
    assert bad.key in str(err)
    assert not yielded & tensors_touching(read_manifest(path), [bad])


@pytest.mark.anyio
async def test_stalled_read_and_a_consumer_that_gives_up(
    store: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    path, tensors = store
    bad = middle_block(path, source="s2")
    made, wrap = wrap_one("s2", stall_keys=[bad.key])
    tasks_before = task_count()
    yielded: set[str] = set()
    async with asyncload.open(path, budget=LOAD_BUDGET, wrap_source=wrap) as model:
        src = made["s2"]
        with anyio.fail_after(10):  # the stall never ends by itself: only cancellation frees us
            stream = model.stream()
            async with anyio.create_task_group() as tg:
                consumer = anyio.CancelScope()

                async def consume() -> None:
                    with consumer:
                        async for name, arr in stream:
                            assert_same(name, arr, tensors)
                            yielded.add(name)
                    assert consumer.cancelled_caught

                async def give_up() -> None:
                    await src.stall_started.wait()
                    consumer.cancel()

                tg.start_soon(consume)
                tg.start_soon(give_up)
            assert src.stalled_now == 1  # still stuck: nobody released it
            await stream.aclose()
        assert src.stalled_now == 0
        assert src.reads_started == src.reads_finished
        st = model.statistics()
        assert st.slots_in_use == 0 and st.bytes_in_flight == 0 and st.reads_in_flight == 0
        assert not yielded & tensors_touching(read_manifest(path), [bad])
        # The model is still usable once the stall is lifted.
        src.release_stalls()
        got = await model.load()
        for name, arr in got.items():
            assert_same(name, arr, tensors)
        assert len(got) == len(tensors)
    assert task_count() == tasks_before


@pytest.mark.anyio
async def test_stalled_read_released_completes(
    store: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    path, tensors = store
    bad = middle_block(path, source="s0")
    made, wrap = wrap_one("s0", stall_keys=[bad.key])
    async with asyncload.open(path, budget=LOAD_BUDGET, wrap_source=wrap) as model:
        src = made["s0"]
        got: dict[str, np.ndarray] = {}
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:

                async def release() -> None:
                    await src.stall_started.wait()
                    await wait_until(
                        lambda: (
                            model.statistics().reads_waiting_for_slot > 0
                            or model.statistics().blocks_read == len(data_blocks(model.manifest)) - 1
                        ),
                        what="the reads behind the stall have run ahead",
                    )
                    src.release_stalls()

                tg.start_soon(release)
                got = await model.load()
        assert src.stalls == 1
        assert len(got) == len(tensors)
        for name, arr in got.items():
            assert_same(name, arr, tensors)
        assert model.statistics().slots_in_use == 0
