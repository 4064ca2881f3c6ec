"""HTTP sources against real servers on 127.0.0.1: a private nginx, and a misbehaving h11 server.

Round trips through nginx (WebDAV PUT, ranged GETs), a local tree copied under the web root
loading from its manifest URL, stores mixing a local directory and HTTP (with S3 as well:
tests/test_s3.py), and faults on the wire: 404, 403, a connection closed mid-body, a stall,
503 on every first attempt. Each fault must end in an error from the tree, within the
configured timeout, with no wrong bytes, no slot left held and no credential in the message.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import uuid
from typing import Any

import _servers
import anyio
import numpy as np
import pytest
from _servers import Nginx, ObjectServer, nginx_fixture, object_server, self_signed_tls  # noqa: F401 - fixture `nginx`
from _stores import KiB, assert_same, make_tensors, save_store, source_dir, wait_until

import asyncload
from asyncload import BlockNotFoundError, SourceUnavailableError
from asyncload.sources import Source
from asyncload.sources._http import HttpSource

LOAD_BUDGET = 64 * KiB
SECRET = "hunter2-s3cr3t"


def fresh(n: Nginx, what: str) -> str:
    """A new URL prefix on the nginx server (tests share one server; prefixes never collide)."""
    return f"{n.url}/{what}-{uuid.uuid4().hex[:10]}"


def www_path(n: Nginx, url: str) -> pathlib.Path:
    return n.www / url.removeprefix(n.url + "/")


async def load_all(target: str | os.PathLike[str], **kw: Any) -> dict[str, np.ndarray]:
    async with asyncload.open(target, budget=LOAD_BUDGET, **kw) as model:
        arrays = await model.load()
        st = model.statistics()
        assert st.slots_in_use == 0 and st.reads_in_flight == 0
    return arrays


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(pathlib.Path(path).read_bytes())


def relative_dirs(root: pathlib.Path, k: int) -> list[str]:
    """``root/d0 ..`` as paths relative to the current directory: a save records them relative."""
    return [os.path.relpath(root / f"d{i}") for i in range(k)]


async def save_relative_store(root: pathlib.Path, tensors: dict[str, np.ndarray], k: int) -> pathlib.Path:
    """Save into ``root/m.asyncload.json`` over ``root/d0 ..``, given as paths relative to the
    current directory, so the manifest records them relative (as `pack --to` writes them)."""
    dirs = relative_dirs(root, k)
    path = await asyncload.save(
        tensors, root / "m.asyncload.json", sources=dirs, block_size=4 * KiB, budget=LOAD_BUDGET
    )
    return pathlib.Path(path)


def assert_all_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, arr in got.items():
        assert_same(name, arr, want)


# --------------------------------------------------------------------------- nginx round trips


@pytest.mark.anyio
async def test_save_to_http_sources_and_load(nginx: Nginx, tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(30, seed=3)
    base = fresh(nginx, "rt")
    path = await asyncload.save(
        tensors,
        tmp_path / "m.asyncload.json",
        sources=[f"{base}/d0", f"{base}/d1"],
        block_size=4 * KiB,
        budget=LOAD_BUDGET,
    )
    doc = read_json(path)
    assert [s["location"] for s in doc["sources"]] == [f"{base}/d0", f"{base}/d1"]
    assert any(www_path(nginx, f"{base}/d0").rglob("*")), "no block reached the web root"
    assert_all_same(await load_all(path), tensors)


@pytest.mark.anyio
async def test_manifest_at_a_url_round_trip(nginx: Nginx) -> None:
    tensors = make_tensors(20, seed=4)
    base = fresh(nginx, "murl")
    url = f"{base}/m.asyncload.json"
    saved = await asyncload.save(
        tensors, url, sources=[f"{base}/d0", f"{base}/d1"], block_size=4 * KiB, budget=LOAD_BUDGET
    )
    assert saved == url
    doc = read_json(www_path(nginx, url))
    assert [s["location"] for s in doc["sources"]] == ["d0", "d1"]  # relative: the tree can move
    assert_all_same(await load_all(url), tensors)
    # Moved elsewhere on the server, it still loads: sources resolve against the manifest's URL.
    moved = fresh(nginx, "moved")
    shutil.copytree(www_path(nginx, base), www_path(nginx, moved))
    assert_all_same(await load_all(f"{moved}/m.asyncload.json"), tensors)


@pytest.mark.anyio
async def test_local_tree_copied_under_web_root_loads_from_its_url(
    nginx: Nginx, tmp_path: pathlib.Path
) -> None:
    tensors = make_tensors(25, seed=5)
    path = await save_relative_store(tmp_path / "store", tensors, 3)
    assert [s["location"] for s in read_json(path)["sources"]] == ["d0", "d1", "d2"]
    url = fresh(nginx, "copied")
    shutil.copytree(tmp_path / "store", www_path(nginx, url))
    assert_all_same(await load_all(f"{url}/{path.name}"), tensors)


@pytest.mark.anyio
async def test_manifest_url_with_missing_blocks_fails_cleanly(nginx: Nginx, tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(10, seed=6)
    path = await save_relative_store(tmp_path / "store", tensors, 2)
    url = fresh(nginx, "partial")
    shutil.copytree(tmp_path / "store", www_path(nginx, url))
    shutil.rmtree(www_path(nginx, url) / "d1")
    with anyio.fail_after(30), pytest.raises(BlockNotFoundError) as info:
        await load_all(f"{url}/{path.name}")
    assert "'s1'" in str(info.value) and "404" in str(info.value)
    with pytest.raises(BlockNotFoundError):
        await load_all(f"{url}/nothing-here.asyncload.json")


def _mixed_locations(n: Nginx, tmp_path: pathlib.Path) -> list[str]:
    """A local directory and an nginx prefix (with S3 too: tests/test_s3.py, mixed stores)."""
    return [str(tmp_path / "disk"), f"{fresh(n, 'mixed')}/dav/x"]


@pytest.mark.anyio
async def test_mixed_store_save_and_load(nginx: Nginx, tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(40, seed=7)
    locs = _mixed_locations(nginx, tmp_path)
    path = await asyncload.save(
        tensors, tmp_path / "m.asyncload.json", sources=locs, block_size=4 * KiB, budget=LOAD_BUDGET
    )
    async with asyncload.open(path, budget=LOAD_BUDGET) as model:
        got = await model.load()
        st = model.statistics()
    assert_all_same(got, tensors)
    assert all(st.sources[f"s{i}"].bytes_read > 0 for i in range(len(locs))), st.sources


def _safetensors_file(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> pathlib.Path:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))
    return path


def _cli(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [sys.executable, "-m", "asyncload", "--backend", "asyncio", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def test_cli_pack_to_disk_and_http_then_load_by_url(nginx: Nginx, tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(30, seed=8, max_bytes=40 * KiB)
    src = _safetensors_file(tmp_path / "model.safetensors", tensors)
    base = fresh(nginx, "cli")
    murl = f"{base}/m.asyncload.json"
    _cli(
        "pack", str(src), "--to", "./disk", f"{base}/dav/x", "-o", murl, "--block-size", "16KiB", cwd=tmp_path
    )
    doc = json.loads(www_path(nginx, murl).read_bytes())
    assert doc["sources"][0]["location"] == str(tmp_path / "disk")  # local source of a remote manifest
    assert doc["sources"][1]["location"] == "dav/x"
    out = _cli("load", murl, "--json", "--budget", "1MiB", cwd=tmp_path)
    report = json.loads(out.stdout)
    assert report["bytes"] == sum(a.nbytes for a in tensors.values()) or report
    _cli("verify", murl, cwd=tmp_path)
    # And a local manifest over the same mix.
    _cli(
        "pack",
        str(src),
        "--to",
        "./disk2",
        f"{base}/dav/y",
        "-o",
        "m.json",
        "--block-size",
        "16KiB",
        cwd=tmp_path,
    )
    _cli("load", "m.json", cwd=tmp_path)
    restored = tmp_path / "restored.safetensors"
    _cli("unpack", murl, "-o", str(restored), cwd=tmp_path)
    assert restored.read_bytes() == src.read_bytes()


# --------------------------------------------------------------------------- faults on the wire


def _objects_of(path: pathlib.Path, source_id: str) -> dict[str, bytes]:
    root = source_dir(path, source_id)
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def _with_secret(url: str) -> str:
    return url.replace("http://", f"http://reader:{SECRET}@", 1)


async def _failing_load(
    path: pathlib.Path,
    tensors: dict[str, np.ndarray],
    srv: ObjectServer,
    exc: type[BaseException],
    *,
    within: float = 30.0,
    **opts: Any,
) -> BaseException:
    """Stream the store with source s0 on ``srv``; the stream must fail with ``exc``.

    Checks: yielded tensors are exact, no slot or read is left, no secret in the message.
    """

    def wrap(s: Source) -> Source:
        if s.id != "s0":
            return s
        return HttpSource(s.id, _with_secret(srv.url), **opts)

    async with asyncload.open(path, budget=LOAD_BUDGET, sources={"s0": srv.url}, wrap_source=wrap) as model:
        with anyio.fail_after(within), pytest.raises(exc) as info:
            async for name, arr in model.stream():
                assert_same(name, arr, tensors)
        st = model.statistics()
        assert st.slots_in_use == 0 and st.bytes_in_slots == 0
        assert st.reads_in_flight == 0 and st.bytes_in_flight == 0
    msg = str(info.value) + "".join(getattr(info.value, "__notes__", []))
    assert SECRET not in msg and base64.b64encode(f"reader:{SECRET}".encode()).decode() not in msg
    assert "'s0'" in msg
    return info.value


@pytest.fixture
async def two_source_store(tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    tensors = make_tensors(24, seed=9)
    return await save_store(tmp_path, tensors, k=2), tensors


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mode", "exc", "needle"),
    [
        ("404", BlockNotFoundError, "HTTP 404"),
        ("403", SourceUnavailableError, "access denied (HTTP 403)"),
        ("close", SourceUnavailableError, "truncated"),
        ("gzip", SourceUnavailableError, "gzip-encoded"),
    ],
)
async def test_wire_fault_is_a_clean_error(
    two_source_store: tuple[pathlib.Path, dict[str, np.ndarray]],
    mode: str,
    exc: type[BaseException],
    needle: str,
) -> None:
    path, tensors = two_source_store
    async with object_server(_objects_of(path, "s0"), mode=mode) as srv:
        err = await _failing_load(path, tensors, srv, exc, backoff=0.01)
        assert needle in str(err)
        assert srv.authorization, "the credentials in the URL were not sent"
        if mode == "close":
            assert "after 5 attempts" in str(err)  # retried (1 + 4), then gave up


@pytest.mark.anyio
async def test_stalled_server_times_out_within_the_stall_timeout(
    two_source_store: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    path, tensors = two_source_store
    async with object_server(_objects_of(path, "s0"), mode="stall") as srv:
        t0 = time.monotonic()
        err = await _failing_load(path, tensors, srv, SourceUnavailableError, within=20, stall_timeout=0.5)
        elapsed = time.monotonic() - t0
        assert srv.stalled.is_set()
        assert "stall timeout" in str(err) and "0.5 s" in str(err)
        assert 0.5 <= elapsed < 10, elapsed


@pytest.mark.anyio
async def test_first_byte_timeout(tmp_path: pathlib.Path) -> None:
    """A server that accepts the connection and never answers: the first-byte timeout fires."""
    import asyncio

    release = asyncio.Event()

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await release.wait()
        w.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        src = HttpSource("h", f"http://127.0.0.1:{port}/x", first_byte_timeout=0.3)
        t0 = time.monotonic()
        with anyio.fail_after(10), pytest.raises(SourceUnavailableError, match="first-byte timeout"):
            await src.read_into("k", 0, memoryview(bytearray(10)))
        assert time.monotonic() - t0 < 5
        assert src.statistics().errors == 1 and src.statistics().in_flight == 0
        await src.aclose()
    finally:
        release.set()
        server.close()
        await server.wait_closed()


@pytest.mark.anyio
async def test_connection_refused_is_retried_then_unavailable() -> None:
    port = _servers.free_port()  # nothing listens there
    src = HttpSource("h", f"http://127.0.0.1:{port}/x", retries=2, backoff=0.01)
    with (
        anyio.fail_after(10),
        pytest.raises(SourceUnavailableError, match=r"after 3 attempts.*cannot connect"),
    ):
        await src.size("k")
    await src.aclose()


@pytest.mark.anyio
async def test_503_on_every_first_attempt_still_loads_exactly(
    two_source_store: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    path, tensors = two_source_store
    async with object_server(_objects_of(path, "s0"), mode="503-first") as srv:
        got = await load_all(path, sources={"s0": srv.url})
        assert len(srv.failed_once) > 1 and srv.requests >= 2 * len(srv.failed_once)
    assert_all_same(got, tensors)


@pytest.mark.anyio
async def test_server_that_ignores_range_still_loads_exactly(
    two_source_store: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    path, tensors = two_source_store
    async with object_server(_objects_of(path, "s0"), mode="norange") as srv:
        assert_all_same(await load_all(path, sources={"s0": srv.url}), tensors)
        src = HttpSource("h", srv.url)
        key, data = next(iter(srv.objects.items()))
        buf = bytearray(7)
        assert await src.read_into(key, 3, memoryview(buf)) == 7 and bytes(buf) == data[3:10]
        assert await src.read_into(key, len(data) - 2, memoryview(buf)) == 2
        assert bytes(buf[:2]) == data[-2:]
        assert await src.read_into(key, len(data) + 5, memoryview(buf)) == 0
        await src.aclose()


@pytest.mark.anyio
async def test_messages_and_repr_carry_no_credentials() -> None:
    src = HttpSource("h", f"http://user:{SECRET}@127.0.0.1:1/p?token={SECRET}")
    assert SECRET not in repr(src) and SECRET not in src.location
    with pytest.raises(BlockNotFoundError) as info:
        await src.read_into("../escape", 0, memoryview(bytearray(1)))
    assert SECRET not in str(info.value)
    await src.aclose()
    with pytest.raises(SourceUnavailableError, match="not an http") as bad:
        HttpSource("x", f"http://u:{SECRET}@/no-host")
    assert SECRET not in str(bad.value)


@pytest.mark.anyio
async def test_chunked_bodies_load_exactly(
    two_source_store: tuple[pathlib.Path, dict[str, np.ndarray]],
) -> None:
    """No Content-Length: h11 frames the body and the bytes are copied into the slot."""
    path, tensors = two_source_store
    async with object_server(_objects_of(path, "s0"), mode="chunked") as srv:
        assert_all_same(await load_all(path, sources={"s0": srv.url}), tensors)
        src = HttpSource("h", srv.url)
        key, data = next(iter(srv.objects.items()))
        buf = bytearray(len(data) + 10)
        assert await src.read_into(key, 5, memoryview(buf)) == len(data) - 5
        assert bytes(buf[: len(data) - 5]) == data[5:]
        await src.aclose()


@pytest.mark.anyio
async def test_https_round_trip(tmp_path: pathlib.Path) -> None:
    server_tls, client_tls = self_signed_tls(tmp_path)
    async with object_server(tls=server_tls) as srv:
        assert srv.url.startswith("https://")
        src = HttpSource("tls", srv.url, ssl=client_tls)
        data = os.urandom(3 * 1024 * 1024 + 7)
        await src.write("a/b", memoryview(data))
        buf = bytearray(len(data))
        assert await src.read_into("a/b", 0, memoryview(buf)) == len(data) and buf == data
        assert await src.size("a/b") == len(data)
        await src.aclose()
        # Without the certificate's CA the handshake fails: a clean error, not retried.
        untrusting = HttpSource("tls", srv.url)
        with anyio.fail_after(20), pytest.raises(SourceUnavailableError, match="TLS"):
            await untrusting.size("a/b")
        await untrusting.aclose()


@pytest.mark.anyio
async def test_server_without_webdav_refuses_writes_clearly() -> None:
    async with object_server(mode="readonly") as srv:
        src = HttpSource("ro", srv.url)
        with pytest.raises(SourceUnavailableError, match=r"does not accept PUT \(HTTP 405\).*WebDAV"):
            await src.write("k", memoryview(b"data"))
        await src.aclose()


@pytest.mark.anyio
async def test_connections_are_kept_alive_across_reads_and_misses() -> None:
    """Sequential requests reuse one connection, 404s included (a save checks every key first)."""
    async with object_server({"k": b"x" * 5000}) as srv:
        src = HttpSource("h", srv.url)
        for i in range(10):
            assert await src.read_into("k", i, memoryview(bytearray(100))) == 100
            assert not await src.exists(f"missing-{i}")
            with pytest.raises(BlockNotFoundError):
                await src.read_into(f"missing-{i}", 0, memoryview(bytearray(10)))
        await src.write("new", memoryview(b"abc"))
        assert await src.size("new") == 3
        await src.aclose()
        assert srv.requests == 32 and srv.connections == 1


@pytest.mark.anyio
async def test_no_connection_outlives_a_save_or_an_unclosed_source(tmp_path: pathlib.Path) -> None:
    tensors = make_tensors(12, seed=11)
    async with object_server() as srv:
        await asyncload.save(
            tensors,
            tmp_path / "m.asyncload.json",
            sources=[f"{srv.url}/d0", str(tmp_path / "d1")],
            block_size=4 * KiB,
            budget=LOAD_BUDGET,
        )
        assert srv.connections >= 1 and any(k.startswith("d0/") for k in srv.objects)
        await wait_until(lambda: srv.closed == srv.connections, what="the save's connections closed")
        assert_all_same(await load_all(tmp_path / "m.asyncload.json"), tensors)
        await wait_until(lambda: srv.closed == srv.connections, what="the load's connections closed")
        # A source dropped without aclose() lets its idle connection go when collected.
        src = HttpSource("h", srv.url)
        assert await src.exists(next(iter(srv.objects)))
        before = srv.closed
        del src
        gc.collect()
        await wait_until(lambda: srv.closed == before + 1, what="the dropped source's connection closed")


@pytest.mark.anyio
async def test_size_when_head_tells_no_length() -> None:
    async with object_server({"k": b"y" * 12345, "e": b""}, mode="headless") as srv:
        src = HttpSource("h", srv.url)
        assert await src.size("k") == 12345  # from a one-byte ranged GET's Content-Range
        assert await src.size("e") == 0  # 416: nothing at offset 0
        with pytest.raises(BlockNotFoundError):
            await src.size("missing")
        await src.aclose()
