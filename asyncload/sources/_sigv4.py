"""AWS Signature Version 4 for the S3 source's own ranged GETs (header-based, unsigned payload).

Only what a GET or HEAD without a body needs: the canonical request over the
request target as sent, ``host``, ``range`` and every ``x-amz-*`` header; the
payload hash is that of the empty body (what botocore sends for a GET, and
what every S3 implementation accepts; ``UNSIGNED-PAYLOAD`` can be asked for). The derived signing key is
cached per day. Nothing here formats a secret; the ``Authorization`` header
carries only the access key id, the scope and the signature, as AWS specifies.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

__all__ = ["EMPTY_PAYLOAD", "UNSIGNED_PAYLOAD", "Signer"]

UNSIGNED_PAYLOAD = b"UNSIGNED-PAYLOAD"
EMPTY_PAYLOAD = hashlib.sha256(b"").hexdigest().encode()
_ALGORITHM = "AWS4-HMAC-SHA256"
_SIGNED = (b"host", b"range", b"content-md5", b"content-type")  # besides every x-amz-* header


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


@dataclass(slots=True)
class Signer:
    """Signs requests for one set of credentials, region and service."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str
    session_token: str | None = field(default=None, repr=False)
    service: str = "s3"
    _keys: dict[str, bytes] = field(default_factory=dict, repr=False)

    def _key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            k = _hmac(f"AWS4{self.secret_access_key}".encode(), day)
            for part in (self.region, self.service, "aws4_request"):
                k = _hmac(k, part)
            self._keys = {day: k}  # one day at a time
            key = k
        return key

    def sign(
        self,
        method: bytes,
        target: bytes,
        headers: tuple[tuple[bytes, bytes], ...],
        *,
        payload_hash: bytes = EMPTY_PAYLOAD,
        now: float | None = None,
    ) -> tuple[tuple[bytes, bytes], ...]:
        """``headers`` plus ``x-amz-date``, ``x-amz-content-sha256``, the token and ``authorization``.

        ``target`` is the request target exactly as it goes on the wire (path already
        percent-encoded, then ``?query``); ``headers`` must include ``host``.
        """
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
        day = stamp[:8]
        out = [
            (k, v) for k, v in headers if k not in (b"authorization", b"x-amz-date", b"x-amz-content-sha256")
        ]
        out.append((b"x-amz-date", stamp.encode()))
        out.append((b"x-amz-content-sha256", payload_hash))
        if self.session_token:
            out = [(k, v) for k, v in out if k != b"x-amz-security-token"]
            out.append((b"x-amz-security-token", self.session_token.encode()))
        signed: dict[bytes, bytes] = {}
        for k, v in out:
            name = k.lower()
            if name in _SIGNED or name.startswith(b"x-amz-"):
                value = b" ".join(v.strip().split())
                signed[name] = signed[name] + b"," + value if name in signed else value
        names = sorted(signed)
        path, _, query = target.partition(b"?")
        canonical = b"\n".join(
            [
                method.upper(),
                path,
                _canonical_query(query),
                b"".join(n + b":" + signed[n] + b"\n" for n in names),
                b";".join(names),
                payload_hash,
            ]
        )
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = f"{_ALGORITHM}\n{stamp}\n{scope}\n{hashlib.sha256(canonical).hexdigest()}"
        signature = hmac.new(self._key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        auth = (
            f"{_ALGORITHM} Credential={self.access_key_id}/{scope}, "
            f"SignedHeaders={b';'.join(names).decode()}, Signature={signature}"
        )
        out.append((b"authorization", auth.encode()))
        return tuple(out)


def _canonical_query(query: bytes) -> bytes:
    """Parameters sorted by name, each name and value percent-encoded the AWS way."""
    if not query:
        return b""
    pairs = []
    for part in query.split(b"&"):
        if not part:
            continue
        name, _, value = part.partition(b"=")
        pairs.append(
            (
                quote(unquote(name.decode()), safe="-_.~"),
                quote(unquote(value.decode()), safe="-_.~"),
            )
        )
    return "&".join(f"{n}={v}" for n, v in sorted(pairs)).encode()
