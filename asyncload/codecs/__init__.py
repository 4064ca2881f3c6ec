"""Block codecs for redundancy: Reed–Solomon erasure coding of stripes.

See :mod:`asyncload.codecs._erasure` and ``docs/erasure.md`` for the stripe
layout the manifest describes, the backend choice and performance notes.
"""

from __future__ import annotations

from ._erasure import BACKEND, MAX_WIDTH, ErasureCode, StripeError, decode_into, encode_into

__all__ = ["BACKEND", "MAX_WIDTH", "ErasureCode", "StripeError", "decode_into", "encode_into"]
