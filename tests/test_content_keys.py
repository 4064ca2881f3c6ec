"""Block keys are content addresses: BLAKE3-256 of the stored bytes, fanned out as ``h[:2]/h``.

A SHA-256 is recorded only where a signature needs it (a signed manifest), and then it is the
SHA-256 of the same stored bytes, data and parity blocks alike.
"""

from __future__ import annotations

import hashlib
import pathlib

import blake3
import numpy as np
import pytest
from _stores import block_path, read_manifest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

import asyncload

pytestmark = pytest.mark.anyio
KiB = 1 << 10


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {f"t{i}": rng.integers(0, 256, 9 * KiB + 17 * i, dtype=np.uint8) for i in range(8)}


def _key(data: bytes) -> str:
    h = blake3.blake3(data).hexdigest()
    return f"{h[:2]}/{h}"


@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("signed", [False, True])
async def test_every_key_is_the_blake3_of_its_stored_bytes(
    tmp_path: pathlib.Path, parity: int, signed: bool
) -> None:
    kw = {}
    if signed:
        sk = Ed25519PrivateKey.generate()
        kw["sign_key"] = sk.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path = await asyncload.save(
        _tensors(), tmp_path / "m.asyncload.json", sources=[tmp_path / f"d{i}" for i in range(3)],
        block_size=4 * KiB, parity=parity, **kw,
    )  # fmt: skip
    man = read_manifest(pathlib.Path(path))
    for b in man.blocks:
        stored = block_path(pathlib.Path(path), b).read_bytes()
        assert b.key == _key(stored), b.index
        assert b.sha256 == (hashlib.sha256(stored).hexdigest() if signed else None)
    for stripe in man.stripes:
        for p in stripe.parity:
            where = pathlib.Path(path).parent / next(s.location for s in man.sources if s.id == p.source)
            stored = where.joinpath(*p.key.split("/")).read_bytes()
            assert p.key == _key(stored)
            assert p.sha256 == (hashlib.sha256(stored).hexdigest() if signed else None)
    assert (parity == 0) == (not man.stripes)
