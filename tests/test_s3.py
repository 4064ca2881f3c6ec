"""The S3 source against a real Ceph RADOS Gateway on 127.0.0.1 (tests/_s3server.py).

Round trips through save and pack, manifests stored in a bucket, stores mixing a local
directory, nginx and a bucket, configuration from the AWS conventions, and failures (wrong
credentials, missing bucket or object, a gateway that answers 503, breaks bodies off or
stalls, through a fault-injecting proxy) that must end in the exception tree, quickly,
without a secret in the message.
"""

from __future__ import annotations

import json
import pathlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import obstore
import pytest
from _s3proxy import FaultProxy
from _s3server import SECRET_KEY, S3Server, s3_env_fixture, s3_server_fixture  # noqa: F401 - fixtures
from _servers import Nginx, nginx_fixture  # noqa: F401 - fixture `nginx`
from _stores import KiB, MiB, assert_same, make_tensors, save_store

import asyncload
from asyncload import AsyncloadError, BlockNotFoundError, SourceUnavailableError
from asyncload.sources._open import source_for
from asyncload.sources._s3 import S3Options, S3Source, parse_s3_location
from asyncload.sources._s3config import resolve
from asyncload.testing import SourceConformance

BUDGET = 256 * KiB


# Reads run through asyncload's own signed GETs (direct_reads, the default) or through obstore.
READ_PATHS = pytest.mark.parametrize("direct", [True, False], ids=["direct", "client"])


async def load_all(target: str | pathlib.Path, **kw: Any) -> dict[str, np.ndarray]:
    async with asyncload.open(target, budget=BUDGET, **kw) as model:
        arrays = await model.load()
        st = model.statistics()
        assert st.slots_in_use == 0 and st.reads_in_flight == 0
    return arrays


def assert_all_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, arr in got.items():
        assert_same(name, arr, want)


