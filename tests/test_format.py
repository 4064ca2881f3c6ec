"""Tests for asyncload._format: safetensors headers, HF indexes and the manifest.

Pure functions, so hypothesis drives most of it: round trips against the
safetensors reference implementation, and hostile input that must end in the
documented exception (HeaderError / ManifestError, both FormatError and ValueError)
with a message that names the file and the field.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncload import _format
from asyncload._dtypes import DTYPE_BITS, expected_nbytes, numpy_dtype
from asyncload._exceptions import AsyncloadError, FormatError, HeaderError, ManifestError
from asyncload._format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_HEADER_SIZE,
    BlockRef,
    FileEntry,
    Manifest,
    SourceRef,
    TensorInfo,
    build_header,
    parse_header,
    parse_header_length,
    parse_hf_index,
)

FILE = "ckpt/model-00001.safetensors"
MF = "out/m.asyncload.json"

# --------------------------------------------------------------------------- helpers

names = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12
).filter(lambda s: s != "__metadata__")
shapes = st.lists(st.integers(0, 5), max_size=4).map(tuple)
metadata_st = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4)


@st.composite
def header_entries(draw: st.DrawFn, *, aligned: bool = False) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, dtype, shape, nbytes) with unique names; unknown dtypes get any byte length."""
    tnames = draw(st.lists(names, unique=True, max_size=8))
    out = []
    for n in tnames:
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)) | st.sampled_from(["Q7", "X_UNKNOWN"]))
        shape = draw(shapes)
        nbytes = expected_nbytes(dtype, shape)
        if nbytes is None:
            nbytes = draw(st.integers(0, 40))
        elif aligned and math.prod(shape) * DTYPE_BITS[dtype] % 8:
            shape = (*shape, 8)  # whole bytes for sub-byte dtypes, as safetensors requires
            nbytes = expected_nbytes(dtype, shape)
        out.append((n, dtype, shape, nbytes))
    return out


def raw_file(doc: Any, data: bytes | int = 0, *, pad: bool = True) -> bytes:
    """A safetensors file from a header document (or raw JSON text) and its data section."""
    text = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    if pad:
        text += b" " * (-(len(text) + 8) % 8)
    body = bytes(data) if isinstance(data, int) else data
    return struct.pack("<Q", len(text)) + text + body


def parse_file(buf: bytes, name: str = FILE) -> _format.SafetensorsHeader:
    return parse_header(buf, file_size=len(buf), name=name)


def check_error(ei: pytest.ExceptionInfo[BaseException], cls: type[FormatError], *parts: str) -> None:
    e = ei.value
    assert type(e) is cls
    assert isinstance(e, FormatError) and isinstance(e, ValueError) and isinstance(e, AsyncloadError)
    for p in parts:
        assert p in str(e), (p, str(e))


# --------------------------------------------------------------------------- build/parse round trip


@given(header_entries(), metadata_st)
def test_build_then_parse_header(entries: list, metadata: dict | None) -> None:
    h = build_header(entries, metadata)
    assert len(h) % 8 == 0  # data section stays 8-byte aligned
    total = sum(e[3] for e in entries)
    buf = h + bytes(total)
    hdr = parse_header(h, file_size=len(buf), name=FILE)  # the header bytes alone suffice
    assert hdr.header_size == len(h)
    assert hdr.data_size == total
    assert hdr.metadata == (metadata or None)
    pos = len(h)
    want = []
    for name, dtype, shape, nbytes in entries:
        want.append(TensorInfo(name, dtype, tuple(shape), pos, pos + nbytes))
        pos += nbytes
    assert list(hdr.tensors) == want


@settings(max_examples=60, deadline=None)
@given(header_entries(aligned=True), metadata_st, st.randoms(use_true_random=False))
def test_our_header_parses_in_safetensors(entries: list, metadata: dict | None, rnd: Any) -> None:
    entries = [e for e in entries if e[1] in DTYPE_BITS]  # safetensors refuses unknown dtypes
    total = sum(e[3] for e in entries)
    data = rnd.randbytes(total)
    buf = build_header(entries, metadata) + data
    got = {
        name: (info["dtype"], tuple(info["shape"]), bytes(info["data"]))
        for name, info in safetensors.deserialize(buf)
    }
    ours = parse_file(buf)
    assert got == {t.name: (t.dtype, t.shape, buf[t.begin : t.end]) for t in ours.tensors}
    numpyable = {n for n, d, *_ in entries if d in ("U8", "I16", "F32", "F64", "BOOL", "C64", "U64")}
    if numpyable and numpyable == {e[0] for e in entries}:
        loaded = safetensors.numpy.load(buf)
        for t in ours.tensors:
            want = np.frombuffer(buf[t.begin : t.end], dtype=numpy_dtype(t.dtype)).reshape(t.shape)
            np.testing.assert_array_equal(loaded[t.name], want)


