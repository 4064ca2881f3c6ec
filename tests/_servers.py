"""Real servers for the remote-source tests, on 127.0.0.1 only, each stopped by whoever started it.

* :func:`nginx` — a session-scoped private nginx (scripts/nginx-up.sh) serving a temp dir with
  WebDAV PUT/DELETE. When ``ASYNCLOAD_TEST_SERVERS=require`` (CI), a missing nginx fails the
  tests instead of skipping them.
* :class:`ObjectServer` — a small HTTP/1.1 object server (h11 on asyncio streams) that runs in
  the test's own event loop and can misbehave on purpose: answer 404/403, close mid-body, stall
  until released, fail the first attempt of every request with 503.

Test modules import the fixtures they use: ``from _servers import nginx_fixture  # noqa: F401``
(the fixture's name is ``nginx``). The S3 server fixtures are in tests/_s3server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import h11
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


def servers_required() -> bool:
    return os.environ.get("ASYNCLOAD_TEST_SERVERS", "") == "require"


def missing(what: str) -> None:
    """Skip (developer machine) or fail (CI: ASYNCLOAD_TEST_SERVERS=require) for a missing server."""
    msg = f"{what} is not installed (scripts/install-servers.sh installs it)"
    if servers_required():
        pytest.fail(msg + "; ASYNCLOAD_TEST_SERVERS=require", pytrace=False)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


@dataclass
class Nginx:
    """A running private nginx: files under ``www`` are served at ``url`` (no trailing slash)."""

    dir: pathlib.Path
    port: int

    @property
    def www(self) -> pathlib.Path:
        return self.dir / "www"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_nginx(dir: pathlib.Path, *, workers: int = 1) -> Nginx:
    """Start nginx via scripts/nginx-up.sh on a free port (a few tries if the port is taken)."""
    exe = find_nginx()
    if exe is None:
        missing("nginx")
    env = {**os.environ, "NGINX_BIN": str(exe), "NGINX_WORKERS": str(workers)}
    last = ""
    for _ in range(5):
        port = free_port()
        r = subprocess.run(
            ["bash", str(SCRIPTS / "nginx-up.sh"), str(dir), str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode == 0:
            return Nginx(dir, port)
        last = r.stderr
        stop_nginx(dir)
    raise RuntimeError(f"nginx did not start: {last}")


def stop_nginx(dir: pathlib.Path) -> None:
    subprocess.run(["bash", str(SCRIPTS / "nginx-down.sh"), str(dir)], check=False, timeout=60)


@pytest.fixture(scope="session", name="nginx")
def nginx_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """One private nginx for the whole session (stopped at its end)."""
    dir = tmp_path_factory.mktemp("nginx")
    server = start_nginx(dir)
    try:
        yield server
    finally:
        stop_nginx(dir)


# --------------------------------------------------------------------------- a misbehaving server


@dataclass
class ObjectServer:
    """Objects in a dict served over HTTP/1.1 with ranges, PUT and DELETE, plus injected faults.

    ``mode``: ``"ok"``; ``"404"``/``"403"`` answer every request so; ``"close"`` sends the head
    and half of each GET body, then closes; ``"stall"`` sends the head and half of each GET body,
    then waits until :attr:`release` is set; ``"503-first"`` answers the first attempt of each
    distinct request 503 and serves the retries; ``"norange"`` ignores Range (always 200 and the
    whole object, as some servers do); ``"chunked"`` sends bodies chunked, with no Content-Length;
    ``"readonly"`` answers PUT and DELETE with 405; ``"gzip"`` labels bodies gzip-encoded;
    ``"headless"`` answers HEAD without a length.
    ``requests`` and ``connections`` count what arrived, and ``authorization`` keeps the
    Authorization headers seen.
    """

    objects: dict[str, bytes] = field(default_factory=dict)
    mode: str = "ok"
    prefix: str = "/store"
    port: int = 0
    requests: int = 0
    connections: int = 0
    closed: int = 0  # connections that ended (the client closed them, or the server did)
    failed_once: set[tuple[str, str, str]] = field(default_factory=set)
    authorization: list[bytes] = field(default_factory=list)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{self.prefix}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        self.connections += 1
        try:
            while True:
                req = await self._next_request(conn, reader)
                if req is None:
                    return
                request, body = req
                self.requests += 1
                keep = await self._answer(conn, writer, request, body)
                if not keep or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            return
        finally:
            self.closed += 1
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _next_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await reader.read(1 << 16)
                conn.receive_data(data)
                continue
            if isinstance(ev, h11.Request):
                request = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            elif isinstance(ev, h11.ConnectionClosed):
                return None

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes = b"",
        *,
        head: bool = False,
    ) -> None:
        if not any(k.lower() == "content-length" for k, _ in headers):
            headers = [*headers, ("Content-Length", str(len(body)))]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        if body and not head:
            writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()

    async def _answer(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, request: h11.Request, body: bytes
    ) -> bool:
        method = request.method.decode()
        target = request.target.decode()
        hdrs = {k.decode().lower(): v.decode() for k, v in request.headers}
        if "authorization" in hdrs:
            self.authorization.append(hdrs["authorization"].encode())
        rng = hdrs.get("range", "")
        if self.mode in ("404", "403"):
            await self._send(conn, writer, int(self.mode), [], b"no" if method != "HEAD" else b"")
            return True
        if self.mode == "503-first" and (method, target, rng) not in self.failed_once:
            self.failed_once.add((method, target, rng))
            await self._send(conn, writer, 503, [("Retry-After", "0")], b"slow down")
            return True
        if not target.startswith(self.prefix + "/"):
            await self._send(conn, writer, 404, [])
            return True
        key = target[len(self.prefix) + 1 :]
        if method in ("PUT", "DELETE") and self.mode == "readonly":
            await self._send(conn, writer, 405, [("Allow", "GET, HEAD")])
            return True
        if method == "PUT":
            self.objects[key] = body
            await self._send(conn, writer, 201, [])
            return True
        if method == "DELETE":
            found = self.objects.pop(key, None) is not None
            await self._send(conn, writer, 204 if found else 404, [])
            return True
        data = self.objects.get(key)
        if data is None:
            await self._send(conn, writer, 404, [], b"not found" if method == "GET" else b"")
            return True
        if method == "HEAD" and self.mode == "headless":  # a HEAD that tells no length
            writer.write(conn.send(h11.Response(status_code=200, headers=[])) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            return True
        if method == "HEAD":
            await self._send(conn, writer, 200, [("Content-Length", str(len(data)))], head=True)
            return True
        status, part, extra = 200, data, []
        if rng.startswith("bytes=") and self.mode != "norange":
            a_s, _, b_s = rng[6:].partition("-")
            a = int(a_s)
            b = min(int(b_s), len(data) - 1) if b_s else len(data) - 1
            if a >= len(data):
                await self._send(conn, writer, 416, [("Content-Range", f"bytes */{len(data)}")])
                return True
            status, part = 206, data[a : b + 1]
            extra = [("Content-Range", f"bytes {a}-{b}/{len(data)}")]
        if self.mode == "gzip":  # claims an encoding the client did not ask for
            extra = [*extra, ("Content-Encoding", "gzip")]
        if self.mode in ("close", "stall"):
            head = [*extra, ("Content-Length", str(len(part)))]
            writer.write(conn.send(h11.Response(status_code=status, headers=head)) or b"")
            writer.write(part[: len(part) // 2])
            await writer.drain()
            if self.mode == "stall":
                self.stalled.set()
                await self.release.wait()
            return False
        if self.mode == "chunked":  # no Content-Length: h11 frames the body in chunks
            writer.write(conn.send(h11.Response(status_code=status, headers=extra)) or b"")
            step = max(1, len(part) // 3)
            for i in range(0, len(part), step):
                writer.write(conn.send(h11.Data(data=part[i : i + step])) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            return True
        await self._send(conn, writer, status, extra, part)
        return True


@contextlib.asynccontextmanager
async def object_server(
    objects: dict[str, bytes] | None = None, *, mode: str = "ok", tls: ssl.SSLContext | None = None
) -> AsyncIterator[ObjectServer]:
    """Run an :class:`ObjectServer` on a free loopback port in the current loop; stop it after."""
    srv = ObjectServer(objects=dict(objects or {}), mode=mode, scheme="https" if tls else "http")
    tasks: set[asyncio.Task[None]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writers.add(w)
        try:
            await srv._handle(r, w)
        finally:
            writers.discard(w)
            tasks.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
    srv.port = server.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        # Let every handler end by itself: release stalls, close their connections.
        srv.release.set()
        server.close()
        for w in list(writers):
            w.close()
        if tasks:
            await asyncio.wait(list(tasks), timeout=10)
        await server.wait_closed()


def self_signed_tls(dir: pathlib.Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) TLS contexts for 127.0.0.1 with a fresh self-signed certificate."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = dir / "cert.pem"
    key_pem = dir / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_pem, key_pem)
    client = ssl.create_default_context(cafile=str(cert_pem))
    return server, client