def assert_no_secret(exc: BaseException) -> None:
    """Neither the message, the notes, nor any chained or grouped exception shows the secret."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.append(e)
        text = " ".join([str(e), repr(e), *getattr(e, "__notes__", [])])
        assert SECRET_KEY not in text, f"secret in {type(e).__name__}: {text}"
        assert "Signature=" not in text and "Authorization" not in text, text
        todo += [x for x in (e.__cause__, e.__context__) if x is not None]
        todo += list(getattr(e, "exceptions", ()))


def leaf(exc: BaseException, kind: type[BaseException]) -> BaseException:
    """The first ``kind`` inside ``exc`` (itself, or in an exception group)."""
    if isinstance(exc, kind):
        return exc
    for e in getattr(exc, "exceptions", ()):
        found = leaf(e, kind)
        if found is not None:
            return found
    raise AssertionError(f"no {kind.__name__} in {exc!r}")


def objects(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    store = server.store(bucket)
    return sorted(m["path"] for batch in obstore.list(store, prefix or None) for m in batch)


# --------------------------------------------------------------------------- the source itself


@READ_PATHS
@pytest.mark.anyio
async def test_ranged_reads_sizes_writes_and_deletes(s3_server: S3Server, direct: bool) -> None:
    bucket = s3_server.bucket()
    src = S3Source("s3", f"s3://{bucket}/pre/fix", options=s3_server.options(direct_reads=direct))
    data = np.random.default_rng(1).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    await src.write("a/obj", memoryview(data))
    assert objects(s3_server, bucket) == ["pre/fix/a/obj"]
    assert await src.size("a/obj") == len(data)
    assert await src.exists("a/obj") and not await src.exists("a/none")
    for offset, length in [(0, 100_000), (0, 1), (99_999, 1), (4096, 8192), (90_000, 20_000), (100_000, 10)]:
        buf = bytearray(b"\xee" * length)
        n = await src.read_into("a/obj", offset, memoryview(buf))
        want = data[offset : offset + length]
        assert n == len(want) and bytes(buf[:n]) == want, (offset, length)
        assert bytes(buf[n:]) == b"\xee" * (length - n), "bytes past the end were touched"
    assert await src.read_into("a/obj", 200_000, memoryview(bytearray(5))) == 0
    assert await src.read_into("a/obj", 0, memoryview(bytearray(0))) == 0
    await src.write("empty", memoryview(b""))
    assert await src.size("empty") == 0
    assert await src.read_into("empty", 0, memoryview(bytearray(4))) == 0
    await src.delete("a/obj")
    await src.delete("a/obj")  # deleting twice is fine
    assert not await src.exists("a/obj")
    st = src.statistics()
    assert st.in_flight == 0 and st.errors == 0 and st.writes == 2 and st.bytes_written == len(data)
    # The path under test is the one that read: asyncload's own signed GETs, or the client.
    assert (src._direct is not None and src._direct.statistics().bytes_read > 0) == direct
    await src.aclose()


@pytest.mark.anyio
async def test_multipart_upload_above_the_threshold(s3_server: S3Server) -> None:
    bucket = s3_server.bucket()
    opts = s3_server.options(multipart_threshold=5 * MiB, part_size=5 * MiB, multipart_concurrency=2)
    src = S3Source("s3", f"s3://{bucket}/mp", options=opts)
    data = np.random.default_rng(2).integers(0, 256, 12 * MiB + 123, dtype=np.uint8).tobytes()
    await src.write("big", memoryview(data))
    meta = await obstore.head_async(s3_server.store(bucket), "mp/big")
    assert str(meta["e_tag"]).rstrip('"').endswith("-3"), meta  # an ETag "<md5>-N" marks N parts
    buf = bytearray(len(data))
    assert await src.read_into("big", 0, memoryview(buf)) == len(data) and bytes(buf) == data
    await src.write("small", memoryview(data[: 1 * MiB]))
    meta = await obstore.head_async(s3_server.store(bucket), "mp/small")
    assert "-" not in str(meta["e_tag"]), meta  # one PUT


@READ_PATHS
@pytest.mark.anyio
async def test_concurrent_reads_land_in_their_own_buffers(s3_server: S3Server, direct: bool) -> None:
    bucket = s3_server.bucket()
    src = S3Source("s3", f"s3://{bucket}", options=s3_server.options(max_connections=3, direct_reads=direct))
    blobs = {f"k{i}": bytes([i]) * (300 * KiB + i) for i in range(12)}
    async with anyio.create_task_group() as tg:
        for k, v in blobs.items():
            tg.start_soon(src.write, k, memoryview(v))
    bufs = {k: bytearray(len(v)) for k, v in blobs.items()}

    async def read(k: str) -> None:
        assert await src.read_into(k, 0, memoryview(bufs[k])) == len(blobs[k])

    async with anyio.create_task_group() as tg:
        for k in blobs:
            tg.start_soon(read, k)
    assert all(bytes(bufs[k]) == v for k, v in blobs.items())
    assert src.statistics().in_flight == 0


@READ_PATHS
@pytest.mark.anyio
async def test_missing_object_and_bucket_name_what_is_missing(s3_server: S3Server, direct: bool) -> None:
    bucket = s3_server.bucket()
    src = S3Source("s3", f"s3://{bucket}/p", options=s3_server.options(direct_reads=direct))
    with pytest.raises(BlockNotFoundError, match=rf"'s3'.*s3://{bucket}/p/nope.*no object 'p/nope'"):
        await src.read_into("nope", 0, memoryview(bytearray(10)))
    with pytest.raises(BlockNotFoundError, match=rf"'s3'.*HEAD s3://{bucket}/p/nope"):
        await src.size("nope")
    gone = S3Source("s3x", "s3://no-such-bucket-zz/p", options=s3_server.options(direct_reads=direct))
    for call in (
        lambda: gone.read_into("k", 0, memoryview(bytearray(4))),
        lambda: gone.write("k", memoryview(b"abc")),
    ):
        with anyio.fail_after(20), pytest.raises(BlockNotFoundError) as info:
            await call()
        assert "bucket 'no-such-bucket-zz' does not exist" in str(info.value)
        assert "'s3x'" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert src.statistics().in_flight == 0 and gone.statistics().in_flight == 0


@READ_PATHS
@pytest.mark.anyio
async def test_wrong_credentials_are_refused_without_the_secret(s3_server: S3Server, direct: bool) -> None:
    bucket = s3_server.bucket()
    good = S3Source("s3", f"s3://{bucket}/p", options=s3_server.options(direct_reads=direct))
    await good.write("k", memoryview(b"payload"))
    cases = {
        "SignatureDoesNotMatch": s3_server.options(
            secret_access_key=SECRET_KEY + "-wrong", direct_reads=direct
        ),
        "InvalidAccessKeyId": s3_server.options(access_key_id="no-such-access-key", direct_reads=direct),
    }
    for code, opts in cases.items():
        bad = S3Source("s3bad", f"s3://{bucket}/p", options=opts)
        buf = bytearray(b"\0" * 7)
        with anyio.fail_after(20), pytest.raises(SourceUnavailableError) as info:
            await bad.read_into("k", 0, memoryview(buf))
        msg = str(info.value)
        assert "'s3bad'" in msg and f"s3://{bucket}/p/k" in msg and code in msg and "403" in msg
        assert_no_secret(info.value)
        assert opts.secret_access_key is not None and opts.secret_access_key not in msg
        assert buf == bytearray(7), "bytes landed from a refused read"
        with pytest.raises(SourceUnavailableError) as info:
            await bad.write("k2", memoryview(b"x"))
        assert_no_secret(info.value)
        st = bad.statistics()
        assert st.in_flight == 0 and st.errors == 2 and st.bytes_read == 0
    assert SECRET_KEY not in repr(good) + repr(good.options) + repr(good.settings)


def test_where_direct_reads_go_and_when_the_client_reads_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    keys = {"access_key_id": "AK", "secret_access_key": SECRET_KEY}

    def direct(location: str, **kw: Any) -> str | None:
        src = S3Source("s", location, options=S3Options(**kw))
        return None if src._direct is None else src._direct.location

    # Path style on other endpoints (the bucket is the first path segment), quoted as S3 wants.
    assert direct("s3://models/p", endpoint="http://127.0.0.1:8000", **keys) == "http://127.0.0.1:8000/models"
    assert (
        direct("s3://m", endpoint="https://minio.example:9000/base/", **keys)
        == "https://minio.example:9000/base/m"
    )
    # AWS: virtual-hosted style in the region's endpoint.
    assert direct("s3://models/p", region="eu-west-1", **keys) == "https://models.s3.eu-west-1.amazonaws.com"
    # A dotted bucket would not match the certificate in virtual-hosted style: the client reads.
    assert direct("s3://my.models/p", region="eu-west-1", **keys) is None
    # No static keys against AWS: the client's credential chain (instance metadata, SSO) reads.
    assert direct("s3://models/p", region="eu-west-1") is None
    # Another endpoint without keys: unsigned requests, which the direct path also sends.
    assert direct("s3://public/p", endpoint="http://127.0.0.1:8000") == "http://127.0.0.1:8000/public"
    assert direct("s3://models/p", endpoint="http://127.0.0.1:8000", direct_reads=False, **keys) is None


@pytest.mark.anyio
async def test_a_direct_read_refused_is_asked_again_through_the_client_for_its_code(
    s3_server: S3Server,
) -> None:
    """The direct GET's 403 carries no parsed S3 code; one GET through the client names it."""
    bucket = s3_server.bucket()
    await obstore.put_async(s3_server.store(bucket), "p/k", b"payload")
    async with FaultProxy(s3_server.port, mode="pass") as proxy:
        opts = s3_server.options(endpoint=proxy.endpoint, secret_access_key=SECRET_KEY + "-wrong")
        bad = S3Source("s3bad", f"s3://{bucket}/p", options=opts)
        with anyio.fail_after(20), pytest.raises(SourceUnavailableError, match="SignatureDoesNotMatch"):
            await bad.read_into("k", 0, memoryview(bytearray(7)))
        assert [m for m, _ in proxy.requests] == ["GET", "GET"]
        proxy.requests.clear()
        good = S3Source("s3", f"s3://{bucket}/p", options=s3_server.options(endpoint=proxy.endpoint))
        buf = bytearray(7)
        assert await good.read_into("k", 0, memoryview(buf)) == 7 and bytes(buf) == b"payload"
        assert [m for m, _ in proxy.requests] == ["GET"]  # one request, no second opinion
        await good.aclose()
        await bad.aclose()