def test_our_header_metadata_reads_back_in_safe_open(tmp_path: Any) -> None:
    entries = [("a", "F32", (2, 3), 24), ("b", "I8", (5,), 5), ("c", "BF16", (0,), 0)]
    meta = {"format": "pt", "note": "ünïcode"}
    path = tmp_path / "x.safetensors"
    data = bytes(range(29))
    path.write_bytes(build_header(entries, meta) + data)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == meta
        assert set(f.keys()) == {"a", "b", "c"}
        np.testing.assert_array_equal(f.get_tensor("a"), np.frombuffer(data[:24], "<f4").reshape(2, 3))


arrays = st.sampled_from(["<f4", "<i2", "|u1", "<f8", "|b1", "<i8", "<f2", "<c8"]).flatmap(
    lambda dt: st.lists(st.integers(0, 4), max_size=3).map(
        lambda shape: np.arange(math.prod(shape), dtype=np.int64).astype(dt).reshape(shape)
    )
)


@settings(max_examples=60, deadline=None)
# metadata={} is left out: safetensors 0.8 then writes an invalid header for an empty dict
@given(
    st.dictionaries(names, arrays, max_size=6),
    st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), min_size=1, max_size=4),
)
def test_safetensors_files_parse_here(tensors: dict[str, np.ndarray], metadata: dict | None) -> None:
    buf = safetensors.numpy.save(tensors, metadata=metadata)
    hdr = parse_file(buf)
    assert hdr.metadata == metadata
    assert hdr.header_size + hdr.data_size == len(buf)
    assert {t.name for t in hdr.tensors} == set(tensors)
    assert [t.begin for t in hdr.tensors] == sorted(t.begin for t in hdr.tensors)
    for t in hdr.tensors:
        arr = np.frombuffer(buf[t.begin : t.end], dtype=numpy_dtype(t.dtype)).reshape(t.shape)
        np.testing.assert_array_equal(arr, tensors[t.name])
        assert arr.dtype == tensors[t.name].dtype


def test_safetensors_save_file_with_metadata(tmp_path: Any) -> None:
    path = tmp_path / "ref.safetensors"
    tensors = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.zeros((0,), np.int64)}
    safetensors.numpy.save_file(tensors, str(path), metadata={"k": "v", "empty": ""})
    buf = path.read_bytes()
    n = parse_header_length(buf[:8], file_size=len(buf), name=str(path))
    hdr = parse_header(buf[: 8 + n], file_size=len(buf), name=str(path))
    assert hdr.metadata == {"k": "v", "empty": ""}
    w = next(t for t in hdr.tensors if t.name == "w")
    assert (w.dtype, w.shape, w.nbytes) == ("F32", (3, 4), 48)
    np.testing.assert_array_equal(np.frombuffer(buf[w.begin : w.end], "<f4").reshape(3, 4), tensors["w"])


def test_build_header_rejects_duplicate_names() -> None:
    with pytest.raises(HeaderError, match="'a'"):
        build_header([("a", "U8", (1,), 1), ("a", "U8", (1,), 1)])


def test_unknown_dtype_is_accepted() -> None:
    hdr = parse_file(raw_file({"q": {"dtype": "Q7", "shape": [3], "data_offsets": [0, 5]}}, 5))
    (t,) = hdr.tensors
    assert (t.dtype, t.shape, t.nbytes) == ("Q7", (3,), 5)


def test_data_section_may_have_trailing_bytes_and_empty_header() -> None:
    hdr = parse_file(raw_file({}, 16))
    assert hdr.tensors == () and hdr.data_size == 16 and hdr.metadata is None


# --------------------------------------------------------------------------- header length


@pytest.mark.parametrize("prefix", [b"", b"\x08", b"\x08\x00\x00\x00\x00\x00\x00"])
def test_truncated_prefix(prefix: bytes) -> None:
    with pytest.raises(HeaderError) as ei:
        parse_header_length(prefix, file_size=len(prefix), name=FILE)
    check_error(ei, HeaderError, FILE, "too short")
    with pytest.raises(HeaderError):
        parse_header(prefix, file_size=len(prefix), name=FILE)


def test_prefix_shorter_than_claimed_file_size() -> None:
    with pytest.raises(HeaderError) as ei:
        parse_header_length(b"\x02\x00", file_size=1000, name=FILE)
    check_error(ei, HeaderError, FILE)


