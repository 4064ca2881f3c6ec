"""Inputs the parser fuzz job (bench/fuzz_parsers.py) found or that its review turned up.

Each once escaped as a non-asyncload exception; each must now be a documented error.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import asyncload
from asyncload._format import parse_header


def _header(doc: dict[str, object]) -> bytes:
    text = json.dumps(doc).encode()
    return struct.pack("<Q", len(text)) + text


def test_zero_size_tensor_with_an_astronomic_shape_is_refused() -> None:
    data = _header({"t": {"dtype": "F32", "shape": [0, 2**70], "data_offsets": [0, 0]}})
    with pytest.raises(asyncload.HeaderError, match="shape"):
        parse_header(data, file_size=len(data), name="f.safetensors")


async def _save(tmp_path: Path) -> Path:
    tensors = {"w": np.arange(100, dtype=np.float32)}
    return Path(await asyncload.save(tensors, tmp_path / "m.json", sources=[tmp_path / "d"], block_size=4096))


def _edit(path: Path, change: object) -> Path:
    doc = json.loads(path.read_text())
    change(doc)  # type: ignore[operator]
    out = path.with_name("edited.json")
    doc.pop("digest", None)  # a hostile manifest carries no digest
    out.write_text(json.dumps(doc))
    return out


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda d: d.update(extra={"x": float("-inf")}), asyncload.ManifestError),  # -2e400 parses as -inf
        (lambda d: d.update(id="\ud800"), asyncload.ManifestError),
        (lambda d: d["sources"][0].update(location="s0\u0000"), asyncload.BlockNotFoundError),
        (lambda d: d["sources"][0].update(location="~nosuchuser-fuzz/s0"), asyncload.BlockNotFoundError),
        (lambda d: d["tensors"][0].update(shape=[0, 2**70]), asyncload.ManifestError),
    ],
    ids=["infinite-float", "surrogate-id", "nul-in-location", "unknown-home", "huge-shape"],
)
async def test_hostile_manifests_raise_documented_errors(tmp_path: Path, change: object, error: type) -> None:
    path = _edit(await _save(tmp_path), change)
    if "inf" in path.read_text().lower():
        path.write_text(path.read_text().replace("-Infinity", "-2e400"))
    with pytest.raises(error):
        await asyncload.load(path)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "shard", ["\u0000", "\ud800", "x" * 300 + ".safetensors"], ids=["nul", "surrogate", "long"]
)
async def test_hostile_shard_names_in_an_index_raise_documented_errors(tmp_path: Path, shard: str) -> None:
    index = {"metadata": {}, "weight_map": {"w": shard}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(asyncload.AsyncloadError):
        await asyncload.load(tmp_path)