def test_plain_http_only_on_loopback_unless_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASYNCLOAD_S3_ALLOW_HTTP", raising=False)
    kw: dict[str, Any] = {"access_key_id": "a", "secret_access_key": "s"}
    # Constructing a source makes no request: nothing here leaves the machine.
    for ok in ("http://127.0.0.1:9000", "http://localhost:9000", "http://[::1]:9000", "https://s3.example"):
        src = S3Source("x", "s3://b", options=S3Options(endpoint=ok, **kw))
        assert src.bucket == "b"
        # Over TLS the body is not hashed into the signature (as botocore); over plain http it is.
        unsigned = str(src._store.config.get("unsigned_payload")).lower() == "true"
        assert unsigned == ok.startswith("https:"), ok
    with pytest.raises(SourceUnavailableError, match="plain http on a non-loopback address"):
        S3Source("x", "s3://b", options=S3Options(endpoint="http://minio.example:9000", **kw))
    with pytest.raises(SourceUnavailableError, match="plain http") as info:
        S3Source("x", "s3://b", options=S3Options(endpoint="http://user:pw@10.1.2.3:9000", **kw))
    assert "pw" not in str(info.value)
    S3Source("x", "s3://b", options=S3Options(endpoint="http://10.1.2.3:9000", allow_http=True, **kw))
    monkeypatch.setenv("ASYNCLOAD_S3_ALLOW_HTTP", "1")
    S3Source("x", "s3://b", options=S3Options(endpoint="http://10.1.2.3:9000", **kw))