@pytest.mark.parametrize("n", [MAX_HEADER_SIZE + 1, 10**12, 2**63, 2**64 - 1])
def test_huge_header_length_rejected_from_the_prefix_alone(n: int) -> None:
    # only the 8-byte prefix is passed and the file is "big enough": the limit must
    # be what rejects it, before anything of that size is read or allocated
    with pytest.raises(HeaderError) as ei:
        parse_header_length(struct.pack("<Q", n), file_size=2**64 + 16, name=FILE)
    check_error(ei, HeaderError, FILE, "limit")
    with pytest.raises(HeaderError) as ei:
        parse_header(struct.pack("<Q", n), file_size=2**64 + 16, name=FILE)
    check_error(ei, HeaderError, FILE, "limit")


def test_header_length_at_the_limit_is_accepted() -> None:
    prefix = struct.pack("<Q", MAX_HEADER_SIZE)
    assert parse_header_length(prefix, file_size=8 + MAX_HEADER_SIZE, name=FILE) == MAX_HEADER_SIZE


@pytest.mark.parametrize(("n", "size"), [(100, 107), (1, 8), (4096, 1000)])
def test_header_length_larger_than_file(n: int, size: int) -> None:
    with pytest.raises(HeaderError) as ei:
        parse_header_length(struct.pack("<Q", n) + b"x" * 8, file_size=size, name=FILE)
    check_error(ei, HeaderError, FILE, str(n))


def test_header_truncated_in_memory() -> None:
    buf = raw_file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, 1)
    with pytest.raises(HeaderError) as ei:
        parse_header(buf[:20], file_size=len(buf), name=FILE)
    check_error(ei, HeaderError, FILE, "truncated")


# --------------------------------------------------------------------------- hostile header documents

GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _entry(**kw: Any) -> dict[str, Any]:
    e = dict(GOOD)
    for k, v in kw.items():
        if v is _DROP:
            del e[k]
        else:
            e[k] = v
    return e


_DROP = object()

BAD_HEADERS: list[tuple[str, bytes, tuple[str, ...]]] = [
    ("not-json", raw_file(b"{not json"), ("JSON",)),
    ("bad-utf8", raw_file(b'{"\xff\xfe": 1}'), ("UTF-8",)),
    ("bom", raw_file(b"\xef\xbb\xbf{}"), ("JSON",)),
    ("array", raw_file([]), ("object",)),
    ("number", raw_file(1), ("object",)),
    ("string", raw_file("x"), ("object",)),
    ("null", raw_file(None), ("object",)),
    (
        "huge-int",
        raw_file(b'{"a":{"dtype":"U8","shape":[' + b"1" * 5000 + b'],"data_offsets":[0,1]}}', 1),
        (),
    ),
    ("deep", raw_file(b"[" * 100_000 + b"]" * 100_000), ()),
    ("entry-not-object", raw_file({"w": 1}), ("'w'", "object")),
    ("entry-list", raw_file({"w": []}), ("'w'",)),
    ("dtype-missing", raw_file({"w": _entry(dtype=_DROP)}, 8), ("'w'", "dtype")),
    ("dtype-int", raw_file({"w": _entry(dtype=7)}, 8), ("'w'", "dtype")),
    ("dtype-null", raw_file({"w": _entry(dtype=None)}, 8), ("'w'", "dtype")),
    ("dtype-empty", raw_file({"w": _entry(dtype="")}, 8), ("'w'", "dtype")),
    ("dtype-list", raw_file({"w": _entry(dtype=["F32"])}, 8), ("'w'", "dtype")),
    ("dtype-long", raw_file({"w": _entry(dtype="F" * 65)}, 8), ("'w'", "dtype")),
    ("shape-missing", raw_file({"w": _entry(shape=_DROP)}, 8), ("'w'", "shape")),
    ("shape-str", raw_file({"w": _entry(shape="2")}, 8), ("'w'", "shape")),
    ("shape-float", raw_file({"w": _entry(shape=[2.0])}, 8), ("'w'", "shape")),
    ("shape-neg", raw_file({"w": _entry(shape=[-2])}, 8), ("'w'", "shape")),
    ("shape-bool", raw_file({"w": _entry(shape=[True, True])}, 8), ("'w'", "shape")),
    ("shape-nested", raw_file({"w": _entry(shape=[[2]])}, 8), ("'w'", "shape")),
    ("shape-65-dims", raw_file({"w": _entry(shape=[1] * 64 + [2])}, 8), ("'w'", "shape")),
    ("offsets-missing", raw_file({"w": _entry(data_offsets=_DROP)}, 8), ("'w'", "data_offsets")),
    ("offsets-one", raw_file({"w": _entry(data_offsets=[0])}, 8), ("'w'", "data_offsets")),
    ("offsets-three", raw_file({"w": _entry(data_offsets=[0, 8, 8])}, 8), ("'w'", "data_offsets")),
    ("offsets-neg", raw_file({"w": _entry(data_offsets=[-8, 0])}, 8), ("'w'", "data_offsets")),
    ("offsets-reversed", raw_file({"w": _entry(data_offsets=[8, 0])}, 8), ("'w'", "data_offsets")),
    ("offsets-past-end", raw_file({"w": _entry(data_offsets=[4, 12])}, 8), ("'w'", "data_offsets", "8-byte")),
    ("offsets-huge", raw_file({"w": _entry(data_offsets=[0, 2**70])}, 8), ("'w'", "data_offsets")),
    ("offsets-float", raw_file({"w": _entry(data_offsets=[0.0, 8])}, 8), ("'w'", "data_offsets")),
    ("offsets-bool", raw_file({"w": _entry(shape=[1], data_offsets=[False, True], dtype="U8")}, 8), ("'w'",)),
    ("offsets-str", raw_file({"w": _entry(data_offsets=["0", "8"])}, 8), ("'w'", "data_offsets")),
    ("offsets-dict", raw_file({"w": _entry(data_offsets={"0": 8})}, 8), ("'w'", "data_offsets")),
    ("mismatch-short", raw_file({"w": _entry(data_offsets=[0, 4])}, 8), ("'w'", "F32", "8 bytes", "span 4")),
    ("mismatch-long", raw_file({"w": _entry(shape=[1])}, 8), ("'w'", "needs 4 bytes")),
    ("mismatch-f4", raw_file({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 4]}}, 8), ("'w'",)),
    (
        "overlap",
        raw_file(
            {
                "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]},
            },
            12,
        ),
        ("'a'", "'b'", "overlap"),
    ),
    (
        "same-range",
        raw_file(
            {
                "b": {"dtype": "Q", "shape": [], "data_offsets": [2, 3]},
                "a": {"dtype": "U8", "shape": [], "data_offsets": [2, 3]},
            },
            4,
        ),
        ("overlap",),
    ),
    ("metadata-list", raw_file({"__metadata__": ["a"]}), ("__metadata__",)),
    ("metadata-int-value", raw_file({"__metadata__": {"a": 1}}), ("__metadata__",)),
    ("metadata-null-value", raw_file({"__metadata__": {"a": None}}), ("__metadata__",)),
    ("metadata-nested", raw_file({"__metadata__": {"a": {"b": "c"}}}), ("__metadata__",)),
]


