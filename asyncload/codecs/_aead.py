"""Client-side block encryption: AES-256-GCM with an envelope of keys.

Key hierarchy::

    user key (32 bytes, never stored)         -- Key, from load_key()/resolve_key()
      └── wraps: data key (32 random bytes)   -- one per checkpoint, new on every save/pack
            ├── encrypts every block          -- AES-256-GCM, nonce = domain || block index
            └── HKDF -> manifest MAC key      -- HMAC-SHA256 over the manifest's canonical bytes

*Envelope.* :func:`new_data_key` draws a fresh data key from ``os.urandom`` and
:func:`wrap_data_key` seals it under the user key with AES-256-GCM, a random
96-bit nonce and the associated data ``b"asyncload-dek-v1" + checkpoint id``, so
a wrapped key copied into another checkpoint's manifest does not open there.
Rekeying is :func:`unwrap_data_key` with the old key followed by
:func:`wrap_data_key` with the new one; no block changes.

*Nonces.* Block ``i`` is encrypted under nonce ``BLOCK_NONCE_DOMAIN || i``
(4 + 8 bytes, big endian). A GCM nonce must never repeat under one key; here
the key is the checkpoint's data key, which is random and used for exactly one
checkpoint (a re-save of the same tensors draws a new one), and within a
checkpoint every block index is distinct. So every (data key, nonce) pair is
used once. Deterministic nonces also avoid the 2**32-message bound of random
96-bit nonces. The 4-byte domain keeps room for other kinds of messages under
the same data key without sharing the nonce space.

*Associated data.* :func:`block_aad` binds checkpoint id, block index, block
count and the SHA-256 of the canonical tensor table. A block that is moved,
swapped, dropped (count), spliced in from another checkpoint or decrypted
against a different tensor table fails its tag; a truncated block fails too.

*Limits.* OpenSSL takes ``int`` lengths, so one call handles at most
``2**31 - 1`` bytes of input; plaintext is therefore capped at
:data:`MAX_PLAINTEXT` so that its ciphertext (plaintext + 16-byte tag) can be
decrypted again in one call.

No message, repr or str produced here contains key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import inspect
import os
import re
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from asyncload._exceptions import BudgetError, DecryptionError, KeyFormatError

__all__ = [
    "BLOCK_NONCE_DOMAIN",
    "DEK_AAD_PREFIX",
    "ENV_VAR",
    "HAS_INTO",
    "KEY_BYTES",
    "MAX_ONESHOT",
    "MAX_PLAINTEXT",
    "NONCE_BYTES",
    "TAG_BYTES",
    "DecryptionError",
    "Key",
    "KeyFormatError",
    "aload_key",
    "block_aad",
    "block_nonce",
    "cipher",
    "decrypt_into",
    "encrypt_into",
    "generate_data_key",
    "key_from_bytes",
    "key_from_env",
    "key_from_file",
    "key_from_hex",
    "load_key",
    "manifest_mac",
    "new_data_key",
    "resolve_key",
    "table_digest",
    "unwrap_data_key",
    "verify_manifest_mac",
    "wrap_data_key",
]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_ONESHOT = 2**31 - 1
MAX_PLAINTEXT = MAX_ONESHOT - TAG_BYTES
ENV_VAR = "ASYNCLOAD_KEY"
DEK_AAD_PREFIX = b"asyncload-dek-v1"
BLOCK_NONCE_DOMAIN = b"blk1"
_BLOCK_AAD_PREFIX = b"asyncload-blk-v1"
_MAC_INFO = b"asyncload-manifest-mac-v1"
_ENVELOPE_SCHEME = "asyncload-dek-v1"
_MAX_KEY_FILE = 4096
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_WS = b" \t\r\n\x0b\x0c"

# Recent cryptography releases write straight into caller memory; older ones only return new bytes.
HAS_INTO: bool = hasattr(AESGCM, "encrypt_into") and hasattr(AESGCM, "decrypt_into")


# --------------------------------------------------------------------------------------------- keys


class Key:
    """A 32-byte user key. Its repr and str never show the key; compare with ``==`` (constant time)."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes | bytearray | memoryview) -> None:
        raw = bytes(secret)
        if len(raw) != KEY_BYTES:
            raise KeyFormatError(f"a key must be exactly {KEY_BYTES} bytes (got {len(raw)} bytes)")
        self._secret = raw

    def secret_bytes(self) -> bytes:
        """The 32 key bytes. Never log, print or store them."""
        return self._secret

    def __repr__(self) -> str:
        return "Key(<32 bytes hidden>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Key):
            return NotImplemented
        return hmac.compare_digest(self._secret, other._secret)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> Any:
        raise TypeError("asyncload.Key cannot be pickled (it would write key material)")


def key_from_bytes(raw: bytes | bytearray | memoryview) -> Key:
    """A key from exactly 32 raw bytes."""
    return Key(raw)