def test_locations_and_keys() -> None:
    assert parse_s3_location("s3://bkt") == ("bkt", "")
    assert parse_s3_location("s3://bkt/a/b/") == ("bkt", "a/b")
    for bad in ("s3://", "s3:///x", "s3://b/a//c", "s3://b/../c", "http://b/c"):
        with pytest.raises(BlockNotFoundError):
            parse_s3_location(bad)
    src = S3Source(
        "x",
        "s3://b/p",
        options=S3Options(endpoint="http://127.0.0.1:1", access_key_id="a", secret_access_key="s"),
    )
    assert src._path("k/d000001") == "p/k/d000001"
    for bad in ("", "/abs", "a/../b", "a//b", "."):
        with pytest.raises(BlockNotFoundError, match="not a safe relative path"):
            src._path(bad)


# --------------------------------------------------------------------------- configuration


@pytest.fixture
def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    from _s3server import AWS_VARS

    for var in AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    yield tmp_path


def test_settings_follow_the_aws_conventions(
    clean_aws_env: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_aws_env / "credentials").write_text(
        "[default]\naws_access_key_id = AKDEF\naws_secret_access_key = SKDEF\n"
        "[team]\naws_access_key_id = AKTEAM\naws_secret_access_key = SKTEAM\naws_session_token = TOK\n"
    )
    (clean_aws_env / "config").write_text(
        "[default]\nregion = eu-west-1\n[profile team]\nregion = ap-south-1\n"
        "endpoint_url = https://team.example\n[profile sso]\nsso_start_url = https://sso.example\n"
    )
    s = resolve(S3Options())
    assert (s.access_key_id, s.region, s.endpoint, s.credentials_from) == (
        "AKDEF",
        "eu-west-1",
        None,
        "profile default",
    )
    assert s.virtual_hosted_style  # AWS itself: bucket.s3.region.amazonaws.com
    monkeypatch.setenv("AWS_PROFILE", "team")
    s = resolve(S3Options())
    assert (s.access_key_id, s.session_token, s.region, s.endpoint) == (
        "AKTEAM",
        "TOK",
        "ap-south-1",
        "https://team.example",
    )
    assert not s.virtual_hosted_style
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SKENV")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ignored-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://general.example")
    s = resolve(S3Options())
    assert (s.access_key_id, s.credentials_from, s.region, s.endpoint) == (
        "AKENV",
        "environment",
        "us-west-2",
        "https://general.example",
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3only.example/")
    assert resolve(S3Options()).endpoint == "https://s3only.example"
    s = resolve(S3Options(profile="team"))  # an explicit profile wins over the environment's keys
    assert (s.access_key_id, s.credentials_from) == ("AKTEAM", "profile team")
    s = resolve(S3Options(access_key_id="AKOPT", secret_access_key="SKOPT", region="sa-east-1"))
    assert (s.access_key_id, s.credentials_from, s.region) == ("AKOPT", "options", "sa-east-1")
    assert "SKOPT" not in repr(s) and "SKOPT" not in repr(S3Options(secret_access_key="SKOPT"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_PROFILE", "sso")
    assert resolve(S3Options()).credentials_from == "boto3 profile sso"
    with pytest.raises(SourceUnavailableError, match="profile 'nobody' not found"):
        resolve(S3Options(profile="nobody"))
    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(clean_aws_env / "none"))
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s = resolve(S3Options())  # nothing anywhere, another endpoint: unsigned requests
    assert s.credentials_from == "none" and s.access_key_id is None
    with pytest.raises(ValueError, match="part_size"):
        S3Options(part_size=1 * MiB)


@pytest.mark.anyio
async def test_a_profile_reaches_the_gateway(
    s3_server: S3Server, clean_aws_env: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (clean_aws_env / "credentials").write_text(
        f"[rgw]\naws_access_key_id = {s3_server.access_key}\naws_secret_access_key = {s3_server.secret_key}\n"
    )
    (clean_aws_env / "config").write_text(f"[profile rgw]\nendpoint_url = {s3_server.endpoint}\n")
    monkeypatch.setenv("AWS_PROFILE", "rgw")
    bucket = s3_server.bucket()
    src = source_for("p", f"s3://{bucket}/x")
    assert isinstance(src, S3Source) and src.settings.credentials_from == "profile rgw"
    await src.write("k", memoryview(b"hello"))
    buf = bytearray(5)
    assert await src.read_into("k", 0, memoryview(buf)) == 5 and buf == b"hello"


# --------------------------------------------------------------------------- round trips


@pytest.mark.anyio
@pytest.mark.parametrize("manifest_on_s3", [False, True], ids=["local-manifest", "s3-manifest"])
async def test_save_to_s3_and_load(s3_env: S3Server, tmp_path: pathlib.Path, manifest_on_s3: bool) -> None:
    tensors = make_tensors(30, seed=11)
    bucket = s3_env.bucket()
    path = f"s3://{bucket}/run/m.asyncload.json" if manifest_on_s3 else tmp_path / "m.asyncload.json"
    saved = await asyncload.save(
        tensors,
        path,
        sources=[f"s3://{bucket}/run/d0", f"s3://{bucket}/run/d1"],
        block_size=4 * KiB,
        budget=BUDGET,
    )
    keys = objects(s3_env, bucket)
    assert any(k.startswith("run/d0/") for k in keys) and any(k.startswith("run/d1/") for k in keys)
    if manifest_on_s3:
        assert saved == path and "run/m.asyncload.json" in keys
        raw = await obstore.get_async(s3_env.store(bucket), "run/m.asyncload.json")
        doc = json.loads(bytes(await raw.bytes_async()))
        assert [s["location"] for s in doc["sources"]] == ["d0", "d1"]  # relative: the tree can move
    assert_all_same(await load_all(saved), tensors)


@pytest.mark.anyio
async def test_pack_to_s3_then_unpack_is_byte_identical(s3_env: S3Server, tmp_path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    tensors = make_tensors(40, seed=12, max_bytes=40 * KiB)
    src = tmp_path / "model.safetensors"
    save_file(tensors, str(src))
    bucket = s3_env.bucket()
    url = f"s3://{bucket}/packed/model.asyncload.json"
    await asyncload.pack(
        src, [f"s3://{bucket}/packed/a", f"s3://{bucket}/packed/b"], url, block_size=8 * KiB, budget=BUDGET
    )
    assert_all_same(await load_all(url), tensors)
    out = tmp_path / "restored.safetensors"
    await asyncload.unpack(url, out, budget=BUDGET)
    assert out.read_bytes() == src.read_bytes()


@pytest.mark.anyio
async def test_local_tree_copied_to_a_bucket_loads_from_its_url(
    s3_env: S3Server, tmp_path: pathlib.Path
) -> None:
    tensors = make_tensors(25, seed=13)
    path = await save_store(tmp_path / "store", tensors, k=3)
    bucket = s3_env.bucket()
    store = s3_env.store(bucket)
    for f in sorted((tmp_path / "store").rglob("*")):
        if f.is_file():
            await obstore.put_async(
                store, f"copy/{f.relative_to(tmp_path / 'store').as_posix()}", f.read_bytes()
            )
    assert_all_same(await load_all(f"s3://{bucket}/copy/{path.name}"), tensors)


@pytest.mark.anyio
async def test_mixed_local_and_s3_store(s3_env: S3Server, tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(40, seed=14)
    bucket = s3_env.bucket()
    locs = [str(tmp_path / "disk"), f"s3://{bucket}/mixed"]
    path = await asyncload.save(
        tensors, tmp_path / "m.asyncload.json", sources=locs, block_size=4 * KiB, budget=BUDGET
    )
    async with asyncload.open(path, budget=BUDGET) as model:
        got = await model.load()
        st = model.statistics()
    assert_all_same(got, tensors)
    assert st.sources["s0"].bytes_read > 0 and st.sources["s1"].bytes_read > 0, st.sources


@pytest.mark.anyio
async def test_mixed_local_nginx_and_s3_store(s3_env: S3Server, nginx: Nginx, tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(40, seed=15)
    bucket = s3_env.bucket()
    locs = [str(tmp_path / "disk"), f"{nginx.url}/s3mix-{uuid.uuid4().hex[:8]}/x", f"s3://{bucket}/mixed"]
    url = f"s3://{bucket}/m.asyncload.json"
    await asyncload.save(tensors, url, sources=locs, block_size=4 * KiB, budget=BUDGET)
    async with asyncload.open(url, budget=BUDGET) as model:
        got = await model.load()
        st = model.statistics()
    assert_all_same(got, tensors)
    assert all(st.sources[f"s{i}"].bytes_read > 0 for i in range(3)), st.sources


# --------------------------------------------------------------------------- failures through the loader


async def _saved_on_s3(server: S3Server, tmp_path: pathlib.Path) -> tuple[str, str, dict[str, np.ndarray]]:
    tensors = make_tensors(12, seed=16)
    bucket = server.bucket()
    url = f"s3://{bucket}/m.asyncload.json"
    await asyncload.save(
        tensors, url, sources=[f"s3://{bucket}/d0", f"s3://{bucket}/d1"], block_size=4 * KiB, budget=BUDGET
    )
    return bucket, url, tensors


@pytest.mark.anyio
async def test_load_with_wrong_credentials_fails_cleanly(
    s3_env: S3Server, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, url, _ = await _saved_on_s3(s3_env, tmp_path)
    local = tmp_path / "m.asyncload.json"
    local.write_bytes(bytes(obstore.get(s3_env.store(bucket), "m.asyncload.json").bytes()))
    repoint = {"s0": f"s3://{bucket}/d0", "s1": f"s3://{bucket}/d1"}  # the local copy's blocks stay in S3
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY + "x")
    # The manifest on S3 cannot even be read.
    with anyio.fail_after(30), pytest.raises(SourceUnavailableError) as info:
        await load_all(url)
    assert "SignatureDoesNotMatch" in str(info.value) and "m.asyncload.json" in str(info.value)
    assert_no_secret(info.value)
    # A local manifest whose blocks are in the bucket: the first block read fails.
    model = asyncload.open(local, budget=BUDGET, sources=repoint)
    async with model as m:
        with anyio.fail_after(30), pytest.raises(AsyncloadError) as info2:
            await m.load()
        st = m.statistics()
        assert st.slots_in_use == 0 and st.reads_in_flight == 0 and st.bytes_in_flight == 0
        assert all(s.in_flight == 0 for s in st.sources.values())
    err = leaf(info2.value, SourceUnavailableError)
    assert "SignatureDoesNotMatch" in str(err) and bucket in str(err)
    assert_no_secret(info2.value)


@pytest.mark.anyio
async def test_missing_bucket_and_object_through_the_loader(s3_env: S3Server, tmp_path: pathlib.Path) -> None:
    bucket, url, tensors = await _saved_on_s3(s3_env, tmp_path)
    with anyio.fail_after(30), pytest.raises(BlockNotFoundError, match="does not exist"):
        await load_all(url, sources={"s0": "s3://no-such-bucket-qq/d0"})
    victim = next(k for k in objects(s3_env, bucket, "d1") if "/" in k)
    await obstore.delete_async(s3_env.store(bucket), victim)
    async with asyncload.open(url, budget=BUDGET) as m:
        with anyio.fail_after(30), pytest.raises(AsyncloadError) as info:
            await m.load()
        st = m.statistics()
        assert st.slots_in_use == 0 and st.reads_in_flight == 0
    err = leaf(info.value, BlockNotFoundError)
    assert victim in str(err) and bucket in str(err) and "'s1'" in str(err)
    with pytest.raises(BlockNotFoundError, match=r"nothing\.asyncload\.json"):
        await load_all(f"s3://{bucket}/nothing.asyncload.json")
    # What the missing block does not touch still loads, exactly.
    async with asyncload.open(url, budget=BUDGET) as m:
        names = [n for n in tensors if m.tensors[n].nbytes == 0][:1]
        if names:
            assert_all_same(await m.load(names), {n: tensors[n] for n in names})


# --------------------------------------------------------------------------- faults on the wire


@READ_PATHS
@pytest.mark.anyio
async def test_503_slowdown_on_every_first_attempt_still_reads_exactly(
    s3_server: S3Server, direct: bool
) -> None:
    bucket = s3_server.bucket()
    data = np.random.default_rng(3).integers(0, 256, 3 * MiB, dtype=np.uint8).tobytes()
    await obstore.put_async(s3_server.store(bucket), "p/obj", data)
    async with FaultProxy(s3_server.port, mode="503-first") as proxy:
        src = S3Source(
            "s3", f"s3://{bucket}/p", options=s3_server.options(endpoint=proxy.endpoint, direct_reads=direct)
        )
        buf = bytearray(len(data))
        with anyio.fail_after(30):
            assert await src.read_into("obj", 0, memoryview(buf)) == len(data)
            assert await src.size("obj") == len(data)
            await src.write("new", memoryview(data[:1000]))
        assert bytes(buf) == data
        assert proxy.faults >= 3, "the proxy did not inject the 503s"
    assert src.statistics().errors == 0


@READ_PATHS
@pytest.mark.anyio
async def test_body_broken_off_is_resumed_exactly(s3_server: S3Server, direct: bool) -> None:
    bucket = s3_server.bucket()
    data = np.random.default_rng(4).integers(0, 256, 4 * MiB, dtype=np.uint8).tobytes()
    await obstore.put_async(s3_server.store(bucket), "obj", data)
    async with FaultProxy(s3_server.port, mode="cut-first") as proxy:
        src = S3Source(
            "s3", f"s3://{bucket}", options=s3_server.options(endpoint=proxy.endpoint, direct_reads=direct)
        )
        buf = bytearray(len(data) - 100)
        with anyio.fail_after(30):
            assert await src.read_into("obj", 100, memoryview(buf)) == len(buf)
        assert bytes(buf) == data[100:]
        assert proxy.faults >= 1


@pytest.mark.anyio
async def test_a_missing_object_costs_one_head_once_the_bucket_is_known(s3_server: S3Server) -> None:
    """The writer HEADs every block before writing it: a 404 must not cost a second request."""
    bucket = s3_server.bucket()
    async with FaultProxy(s3_server.port, mode="pass") as proxy:
        src = S3Source("s3", f"s3://{bucket}/p", options=s3_server.options(endpoint=proxy.endpoint))
        with pytest.raises(BlockNotFoundError, match="no object 'p/a' in bucket"):
            await src.size("a")  # nothing known yet: HEAD, then a 1-byte GET for the S3 code
        assert [m for m, _ in proxy.requests] == ["HEAD", "GET"]
        proxy.requests.clear()
        with pytest.raises(BlockNotFoundError, match="no object 'p/b' in bucket"):
            await src.size("b")
        assert [m for m, _ in proxy.requests] == ["HEAD"]
        gone = S3Source("s3x", "s3://no-such-bucket-hd/p", options=s3_server.options(endpoint=proxy.endpoint))
        with pytest.raises(BlockNotFoundError, match="bucket 'no-such-bucket-hd' does not exist"):
            await gone.size("a")


@READ_PATHS
@pytest.mark.anyio
async def test_stalled_gateway_times_out_within_the_stall_timeout(s3_server: S3Server, direct: bool) -> None:
    bucket = s3_server.bucket()
    await obstore.put_async(s3_server.store(bucket), "obj", b"z" * (2 * MiB))
    async with FaultProxy(s3_server.port, mode="stall") as proxy:
        opts = s3_server.options(
            endpoint=proxy.endpoint, stall_timeout=0.5, max_retries=1, retry_timeout=5, direct_reads=direct
        )
        src = S3Source("s3", f"s3://{bucket}", options=opts)
        buf = bytearray(2 * MiB)
        with anyio.fail_after(15), pytest.raises(SourceUnavailableError) as info:
            await src.read_into("obj", 0, memoryview(buf))
        assert "obj" in str(info.value) and "'s3'" in str(info.value)
        assert_no_secret(info.value)
        assert src.statistics().in_flight == 0 and src.statistics().errors == 1
        proxy.release()


@READ_PATHS
@pytest.mark.anyio
async def test_a_cancelled_read_and_write_leave_nothing_behind(s3_server: S3Server, direct: bool) -> None:
    bucket = s3_server.bucket()
    data = np.random.default_rng(5).integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
    await obstore.put_async(s3_server.store(bucket), "obj", data)
    async with FaultProxy(s3_server.port, mode="stall") as proxy:
        src = S3Source(
            "s3", f"s3://{bucket}", options=s3_server.options(endpoint=proxy.endpoint, direct_reads=direct)
        )
        buf = bytearray(len(data))
        with anyio.move_on_after(1.0) as scope:  # the body stalls after 64 KiB: only a cancel ends it
            await src.read_into("obj", 0, memoryview(buf))
        assert scope.cancelled_caught
        st = src.statistics()
        assert st.in_flight == 0 and st.errors == 0 and st.reads == 0, st
        proxy.release()
    # A write cancelled while its PUT is on the wire finishes the PUT first (the client reads the
    # buffer in place), so the object is whole and the buffer was never touched by a reuse.
    src = S3Source("s3", f"s3://{bucket}", options=s3_server.options(direct_reads=direct))
    payload = bytearray(data)
    async with anyio.create_task_group() as tg:
        tg.start_soon(src.write, "w", memoryview(payload))
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    assert src.statistics().in_flight == 0
    if await src.exists("w"):
        got = bytearray(len(data))
        assert await src.read_into("w", 0, memoryview(got)) == len(data) and bytes(got) == data


@READ_PATHS
@pytest.mark.anyio
async def test_unreachable_endpoint_fails_within_the_timeouts(direct: bool) -> None:
    from _s3server import _free_port

    port = _free_port()  # nothing listens there
    opts = S3Options(
        endpoint=f"http://127.0.0.1:{port}",
        access_key_id="a",
        secret_access_key=SECRET_KEY,
        connect_timeout=1,
        max_retries=1,
        retry_timeout=3,
        direct_reads=direct,
    )
    src = S3Source("s3", "s3://bkt/p", options=opts)
    with anyio.fail_after(15), pytest.raises(SourceUnavailableError) as info:
        await src.read_into("k", 0, memoryview(bytearray(4)))
    assert "'s3'" in str(info.value) and "s3://bkt/p/k" in str(info.value)
    assert_no_secret(info.value)


def test_a_script_that_exits_right_after_a_failed_put_exits_cleanly(s3_server: S3Server) -> None:
    """obstore finishes each call on its own thread; exiting right after one used to abort (134)."""
    import subprocess
    import sys

    script = (
        "import anyio, sys\n"
        "from asyncload.sources import S3Options, S3Source\n"
        f"o = S3Options(endpoint={s3_server.endpoint!r}, access_key_id={s3_server.access_key!r},\n"
        "               secret_access_key=sys.argv[1])\n"
        "async def main():\n"
        "    try:\n"
        "        src = S3Source('s', 's3://no-such-bucket-exit/p', options=o)\n"
        "        await src.write('k', memoryview(b'x' * 100))\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__)\n"
        "anyio.run(main)\n"
    )
    codes = []
    for _ in range(8):
        p = subprocess.run(
            [sys.executable, "-c", script, s3_server.secret_key], capture_output=True, text=True, timeout=60
        )
        assert p.stdout.strip() == "BlockNotFoundError", p.stdout + p.stderr
        codes.append(p.returncode)
    assert codes == [0] * 8, codes


# --------------------------------------------------------------------------- the conformance suite


class TestS3Conformance(SourceConformance):
    """The suite every source passes, against the real gateway (one bucket per test)."""

    unreachable_within = 15.0

    @pytest.fixture
    async def source(self, s3_server: S3Server) -> AsyncIterator[S3Source]:
        src = S3Source("s3", f"s3://{s3_server.bucket('conf')}/p", options=s3_server.options())
        yield src
        await src.aclose()

    @pytest.fixture
    def unreachable_source(self) -> S3Source:
        from _s3server import _free_port

        opts = S3Options(
            endpoint=f"http://127.0.0.1:{_free_port()}",  # nothing listens there
            access_key_id="a",
            secret_access_key=SECRET_KEY,
            connect_timeout=1,
            max_retries=1,
            retry_timeout=3,
        )
        return S3Source("gone", "s3://bkt/p", options=opts)


def test_cli_pack_to_disk_and_s3_then_load_and_unpack_by_url(
    s3_env: S3Server, tmp_path: pathlib.Path
) -> None:
    import subprocess
    import sys

    from safetensors.numpy import save_file

    tensors = make_tensors(30, seed=17, max_bytes=40 * KiB)
    src = tmp_path / "model.safetensors"
    save_file(tensors, str(src))
    bucket = s3_env.bucket()
    url = f"s3://{bucket}/cli/model.asyncload.json"

    def cli(*args: str) -> str:
        p = subprocess.run(  # the environment s3_env set up is inherited
            [sys.executable, "-m", "asyncload", "--backend", "asyncio", "-q", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout}\n{p.stderr}"
        assert SECRET_KEY not in p.stdout + p.stderr
        return p.stdout

    cli(
        "pack",
        str(src),
        "--to",
        str(tmp_path / "disk"),
        f"s3://{bucket}/cli/d1",
        "-o",
        url,
        "--block-size",
        "8KiB",
    )
    result = json.loads(cli("load", url, "--json", "--budget", "256KiB"))
    assert result["bytes"] == sum(t.nbytes for t in tensors.values())
    assert all(v > 0 for v in result["bytes_read_per_source"].values()), result
    cli("unpack", url, "-o", str(tmp_path / "restored.safetensors"))
    assert (tmp_path / "restored.safetensors").read_bytes() == src.read_bytes()