@pytest.mark.parametrize(("buf", "parts"), [pytest.param(b, p, id=i) for i, b, p in BAD_HEADERS])
def test_hostile_header_rejected(buf: bytes, parts: tuple[str, ...]) -> None:
    with pytest.raises(HeaderError) as ei:
        parse_file(buf)
    check_error(ei, HeaderError, FILE, *parts)


def test_header_overlap_is_independent_of_key_order() -> None:
    for order in (["a", "b"], ["b", "a"]):
        doc = {
            "a": {"dtype": "U8", "shape": [6], "data_offsets": [0, 6]},
            "b": {"dtype": "U8", "shape": [6], "data_offsets": [5, 11]},
        }
        with pytest.raises(HeaderError, match="overlap"):
            parse_file(raw_file({k: doc[k] for k in order}, 11))


def test_zero_size_tensors_do_not_overlap() -> None:
    doc = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
        "f": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]},
    }
    hdr = parse_file(raw_file(doc, 8))
    assert [t.name for t in hdr.tensors] == ["a", "e", "f", "b"]


# --------------------------------------------------------------------------- HF index


def test_hf_index_ok() -> None:
    doc = {"metadata": {"total_size": 10}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}
    assert parse_hf_index(json.dumps(doc).encode(), name="idx.json") == doc["weight_map"]


@pytest.mark.parametrize(
    "data",
    [
        b"{",
        b"\xff\xff",
        b"[]",
        b"null",
        b"{}",
        b'{"weight_map": []}',
        b'{"weight_map": {"a": 1}}',
        b'{"weight_map": {"a": null}}',
        b'{"weight_map": "x"}',
        b'{"weight_map": {"a": "x"}, "n": ' + b"9" * 5000 + b"}",
        b"[" * 100_000,
    ],
)
def test_hf_index_rejected(data: bytes) -> None:
    with pytest.raises(HeaderError) as ei:
        parse_hf_index(data, name="ckpt/model.safetensors.index.json")
    check_error(ei, HeaderError, "ckpt/model.safetensors.index.json")


