"""Encrypted checkpoints end to end (issue 6): round trips, the tamper matrix, nonce uniqueness,
signed manifests, rekey, keys that never leak, and verify with and without the key.

The AES-GCM codec itself (in-place sealing, AAD fields, key parsing) is tested in test_aead.py;
here every check goes through save/pack/open/stream/load/unpack/verify/rekey and the CLI, with
the faults made for real: bytes flipped in block files on disk, block files swapped or taken
from another checkpoint, manifests edited.

Two attackers appear below. One *without the key* can change block files and manifest text, but
cannot produce a manifest MAC, so any manifest edit is refused before a block is read and any
block edit is caught by the crc32c (of the stored bytes) the MAC'ed manifest records. The other
is a *key holder* re-sealing a manifest with a valid MAC over fixed-up crcs ("reseal" below); that
is not a threat (they can decrypt anyway) but it peels off the crc layer and shows that the GCM
tag with its nonce and associated data catches the same edit on its own.

Stores are tiny (4 KiB blocks, about 35 KiB of tensors) so the whole file runs in seconds.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio
import crc32c
import numpy as np
import pytest
from _stores import block_path, data_blocks, read_manifest, source_dir, tensors_touching
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import asyncload
from asyncload import (
    AuthenticationError,
    ChecksumError,
    DecryptionError,
    KeyFormatError,
    KeyRequiredError,
    Manifest,
    ManifestError,
)
from asyncload._format import BlockRef
from asyncload._security import BlockCipher, seal_manifest
from asyncload.codecs._aead import TAG_BYTES, block_aad, block_nonce, load_key, table_digest, unwrap_data_key
from asyncload.testing import FaultySource

KiB = 1 << 10
BS = 4 * KiB
BUDGET = 64 * KiB
K = 3
# Distinctive keys: any appearance of their bytes in any text below is a leak.
KEY = hashlib.sha256(b"asyncload test user key").digest()
KEY2 = hashlib.sha256(b"asyncload test second key").digest()
WRONG = hashlib.sha256(b"asyncload test wrong key").digest()
HF_INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- helpers


def random_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Random content (so every 48-byte window of the stream is unique), assorted dtypes.

    ``x`` and ``y`` have the same byte size (their offsets can be swapped in a manifest);
    ``w`` is 2-D with unequal dims (its shape can be transposed).
    """
    rng = np.random.default_rng(seed)
    return {
        "emb": rng.integers(0, 256, 5000, dtype=np.uint8),
        "w": rng.standard_normal((32, 64)).astype(np.float32),
        "x": rng.standard_normal(256).astype(np.float32),
        "y": rng.integers(-(2**31), 2**31 - 1, 256, dtype=np.int32),
        "b": rng.integers(-(2**62), 2**62, 1500, dtype=np.int64),
        "h": rng.standard_normal(3000).astype(np.float16),
        "s": rng.integers(-128, 127, 7, dtype=np.int8),
    }


def read_bytes(p: str | os.PathLike[str]) -> bytes:
    return Path(p).read_bytes()


def write_bytes(p: Path, data: bytes) -> None:
    p.write_bytes(data)


def read_json(p: Path) -> Any:
    return json.loads(p.read_bytes())


def write_json(p: Path, doc: Any) -> None:
    if isinstance(doc, dict):  # an edit by hand or by an attacker: no digest to match
        doc.pop("digest", None)
    p.write_text(json.dumps(doc, indent=1))


def dirs(root: Path, k: int = K, prefix: str = "d") -> list[Path]:
    return [root / f"{prefix}{i}" for i in range(k)]


async def save_enc(
    root: Path, tensors: Mapping[str, np.ndarray], *, name: str = "m", key: Any = KEY, **kw: Any
) -> Path:
    path = await asyncload.save(
        tensors, root / f"{name}.asyncload.json", sources=dirs(root, prefix=f"{name}-d"),
        block_size=BS, budget=BUDGET, key=key, **kw,
    )  # fmt: skip
    return Path(path)