def key_from_hex(text: str | bytes | bytearray) -> Key:
    """A key from 64 hex characters; surrounding whitespace is ignored."""
    if isinstance(text, str):
        # Checked up front, not via UnicodeEncodeError: that exception would carry the whole text.
        if not text.isascii():
            raise KeyFormatError("a hex key must hold 64 hex characters (found non-ASCII ones)")
        data = text.encode("ascii")
    else:
        data = bytes(text)
    data = data.strip(_WS)
    if len(data) != 2 * KEY_BYTES:
        raise KeyFormatError(f"a hex key must hold 64 hex characters (got {len(data)} characters)")
    if _HEX64.fullmatch(data.decode("latin-1")) is None:
        raise KeyFormatError("a hex key must hold 64 hex characters (found non-hex characters)")
    return Key(bytes.fromhex(data.decode("ascii")))


def key_from_file(path: str | os.PathLike[str]) -> Key:
    """A key from a file holding exactly 32 raw bytes, or 64 hex characters (whitespace ignored)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise KeyFormatError(f"key file {name!r} cannot be read: {reason}") from None
    if len(data) == KEY_BYTES:
        return Key(data)
    if len(data) > _MAX_KEY_FILE:
        raise KeyFormatError(f"key file {name!r} is too large to be a key (expected 32 raw bytes or 64 hex)")
    stripped = data.strip(_WS)
    if len(stripped) == 2 * KEY_BYTES and _HEX64.fullmatch(stripped.decode("latin-1")) is not None:
        return Key(bytes.fromhex(stripped.decode("ascii")))
    raise KeyFormatError(
        f"key file {name!r} must hold exactly 32 raw bytes or 64 hex characters (it holds {len(data)} bytes"
        + (", not all hex" if len(stripped) == 2 * KEY_BYTES else "")
        + ")"
    )


def key_from_env(environ: Mapping[str, str] | None = None, name: str = ENV_VAR) -> Key | None:
    """The key in ``$ASYNCLOAD_KEY`` (64 hex characters), or None when unset or empty."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None or not value.strip():
        return None
    try:
        return key_from_hex(value)
    except KeyFormatError as exc:
        raise KeyFormatError(f"environment variable {name}: {exc}") from None


KeyLike = Key | bytes | bytearray | memoryview | str | os.PathLike[str]


def load_key(value: KeyLike) -> Key:
    """Turn a key-like value into a :class:`Key`.

    ``Key`` as is; bytes-like of length 32: raw key; other bytes-like: hex text;
    ``str``: 64 hex characters; ``os.PathLike``: a key file (:func:`key_from_file`).
    """
    if isinstance(value, Key):
        return value
    if isinstance(value, os.PathLike):
        return key_from_file(value)
    if isinstance(value, str):
        return key_from_hex(value)
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return Key(raw) if len(raw) == KEY_BYTES else key_from_hex(raw)
    raise KeyFormatError(
        f"a key must be a Key, 32 raw bytes, 64 hex characters or a path (got {type(value).__name__})"
    )


async def aload_key(value: KeyLike | Callable[[], Any]) -> Key:
    """Like :func:`load_key`, also accepting a (sync or async) callable, e.g. a key-service client."""
    if callable(value) and not isinstance(value, Key):
        result = value()
        if inspect.isawaitable(result):
            result = await result
        return load_key(result)
    return load_key(value)