# --------------------------------------------------------------------------- manifest


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    file_sizes = draw(st.lists(st.integers(0, 300), min_size=0, max_size=4))
    total = sum(file_sizes)
    block_size = draw(st.integers(1, 128))
    nsrc = draw(st.integers(1, 4))
    sources = tuple(SourceRef(f"s{i}", draw(st.text(max_size=10))) for i in range(nsrc))
    files = []
    pos = 0
    for i, size in enumerate(file_sizes):
        kind = draw(st.sampled_from(["safetensors", "index"]))
        files.append(FileEntry(f"dir/f{i}.bin" if i % 2 else f"f{i}.safetensors", pos, size, kind))
        pos += size
    blocks = []
    pos = 0
    while pos < total:
        n = min(draw(st.integers(1, block_size)), total - pos)
        crc = draw(st.none() | st.integers(0, 2**32 - 1))
        key_off = draw(st.sampled_from([0, 0, 8, 12345]))
        blocks.append(
            BlockRef(len(blocks), f"s{len(blocks) % nsrc}", f"ck/{len(blocks):06d}", pos, n, crc, key_off)
        )
        pos += n
    tensors = []
    tnames = draw(st.lists(names, unique=True, max_size=6))
    tpos = 0
    for tn in tnames:
        dtype = draw(st.sampled_from(["U8", "F32", "BF16", "F4", "Q7"]))
        shape = draw(shapes)
        nbytes = expected_nbytes(dtype, shape)
        if nbytes is None:
            nbytes = draw(st.integers(0, 9))
        gap = draw(st.integers(0, 9))
        if tpos + gap + nbytes > total:
            break
        tensors.append(TensorInfo(tn, dtype, shape, tpos + gap, tpos + gap + nbytes))
        tpos += gap + nbytes
    extra = draw(
        st.dictionaries(st.text(max_size=5), st.integers(-5, 5) | st.text(max_size=5) | st.none(), max_size=3)
    )
    return Manifest(
        draw(st.text(max_size=12)),
        block_size,
        total,
        tuple(files),
        tuple(tensors),
        sources,
        tuple(blocks),
        FORMAT_VERSION,
        extra,
    )


@settings(deadline=None)
@given(manifests())
def test_manifest_round_trip(m: Manifest) -> None:
    text = m.to_json()
    back = Manifest.from_json(text, name=MF)
    assert back == m
    assert back.to_json() == text  # canonical
    assert Manifest.from_json(text.decode()) == m  # str accepted as well as bytes
    doc = json.loads(text)
    assert doc["format"] == FORMAT_NAME and doc["version"] == FORMAT_VERSION


def _valid_doc() -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "id": "ckpt-1",
        "block_size": 8,
        "total_size": 20,
        "files": [
            {"path": "model.safetensors", "offset": 0, "size": 12, "kind": "safetensors"},
            {"path": "sub/model.index.json", "offset": 12, "size": 8, "kind": "index"},
        ],
        "tensors": [
            {"name": "a", "dtype": "F32", "shape": [2], "offsets": [0, 8]},
            {"name": "b", "dtype": "U8", "shape": [2, 2], "offsets": [8, 12]},
        ],
        "sources": [{"id": "s0", "location": "../d0"}, {"id": "s1", "location": "d1"}],
        "blocks": [
            {"source": "s0", "key": "ckpt-1/000000", "offset": 0, "length": 8, "crc32c": "0123abcd"},
            {"source": "s1", "key": "ckpt-1/000001", "offset": 8, "length": 8, "crc32c": None},
            {"source": "s0", "key": "ckpt-1/000002", "offset": 16, "length": 4, "crc32c": "ffffffff"},
        ],
    }


def test_valid_doc_parses() -> None:
    m = Manifest.from_json(json.dumps(_valid_doc()), name=MF)
    assert [b.crc32c for b in m.blocks] == [0x0123ABCD, None, 0xFFFFFFFF]
    assert [t.name for t in m.tensors] == ["a", "b"]
    assert m.sources[0] == SourceRef("s0", "../d0")


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *head, last = path.split(".")

    def f(doc: dict[str, Any]) -> None:
        node: Any = doc
        for p in head:
            node = node[int(p)] if p.isdigit() else node[p]
        key: Any = int(last) if last.isdigit() else last
        if value is _DROP:
            del node[key]
        else:
            node[key] = value

    return f


