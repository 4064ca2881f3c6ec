"""Block codecs for redundancy: Reed-Solomon erasure coding of stripes.

See :mod:`asyncload.codecs._erasure` and ``docs/erasure.md`` for the stripe
layout the manifest describes, the backend choice and performance notes.
"""

from __future__ import annotations

from ._erasure import BACKEND, MAX_WIDTH, ErasureCode, StripeError, decode_into, encode_into

__all__ = ["BACKEND", "MAX_WIDTH", "ErasureCode", "StripeError", "decode_into", "encode_into"]

# Client-side AES-256-GCM block encryption (see asyncload.codecs._aead and docs/encryption.md).
from ._aead import (
    DecryptionError,
    Key,
    KeyFormatError,
    block_aad,
    block_nonce,
    decrypt_into,
    encrypt_into,
    load_key,
    manifest_mac,
    new_data_key,
    resolve_key,
    unwrap_data_key,
    verify_manifest_mac,
    wrap_data_key,
)

__all__ += [
    "DecryptionError",
    "Key",
    "KeyFormatError",
    "block_aad",
    "block_nonce",
    "decrypt_into",
    "encrypt_into",
    "load_key",
    "manifest_mac",
    "new_data_key",
    "resolve_key",
    "unwrap_data_key",
    "verify_manifest_mac",
    "wrap_data_key",
]