def assert_equal_tensors(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> None:
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for n, a in want.items():
        assert got[n].dtype == a.dtype and got[n].shape == a.shape, n
        assert np.array_equal(got[n], a), n


def stored(path: Path) -> dict[int, bytes]:
    """Block index -> the bytes stored for it on disk."""
    man = read_manifest(path)
    return {b.index: block_path(path, b).read_bytes() for b in man.blocks}


def dek_of(man: Manifest, key: bytes = KEY) -> bytes:
    assert man.encryption is not None
    return unwrap_data_key(load_key(key), man.encryption["key"], man.id)


def cipher_of(man: Manifest, key: bytes = KEY) -> BlockCipher:
    return BlockCipher(dek_of(man, key), man.id, len(man.blocks), man.table_bytes())


def reseal(path: Path, man: Manifest, key: bytes = KEY) -> None:
    """As a key holder: write ``man`` at ``path`` with a valid MAC (what no attacker can do)."""
    path.write_bytes(seal_manifest(man, cipher_of(man, key)).to_json())


def with_crc(man: Manifest, index: int, data: bytes) -> Manifest:
    blocks = list(man.blocks)
    blocks[index] = dataclasses.replace(blocks[index], crc32c=int(crc32c.crc32c(data)))
    return dataclasses.replace(man, blocks=tuple(blocks))


def flip(p: Path, pos: int) -> bytes:
    data = bytearray(p.read_bytes())
    data[pos] ^= 0x01
    p.write_bytes(bytes(data))
    return bytes(data)


def middle_data_block(man: Manifest) -> BlockRef:
    full = [b for b in data_blocks(man) if b.length == man.block_size]
    return full[len(full) // 2]


class CountReads:
    """``wrap_source`` hook: every source wrapped in a fault-free FaultySource, to count its reads."""

    def __init__(self) -> None:
        self.wrapped: list[FaultySource] = []

    def __call__(self, s: Any) -> FaultySource:
        f = FaultySource(s)
        self.wrapped.append(f)
        return f

    @property
    def reads(self) -> int:
        return sum(f.reads_started for f in self.wrapped)


async def stream_expecting(
    path: Path, originals: Mapping[str, np.ndarray], exc: type[BaseException], **kw: Any
) -> tuple[BaseException, set[str]]:
    """Stream all with ``key=KEY``; the error must be exactly ``exc``. Every array yielded before it
    must equal its original; the model must end with no slot held and no read in flight."""
    yielded: set[str] = set()
    async with asyncload.open(path, budget=BUDGET, key=kw.pop("key", KEY), **kw) as model:
        with anyio.fail_after(30), pytest.raises(exc) as info:
            async for name, arr in model.stream():
                assert np.array_equal(arr, originals[name]), name
                yielded.add(name)
        st = model.statistics()
        assert (st.slots_in_use, st.bytes_in_flight, st.reads_in_flight) == (0, 0, 0)
    assert type(info.value) is exc, repr(info.value)
    return info.value, yielded


async def refused_at_open(path: Path, exc: type[BaseException], **kw: Any) -> BaseException:
    """``open`` must raise exactly ``exc`` before any source is read."""
    counter = CountReads()
    kw.setdefault("key", KEY)
    with pytest.raises(exc) as info:
        async with asyncload.open(path, budget=BUDGET, wrap_source=counter, **kw):
            pytest.fail("opened")  # pragma: no cover
    assert type(info.value) is exc, repr(info.value)
    assert counter.reads == 0
    return info.value


# The plaintext-run check. Claim: if no 48-byte window of the plaintext starting at a multiple of 16
# occurs in a block file, then no 64-byte run of the plaintext occurs there. Proof: a run
# plaintext[p:p+64] contains plaintext[q:q+48] for q = the first multiple of 16 >= p (q <= p+15, so
# q+48 <= p+63). So we put every 48-byte window (stride 1) of every block file in a set and look
# up the stride-16 windows of the plaintext: linear time, and it cannot miss a 64-byte run.
WINDOW, STRIDE = 48, 16


def plaintext_runs(plaintext: bytes, files: Iterable[bytes]) -> int:
    windows: set[bytes] = set()
    for data in files:
        windows.update(data[j : j + WINDOW] for j in range(len(data) - WINDOW + 1))
    return sum(plaintext[q : q + WINDOW] in windows for q in range(0, len(plaintext) - WINDOW + 1, STRIDE))


def write_hf_dir(directory: Path, shards: list[dict[str, np.ndarray]]) -> None:
    directory.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / fname, metadata={"format": "np"})
        weight_map.update(dict.fromkeys(tensors, fname))
    (directory / HF_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def cli(*args: Any, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "ASYNCLOAD_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "asyncload", "-q", *map(os.fspath, args)],
        cwd=cwd, capture_output=True, text=True, timeout=90, env={**base, **(env or {})}, check=False,
    )  # fmt: skip


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def fails(p: subprocess.CompletedProcess[str], exc: type[BaseException], rc: int = 2) -> str:
    assert p.returncode == rc, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert f"{exc.__name__}:" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    return p.stderr


# --------------------------------------------------------------------------- 1. round trips


@pytest.mark.anyio
async def test_save_round_trip_is_exact_and_no_block_holds_plaintext(tmp_path: Path) -> None:
    want = random_tensors()
    path = await save_enc(tmp_path, want)
    man = read_manifest(path)
    assert man.encryption is not None and man.mac is not None
    blocks = stored(path)
    # every stored block is its stream bytes plus a 16-byte tag, and holds none of its plaintext
    assert {i: len(d) for i, d in blocks.items()} == {b.index: b.length + TAG_BYTES for b in man.blocks}
    async with asyncload.open(path, budget=BUDGET, key=KEY) as model:
        owned = {n: a async for n, a in model.stream(copy=True)}
        assert_equal_tensors(owned, want)
        leases = 0
        async with model.stream(copy=False) as s:
            async for n, view in s:
                t = model.tensors[n]  # a tensor inside one block is a read-only view of its slot
                leased = any(b.offset <= t.begin and t.end <= b.end for b in man.blocks)
                assert view.flags.writeable is not leased, n
                leases += leased
                assert np.array_equal(view, want[n]), n
        assert leases > 0
        assert_equal_tensors(await model.load(), want)
        assert_equal_tensors(await model.load(["s", "emb"]), {"s": want["s"], "emb": want["emb"]})
        assert model.statistics().slots_in_use == 0
    assert_equal_tensors(await asyncload.load(path, key=KEY, budget=BUDGET), want)
    out = tmp_path / "out.safetensors"
    await asyncload.unpack(path, out, key=KEY, budget=BUDGET)
    assert_equal_tensors(load_file(out), want)
    plaintext = out.read_bytes()  # the stream save() cut into blocks, header included
    assert len(plaintext) == man.total_size
    assert plaintext_runs(plaintext, blocks.values()) == 0
    # Re-pointing a moved source at open time is not a manifest change: the MAC still holds.
    moved = tmp_path / "moved"
    shutil.move(source_dir(path, "s1"), moved)
    assert_equal_tensors(await asyncload.load(path, key=KEY, budget=BUDGET, sources={"s1": str(moved)}), want)


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["safetensors", "hf"])
async def test_pack_unpack_is_byte_identical_and_no_block_holds_plaintext(tmp_path: Path, kind: str) -> None:
    want = random_tensors(1)
    if kind == "safetensors":
        src = tmp_path / "model.safetensors"
        save_file(want, src, metadata={"format": "np"})
        files = [src]
    else:
        src = tmp_path / "hf"
        names = sorted(want)
        write_hf_dir(src, [{n: want[n] for n in names[:3]}, {n: want[n] for n in names[3:]}])
        files = sorted(src.iterdir())
    manifest = Path(await asyncload.pack(src, dirs(tmp_path), tmp_path / "m.json", block_size=BS, key=KEY))
    man = read_manifest(manifest)
    assert man.encryption is not None and len(man.blocks) > K
    by_name = {f.name: f for f in files}
    plaintext = b"".join(by_name[Path(f.path).name].read_bytes() for f in man.files)  # the stream
    assert len(plaintext) == man.total_size
    assert plaintext_runs(plaintext, stored(manifest).values()) == 0
    out = tmp_path / "out"
    written = await asyncload.unpack(manifest, f"{out}{os.sep}" if kind == "safetensors" else out, key=KEY)
    assert sorted(Path(p).name for p in written) == sorted(by_name)
    for p in written:
        assert read_bytes(p) == read_bytes(by_name[Path(p).name]), p  # cmp
    async with asyncload.open(manifest, budget=BUDGET, key=KEY) as model:
        assert_equal_tensors({n: a async for n, a in model.stream(copy=True)}, want)
        async for n, view in model.stream(copy=False):
            assert np.array_equal(view, want[n]), n
        assert_equal_tensors(await model.load(), want)
    # Control: the detector does find the plaintext in the blocks of the same pack without a key.
    plain = Path(await asyncload.pack(src, dirs(tmp_path, prefix="p"), tmp_path / "p.json", block_size=BS))
    assert plaintext_runs(plaintext, stored(plain).values()) > len(plaintext) // STRIDE // 2


# --------------------------------------------------------------------------- 2. tamper matrix


@pytest.fixture
async def enc(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    want = random_tensors(2)
    return await save_enc(tmp_path, want), want


# Byte position classes of a stored block: [ciphertext body (n bytes) | tag (16 bytes)]. The 12-byte
# nonce is not stored: it is derived from the block index (b"blk1" || index), so "altering the
# nonce" means presenting a block at another index; that is the swap test below.
POSITIONS = {
    "ciphertext-first": lambda n: 0,
    "ciphertext-middle": lambda n: n // 2,
    "ciphertext-last": lambda n: n - 1,
    "tag-first": lambda n: n,
    "tag-last": lambda n: n + TAG_BYTES - 1,
}


@pytest.mark.anyio
@pytest.mark.parametrize("where", list(POSITIONS))
async def test_flipped_byte_in_each_position_class_is_refused(
    tmp_path: Path, enc: tuple[Path, dict[str, np.ndarray]], where: str
) -> None:
    path, want = enc
    man = read_manifest(path)
    block = middle_data_block(man)
    affected = tensors_touching(man, [block])
    assert affected and affected != set(want)
    data = flip(block_path(path, block), POSITIONS[where](block.length))
    # Attacker without the key: the MAC'ed crc32c of the stored bytes catches it first.
    err, yielded = await stream_expecting(path, want, ChecksumError)
    assert f"block {block.index} (" in str(err)
    assert not yielded & affected
    # A key holder fixes the crc and re-MACs: the GCM tag alone still refuses the block.
    reseal(path, with_crc(man, block.index, data))
    err, yielded = await stream_expecting(path, want, DecryptionError)
    assert f"block {block.index} (" in str(err) and "authentication failed" in str(err)
    assert not yielded & affected
    with pytest.raises(DecryptionError):
        await asyncload.load(path, key=KEY, budget=BUDGET)
    out = tmp_path / "out"
    with pytest.raises(DecryptionError):
        await asyncload.unpack(path, f"{out}{os.sep}", key=KEY, budget=BUDGET)
    assert list(out.iterdir()) == []  # no bytes of the file, not even a temporary


def _edit(doc: dict[str, Any], path: str, value: Any) -> None:
    """Set ``doc[a][b]...`` for ``path`` "a.b.c" (list indices as integers); delete if value is ...."""
    *parents, last = [int(p) if p.lstrip("-").isdigit() else p for p in path.split(".")]
    node: Any = doc
    for p in parents:
        node = node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value


def manifest_edits(doc: dict[str, Any], other: dict[str, Any]) -> list[tuple[str, Callable[[], None], type]]:
    """(what, edit doc in place, error) for every field of an encrypted manifest."""
    t = {x["name"]: i for i, x in enumerate(doc["tensors"])}
    b0, b1 = doc["blocks"][-3], doc["blocks"][-2]
    assert b0["length"] == b1["length"] == doc["block_size"]

    def do(*edits: tuple[str, Any]) -> Callable[[], None]:
        def apply() -> None:
            for p, v in edits:
                _edit(doc, p, v)

        return apply

    def swap_offsets() -> None:
        tx, ty = doc["tensors"][t["x"]], doc["tensors"][t["y"]]
        tx["offsets"], ty["offsets"] = ty["offsets"], tx["offsets"]

    def swap_keys() -> None:
        b0["key"], b1["key"] = b1["key"], b0["key"]
        b0["source"], b1["source"] = b1["source"], b0["source"]

    def flip_b64(field: str) -> Callable[[], None]:
        def f() -> None:
            raw = bytearray(base64.b64decode(doc["encryption"]["key"][field]))
            raw[0] ^= 1
            doc["encryption"]["key"][field] = base64.b64encode(bytes(raw)).decode()

        return f

    mac, b1s = doc["mac"], doc["blocks"][1]["source"]
    A, D, M = AuthenticationError, DecryptionError, ManifestError
    return [
        ("tensor name", do((f"tensors.{t['w']}.name", "w2")), A),
        ("tensor shape", do((f"tensors.{t['w']}.shape", [64, 32])), A),
        ("tensor dtype", do((f"tensors.{t['x']}.dtype", "I32")), A),
        ("tensor offsets", swap_offsets, A),
        ("tensor offsets out of range", do((f"tensors.{t['s']}.offsets", [0, 10**9])), M),
        ("block crc32c", do(("blocks.2.crc32c", f"{int(doc['blocks'][2]['crc32c'], 16) ^ 1:08x}")), A),
        ("block key", do(("blocks.1.key", doc["blocks"][1]["key"] + "x")), A),
        ("block source", do(("blocks.1.source", next(s["id"] for s in doc["sources"] if s["id"] != b1s))), A),
        ("block key+source swapped", swap_keys, A),
        ("block key_offset", do(("blocks.1.key_offset", 16)), A),
        ("block length", do(("blocks.1.length", doc["blocks"][1]["length"] - 1)), M),
        ("block offset", do(("blocks.1.offset", doc["blocks"][1]["offset"] + 1)), M),
        ("block_size", do(("block_size", doc["block_size"] * 2)), A),
        ("total_size", do(("total_size", doc["total_size"] + 1)), M),
        ("file path", do(("files.0.path", "other.safetensors")), A),
        ("file size and total_size", do(("files.0.size", 1), ("total_size", 1)), M),
        ("source location", do(("sources.0.location", doc["sources"][1]["location"])), A),
        ("extra", do(("extra", {"note": "x"})), A),
        ("format", do(("format", "asyncload.other")), M),
        ("version", do(("version", 2)), M),
        ("id", do(("id", uuid.uuid4().hex)), D),
        ("envelope nonce", flip_b64("nonce"), D),
        ("envelope wrapped key", flip_b64("wrapped"), D),
        ("envelope scheme", do(("encryption.key.scheme", "asyncload-dek-v0")), D),
        ("envelope from another checkpoint (same key)", do(("encryption", other["encryption"])), D),
        ("encryption scheme", do(("encryption.scheme", "none")), M),
        ("mac", do(("mac", f"{int(mac[0], 16) ^ 1:x}" + mac[1:])), A),
        ("mac from another checkpoint (same key)", do(("mac", other["mac"])), A),
        ("mac removed", do(("mac", ...)), A),
        ("mac uppercase", do(("mac", mac.upper() if not mac.isdigit() else "X" * 64)), M),
        # A downgrade: stripped of envelope and MAC, the manifest would read as unencrypted;
        # with a key given, that is refused (else ciphertext - or anything - would load).
        ("encryption and mac removed", do(("encryption", ...), ("mac", ...)), A),
    ]


@pytest.mark.anyio
async def test_any_manifest_change_is_refused_before_a_block_is_read(
    tmp_path: Path, enc: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, want = enc
    other = json.loads((await save_enc(tmp_path, want, name="other")).read_bytes())
    n = len(manifest_edits(json.loads(path.read_bytes()), other))
    for i in range(n):
        doc = json.loads(path.read_bytes())
        what, edit, exc = manifest_edits(doc, other)[i]
        edit()
        tampered = tmp_path / "tampered.asyncload.json"
        doc.pop("digest", None)  # an attacker drops the accident guard; the MAC remains
        tampered.write_text(json.dumps(doc, indent=1))
        try:
            await refused_at_open(tampered, exc)
            with pytest.raises(exc):
                await asyncload.verify(tampered, key=KEY, budget=BUDGET)
        except BaseException as e:
            raise AssertionError(f"manifest edit {what!r}: {e!r}") from e
    # The untouched manifest still loads (so the refusals above are the edits' doing).
    assert_equal_tensors(await asyncload.load(path, key=KEY, budget=BUDGET), want)


@pytest.mark.anyio
async def test_two_block_files_swapped_on_disk(
    tmp_path: Path, enc: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, want = enc
    man = read_manifest(path)
    a, b = [x for x in data_blocks(man) if x.length == man.block_size][:2]
    pa, pb = block_path(path, a), block_path(path, b)
    tmp = pa.with_name("swap.tmp")
    pa.rename(tmp)
    pb.rename(pa)
    tmp.rename(pb)
    da, db = pa.read_bytes(), pb.read_bytes()
    affected = tensors_touching(man, [a, b])
    # (i) manifest untouched: the crcs differ, so the first of them to land fails its crc32c.
    _, yielded = await stream_expecting(path, want, ChecksumError)
    assert not yielded & affected
    # (ii) an attacker also swaps the two crcs in the manifest: that breaks the MAC, refused at open.
    # Without the key there is no third way: a swap either leaves a crc wrong or edits the MAC'ed text.
    original = path.read_bytes()
    doc = json.loads(original)
    ja, jb = doc["blocks"][a.index], doc["blocks"][b.index]
    ja["crc32c"], jb["crc32c"] = jb["crc32c"], ja["crc32c"]
    doc.pop("digest", None)
    path.write_text(json.dumps(doc))
    await refused_at_open(path, AuthenticationError)
    # (iii) even with a valid MAC over the swapped crcs (a key holder), each block now sits at
    # another index: another nonce and associated data, so its tag fails.
    reseal(path, with_crc(with_crc(man, a.index, da), b.index, db))
    err, yielded = await stream_expecting(path, want, DecryptionError)
    assert {f"block {a.index} (" in str(err), f"block {b.index} (" in str(err)} == {True, False}
    assert not yielded & affected
    # and moving the files back restores the original
    path.write_bytes(original)
    pa.rename(tmp)
    pb.rename(pa)
    tmp.rename(pb)
    assert_equal_tensors(await asyncload.load(path, key=KEY, budget=BUDGET), want)


@pytest.mark.anyio
async def test_block_from_another_checkpoint_under_the_same_key(
    tmp_path: Path, enc: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, want = enc
    # Same names, dtypes and shapes, other values: the same layout, block for block.
    other_want = random_tensors(3)
    other = await save_enc(tmp_path, other_want, name="other")
    man, oman = read_manifest(path), read_manifest(other)
    assert [(b.offset, b.length) for b in man.blocks] == [(b.offset, b.length) for b in oman.blocks]
    assert man.table_bytes() == oman.table_bytes()
    block = middle_data_block(man)
    foreign = block_path(other, oman.blocks[block.index]).read_bytes()
    block_path(path, block).write_bytes(foreign)
    affected = tensors_touching(man, [block])
    # Manifest unchanged: crc32c. Fixing the crc would break the MAC (see the manifest edits).
    _, yielded = await stream_expecting(path, want, ChecksumError)
    assert not yielded & affected
    # With a valid MAC over the foreign crc (a key holder), the tag refuses it.
    reseal(path, with_crc(man, block.index, foreign))
    _, yielded = await stream_expecting(path, want, DecryptionError)
    assert not yielded & affected
    # The binding, one layer down: the foreign block opens only as itself.
    dek, odek = dek_of(man), dek_of(oman)
    assert dek != odek
    count, table = len(man.blocks), man.table_bytes()
    attempts = {
        "this checkpoint": BlockCipher(dek, man.id, count, table),
        "its data key, this id": BlockCipher(odek, man.id, count, table),  # AAD binds the id
        "this data key, its id": BlockCipher(dek, oman.id, count, table),  # data key differs
    }
    for what, c in attempts.items():
        buf = bytearray(foreign)
        with pytest.raises(DecryptionError):
            c.open(block.index, buf, len(buf))
        assert buf == bytes(len(buf)), f"{what}: unauthenticated plaintext left in the buffer"
    buf = bytearray(foreign)
    n = BlockCipher(odek, oman.id, count, table).open(block.index, buf, len(buf))  # control
    await asyncload.unpack(other, tmp_path / "o.safetensors", key=KEY)
    other_stream = read_bytes(tmp_path / "o.safetensors")
    assert bytes(buf[:n]) == other_stream[block.offset : block.end]


@pytest.mark.anyio
async def test_truncated_block_list_is_refused(
    tmp_path: Path, enc: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, want = enc
    man = read_manifest(path)
    doc = json.loads(path.read_bytes())
    # Dropping the last block alone leaves the manifest inconsistent: refused by the parser.
    doc["blocks"] = doc["blocks"][:-1]
    doc.pop("digest", None)
    path.write_text(json.dumps(doc))
    await refused_at_open(path, ManifestError)
    # A consistent truncation (sizes and tensor table cut to match) is refused by the MAC.
    end = doc["blocks"][-1]["offset"] + doc["blocks"][-1]["length"]
    doc["total_size"] = doc["files"][0]["size"] = end
    doc["tensors"] = [t for t in doc["tensors"] if t["offsets"][1] <= end]
    assert 0 < len(doc["tensors"]) < len(want)
    path.write_text(json.dumps(doc))
    await refused_at_open(path, AuthenticationError)
    # Re-MAC'ed by a key holder, every block still fails: its associated data binds the block
    # count and the tensor table it was sealed with.
    cut = Manifest.from_json(json.dumps(doc))
    reseal(path, dataclasses.replace(cut, encryption=man.encryption))
    _, yielded = await stream_expecting(path, want, DecryptionError)
    assert not yielded


@pytest.mark.anyio
async def test_wrong_missing_or_malformed_key_is_refused_at_open(
    tmp_path: Path, enc: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, want = enc
    err = await refused_at_open(path, DecryptionError, key=WRONG)
    assert "wrong key" in str(err)
    await refused_at_open(path, KeyRequiredError, key=None)
    await refused_at_open(path, KeyFormatError, key=KEY[:31])
    with pytest.raises(DecryptionError):
        await asyncload.load(path, key=WRONG.hex(), budget=BUDGET)
    with pytest.raises(KeyRequiredError):
        await asyncload.load(path, budget=BUDGET)
    out = tmp_path / "out"
    for key, exc in [(WRONG, DecryptionError), (None, KeyRequiredError)]:
        with pytest.raises(exc):
            await asyncload.unpack(path, f"{out}{os.sep}", key=key, budget=BUDGET)
    assert not out.exists() or list(out.iterdir()) == []
    with pytest.raises(DecryptionError):
        await asyncload.verify(path, key=WRONG, budget=BUDGET)

    async def key_service() -> bytes:  # an async callable works like the key itself
        return KEY

    assert_equal_tensors(await asyncload.load(path, key=key_service, budget=BUDGET), want)
    # An unencrypted checkpoint opened with a key is refused too (see the downgrade edit above).
    plain = Path(await asyncload.save(want, tmp_path / "p.json", sources=dirs(tmp_path, prefix="p"),
                                      block_size=BS, budget=BUDGET))  # fmt: skip
    await refused_at_open(plain, AuthenticationError)


# --------------------------------------------------------------------------- 3. nonce uniqueness


def opened_pairs(path: Path, key: bytes) -> list[tuple[bytes, bytes]]:
    """(data key, nonce) of every stored block, each checked to really open under that pair."""
    man = read_manifest(path)
    dek = dek_of(man, key)
    digest = table_digest(man.table_bytes())
    aead = AESGCM(dek)
    pairs = []
    for b in man.blocks:
        nonce = block_nonce(b.index)
        plain = aead.decrypt(
            nonce, block_path(path, b).read_bytes(), block_aad(man.id, b.index, len(man.blocks), digest)
        )
        assert len(plain) == b.length
        pairs.append((dek, nonce))
    return pairs


@pytest.mark.anyio
async def test_nonces_never_repeat_across_twenty_saves_under_one_key(tmp_path: Path) -> None:
    want = random_tensors(4)
    pairs: list[tuple[bytes, bytes]] = []
    envelopes, ids, deks, headers = set(), set(), set(), set()
    for i in range(20):
        path = await save_enc(tmp_path / f"r{i}", want)
        man = read_manifest(path)
        assert man.encryption is not None
        nonces = [block_nonce(b.index) for b in man.blocks]
        assert len(set(nonces)) == len(nonces)  # unique by index within a checkpoint
        pairs += opened_pairs(path, KEY)
        envelopes.add(json.dumps(man.encryption, sort_keys=True))
        ids.add(man.id)
        deks.add(dek_of(man))
        headers.add(block_path(path, man.blocks[0]).read_bytes())
    assert len(ids) == len(envelopes) == len(deks) == 20  # a fresh data key for every save
    assert len(set(pairs)) == len(pairs) == 20 * len(read_manifest(path).blocks)
    assert len(headers) == 20  # the same header bytes never encrypt to the same block twice


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    sizes=st.lists(st.integers(0, 3 * BS), min_size=1, max_size=4),
    saves=st.integers(2, 3),
    seed=st.integers(0, 2**32 - 1),
)
@pytest.mark.anyio
async def test_property_data_key_and_nonce_pairs_are_unique(sizes: list[int], saves: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    want = {f"t{i}": rng.integers(0, 256, n, dtype=np.uint8) for i, n in enumerate(sizes)}
    pairs: list[tuple[bytes, bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(saves):
            path = await save_enc(Path(tmp) / f"r{i}", want)
            pairs += opened_pairs(path, KEY)
        assert_equal_tensors(await asyncload.load(path, key=KEY, budget=BUDGET), want)
    assert len(set(pairs)) == len(pairs)
    assert len({dek for dek, _ in pairs}) == saves


# --------------------------------------------------------------------------- 4. signed manifests


def pem_private(sk: Ed25519PrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # fmt: skip


def pem_public(sk: Ed25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip


@pytest.mark.anyio
async def test_signed_manifest(tmp_path: Path) -> None:
    want = random_tensors(5)
    publisher, intruder = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pk = publisher.public_key()
    path = Path(await asyncload.save(want, tmp_path / "m.json", sources=dirs(tmp_path), block_size=BS,
                                     budget=BUDGET, sign_key=publisher))  # fmt: skip
    assert read_manifest(path).signature is not None and read_manifest(path).encryption is None
    raw_pk = pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    (tmp_path / "pk.pem").write_bytes(pem_public(publisher))
    for vk in (pk, pem_public(publisher), raw_pk, raw_pk.hex(), tmp_path / "pk.pem"):
        assert_equal_tensors(await asyncload.load(path, verify_key=vk, budget=BUDGET), want)
    assert_equal_tensors(await asyncload.load(path, budget=BUDGET), want)  # no verify key: not required
    await refused_at_open(path, AuthenticationError, key=None, verify_key=intruder.public_key())
    # unsigned
    plain = Path(await asyncload.save(want, tmp_path / "p.json", sources=dirs(tmp_path, prefix="p"),
                                      block_size=BS, budget=BUDGET))  # fmt: skip
    await refused_at_open(plain, KeyRequiredError, key=None, verify_key=pk)
    # altered: any field of the signed text, or the signature itself
    original = read_json(path)
    edits: list[Callable[[dict[str, Any]], None]] = [
        lambda d: d["tensors"][0].update(name="renamed"),
        lambda d: d["blocks"][1].update(crc32c=f"{int(d['blocks'][1]['crc32c'], 16) ^ 1:08x}"),
        lambda d: d["sources"][0].update(location="elsewhere"),
        lambda d: d.update(extra={"note": "x"}),
        lambda d: d["signature"].update(
            value=("0" if d["signature"]["value"][0] != "0" else "1") + d["signature"]["value"][1:]
        ),
        lambda d: d.pop("signature"),
    ]
    for i, edit in enumerate(edits):
        doc = json.loads(json.dumps(original))
        edit(doc)
        write_json(path, doc)
        exc = KeyRequiredError if "signature" not in doc else AuthenticationError
        try:
            await refused_at_open(path, exc, key=None, verify_key=pk)
        except BaseException as e:
            raise AssertionError(f"signed-manifest edit {i}: {e!r}") from e
    # re-signed by another key (whatever public key it names) is refused
    resigned = seal_manifest(Manifest.from_json(json.dumps(original)), None, intruder)
    write_bytes(path, resigned.to_json())
    await refused_at_open(path, AuthenticationError, key=None, verify_key=pk)
    # signed and encrypted: both checks, both needed
    both = await save_enc(tmp_path, want, name="both", sign_key=pem_private(publisher))
    assert_equal_tensors(await asyncload.load(both, key=KEY, verify_key=pk, budget=BUDGET), want)
    await refused_at_open(both, AuthenticationError, verify_key=intruder.public_key())
    await refused_at_open(both, KeyRequiredError, key=None, verify_key=pk)


def test_cli_pack_sign_key_then_load_verify_key(tmp_path: Path) -> None:
    want = random_tensors(6)
    save_file(want, tmp_path / "model.safetensors")
    publisher, intruder = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    (tmp_path / "sk.pem").write_bytes(pem_private(publisher))
    (tmp_path / "pk.pem").write_bytes(pem_public(publisher))
    (tmp_path / "other.pem").write_bytes(pem_public(intruder))
    (tmp_path / "key").write_bytes(KEY)
    ok(cli("pack", "model.safetensors", "--to", "d0", "d1", "-o", "m.json", "--block-size", "4KiB",
           "--sign-key", "sk.pem", cwd=tmp_path))  # fmt: skip
    assert read_manifest(tmp_path / "m.json").signature is not None
    res = json.loads(ok(cli("load", "m.json", "--verify-key", "pk.pem", "--json", cwd=tmp_path)).stdout)
    assert res["tensors"] == len(want)
    fails(cli("load", "m.json", "--verify-key", "other.pem", cwd=tmp_path), AuthenticationError)
    ok(cli("pack", "model.safetensors", "--to", "e0", "e1", "-o", "e.json", "--block-size", "4KiB",
           "--key-file", "key", "--sign-key", "sk.pem", cwd=tmp_path))  # fmt: skip
    out = ok(cli("unpack", "e.json", "-o", "out.safetensors", "--key-file", "key", "--verify-key", "pk.pem",
                 cwd=tmp_path))  # fmt: skip
    assert out.stdout.strip().endswith("out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    fails(cli("unpack", "e.json", "-o", "bad.safetensors", "--key-file", "key", "--verify-key", "other.pem",
              cwd=tmp_path), AuthenticationError)  # fmt: skip
    assert not (tmp_path / "bad.safetensors").exists()


# --------------------------------------------------------------------------- 5. rekey


def block_snapshot(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under every source directory: bytes and mtime_ns."""
    out = {}
    for s in read_manifest(path).sources:
        for p in sorted(source_dir(path, s.id).rglob("*")):
            if p.is_file():
                out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


@pytest.mark.anyio
async def test_rekey_rewraps_without_touching_a_block(
    tmp_path: Path, enc: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, want = enc
    before, man = block_snapshot(path), read_manifest(path)
    assert len(before) == len(man.blocks)
    # the wrong current key is refused and changes nothing
    text = path.read_bytes()
    with pytest.raises(DecryptionError):
        await asyncload.rekey(path, WRONG, KEY2)
    assert path.read_bytes() == text
    await asyncload.rekey(path, KEY, KEY2)
    after = read_manifest(path)
    assert after.id == man.id and after.blocks == man.blocks and after.encryption != man.encryption
    assert dek_of(after, KEY2) == dek_of(man, KEY)  # same data key, so no block needs rewriting
    assert_equal_tensors(await asyncload.load(path, key=KEY2, budget=BUDGET), want)
    await refused_at_open(path, DecryptionError, key=KEY)
    assert block_snapshot(path) == before
    with pytest.raises(KeyRequiredError):  # nothing to rotate on a plain checkpoint
        await asyncload.rekey(
            await asyncload.save(want, tmp_path / "p.json", sources=[tmp_path / "p"], block_size=BS),
            KEY,
            KEY2,
        )


def test_cli_rekey_and_key_from_environment(tmp_path: Path) -> None:
    want = random_tensors(7)
    save_file(want, tmp_path / "model.safetensors")
    (tmp_path / "old").write_bytes(KEY)  # raw
    (tmp_path / "new").write_text(KEY2.hex() + "\n")  # hex
    ok(cli("pack", "model.safetensors", "--to", "d0", "d1", "d2", "-o", "m.json", "--block-size", "4KiB",
           "--encrypt", "--key-file", "old", cwd=tmp_path))  # fmt: skip
    manifest = tmp_path / "m.json"
    before = block_snapshot(manifest)
    ok(cli("load", "m.json", "--key-file", "old", cwd=tmp_path))
    fails(cli("rekey", "m.json", "--key-file", "new", "--new-key-file", "old", cwd=tmp_path), DecryptionError)
    ok(cli("rekey", "m.json", "--key-file", "old", "--new-key-file", "new", cwd=tmp_path))
    assert json.loads(ok(cli("load", "m.json", "--key-file", "new", "--json", cwd=tmp_path)).stdout)[
        "tensors"
    ] == len(want)
    fails(cli("load", "m.json", "--key-file", "old", cwd=tmp_path), DecryptionError)
    assert block_snapshot(manifest) == before
    # ASYNCLOAD_KEY is the key when no --key-file is given
    ok(cli("load", "m.json", cwd=tmp_path, env={"ASYNCLOAD_KEY": KEY2.hex()}))
    fails(cli("load", "m.json", cwd=tmp_path, env={"ASYNCLOAD_KEY": KEY.hex()}), DecryptionError)
    fails(cli("load", "m.json", cwd=tmp_path), KeyRequiredError)
    ok(cli("unpack", "m.json", "-o", "out.safetensors", cwd=tmp_path, env={"ASYNCLOAD_KEY": KEY2.hex()}))
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------- 6. keys never leak


def leak_strings(*secrets: bytes) -> list[str]:
    out = []
    for s in secrets:
        out += [s.hex(), s.hex().upper(), s.hex()[:16], base64.b64encode(s).decode()[:16],
                repr(s)[2:-1], s.decode("latin-1")]  # fmt: skip
    return out


def assert_clean(text: str, leaks: list[str]) -> None:
    found = [i for i, s in enumerate(leaks) if s in text]
    assert not found, f"key material (form {found[0]}) appears in:\n{text}"


def error_text(e: BaseException) -> str:
    return "".join(traceback.format_exception(e)) + repr(e) + str(e) + repr(getattr(e, "__notes__", ""))


@pytest.mark.anyio
async def test_keys_never_appear_in_messages_reprs_or_manifests(
    tmp_path: Path, enc: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, _ = enc
    man = read_manifest(path)
    leaks = leak_strings(KEY, WRONG, KEY2, dek_of(man))
    texts = [path.read_text()]
    async with asyncload.open(path, budget=BUDGET, key=KEY) as model:
        stream = model.stream()
        texts += [repr(model), str(model), repr(stream), repr(model.statistics()), repr(model.manifest)]
        await stream.aclose()
        texts.append(repr(model.statistics()))
    errors: list[BaseException] = []

    async def catch(coro: Any) -> None:
        try:
            await coro
        except Exception as e:
            errors.append(e)
        else:
            pytest.fail("no error")  # pragma: no cover

    await catch(asyncload.load(path, key=WRONG, budget=BUDGET))
    await catch(asyncload.load(path, budget=BUDGET))
    await catch(asyncload.load(path, key=KEY[:31], budget=BUDGET))
    await catch(asyncload.load(path, key=KEY.hex()[:-1] + "g", budget=BUDGET))
    await catch(asyncload.rekey(path, WRONG, KEY2))
    doc = json.loads(path.read_bytes())
    doc["tensors"][0]["name"] = "renamed"
    doc.pop("digest", None)
    (tmp_path / "edited.json").write_text(json.dumps(doc))
    await catch(asyncload.load(tmp_path / "edited.json", key=KEY, budget=BUDGET))
    block = middle_data_block(man)
    data = flip(block_path(path, block), 3)
    await catch(asyncload.load(path, key=KEY, budget=BUDGET))  # ChecksumError
    texts.append(repr(await asyncload.verify(path, key=KEY, budget=BUDGET)))
    reseal(path, with_crc(man, block.index, data))
    await catch(asyncload.load(path, key=KEY, budget=BUDGET))  # DecryptionError
    report = await asyncload.verify(path, key=KEY, budget=BUDGET)
    assert not report.ok
    texts.append(repr(report))
    texts.append(path.read_text())
    assert [type(e).__name__ for e in errors] == [
        "DecryptionError", "KeyRequiredError", "KeyFormatError", "KeyFormatError", "DecryptionError",
        "AuthenticationError", "ChecksumError", "DecryptionError",
    ]  # fmt: skip
    texts += [error_text(e) for e in errors]
    assert_clean("\n".join(texts), leaks)
    # the CLI: a wrong key from a file and from the environment, and a malformed one
    (tmp_path / "wrong").write_bytes(WRONG)
    runs = [
        cli("load", path, "--key-file", "wrong", cwd=tmp_path),
        cli("verify", path, "--key-file", "wrong", cwd=tmp_path),
        cli("info", path, cwd=tmp_path, env={"ASYNCLOAD_KEY": WRONG.hex()}),
        cli("load", path, cwd=tmp_path, env={"ASYNCLOAD_KEY": WRONG.hex()[:-1] + "g"}),
    ]
    for p in runs:
        assert p.returncode == 2, p
        assert_clean(p.stdout + p.stderr, [*leaks, WRONG.hex()[:-1]])


# --------------------------------------------------------------------------- 7. verify


@pytest.mark.anyio
async def test_verify_without_key_checks_crcs_and_with_key_checks_tags(
    tmp_path: Path, enc: tuple[Path, dict[str, np.ndarray]]
) -> None:
    path, _ = enc
    man = read_manifest(path)
    total = sum(b.length for b in man.blocks)
    for key in (None, KEY):
        report = await asyncload.verify(path, key=key, budget=BUDGET)
        assert report.ok and report.blocks == len(man.blocks) and report.bytes_checked == total
    block = middle_data_block(man)
    data = flip(block_path(path, block), block.length + 2)  # in the tag
    for key in (None, KEY):
        report = await asyncload.verify(path, key=key, budget=BUDGET)
        assert [(b.index, "crc32c" in b.error) for b in report.bad] == [(block.index, True)]
    # With the crc fixed under a valid MAC, only the tag can tell: verify without the key passes
    # (it checks what is stored), verify with the key names the block.
    reseal(path, with_crc(man, block.index, data))
    assert (await asyncload.verify(path, budget=BUDGET)).ok
    report = await asyncload.verify(path, key=KEY, budget=BUDGET)
    assert [(b.index, "authentication failed" in b.error) for b in report.bad] == [(block.index, True)]


def test_cli_verify_with_and_without_key(tmp_path: Path) -> None:
    save_file(random_tensors(8), tmp_path / "model.safetensors")
    (tmp_path / "key").write_bytes(KEY)
    ok(cli("pack", "model.safetensors", "--to", "d0", "d1", "-o", "m.json", "--block-size", "4KiB",
           "--key-file", "key", cwd=tmp_path))  # fmt: skip
    ok(cli("verify", "m.json", cwd=tmp_path))
    ok(cli("verify", "m.json", "--key-file", "key", cwd=tmp_path))
    man = read_manifest(tmp_path / "m.json")
    flip(block_path(tmp_path / "m.json", man.blocks[1]), 5)
    for extra in ([], ["--key-file", "key"]):
        p = cli("verify", "m.json", *extra, cwd=tmp_path)
        assert p.returncode == 1, p
        assert "BAD block 1 " in p.stdout, p.stdout


# --------------------------------------------------------------------------- budget, strict schema, env keys


@pytest.mark.anyio
async def test_encrypted_ring_counts_the_tag_against_the_budget(tmp_path: Path) -> None:
    """Slots of an encrypted store are m + 16 bytes: S = k x m is too small, and slots never exceed S."""
    key = os.urandom(32)
    m = 4096
    tensors = {f"t{i}": np.full(3000, i, dtype=np.float32) for i in range(8)}
    dirs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(asyncload.BudgetError, match=r"2 sources x 4096 bytes block size \+ 16-byte tag"):
        await asyncload.save(tensors, tmp_path / "m.json", sources=dirs, block_size=m, budget=2 * m, key=key)
    budget = 4 * (m + 16)
    path = await asyncload.save(
        tensors, tmp_path / "m.json", sources=dirs, block_size=m, budget=budget, key=key
    )
    with pytest.raises(asyncload.BudgetError, match="16-byte tag"):
        async with asyncload.open(path, key=key, budget=2 * m):
            pass
    async with asyncload.open(path, key=key, budget=budget) as model:
        async for _name, _arr in model.stream():
            assert model.statistics().bytes_in_slots <= budget
        assert model.statistics().peak_slots_in_use * (m + 16) <= budget


def test_manifest_fields_outside_the_schema_are_refused() -> None:
    """A MAC or signature covers the parsed fields, so nothing else may ride along."""
    doc = {
        "format": "asyncload.manifest", "version": 1, "id": "x", "block_size": 4096, "total_size": 1,
        "files": [{"path": "m.safetensors", "offset": 0, "size": 1, "kind": "safetensors"}],
        "tensors": [], "sources": [{"id": "s0", "location": "d"}],
        "blocks": [{"source": "s0", "key": "k", "offset": 0, "length": 1, "crc32c": "00000000"}],
    }  # fmt: skip
    asyncload.Manifest.from_json(json.dumps(doc))
    for where in (doc, doc["files"][0], doc["sources"][0], doc["blocks"][0]):
        where["smuggled"] = 1
        with pytest.raises(asyncload.ManifestError, match="unknown fields"):
            asyncload.Manifest.from_json(json.dumps(doc))
        del where["smuggled"]


@pytest.mark.anyio
async def test_a_key_for_a_plain_manifest_is_refused_but_ignored_for_files_read_in_place(
    tmp_path: Path,
) -> None:
    key = os.urandom(32)
    tensors = {"w": np.arange(1000, dtype=np.float32)}
    plain = await asyncload.save(tensors, tmp_path / "m.json", sources=[tmp_path / "d"], block_size=4096)
    with pytest.raises(asyncload.AuthenticationError, match="not encrypted"):
        await asyncload.load(plain, key=key)
    save_file(tensors, str(tmp_path / "w.safetensors"))
    got = await asyncload.load(tmp_path / "w.safetensors", key=key)  # a safetensors file cannot be encrypted
    assert got["w"].tobytes() == tensors["w"].tobytes()


def _forge_same_crc(data: bytes) -> bytes:
    """``data`` changed in a few bits of its first 5 bytes, with the same crc32c (CRC is affine)."""
    base = crc32c.crc32c(data)
    rows: list[tuple[int, int]] = []  # (crc difference, bit set of flipped positions)
    for bit in range(33):  # 33 vectors in a 32-dimensional space: some XOR to zero
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        diff, combo = crc32c.crc32c(bytes(flipped)) ^ base, 1 << bit
        for r_diff, r_combo in rows:  # Gaussian elimination over GF(2), pivot = highest bit
            if diff ^ r_diff < diff:
                diff, combo = diff ^ r_diff, combo ^ r_combo
        if diff == 0:
            out = bytearray(data)
            for b in range(33):
                if combo >> b & 1:
                    out[b // 8] ^= 1 << (b % 8)
            assert bytes(out) != data and crc32c.crc32c(bytes(out)) == base
            return bytes(out)
        rows.append((diff, combo))
    raise AssertionError("unreachable: 33 vectors in GF(2)^32 are dependent")


@pytest.mark.anyio
async def test_a_signed_plain_checkpoint_protects_block_bytes_not_just_crcs(tmp_path: Path) -> None:
    """crc32c can be forged; a signed manifest records a SHA-256 per block and a verify key checks it."""
    sk = Ed25519PrivateKey.generate()
    tensors = {f"t{i}": np.full(2048, i, dtype=np.float32) for i in range(4)}
    path = Path(
        await asyncload.save(
            tensors, tmp_path / "m.json", sources=[tmp_path / "d"], block_size=4096, sign_key=sk
        )
    )
    man = read_manifest(path)
    assert all(b.sha256 is not None for b in man.blocks)
    victim = data_blocks(man)[1]
    f = block_path(path, victim)
    f.write_bytes(_forge_same_crc(f.read_bytes()))
    # Without a verify key the crc32c still matches: the forgery passes the integrity check ...
    got = await asyncload.load(path)
    assert any(got[n].tobytes() != tensors[n].tobytes() for n in tensors)
    # ... with it, the signed SHA-256 refuses the block and no altered tensor comes back.
    with pytest.raises(asyncload.AuthenticationError, match="SHA-256 differs"):
        await asyncload.load(path, verify_key=sk.public_key())
    # Signing a manifest whose blocks have no SHA-256 (e.g. rekey --sign-key of an unsigned store) is refused.
    plain = read_manifest(Path(await asyncload.save(tensors, tmp_path / "p.json", sources=[tmp_path / "e"])))
    with pytest.raises(asyncload.AuthenticationError, match="no sha256"):
        seal_manifest(plain, None, sk)