def _then(*fs: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def f(doc: dict[str, Any]) -> None:
        for g in fs:
            g(doc)

    return f


BAD_MANIFESTS: list[tuple[str, Callable[[dict[str, Any]], None], tuple[str, ...]]] = [
    *[
        (f"missing-{k}", _set(k, _DROP), (f"'{k}'",))
        for k in ("version", "id", "block_size", "total_size", "sources", "blocks", "files", "tensors")
    ],
    ("missing-format", _set("format", _DROP), ("format",)),
    ("wrong-format", _set("format", "safetensors"), ("'safetensors'",)),
    ("format-list", _set("format", [FORMAT_NAME]), ("format",)),
    ("version-2", _set("version", 2), ("version 2",)),
    ("version-0", _set("version", 0), ("version 0",)),
    ("version-neg", _set("version", -1), ("'version'",)),
    ("version-str", _set("version", "1"), ("'version'", "str")),
    ("version-bool", _set("version", True), ("'version'", "bool")),
    ("version-float", _set("version", 1.0), ("'version'", "float")),
    ("id-int", _set("id", 1), ("'id'",)),
    ("block_size-bool", _set("block_size", True), ("'block_size'", "bool")),
    ("block_size-str", _set("block_size", "8"), ("'block_size'",)),
    ("block_size-zero", _set("block_size", 0), ("block_size",)),
    ("total_size-bool", _set("total_size", False), ("'total_size'", "bool")),
    ("total_size-float", _set("total_size", 20.0), ("'total_size'",)),
    ("total_size-neg", _set("total_size", -20), ("'total_size'",)),
    ("sources-dict", _set("sources", {"s0": "d0"}), ("'sources'",)),
    ("sources-empty", _set("sources", []), ("source",)),
    ("source-not-object", _set("sources.1", "d1"), ("sources[1]",)),
    ("source-no-id", _set("sources.1.id", _DROP), ("sources[1]", "'id'")),
    ("source-no-location", _set("sources.0.location", _DROP), ("sources[0]", "'location'")),
    ("source-location-int", _set("sources.0.location", 3), ("sources[0]", "'location'")),
    ("source-dup-id", _set("sources.1.id", "s0"), ("unique",)),
    ("blocks-str", _set("blocks", "x"), ("'blocks'",)),
    ("block-not-object", _set("blocks.1", 8), ("blocks[1]",)),
    ("block-unknown-source", _set("blocks.1.source", "s9"), ("blocks[1]", "'s9'")),
    ("block-source-int", _set("blocks.1.source", 1), ("blocks[1]", "'source'")),
    ("block-key-missing", _set("blocks.0.key", _DROP), ("blocks[0]", "'key'")),
    *[
        (f"block-key-{i}", _set("blocks.2.key", k), ("blocks[2]", repr(k)))
        for i, k in enumerate(
            ["../x", "/abs", "a//b", "", ".", "a/./b", "a/../b", "a/..", "a\\b", "a\0b", "ckpt/"]
        )
    ],
    ("block-offset-bool", _set("blocks.0.offset", False), ("blocks[0]", "'offset'", "bool")),
    ("block-length-bool", _set("blocks.2.length", True), ("blocks[2]", "'length'")),
    ("block-offset-str", _set("blocks.0.offset", "0"), ("blocks[0]", "'offset'")),
    ("block-gap", _set("blocks.1.offset", 9), ("blocks[1]", "gap", "expected 8")),
    ("block-overlap", _set("blocks.1.offset", 7), ("blocks[1]", "expected 8")),
    ("block-first-not-zero", _set("blocks.0.offset", 1), ("blocks[0]", "expected 0")),
    (
        "block-length-zero",
        _then(_set("blocks.2.length", 0), _set("total_size", 16)),
        ("blocks[2]", "length 0"),
    ),
    (
        "block-length-over",
        _then(_set("blocks.2.length", 9), _set("total_size", 25)),
        ("blocks[2]", "length 9"),
    ),
    ("block-key_offset-neg", _set("blocks.0.key_offset", -1), ("blocks[0]", "'key_offset'")),
    ("block-key_offset-bool", _set("blocks.0.key_offset", True), ("blocks[0]", "'key_offset'")),
    ("blocks-short-of-total", _set("total_size", 21), ("blocks cover 20", "21")),
    ("blocks-over-total", _set("total_size", 19), ("blocks cover 20", "19")),
    *[
        (f"crc-{i}", _set("blocks.0.crc32c", c), ("blocks[0]", "crc32c"))
        for i, c in enumerate(
            [
                "xyz",
                "1234567",
                "123456789",
                " 1234567",
                "1234567 ",
                "-1234567",
                "+1234567",
                "1_234567",
                "0x123456",
                "ABCDEFGH",
                "",
                12345678,
                0,
                True,
                ["0123abcd"],
                "\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17",
            ]
        )
    ],
    ("files-dict", _set("files", {}), ("'files'",)),
    ("file-not-object", _set("files.0", "model.safetensors"), ("files[0]",)),
    ("file-path-abs", _set("files.0.path", "/etc/passwd"), ("files[0]", "/etc/passwd")),
    ("file-path-dotdot", _set("files.1.path", "../x"), ("files[1]", "'../x'")),
    ("file-path-double-slash", _set("files.1.path", "a//b"), ("files[1]", "'a//b'")),
    ("file-size-bool", _set("files.0.size", True), ("files[0]", "'size'")),
    ("file-kind", _set("files.0.kind", "bin"), ("files[0]", "kind")),
    ("file-offset", _set("files.1.offset", 11), ("files[1]", "offset")),
    ("files-short", _set("files.1.size", 7), ("files cover 19",)),
    ("files-none", _set("files", []), ("files cover 0",)),
    ("tensors-dict", _set("tensors", {}), ("'tensors'",)),
    ("tensor-not-object", _set("tensors.0", "a"), ("tensors[0]",)),
    ("tensor-name-int", _set("tensors.0.name", 0), ("tensors[0]", "'name'")),
    ("tensor-dup", _set("tensors.1.name", "a"), ("tensors[1]", "duplicate", "'a'")),
    ("tensor-dtype-null", _set("tensors.0.dtype", None), ("tensors[0]", "'dtype'")),
    ("tensor-shape-bool", _set("tensors.1.shape", [True, 4]), ("tensors[1]", "shape")),
    ("tensor-shape-missing", _set("tensors.1.shape", _DROP), ("tensors[1]", "shape")),
    ("tensor-offsets-missing", _set("tensors.1.offsets", _DROP), ("tensors[1]", "'offsets'")),
    ("tensor-offsets-bool", _set("tensors.1.offsets", [8, True]), ("tensors[1]", "offsets")),
    ("tensor-offsets-beyond", _set("tensors.1.offsets", [16, 20 + 4]), ("tensors[1]", "total_size 20")),
    ("tensor-offsets-neg", _set("tensors.1.offsets", [-4, 0]), ("tensors[1]", "offsets")),
    ("tensor-offsets-huge", _set("tensors.1.offsets", [8, 2**64]), ("tensors[1]", "offsets")),
    ("tensor-mismatch", _set("tensors.0.shape", [3]), ("tensors[0]", "needs 12 bytes")),
    ("tensor-overlap", _set("tensors.1.offsets", [4, 8]), ("'a'", "'b'", "overlap")),
    ("extra-list", _set("extra", [1]), ("'extra'",)),
    ("extra-nan", _set("extra", {"x": float("nan")}), ("NaN",)),
    ("extra-inf", _set("extra", {"x": float("inf")}), ("Infinity",)),
]


@pytest.mark.parametrize(("mutate", "parts"), [pytest.param(f, p, id=i) for i, f, p in BAD_MANIFESTS])
def test_hostile_manifest_rejected(mutate: Callable[[dict[str, Any]], None], parts: tuple[str, ...]) -> None:
    doc = _valid_doc()
    mutate(doc)
    with pytest.raises(ManifestError) as ei:
        Manifest.from_json(json.dumps(doc).encode(), name=MF)
    check_error(ei, ManifestError, MF, *parts)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"\xff\xfe\xfd",
        b"[]",
        b"1",
        b'"m"',
        b"null",
        b"[" * 100_000,
        b'{"format": "asyncload.manifest", "version": ' + b"1" * 5000 + b"}",
    ],
)
def test_manifest_not_json_or_not_object(data: bytes) -> None:
    with pytest.raises(ManifestError) as ei:
        Manifest.from_json(data, name=MF)
    check_error(ei, ManifestError, MF)


