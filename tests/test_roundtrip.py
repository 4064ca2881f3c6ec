"""Byte-for-byte round trips through every public path.

save -> open -> stream (copy / zero-copy) -> load; pack -> unpack (byte-identical files);
plain .safetensors files and Hugging Face directories opened in place; dtypes that
have no numpy form (unknown, packed sub-byte); the inputs save() accepts; and
re-pointing sources after a move. The reference reader/writer is safetensors.
"""

from __future__ import annotations

import filecmp
import json
import math
import os
import shutil
import tempfile
import types
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import deserialize, safe_open
from safetensors.numpy import load_file, save_file

import asyncload
from asyncload import (
    BlockNotFoundError,
    FormatError,
    HeaderError,
    ManifestError,
    UnsupportedDtypeError,
)
from asyncload._assemble import lease_spans
from asyncload._dtypes import DTYPE_BITS
from asyncload._format import build_header
from asyncload._plan import plan_load
from asyncload._writer import TensorsInput

pytestmark = pytest.mark.anyio

MIN_BLOCK = 4096
HF_INDEX = "model.safetensors.index.json"

# Every safetensors dtype that has a numpy form.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "F32": np.dtype(np.float32),
    "C64": np.dtype(np.complex64),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
ALL_DTYPES = sorted(NUMPY_DTYPES)
# The dtypes safetensors.numpy.load_file can return (the others need ml_dtypes).
ST_NUMPY_DTYPES = ["BOOL", "C64", "F16", "F32", "F64", "I16", "I32", "I64", "I8", "U16", "U32", "U64", "U8"]

RT = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # only anyio_backend, constant per test
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
RT_SMALL = settings(RT, max_examples=25)


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Layout:
    k: int  # sources
    m: int  # block size
    save_budget: int
    load_budget: int


@dataclass(frozen=True)
class Spec:
    dtype: str
    shape: tuple[int, ...]
    seed: int


@dataclass(frozen=True)
class Ckpt:
    layout: Layout
    specs: tuple[Spec, ...]
    big: Spec | None  # a tensor larger than either budget (size fixed in tensors())
    prefix: str

    def tensors(self) -> dict[str, np.ndarray]:
        out = {f"{self.prefix}{i}": make_array(s) for i, s in enumerate(self.specs)}
        if self.big is not None:
            itemsize = NUMPY_DTYPES[self.big.dtype].itemsize
            target = max(self.layout.save_budget, self.layout.load_budget) + self.big.shape[0]
            spec = Spec(self.big.dtype, (math.ceil(target / itemsize),), self.big.seed)
            out[f"{self.prefix}big"] = make_array(spec)
        return out


def make_array(spec: Spec) -> np.ndarray:
    """Random bytes viewed as the dtype (every bit pattern, NaNs included); bools stay 0/1."""
    dt = NUMPY_DTYPES[spec.dtype]
    rng = np.random.default_rng(spec.seed)
    count = math.prod(spec.shape)
    if spec.dtype == "BOOL":
        return rng.integers(0, 2, count, dtype=np.uint8).view(np.bool_).reshape(spec.shape)
    raw = rng.integers(0, 256, count * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(spec.shape)


SEEDS = st.integers(0, 2**32 - 1)
SHAPES = st.one_of(
    st.sampled_from([(), (0,), (3, 0), (0, 5, 2)]),  # scalars and zero-size tensors
    st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple),  # tiny, odd lengths
    st.integers(1, 12_000).map(lambda n: (n,)),  # up to several blocks
    st.tuples(st.integers(1, 300), st.integers(1, 37)),
)


@st.composite
def layouts(draw: st.DrawFn, max_k: int = 5) -> Layout:
    k = draw(st.integers(1, max_k))
    # Any block size >= 4 KiB; almost all of them divide nothing.
    m = draw(st.one_of(st.just(MIN_BLOCK), st.integers(MIN_BLOCK + 1, 2 * MIN_BLOCK + 1000)))

    def budget() -> int:
        # exactly k x m, a few bytes above, or a few blocks above
        return k * m + draw(st.one_of(st.just(0), st.integers(1, 64), st.integers(m, 3 * m + 17)))

    return Layout(k, m, budget(), budget())


