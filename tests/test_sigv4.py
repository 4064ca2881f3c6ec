"""The S3 source's SigV4 signer (asyncload/sources/_sigv4.py).

Checked three ways: AWS's published example, botocore's signer on generated requests
(property test), and a real gateway that verifies signatures (tests/test_s3.py reads every
block through it).
"""

from __future__ import annotations

import calendar
import time
from urllib.parse import quote

from botocore.auth import S3SigV4Auth  # a test dependency: pyproject's [test] extra
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given
from hypothesis import strategies as st

from asyncload.sources._sigv4 import EMPTY_PAYLOAD, UNSIGNED_PAYLOAD, Signer

AK, SK = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
MAY_24_2013 = calendar.timegm((2013, 5, 24, 0, 0, 0))
EMPTY_SHA256 = b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
assert EMPTY_PAYLOAD == EMPTY_SHA256


def test_the_aws_documentation_example_get_object_with_range() -> None:
    # "Example: GET Object" of the S3 SigV4 header-authentication documentation.
    signer = Signer(AK, SK, "us-east-1")
    headers = signer.sign(
        b"GET",
        b"/test.txt",
        ((b"host", b"examplebucket.s3.amazonaws.com"), (b"range", b"bytes=0-9")),
        payload_hash=EMPTY_SHA256,
        now=MAY_24_2013,
    )
    h = dict(headers)
    assert h[b"x-amz-date"] == b"20130524T000000Z"
    assert h[b"authorization"] == (
        b"AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        b"SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        b"Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_the_secret_never_appears_and_the_token_is_sent_and_signed() -> None:
    signer = Signer(AK, SK, "eu-west-1", session_token="TOKEN/abc=")
    headers = dict(
        signer.sign(b"GET", b"/b/k", ((b"host", b"h"),), payload_hash=UNSIGNED_PAYLOAD, now=MAY_24_2013)
    )
    assert headers[b"x-amz-security-token"] == b"TOKEN/abc="
    assert b"x-amz-security-token" in headers[b"authorization"]
    assert headers[b"x-amz-content-sha256"] == UNSIGNED_PAYLOAD
    assert SK not in repr(signer) and "TOKEN" not in repr(signer)
    assert all(SK.encode() not in v for v in headers.values())


def test_each_signature_depends_on_what_it_covers() -> None:
    signer = Signer(AK, SK, "us-east-1")

    def sig(
        method: bytes = b"GET", target: bytes = b"/b/k", rng: bytes = b"bytes=0-9", now: int = 0
    ) -> bytes:
        hs = ((b"host", b"h:1"), (b"range", rng), (b"user-agent", b"x"))
        return dict(signer.sign(method, target, hs, now=MAY_24_2013 + now))[b"authorization"]

    base = sig()
    assert base == sig()  # deterministic for the same second
    for other in (sig(method=b"HEAD"), sig(target=b"/b/k2"), sig(rng=b"bytes=0-10"), sig(now=1)):
        assert other != base
    # Headers outside the signed set (user-agent) do not change it.
    hs = ((b"host", b"h:1"), (b"range", b"bytes=0-9"), (b"user-agent", b"other"))
    assert dict(signer.sign(b"GET", b"/b/k", hs, now=MAY_24_2013))[b"authorization"] == base


_KEY_CHARS = st.characters(codec="utf-8", exclude_characters="/\0\r\n?#")


@given(
    key=st.lists(st.text(_KEY_CHARS, min_size=1, max_size=12), min_size=1, max_size=4).filter(
        lambda parts: not ({".", ".."} & set(parts))
    ),
    start=st.integers(0, 2**40),
    length=st.integers(1, 2**30),
    region=st.sampled_from(["us-east-1", "eu-central-1", "ap-southeast-2", "default"]),
    token=st.none() | st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
    query=st.sampled_from(["", "versionId=abc", "versionId=x%2By&partNumber=2", "uploads="]),
)
def test_matches_botocore_for_any_key_range_region_and_token(
    key: list[str], start: int, length: int, region: str, token: str | None, query: str
) -> None:
    path = "/bucket/" + quote("/".join(key), safe="/-._~")
    rng = f"bytes={start}-{start + length - 1}"
    target = f"{path}?{query}" if query else path
    req = AWSRequest(method="GET", url=f"https://s3.example:9000{target}", headers={"Range": rng})
    S3SigV4Auth(Credentials(AK, SK, token), "s3", region).add_auth(req)
    # Sign for the second botocore signed in.
    when = calendar.timegm(time.strptime(req.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    ours = Signer(AK, SK, region, session_token=token).sign(
        b"GET", target.encode(), ((b"host", b"s3.example:9000"), (b"range", rng.encode())), now=when
    )
    assert dict(ours)[b"authorization"].decode() == req.headers["Authorization"]
    assert dict(ours)[b"x-amz-content-sha256"].decode() == req.headers["X-Amz-Content-SHA256"]
