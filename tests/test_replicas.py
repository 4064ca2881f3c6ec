"""Replicas: every block on R distinct sources; a failed copy is read from another."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from _stores import block_path, data_blocks, read_manifest, source_dir
from safetensors.numpy import save_file

import asyncload


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {f"t{i}": rng.integers(0, 1 << 15, size=1500 + 37 * i).astype(np.int16) for i in range(12)}


async def _save(root: Path, replicas: int, k: int = 3, **kw: object) -> Path:
    dirs = [root / f"d{i}" for i in range(k)]
    path = await asyncload.save(
        _tensors(), root / "m.json", sources=dirs, block_size=4096, budget=8 * 4096, replicas=replicas, **kw
    )
    return Path(path)


def _same(got: dict[str, np.ndarray]) -> bool:
    want = _tensors()
    return got.keys() == want.keys() and all(got[n].tobytes() == want[n].tobytes() for n in want)


@pytest.mark.anyio
async def test_blocks_are_placed_on_r_consecutive_sources(tmp_path: Path) -> None:
    path = await _save(tmp_path, replicas=2)
    man = read_manifest(path)
    ids = [s.id for s in man.sources]
    for b in man.blocks:
        assert len(b.copies) == 1 and b.copies[0] == ids[(ids.index(b.source) + 1) % 3]
        for sid in (b.source, *b.copies):
            assert (source_dir(path, sid) / b.key).is_file()


@pytest.mark.anyio
async def test_a_deleted_source_directory_is_read_from_the_other_copies(tmp_path: Path) -> None:
    path = await _save(tmp_path, replicas=2)
    shutil.rmtree(source_dir(path, "s1"))
    async with asyncload.open(path, budget=8 * 4096) as model:
        assert _same(await model.load())
        stats = model.statistics()
        assert stats.degraded_reads > 0 and stats.slots_in_use == 0
        assert stats.bytes_read_per_source["s1"] == 0
    report = await asyncload.verify(path, budget=8 * 4096)
    assert not report.ok and {b.source for b in report.bad} == {"s1"}  # every copy is checked


@pytest.mark.anyio
async def test_a_corrupt_primary_is_never_returned(tmp_path: Path) -> None:
    key = os.urandom(32)
    for kw in ({}, {"key": key}):
        root = tmp_path / ("enc" if kw else "plain")
        path = await _save(root, replicas=2, **kw)
        victim = data_blocks(read_manifest(path))[2]
        f = block_path(path, victim)
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0x40
        f.write_bytes(bytes(raw))
        async with asyncload.open(path, budget=8 * (4096 + 16), key=kw.get("key")) as model:
            assert _same(await model.load())
            assert model.statistics().degraded_reads == 1


@pytest.mark.anyio
async def test_losing_every_copy_raises_naming_each(tmp_path: Path) -> None:
    path = await _save(tmp_path, replicas=2)
    victim = data_blocks(read_manifest(path))[0]
    for sid in (victim.source, *victim.copies):
        (source_dir(path, sid) / victim.key).unlink()
    with pytest.raises(asyncload.BlockNotFoundError) as info:
        await asyncload.load(path, budget=8 * 4096)
    text = str(info.value) + " ".join(getattr(info.value, "__notes__", []))
    assert victim.source in text and victim.copies[0] in text


@pytest.mark.anyio
@pytest.mark.parametrize("replicas", [0, 4])
async def test_replicas_outside_1_to_k_are_refused(tmp_path: Path, replicas: int) -> None:
    with pytest.raises(asyncload.FormatError, match="replicas"):
        await _save(tmp_path, replicas=replicas)
    assert not (tmp_path / "m.json").exists()


@pytest.mark.anyio
async def test_pack_with_replicas_survives_a_lost_directory(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    save_file(_tensors(), str(src))
    dirs = [tmp_path / f"p{i}" for i in range(4)]
    manifest = await asyncload.pack(
        src, dirs, tmp_path / "p.json", block_size=4096, budget=16 * 4096, replicas=3
    )
    shutil.rmtree(dirs[2])
    shutil.rmtree(dirs[3])  # two of four lost; every block had three copies
    out = await asyncload.unpack(manifest, tmp_path / "out.safetensors", budget=16 * 4096)
    assert Path(out[0]).read_bytes() == src.read_bytes()  # noqa: ASYNC240 - a test, after the load