def resolve_key(
    key: KeyLike | None = None,
    key_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Key | None:
    """The key a caller means: ``key`` first, then ``key_file``, then ``$ASYNCLOAD_KEY``; None if none."""
    if key is not None:
        return load_key(key)
    if key_file is not None:
        return key_from_file(key_file)
    return key_from_env(environ)


def _as_key(user_key: Key | bytes | bytearray | memoryview) -> Key:
    if isinstance(user_key, Key):
        return user_key
    if isinstance(user_key, bytes | bytearray | memoryview):
        return Key(user_key)
    raise KeyFormatError(f"a user key must be a Key or 32 bytes (got {type(user_key).__name__})")


def _dek_bytes(dek: bytes | bytearray | memoryview) -> bytes:
    raw = bytes(dek)
    if len(raw) != KEY_BYTES:
        raise KeyFormatError(f"a data key must be exactly {KEY_BYTES} bytes (got {len(raw)} bytes)")
    return raw


def _id_bytes(checkpoint_id: str | bytes) -> bytes:
    return checkpoint_id.encode("utf-8") if isinstance(checkpoint_id, str) else bytes(checkpoint_id)


# --------------------------------------------------------------------------------------------- envelope


def generate_data_key() -> bytes:
    """32 fresh random bytes from the OS CSPRNG: one checkpoint's data key."""
    return os.urandom(KEY_BYTES)


def wrap_data_key(
    user_key: Key | bytes, data_key: bytes | bytearray | memoryview, checkpoint_id: str | bytes
) -> dict[str, str]:
    """Seal ``data_key`` under ``user_key`` for ``checkpoint_id``; a JSON-safe dict for the manifest."""
    uk = _as_key(user_key)
    dek = _dek_bytes(data_key)
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(uk.secret_bytes()).encrypt(nonce, dek, DEK_AAD_PREFIX + _id_bytes(checkpoint_id))
    return {
        "scheme": _ENVELOPE_SCHEME,
        "nonce": base64.b64encode(nonce).decode("ascii"),
        "wrapped": base64.b64encode(sealed).decode("ascii"),
    }


def _b64_field(wrapped: Mapping[str, Any], field: str, size: int) -> bytes:
    value = wrapped.get(field)
    if not isinstance(value, str):
        raise DecryptionError(f"malformed key envelope: field {field!r} missing or not a string")
    try:
        data = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise DecryptionError(f"malformed key envelope: field {field!r} is not base64") from None
    if len(data) != size:
        raise DecryptionError(f"malformed key envelope: field {field!r} must decode to {size} bytes")
    return data


def unwrap_data_key(user_key: Key | bytes, wrapped: Mapping[str, Any], checkpoint_id: str | bytes) -> bytes:
    """Open a :func:`wrap_data_key` envelope; :class:`DecryptionError` on a wrong key or any change."""
    uk = _as_key(user_key)
    if not isinstance(wrapped, Mapping):
        raise DecryptionError("malformed key envelope: not an object")
    if set(wrapped) != {"scheme", "nonce", "wrapped"}:
        raise DecryptionError("malformed key envelope: expected fields 'scheme', 'nonce', 'wrapped'")
    if wrapped.get("scheme") != _ENVELOPE_SCHEME:
        raise DecryptionError(f"malformed key envelope: unsupported scheme (expected {_ENVELOPE_SCHEME!r})")
    nonce = _b64_field(wrapped, "nonce", NONCE_BYTES)
    sealed = _b64_field(wrapped, "wrapped", KEY_BYTES + TAG_BYTES)
    try:
        dek = AESGCM(uk.secret_bytes()).decrypt(nonce, sealed, DEK_AAD_PREFIX + _id_bytes(checkpoint_id))
    except InvalidTag:
        raise DecryptionError("wrong key or tampered key envelope") from None
    return dek


def new_data_key(user_key: Key | bytes, checkpoint_id: str | bytes) -> tuple[bytes, dict[str, str]]:
    """A fresh data key for a new checkpoint and its wrapped form: ``(data_key, envelope)``."""
    dek = generate_data_key()
    return dek, wrap_data_key(user_key, dek, checkpoint_id)


# --------------------------------------------------------------------------------------------- nonce / AAD


def block_nonce(index: int, domain: bytes = BLOCK_NONCE_DOMAIN) -> bytes:
    """The 96-bit nonce of block ``index``: 4-byte ``domain`` followed by the index as 8 bytes big endian."""
    if len(domain) != 4:
        raise ValueError("a nonce domain must be exactly 4 bytes")
    if not 0 <= index < 2**64:
        raise ValueError(f"block index {index} out of range [0, 2**64)")
    return bytes(domain) + struct.pack(">Q", index)


def table_digest(canonical_table: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of the canonical tensor-table bytes (what :func:`block_aad` expects)."""
    return hashlib.sha256(canonical_table).digest()


def block_aad(checkpoint_id: str | bytes, index: int, count: int, table_digest: bytes) -> bytes:
    """Associated data of block ``index`` of ``count``: prefix, index, count, table digest, checkpoint id.

    Every field but the last has a fixed width, so the encoding is unambiguous.
    """
    if not 0 < count < 2**64:
        raise ValueError(f"block count {count} out of range (0, 2**64)")
    if not 0 <= index < count:
        raise ValueError(f"block index {index} out of range [0, {count})")
    if len(table_digest) != 32:
        raise ValueError("table_digest must be a 32-byte SHA-256 digest")
    fixed = _BLOCK_AAD_PREFIX + struct.pack(">QQ", index, count) + bytes(table_digest)
    return fixed + _id_bytes(checkpoint_id)


# --------------------------------------------------------------------------------------------- blocks


def cipher(dek: bytes | bytearray | memoryview) -> AESGCM:
    """An AESGCM for a data key; build once per checkpoint and pass it to encrypt_into/decrypt_into."""
    return AESGCM(_dek_bytes(dek))


def _aead(dek: AESGCM | bytes | bytearray | memoryview) -> AESGCM:
    return dek if isinstance(dek, AESGCM) else cipher(dek)


def _byte_view(buf: Any, what: str, *, writable: bool = False) -> memoryview:
    try:
        mv = memoryview(buf)
    except TypeError:
        raise TypeError(f"{what} must be a buffer (bytes, bytearray, memoryview, ndarray)") from None
    if mv.format != "B" or mv.ndim != 1:
        if not mv.c_contiguous:
            raise TypeError(f"{what} must be C-contiguous")
        mv = mv.cast("B")
    if writable and mv.readonly:
        raise TypeError(f"{what} must be writable")
    return mv


def _zero(mv: memoryview) -> None:
    if mv.nbytes:
        np.frombuffer(mv, dtype=np.uint8).fill(0)


def encrypt_into(
    dek: AESGCM | bytes | bytearray | memoryview,
    nonce: bytes,
    aad: bytes,
    plaintext: Any,
    out: Any,
) -> int:
    """Encrypt ``plaintext`` into ``out[:n + 16]`` (ciphertext then tag); returns ``n + 16``.

    ``out`` may be larger than needed, and may be the very buffer holding the plaintext when
    both start at the same address (in-place). Plaintext is capped at :data:`MAX_PLAINTEXT` bytes.
    """
    pt = _byte_view(plaintext, "plaintext")
    dst = _byte_view(out, "out", writable=True)
    n = pt.nbytes
    if n > MAX_PLAINTEXT:
        raise BudgetError(
            f"an encrypted block holds at most {MAX_PLAINTEXT} bytes of plaintext (got {n}); "
            "use a smaller block size"
        )
    need = n + TAG_BYTES
    if dst.nbytes < need:
        raise BudgetError(f"out holds {dst.nbytes} bytes; encrypting {n} bytes needs {need}")
    aead = _aead(dek)
    if HAS_INTO:
        return int(aead.encrypt_into(nonce, pt, aad, dst[:need]))
    sealed = aead.encrypt(nonce, pt, aad)
    dst[:need] = sealed
    return need


def decrypt_into(
    dek: AESGCM | bytes | bytearray | memoryview,
    nonce: bytes,
    aad: bytes,
    ciphertext: Any,
    out: Any,
    *,
    index: int | None = None,
) -> int:
    """Check and decrypt ``ciphertext`` (ciphertext then 16-byte tag) into ``out``; returns the length.

    On an authentication failure (or ciphertext shorter than a tag) the whole of ``out`` is zeroed
    and :class:`DecryptionError` naming block ``index`` is raised, so no unauthenticated plaintext
    survives. Size and type errors in the arguments raise before anything is written.
    """
    ct = _byte_view(ciphertext, "ciphertext")
    dst = _byte_view(out, "out", writable=True)
    m = ct.nbytes
    if m > MAX_ONESHOT:
        raise BudgetError(f"an encrypted block holds at most {MAX_ONESHOT} bytes (got {m})")
    where = "block" if index is None else f"block {index}"
    if m < TAG_BYTES:
        _zero(dst)
        err = DecryptionError(f"{where}: {m} bytes is shorter than the {TAG_BYTES}-byte tag (truncated)")
        err.index = index
        raise err
    n = m - TAG_BYTES
    if dst.nbytes < n:
        raise BudgetError(f"out holds {dst.nbytes} bytes; decrypting {m} bytes needs {n}")
    aead = _aead(dek)
    try:
        if HAS_INTO:
            got = int(aead.decrypt_into(nonce, ct, aad, dst[:n]))
        else:
            dst[:n] = aead.decrypt(nonce, ct, aad)
            got = n
    except InvalidTag:
        _zero(dst)
        err = DecryptionError(
            f"{where}: authentication failed (wrong key, or the block was altered, truncated, moved, "
            "or taken from another checkpoint or tensor table)"
        )
        err.index = index
        raise err from None
    return got


# --------------------------------------------------------------------------------------------- manifest MAC


def _mac_key(key: bytes | bytearray | memoryview) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_MAC_INFO)
    return hkdf.derive(_dek_bytes(key))


def manifest_mac(key: bytes | bytearray | memoryview, canonical_bytes: bytes) -> str:
    """HMAC-SHA256 (hex) of a manifest's canonical bytes under HKDF(data key, "asyncload-manifest-mac-v1")."""
    return hmac.new(_mac_key(key), bytes(canonical_bytes), hashlib.sha256).hexdigest()


def verify_manifest_mac(key: bytes | bytearray | memoryview, canonical_bytes: bytes, mac: object) -> None:
    """Raise :class:`DecryptionError` unless ``mac`` is :func:`manifest_mac` of the bytes (constant time)."""
    expected = manifest_mac(key, canonical_bytes).encode("ascii")
    given = mac.encode("ascii", "replace").lower() if isinstance(mac, str) else b""
    if not hmac.compare_digest(expected, given):
        raise DecryptionError("manifest MAC does not match: wrong key, or the manifest was altered")