@st.composite
def checkpoints(
    draw: st.DrawFn, dtypes: list[str] = ALL_DTYPES, max_tensors: int = 10, max_k: int = 5
) -> Ckpt:
    layout = draw(layouts(max_k))
    specs = draw(st.lists(st.builds(Spec, st.sampled_from(dtypes), SHAPES, SEEDS), max_size=max_tensors))
    big = draw(
        st.one_of(st.none(), st.builds(Spec, st.sampled_from(dtypes), st.tuples(st.integers(1, 9000)), SEEDS))
    )
    prefix = draw(st.sampled_from(["t", "model.layers.", "ü/ß.", 'a b"c\\', ""]))
    return Ckpt(layout, tuple(specs), big, prefix)


# --------------------------------------------------------------------------- helpers


def assert_same(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert g.tobytes() == w.tobytes(), name


def assert_reference_reads(path: Path, want: Mapping[str, np.ndarray]) -> None:
    """safetensors itself parses ``path`` and finds exactly ``want`` (dtype, shape, bytes)."""
    got = dict(deserialize(path.read_bytes()))  # type: ignore[no-untyped-call]
    assert sorted(got) == sorted(want)
    inverse = {dt: name for name, dt in NUMPY_DTYPES.items()}
    for name, w in want.items():
        assert got[name]["dtype"] == inverse[w.dtype], name
        assert tuple(got[name]["shape"]) == w.shape, name
        assert bytes(got[name]["data"]) == w.tobytes(), name
    if all(inverse[w.dtype] in ST_NUMPY_DTYPES for w in want.values()):
        assert_same(load_file(path), want)


def make_dirs(root: Path, k: int, prefix: str = "d") -> list[Path]:
    dirs = [root / f"{prefix}{i}" for i in range(k)]
    for d in dirs:
        d.mkdir()
    return dirs


def same_bytes(a: Path, b: Path) -> bool:
    return filecmp.cmp(a, b, shallow=False) and a.read_bytes() == b.read_bytes()


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def write_raw_safetensors(
    path: Path, entries: list[tuple[str, str, tuple[int, ...], bytes]], metadata: dict[str, str] | None = None
) -> None:
    header = build_header([(n, d, s, len(b)) for n, d, s, b in entries], metadata)
    path.write_bytes(header + b"".join(b for *_, b in entries))


def write_hf_dir(directory: Path, shards: list[dict[str, np.ndarray]]) -> None:
    """Shards written by safetensors itself plus a ``model.safetensors.index.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, directory / fname, metadata={"format": "np"})
        weight_map.update(dict.fromkeys(tensors, fname))
        total += sum(a.nbytes for a in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / HF_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def covered_by_one_block(model: asyncload.Model, name: str) -> bool:
    t = model.tensors[name]
    return t.nbytes > 0 and any(b.offset <= t.begin and t.end <= b.end for b in model.manifest.blocks)


async def check_model(model: asyncload.Model, want: Mapping[str, np.ndarray]) -> None:
    """Both stream modes and load() give exactly ``want``; every slot comes back."""
    assert {n: (t.dtype, t.shape) for n, t in model.tensors.items()} == {
        n: ({v: k for k, v in NUMPY_DTYPES.items()}[a.dtype], a.shape) for n, a in want.items()
    }
    ring_memory = model._ring._memory  # type: ignore[union-attr]

    seen: list[str] = []
    got: dict[str, np.ndarray] = {}
    async with model.stream(copy=True) as s:
        async for name, arr in s:
            seen.append(name)
            assert arr.flags.writeable, name
            assert not np.shares_memory(arr, ring_memory), name  # owned, not a slot view
            got[name] = arr
    assert sorted(seen) == sorted(want)  # each exactly once
    assert_same(got, want)
    assert model.statistics().slots_in_use == 0

    seen = []
    snap: dict[str, np.ndarray] = {}
    ring = model._ring
    assert ring is not None
    plan = plan_load(model.manifest.blocks, list(model.manifest.tensors))
    striped = bool(model.manifest.stripes)
    spans = dict(
        zip(
            (t.name for t in plan.tensors),
            lease_spans(plan, ring, copy=False, across_blocks=not striped),
            strict=True,
        )
    )
    ring_all = ring._mirror if ring._mirror is not None else ring_memory
    async for name, arr in model.stream(copy=False):
        seen.append(name)
        if covered_by_one_block(model, name):
            assert spans[name] == 1, name
        if spans[name]:  # inside one block, or over consecutive full blocks of a mirrored ring
            assert not arr.flags.writeable, name  # a zero-copy lease is read-only
            assert np.shares_memory(arr, ring_all), name
        else:
            assert not np.shares_memory(arr, ring_all), name
        snap[name] = arr.copy()  # a lease is valid only until the next item
    assert sorted(seen) == sorted(want)
    assert_same(snap, want)
    assert model.statistics().slots_in_use == 0

    loaded = await model.load()
    assert list(loaded) == [t.name for t in model.manifest.tensors]
    assert_same(loaded, want)
    assert model.statistics().slots_in_use == 0


# --------------------------------------------------------------------------- 1. save / open / load


@RT
@given(ckpt=checkpoints(), data=st.data())
async def test_save_open_stream_load(ckpt: Ckpt, data: st.DataObject) -> None:
    lay = ckpt.layout
    want = ckpt.tensors()
    subset = data.draw(st.lists(st.sampled_from(sorted(want)), unique=True) if want else st.just([]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = make_dirs(root, lay.k)
        mpath = await asyncload.save(
            want, root / "m.asyncload.json", sources=dirs, block_size=lay.m, budget=lay.save_budget
        )
        async with asyncload.open(mpath, budget=lay.load_budget) as model:
            assert model.kind == "manifest"
            assert model.manifest.block_size == lay.m
            assert all(b.length <= lay.m for b in model.manifest.blocks)
            await check_model(model, want)
            # a subset through a stream of the same model
            sub = await model.load(subset)
            assert_same(sub, {n: want[n] for n in subset})
        got = await asyncload.load(mpath, names=subset, budget=lay.load_budget)
        assert_same(got, {n: want[n] for n in subset})


@RT_SMALL
@given(ckpt=checkpoints())
async def test_unpack_of_saved_manifest_is_safetensors(ckpt: Ckpt) -> None:
    lay = ckpt.layout
    want = ckpt.tensors()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mpath = await asyncload.save(
            want,
            root / "m.asyncload.json",
            sources=make_dirs(root, lay.k),
            block_size=lay.m,
            budget=lay.save_budget,
            metadata={"origin": "asyncload"},
        )
        out = root / "out" / "model.safetensors"
        assert await asyncload.unpack(mpath, out, budget=lay.load_budget) == [str(out)]
        assert_reference_reads(out, want)
        with safe_open(out, framework="np") as f:
            assert f.metadata() == {"origin": "asyncload"}
        # and the rebuilt file packs and unpacks to itself
        m2 = await asyncload.pack(
            out, make_dirs(root, lay.k, "p"), root / "p.json", block_size=lay.m, budget=lay.save_budget
        )
        again = root / "again.safetensors"
        await asyncload.unpack(m2, again, budget=lay.load_budget)
        assert same_bytes(out, again)


@pytest.mark.parametrize("copy", [True, False])
async def test_hundreds_of_tiny_tensors(tmp_path: Path, copy: bool) -> None:
    rng = np.random.default_rng(7)
    dts = list(NUMPY_DTYPES)
    want = {
        f"layer.{i}.w": make_array(Spec(dts[i % len(dts)], (int(rng.integers(0, 4)),), i)) for i in range(400)
    }
    want["scalar"] = np.array(1.5, dtype=np.float64)
    m = MIN_BLOCK + 13
    mpath = await asyncload.save(
        want, tmp_path / "m.json", sources=make_dirs(tmp_path, 3), block_size=m, budget=3 * m
    )
    async with asyncload.open(mpath, budget=3 * m + 1) as model:
        data_start = min(t.begin for t in model.manifest.tensors)  # the header is before it
        assert sum(1 for b in model.manifest.blocks if b.offset < data_start) > 1
        got: dict[str, np.ndarray] = {}
        async for name, arr in model.stream(copy=copy):
            assert name not in got
            got[name] = arr.copy()
        assert_same(got, want)
    out = tmp_path / "m.safetensors"
    await asyncload.unpack(mpath, out, budget=3 * m)
    assert_reference_reads(out, want)


# --------------------------------------------------------------------------- 2. pack / unpack


@RT
@given(
    ckpt=checkpoints(),
    metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=24), max_size=3),
    into_dir=st.booleans(),
)
async def test_pack_unpack_is_byte_identical(ckpt: Ckpt, metadata: dict[str, str], into_dir: bool) -> None:
    lay = ckpt.layout
    want = ckpt.tensors()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = root / "orig.safetensors"
        save_file(want, src, metadata=metadata or None)
        dirs = make_dirs(root, lay.k)
        mpath = await asyncload.pack(
            src, dirs, root / "orig.asyncload.json", block_size=lay.m, budget=lay.save_budget
        )
        blocks = read_json(Path(mpath))["blocks"]
        assert [b["source"] for b in blocks] == [f"s{i % lay.k}" for i in range(len(blocks))]
        assert all(0 < b["length"] <= lay.m for b in blocks)
        if into_dir:
            out_dir = root / "out"
            out_dir.mkdir()
            written = await asyncload.unpack(mpath, out_dir, budget=lay.load_budget)
            out = out_dir / "orig.safetensors"
            assert written == [str(out)]
            assert files_in(out_dir) == ["orig.safetensors"]  # no temp files left behind
        else:
            out = root / "copy.safetensors"
            assert await asyncload.unpack(mpath, out, budget=lay.load_budget) == [str(out)]
        assert same_bytes(src, out)
        report = await asyncload.verify(mpath, budget=lay.load_budget)
        assert report.ok and report.bytes_checked == src.stat().st_size
        # the packed store loads the same arrays too
        assert_same(await asyncload.load(mpath, budget=lay.load_budget), want)


# --------------------------------------------------------------------------- 3. direct opens


@RT
@given(ckpt=checkpoints(max_k=1))
async def test_open_safetensors_file_in_place(ckpt: Ckpt) -> None:
    lay = ckpt.layout
    want = ckpt.tensors()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plain.safetensors"
        save_file(want, path)
        before = files_in(Path(tmp))
        async with asyncload.open(path, budget=lay.load_budget, block_size=lay.m) as model:
            assert model.kind == "safetensors"
            assert model.manifest.block_size == lay.m
            await check_model(model, want)
        assert files_in(Path(tmp)) == before  # open() never writes
        ref = {n: a for n, a in want.items() if a.dtype in [NUMPY_DTYPES[d] for d in ST_NUMPY_DTYPES]}
        got = await asyncload.load(path, names=list(ref), budget=lay.load_budget, block_size=lay.m)
        assert_same(got, load_file(path) if len(ref) == len(want) else ref)


@RT_SMALL
@given(ckpt=checkpoints(max_tensors=8), nshards=st.integers(2, 3), data=st.data())
async def test_hf_sharded_directory(ckpt: Ckpt, nshards: int, data: st.DataObject) -> None:
    lay = ckpt.layout
    want = ckpt.tensors()
    names = sorted(want)
    # every shard gets at least one tensor
    names += [f"pad{i}" for i in range(max(0, nshards - len(names)))]
    want.update({n: np.arange(3, dtype=np.int16) for n in names if n not in want})
    owner = data.draw(st.lists(st.integers(0, nshards - 1), min_size=len(names), max_size=len(names)))
    owner[:nshards] = range(nshards)
    shards = [{n: want[n] for n, o in zip(names, owner, strict=True) if o == i} for i in range(nshards)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = root / "hf"
        write_hf_dir(hf, shards)
        async with asyncload.open(hf, budget=lay.load_budget, block_size=lay.m) as model:
            assert model.kind == "hf-directory"
            await check_model(model, want)
        assert_same(await asyncload.load(hf, budget=lay.load_budget, block_size=lay.m), want)

        mpath = await asyncload.pack(
            hf, make_dirs(root, lay.k), root / "hf.asyncload.json", block_size=lay.m, budget=lay.save_budget
        )
        out = root / "restored"
        written = await asyncload.unpack(mpath, out, budget=lay.load_budget)
        assert sorted(Path(p).name for p in written) == files_in(hf)
        assert files_in(out) == files_in(hf)
        for name in files_in(hf):  # every shard and the index, byte for byte
            assert same_bytes(hf / name, out / name), name
        async with asyncload.open(out, budget=lay.load_budget, block_size=lay.m) as model:
            assert_same(await model.load(), want)


async def test_single_model_safetensors_directory(tmp_path: Path) -> None:
    want = {"a": np.arange(5000, dtype=np.float32), "b": np.array(True), "c": np.zeros((3, 0), np.int8)}
    d = tmp_path / "single"
    d.mkdir()
    save_file(want, d / "model.safetensors")
    async with asyncload.open(d, budget=2 * MIN_BLOCK, block_size=MIN_BLOCK) as model:
        assert model.kind == "hf-directory"
        await check_model(model, want)
    mpath = await asyncload.pack(
        d, make_dirs(tmp_path, 2), tmp_path / "s.json", block_size=MIN_BLOCK, budget=2 * MIN_BLOCK
    )
    out = tmp_path / "out"
    out.mkdir()
    await asyncload.unpack(mpath, out, budget=2 * MIN_BLOCK)
    assert same_bytes(d / "model.safetensors", out / "model.safetensors")


async def test_hf_index_mapping_to_wrong_shard_is_header_error(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    write_hf_dir(hf, [{"a": np.arange(4, dtype=np.int32)}, {"b": np.arange(5, dtype=np.int8)}])
    index = json.loads((hf / HF_INDEX).read_text())
    index["weight_map"]["a"] = "model-00002-of-00002.safetensors"
    index["weight_map"]["b"] = "model-00001-of-00002.safetensors"
    (hf / HF_INDEX).write_text(json.dumps(index))
    with pytest.raises(HeaderError, match="'a'"):
        async with asyncload.open(hf, block_size=MIN_BLOCK):
            pass
    with pytest.raises(HeaderError):
        await asyncload.pack(hf, make_dirs(tmp_path, 1), tmp_path / "x.json", block_size=MIN_BLOCK)
    assert not (tmp_path / "x.json").exists()


async def test_hf_index_naming_a_missing_tensor_is_header_error(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    write_hf_dir(hf, [{"a": np.arange(4, dtype=np.int32)}, {"b": np.arange(5, dtype=np.int8)}])
    index = json.loads((hf / HF_INDEX).read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (hf / HF_INDEX).write_text(json.dumps(index))
    with pytest.raises(HeaderError, match="ghost"):
        await asyncload.load(hf, block_size=MIN_BLOCK)


# --------------------------------------------------------------------------- 4. dtypes without numpy form


def _odd_entries() -> list[tuple[str, str, tuple[int, ...], bytes]]:
    rng = np.random.default_rng(3)
    normal = np.arange(2500, dtype=np.float32)
    return [
        ("weird", "X9", (3,), rng.integers(0, 256, 9_001, dtype=np.uint8).tobytes()),
        ("normal", "F32", normal.shape, normal.tobytes()),
        ("packed4", "F4", (9_999,), rng.integers(0, 256, 5_000, dtype=np.uint8).tobytes()),
        ("packed6", "F6_E2M3", (5,), rng.integers(0, 256, 4, dtype=np.uint8).tobytes()),
        ("tail", "U8", (3,), b"xyz"),
    ]


@pytest.mark.parametrize("k", [1, 3])
async def test_unknown_and_packed_dtypes_survive_pack_unpack(tmp_path: Path, k: int) -> None:
    entries = _odd_entries()
    assert DTYPE_BITS["F4"] == 4 and "X9" not in DTYPE_BITS
    src = tmp_path / "odd.safetensors"
    write_raw_safetensors(src, entries, {"note": "odd"})
    m = MIN_BLOCK + 321
    mpath = await asyncload.pack(
        src, make_dirs(tmp_path, k), tmp_path / "odd.json", block_size=m, budget=k * m
    )
    out = tmp_path / "back.safetensors"
    await asyncload.unpack(mpath, out, budget=k * m)
    assert same_bytes(src, out)

    for target in (src, Path(mpath)):
        async with asyncload.open(target, budget=k * m, block_size=m) as model:
            info = {n: (t.dtype, t.shape, t.nbytes) for n, t in model.tensors.items()}
            assert info == {n: (d, s, len(b)) for n, d, s, b in entries}
            got = await model.load(["normal", "tail"])
            assert_same(
                got, {"normal": np.arange(2500, dtype=np.float32), "tail": np.frombuffer(b"xyz", np.uint8)}
            )
            for bad in ("weird", "packed4", "packed6"):
                for copy in (True, False):
                    with pytest.raises(UnsupportedDtypeError, match=bad) as ei:
                        async for _ in model.stream([bad], copy=copy):
                            pass
                    assert isinstance(ei.value, TypeError)
                    assert model.statistics().slots_in_use == 0
            # the model is still usable after the error
            assert_same(await model.load(["normal"]), {"normal": np.arange(2500, dtype=np.float32)})
        with pytest.raises(UnsupportedDtypeError, match="weird"):
            await asyncload.load(target, budget=k * m, block_size=m)


# --------------------------------------------------------------------------- 5. save() inputs


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {
        "a": rng.standard_normal((37, 129)).astype(np.float32),
        "b": np.arange(3, dtype=ml_dtypes.bfloat16),
        "s": np.array(7, dtype=np.int64),
        "z": np.zeros((0, 4), np.float16),
    }


async def _agen(items: dict[str, np.ndarray]) -> AsyncIterator[tuple[str, np.ndarray]]:
    for item in items.items():
        yield item


def _gen(items: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    yield from items.items()


@pytest.mark.parametrize("form", ["dict", "mapping", "list", "generator", "async-generator"])
async def test_save_accepts_mappings_and_iterables(tmp_path: Path, form: str) -> None:
    want = _inputs()
    tensors: TensorsInput
    if form == "dict":
        tensors = want
    elif form == "mapping":
        tensors = types.MappingProxyType(want)
    elif form == "list":
        tensors = list(want.items())
    elif form == "generator":
        tensors = _gen(want)
    else:
        tensors = _agen(want)
    mpath = await asyncload.save(
        tensors,
        tmp_path / "m.json",
        sources=make_dirs(tmp_path, 2),
        block_size=MIN_BLOCK,
        budget=2 * MIN_BLOCK,
    )
    got = await asyncload.load(mpath, budget=2 * MIN_BLOCK)
    assert list(got) == list(want)  # stream order is input order
    assert_same(got, want)


async def test_save_non_contiguous_arrays_as_logical_values(tmp_path: Path) -> None:
    base = np.arange(48 * 80, dtype=np.float64).reshape(48, 80)
    buf = np.arange(8 * 100 + 1, dtype=np.uint8)
    want_views: dict[str, np.ndarray] = {
        "every_other_row": base[::2],
        "transpose": base.T,
        "column_slice": base[:, 3:41],
        "negative_strides": base[::-1, ::-3],
        "fortran": np.asfortranarray(base[:7, :9]),
        "broadcast": np.broadcast_to(np.arange(5, dtype=np.int16), (300, 5)),
        "unaligned": np.frombuffer(buf.tobytes(), dtype=np.float64, count=100, offset=1),
        "strided_bf16": np.arange(64, dtype=ml_dtypes.bfloat16)[1::3],
    }
    assert not all(v.flags.c_contiguous for v in want_views.values())
    want = {n: np.ascontiguousarray(v) for n, v in want_views.items()}
    m = MIN_BLOCK + 5
    mpath = await asyncload.save(
        want_views, tmp_path / "m.json", sources=make_dirs(tmp_path, 2), block_size=m, budget=2 * m
    )
    assert_same(await asyncload.load(mpath, budget=2 * m), want)
    out = tmp_path / "m.safetensors"
    await asyncload.unpack(mpath, out, budget=2 * m)
    assert_reference_reads(out, want)


@pytest.mark.parametrize("form", ["list", "async-generator"])
@pytest.mark.parametrize("bad", ["dup", "__metadata__"])
async def test_save_rejects_duplicate_and_reserved_names(tmp_path: Path, form: str, bad: str) -> None:
    # an earlier good save at the same path must survive the failed one
    old = {"keep": np.arange(9, dtype=np.int32)}
    mpath = tmp_path / "m.json"
    await asyncload.save(
        old, mpath, sources=make_dirs(tmp_path, 2, "old"), block_size=MIN_BLOCK, budget=2 * MIN_BLOCK
    )
    before = mpath.read_bytes()
    a = np.arange(10_000, dtype=np.uint8)
    pairs = [("dup", a), ("x", a), ("dup", a)] if bad == "dup" else [("x", a), ("__metadata__", a)]
    tensors: TensorsInput = _agen_pairs(pairs) if form == "async-generator" else pairs
    with pytest.raises(FormatError, match=bad):
        await asyncload.save(
            tensors, mpath, sources=make_dirs(tmp_path, 2), block_size=MIN_BLOCK, budget=2 * MIN_BLOCK
        )
    assert mpath.read_bytes() == before
    assert_same(await asyncload.load(mpath, budget=2 * MIN_BLOCK), old)


async def _agen_pairs(pairs: list[tuple[str, np.ndarray]]) -> AsyncIterator[tuple[str, np.ndarray]]:
    for p in pairs:
        yield p


async def test_save_rejects_big_endian(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedDtypeError):
        await asyncload.save(
            {"be": np.arange(3, dtype=">i4")},
            tmp_path / "m.json",
            sources=make_dirs(tmp_path, 1),
            block_size=MIN_BLOCK,
            budget=MIN_BLOCK,
        )
    assert not (tmp_path / "m.json").exists()


@RT_SMALL
@given(metadata=st.dictionaries(st.text(max_size=10), st.text(max_size=30), min_size=1, max_size=4))
async def test_save_metadata_round_trips(metadata: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        want = {"w": np.arange(7, dtype=np.float16)}
        mpath = await asyncload.save(
            want,
            root / "m.json",
            sources=make_dirs(root, 1),
            block_size=MIN_BLOCK,
            budget=MIN_BLOCK,
            metadata=metadata,
        )
        out = root / "m.safetensors"
        await asyncload.unpack(mpath, out, budget=MIN_BLOCK)
        with safe_open(out, framework="np") as f:
            assert f.metadata() == metadata
        assert_same(load_file(out), want)


# --------------------------------------------------------------------------- 6. re-pointing sources


async def test_repoint_moved_source(tmp_path: Path) -> None:
    want: dict[str, np.ndarray] = {"x": np.arange(20_000, dtype=np.int32), "y": np.arange(7, dtype=np.uint8)}
    m = MIN_BLOCK + 100
    dirs = make_dirs(tmp_path, 3)
    mpath = await asyncload.save(want, tmp_path / "m.json", sources=dirs, block_size=m, budget=3 * m)
    moved = tmp_path / "elsewhere" / "new1"
    moved.parent.mkdir()
    shutil.move(dirs[1], moved)

    with pytest.raises(BlockNotFoundError) as ei:
        await asyncload.load(mpath, budget=3 * m)
    assert isinstance(ei.value, FileNotFoundError)
    assert "'s1'" in str(ei.value)
    assert str(dirs[1]) in str(ei.value)

    async with asyncload.open(mpath, budget=3 * m, sources={"s1": str(moved)}) as model:
        assert_same(await model.load(), want)
        assert model.statistics().bytes_read_per_source["s1"] > 0
    assert_same(await asyncload.load(mpath, budget=3 * m, sources={"s1": str(moved)}), want)
    out = tmp_path / "m.safetensors"
    await asyncload.unpack(mpath, out, budget=3 * m, sources={"s1": str(moved)})
    assert_reference_reads(out, want)
    assert (await asyncload.verify(mpath, budget=3 * m, sources={"s1": str(moved)})).ok

    with pytest.raises(ManifestError, match="s7"):
        await asyncload.load(mpath, budget=3 * m, sources={"s7": str(moved)})


async def test_relative_sources_move_with_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = {"x": np.arange(9_000, dtype=np.float32)}
    a = tmp_path / "a"
    a.mkdir()
    monkeypatch.chdir(a)
    mpath = await asyncload.save(
        want, "ckpt/m.json", sources=["store/s0", "store/s1"], block_size=MIN_BLOCK, budget=2 * MIN_BLOCK
    )
    locs = [s["location"] for s in json.loads((a / mpath).read_text())["sources"]]
    assert not any(os.path.isabs(p) for p in locs)
    monkeypatch.chdir(tmp_path)
    shutil.move(a, tmp_path / "b")
    assert_same(await asyncload.load(tmp_path / "b" / "ckpt" / "m.json", budget=2 * MIN_BLOCK), want)