def test_manifest_size_limit_checked_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    text = json.dumps(_valid_doc())
    monkeypatch.setattr(_format, "MAX_MANIFEST_SIZE", len(text) - 1)
    with pytest.raises(ManifestError) as ei:
        Manifest.from_json(text, name=MF)
    check_error(ei, ManifestError, MF, "larger")


@pytest.mark.parametrize("crc", ["ABCDEF01", "abcdef01", "00000000"])
def test_crc_hex_case_accepted(crc: str) -> None:
    doc = _valid_doc()
    doc["blocks"][0]["crc32c"] = crc
    assert Manifest.from_json(json.dumps(doc)).blocks[0].crc32c == int(crc, 16)


def test_manifest_tensors_sorted_and_unknown_dtype_ok() -> None:
    doc = _valid_doc()
    doc["tensors"].reverse()
    doc["tensors"][0]["dtype"] = "Q7"
    m = Manifest.from_json(json.dumps(doc))
    assert [(t.name, t.dtype) for t in m.tensors] == [("a", "F32"), ("b", "Q7")]


# --------------------------------------------------------------------------- fuzz: FormatError or success

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=6),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: Any, data: st.DataObject) -> Any:
    doc = copy.deepcopy(doc)
    path = data.draw(st.sampled_from(_paths(doc)))
    if not path:
        return data.draw(json_values)
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    action = data.draw(st.sampled_from(["replace", "delete", "int", "tweak"]))
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "int":
        parent[last] = data.draw(st.integers(-3, 2**65) | st.booleans())
    elif action == "tweak" and type(parent[last]) is int:
        parent[last] += data.draw(st.sampled_from([-1, 1, -8, 8]))
    elif action == "tweak" and isinstance(parent[last], str):
        parent[last] = data.draw(st.sampled_from(["", "..", "/x", "a//b", "s9", "Q7", "zzzzzzzz"]))
    else:
        parent[last] = data.draw(json_values)
    return doc


