"""Encrypted checkpoints and authenticated manifests: the glue between codecs and the data path.

* :class:`BlockCipher` seals and opens blocks in place in a slot (worker
  threads call it): ciphertext and tag replace the plaintext, so a slot of an
  encrypted store is ``m + 16`` bytes.
* :func:`seal_manifest` adds the MAC (and an optional Ed25519 signature) to a
  manifest; :func:`open_manifest` checks them before any block is read and
  returns the cipher for its blocks.

The wrapped data key, MAC and signature live in the manifest; the user key and
the signing key never do. See docs/encryption.md.
"""

from __future__ import annotations

import binascii
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._exceptions import AuthenticationError, DecryptionError, KeyFormatError, KeyRequiredError
from ._format import ENCRYPTION_SCHEME, Manifest, TensorInfo, table_bytes
from .codecs._aead import (
    TAG_BYTES,
    Key,
    block_aad,
    block_nonce,
    cipher,
    decrypt_into,
    encrypt_into,
    load_key,
    manifest_mac,
    new_data_key,
    table_digest,
    unwrap_data_key,
    verify_manifest_mac,
    wrap_data_key,
)

__all__ = [
    "BlockCipher",
    "SignKeyLike",
    "VerifyKeyLike",
    "load_sign_key",
    "load_verify_key",
    "new_cipher_for",
    "open_manifest",
    "rekey_manifest",
    "seal_manifest",
]

SignKeyLike = Ed25519PrivateKey | bytes | str | os.PathLike[str]
VerifyKeyLike = Ed25519PublicKey | bytes | str | os.PathLike[str]
_SIG_ALG = "ed25519"


class BlockCipher:
    """AES-256-GCM for the blocks of one checkpoint (data key, id, block count, tensor table)."""

    overhead = TAG_BYTES

    def __init__(self, dek: bytes, checkpoint_id: str, count: int, table: bytes) -> None:
        self._aead = cipher(dek)
        self._dek = dek
        self._id = checkpoint_id
        self._count = count
        self._digest = table_digest(table)

    def __repr__(self) -> str:
        return f"<BlockCipher checkpoint={self._id!r} blocks={self._count}>"

    def seal(self, index: int, memory: Any, n: int) -> int:
        """Encrypt ``memory[:n]`` in place; returns ``n + 16`` (ciphertext then tag)."""
        view = memoryview(memory)
        aad = block_aad(self._id, index, self._count, self._digest)
        return encrypt_into(self._aead, block_nonce(index), aad, view[:n], view[: n + TAG_BYTES])

    def open(self, index: int, memory: Any, stored: int) -> int:
        """Check and decrypt ``memory[:stored]`` in place; returns the plaintext length."""
        view = memoryview(memory)
        aad = block_aad(self._id, index, self._count, self._digest)
        return decrypt_into(self._aead, block_nonce(index), aad, view[:stored], view[:stored], index=index)

    def mac(self, manifest: Manifest) -> str:
        return manifest_mac(self._dek, manifest.canonical_bytes())


def new_cipher_for(
    key: Key, checkpoint_id: str, count: int, tensors: Sequence[TensorInfo]
) -> tuple[BlockCipher, dict[str, Any]]:
    """A fresh data key for a new checkpoint (id, block count, tensor table) and its envelope."""
    dek, envelope = new_data_key(key, checkpoint_id)
    return (
        BlockCipher(dek, checkpoint_id, count, table_bytes(tensors)),
        {"scheme": ENCRYPTION_SCHEME, "key": envelope},
    )


# --------------------------------------------------------------------------- signatures


def _read_key_material(value: bytes | str | os.PathLike[str], what: str) -> bytes:
    if isinstance(value, os.PathLike) or (isinstance(value, str) and Path(value).is_file()):
        try:
            data = Path(os.fspath(value)).read_bytes()
        except OSError as e:
            raise KeyFormatError(f"cannot read {what} file {os.fspath(value)!r}: {e.strerror}") from None
        return data
    return value.encode() if isinstance(value, str) else bytes(value)


def _raw32(data: bytes, what: str) -> bytes | None:
    stripped = data.strip()
    if len(data) == 32:
        return data
    if len(stripped) == 64:
        try:
            return binascii.unhexlify(stripped)
        except (binascii.Error, ValueError):
            raise KeyFormatError(f"{what} is 64 characters but not hex") from None
    return None


def _load_ed25519(value: Any, private: bool) -> Ed25519PrivateKey | Ed25519PublicKey:
    what = "signing key" if private else "verify key"
    data = _read_key_material(value, what)
    raw = _raw32(data, what)
    try:
        if raw is not None:
            if private:
                return Ed25519PrivateKey.from_private_bytes(raw)
            return Ed25519PublicKey.from_public_bytes(raw)
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError):
        raise KeyFormatError(f"{what} is not an Ed25519 PEM key, 32 raw bytes or 64 hex characters") from None
    if not isinstance(key, Ed25519PrivateKey if private else Ed25519PublicKey):
        raise KeyFormatError(f"{what} is not an Ed25519 key")
    return key