def _bytes_mutate(buf: bytes, data: st.DataObject) -> bytes:
    b = bytearray(buf)
    for _ in range(data.draw(st.integers(1, 4))):
        if not b:
            break
        i = data.draw(st.integers(0, len(b) - 1))
        op = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if op == "flip":
            b[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete":
            del b[i]
        elif op == "insert":
            b.insert(i, data.draw(st.integers(0, 255)))
        else:
            del b[i:]
    return bytes(b)


def _header_outcome(buf: bytes, file_size: int) -> None:
    try:
        hdr = parse_header(buf, file_size=file_size, name=FILE)
    except FormatError as e:
        assert type(e) is HeaderError and FILE in str(e)
        return
    for t in hdr.tensors:  # what parses is consistent
        assert hdr.header_size <= t.begin <= t.end <= hdr.header_size + hdr.data_size
    for a, b in zip(hdr.tensors, hdr.tensors[1:], strict=False):
        assert a.end <= b.begin


def _manifest_outcome(data: bytes | str) -> None:
    try:
        m = Manifest.from_json(data, name=MF)
    except FormatError as e:
        assert type(e) is ManifestError and MF in str(e)
        return
    assert Manifest.from_json(m.to_json()) == m  # what parses can be written and read back
    assert sum(b.length for b in m.blocks) == m.total_size


FUZZ = settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 400))
def test_fuzz_header_random_bytes(buf: bytes, extra: int) -> None:
    _header_outcome(buf, len(buf) + extra)


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 64))
def test_fuzz_header_random_json_text(text: bytes, data_size: int) -> None:
    buf = struct.pack("<Q", len(text)) + text + bytes(data_size)
    _header_outcome(buf, len(buf))


@FUZZ
@given(st.data())
def test_fuzz_header_mutated_document(data: st.DataObject) -> None:
    entries = data.draw(header_entries())
    doc = json.loads(build_header(entries, {"a": "b"})[8:])
    doc = _mutate(doc, data)
    total = sum(e[3] for e in entries) + data.draw(st.integers(-2, 2))
    text = json.dumps(doc).encode()
    buf = struct.pack("<Q", len(text)) + text + bytes(max(total, 0))
    _header_outcome(buf, len(buf))


@FUZZ
@given(st.data())
def test_fuzz_header_mutated_bytes(data: st.DataObject) -> None:
    entries = data.draw(header_entries())
    buf = build_header(entries) + bytes(sum(e[3] for e in entries))
    buf = _bytes_mutate(buf, data)
    _header_outcome(buf, len(buf))


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_manifest_random_bytes(buf: bytes) -> None:
    _manifest_outcome(buf)


@FUZZ
@given(manifests(), st.data())
def test_fuzz_manifest_mutated_document(m: Manifest, data: st.DataObject) -> None:
    doc = _mutate(json.loads(m.to_json()), data)
    _manifest_outcome(json.dumps(doc))


@FUZZ
@given(manifests(), st.data())
def test_fuzz_manifest_mutated_bytes(m: Manifest, data: st.DataObject) -> None:
    _manifest_outcome(_bytes_mutate(m.to_json(), data))


@FUZZ
@given(st.data())
def test_fuzz_hf_index(data: st.DataObject) -> None:
    doc = _mutate({"metadata": {"total_size": 3}, "weight_map": {"a": "x.safetensors"}}, data)
    try:
        wm = parse_hf_index(json.dumps(doc).encode(), name="idx.json")
    except FormatError as e:
        assert type(e) is HeaderError and "idx.json" in str(e)
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items())