def load_sign_key(value: SignKeyLike) -> Ed25519PrivateKey:
    """An Ed25519 private key: an object, PEM (PKCS#8), 32 raw bytes or 64 hex chars, or a file of them."""
    if isinstance(value, Ed25519PrivateKey):
        return value
    key = _load_ed25519(value, private=True)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def load_verify_key(value: VerifyKeyLike) -> Ed25519PublicKey:
    """An Ed25519 public key: an object, PEM, 32 raw bytes or 64 hex chars, or a file of them."""
    if isinstance(value, Ed25519PublicKey):
        return value
    key = _load_ed25519(value, private=False)
    assert isinstance(key, Ed25519PublicKey)
    return key


def _public_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


# --------------------------------------------------------------------------- manifests


def seal_manifest(
    manifest: Manifest, block_cipher: BlockCipher | None, sign_key: SignKeyLike | None = None
) -> Manifest:
    """``manifest`` with its MAC (when encrypted) and signature (when a signing key is given)."""
    out = dataclasses.replace(manifest, mac=None, signature=None)
    if block_cipher is not None:
        out = dataclasses.replace(out, mac=block_cipher.mac(out))
    if sign_key is not None:
        if any(b.sha256 is None for b in out.blocks):
            raise AuthenticationError(
                "cannot sign a manifest whose blocks carry no sha256: a signature over crc32c values "
                "would not protect the bytes (save or pack with sign_key to record them)"
            )
        sk = load_sign_key(sign_key)
        sig = sk.sign(out.canonical_bytes(without=("signature",)))
        out = dataclasses.replace(
            out, signature={"alg": _SIG_ALG, "public_key": _public_hex(sk.public_key()), "value": sig.hex()}
        )
    return out


def _check_signature(manifest: Manifest, verify_key: VerifyKeyLike, name: str) -> None:
    vk = load_verify_key(verify_key)
    sig = manifest.signature
    if sig is None:
        raise KeyRequiredError(f"{name}: a verify key was given but the manifest is not signed")
    if sig.get("alg") != _SIG_ALG:
        raise AuthenticationError(f"{name}: unsupported signature algorithm {sig.get('alg')!r}")
    try:
        vk.verify(bytes.fromhex(sig.get("value", "")), manifest.canonical_bytes(without=("signature",)))
    except (InvalidSignature, ValueError):
        raise AuthenticationError(
            f"{name}: the manifest signature does not verify with the given key "
            "(signed by someone else, or the manifest was altered)"
        ) from None


def open_manifest(
    manifest: Manifest,
    key: Any | None,
    *,
    verify_key: VerifyKeyLike | None = None,
    name: str = "manifest",
) -> BlockCipher | None:
    """Check signature and MAC before anything is read; the cipher for an encrypted checkpoint.

    Raises :class:`KeyRequiredError` for an encrypted checkpoint without a key,
    :class:`DecryptionError` for a wrong key or altered key envelope, and
    :class:`AuthenticationError` for a MAC or signature that does not verify, and for a
    key given with a checkpoint that is not encrypted (a stripped envelope must not pass).
    """
    if verify_key is not None:
        _check_signature(manifest, verify_key, name)
    if manifest.encryption is None:
        if key is not None:  # fail closed: an encrypted manifest stripped of its envelope and MAC
            raise AuthenticationError(
                f"{name}: a key was given but the checkpoint is not encrypted "
                "(refused: its encryption and MAC may have been removed)"
            )
        return None
    if key is None:
        raise KeyRequiredError(f"{name} is encrypted: pass key= (or --key-file PATH, or set ASYNCLOAD_KEY)")
    user_key = load_key(key)
    try:
        dek = unwrap_data_key(user_key, manifest.encryption["key"], manifest.id)
    except DecryptionError as e:
        raise DecryptionError(f"{name}: {e}") from None
    if manifest.mac is None:
        raise AuthenticationError(f"{name}: encrypted manifest carries no MAC")
    try:
        verify_manifest_mac(dek, manifest.canonical_bytes(), manifest.mac)
    except AuthenticationError:
        raise AuthenticationError(
            f"{name}: the manifest MAC does not verify (the manifest was altered)"
        ) from None
    return BlockCipher(dek, manifest.id, len(manifest.blocks), manifest.table_bytes())


def rekey_manifest(
    manifest: Manifest,
    old_key: Any,
    new_key: Any,
    *,
    sign_key: SignKeyLike | None = None,
    name: str = "manifest",
) -> Manifest:
    """The same checkpoint with its data key re-wrapped under ``new_key``; no block changes."""
    if manifest.encryption is None:
        raise KeyRequiredError(f"{name} is not encrypted: there is no key to rotate")
    block_cipher = open_manifest(manifest, old_key, name=name)
    assert block_cipher is not None
    envelope = wrap_data_key(load_key(new_key), block_cipher._dek, manifest.id)
    out = dataclasses.replace(manifest, encryption={"scheme": ENCRYPTION_SCHEME, "key": envelope})
    return seal_manifest(out, block_cipher, sign_key)
