"""HTTP(S) servers as sources: ranged GETs into the caller's buffer, WebDAV PUT/DELETE for writes.

A location is a base URL; a block's key is appended to its path
(``http://host/store/d0`` + ``ckpt/000001`` -> ``GET /store/d0/ckpt/000001``).
Any server that answers ``Range: bytes=a-b`` works for reads (nginx, Apache,
a CDN, an object store's public HTTP endpoint); writes need one that accepts
``PUT`` and ``DELETE`` (nginx with the dav module, Apache mod_dav) and that
stores a PUT whole or not at all, as nginx does (temp file, then rename).

Each source owns one bounded pool of keep-alive connections (``connections``).
Requests that may succeed on a second try — 5xx, 429, a reset, a refused
connect, a body cut short — are retried up to ``retries`` times with
exponential backoff and full jitter (``Retry-After`` is honoured up to
``max_backoff``). Timeouts are not retried, so a dead server ends a read
within ``connect_timeout`` / ``first_byte_timeout`` / ``stall_timeout``.
404/410 raise :class:`~asyncload.BlockNotFoundError`; 401/403 and every
other failure :class:`~asyncload.SourceUnavailableError`. Messages name the
source id, the key and the URL without user info or query string, so
credentials in a location never reach a message or log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import ssl as _ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar
from urllib.parse import quote, unquote, urlsplit

import anyio

from .._exceptions import BlockNotFoundError, SourceUnavailableError
from ._base import Source
from ._httpconn import HttpFailure, Pool, Response, Timeouts, wait_response
from ._ioloop import IoLoop

__all__ = ["HttpSource"]


T = TypeVar("T")

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_USER_AGENT = b"asyncload"


class HttpSource(Source):
    """Blocks stored under a base URL on an HTTP(S) server."""

    supports_writes = True

    def __init__(
        self,
        id: str,
        location: str,
        *,
        connections: int = 16,
        connect_timeout: float = 10.0,
        first_byte_timeout: float = 30.0,
        stall_timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.1,
        max_backoff: float = 5.0,
        headers: Mapping[str, str] | None = None,
        ssl: _ssl.SSLContext | None = None,
        io_thread: bool = True,
        sign: Callable[[bytes, bytes, tuple[tuple[bytes, bytes], ...]], tuple[tuple[bytes, bytes], ...]]
        | None = None,
    ) -> None:
        u = urlsplit(location)
        scheme = u.scheme.lower()
        if scheme not in ("http", "https") or not u.hostname:
            raise SourceUnavailableError(
                f"source {id!r}: {_redact(location)!r} is not an http(s) URL with a host"
            )
        if connections < 1 or retries < 0:
            raise ValueError(f"source {id!r}: connections must be >= 1 and retries >= 0")
        super().__init__(id, _redact(location))  # the location shown anywhere has no credentials
        self._host = u.hostname
        self._port = u.port or (443 if scheme == "https" else 80)
        self._tls = (ssl or _ssl.create_default_context()) if scheme == "https" else None
        self._prefix = u.path.rstrip("/")
        self._query = f"?{u.query}" if u.query else ""
        host_header = self._host if u.port is None else f"{self._host}:{u.port}"
        if ":" in self._host:  # IPv6 literal
            host_header = f"[{self._host}]" if u.port is None else f"[{self._host}]:{u.port}"
        hdrs = [
            (b"host", host_header.encode("idna")),
            (b"user-agent", _USER_AGENT),
            (b"accept-encoding", b"identity"),  # block bytes as stored, never recompressed
        ]
        if u.username is not None:
            cred = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
            hdrs.append((b"authorization", b"Basic " + base64.b64encode(cred)))
        for k, v in (headers or {}).items():
            hdrs.append((k.lower().encode("latin-1"), v.encode("latin-1")))
        self._headers = tuple(hdrs)
        self.timeouts = Timeouts(connect_timeout, first_byte_timeout, stall_timeout)
        self.connections = connections
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._pool: Pool | None = None
        # The connections live on this source's own I/O loop (see _ioloop), or, with
        # io_thread=False, on whichever loop calls.
        self._io = IoLoop(id) if io_thread else None
        # Called per attempt with (method, target, headers): headers to send (request signing).
        self._sign = sign

    # -- plumbing --------------------------------------------------------------------
    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one request (retries included) where this source's connections live."""
        if self._io is None:
            return await fn()
        return await self._io.call(fn)

    def _get_pool(self) -> Pool:
        loop = asyncio.get_running_loop()
        if self._pool is None or self._pool.loop is not loop:
            if self._pool is not None:
                self._pool.close_idle()
            self._pool = Pool(
                self._host, self._port, tls=self._tls, limit=self.connections, timeouts=self.timeouts
            )
        return self._pool

    def _target(self, key: str) -> bytes:
        parts = key.split("/")
        if "" in parts or "." in parts or ".." in parts or "\0" in key:
            raise BlockNotFoundError(f"source {self.id!r}: key {key!r} is not a safe relative path")
        return (self._prefix + "/" + quote(key, safe="/-._~") + self._query).encode("ascii")

    def _where(self, key: str) -> str:
        return f"source {self.id!r}: {key!r} at {self.location}/{key}"

    async def _request(
        self,
        method: bytes,
        key: str,
        *,
        extra: tuple[tuple[bytes, bytes], ...] = (),
        body: memoryview | None = None,
        sink: memoryview | None = None,
        skip: int = 0,
        whole_skip: int | None = None,
    ) -> Response:
        """One request with retries; a response is returned for any status that is not retried."""
        target = self._target(key)
        headers = self._headers + extra
        attempt = 0
        while True:
            sent = headers if self._sign is None else self._sign(method, target, headers)
            try:
                outcome: HttpFailure | Response = await self._attempt(
                    method, target, sent, body, sink, skip, whole_skip
                )
            except HttpFailure as e:
                outcome = e
            if isinstance(outcome, Response):
                if outcome.status not in _RETRY_STATUS or attempt >= self.retries:
                    return outcome
                delay = self._delay(attempt, outcome.headers.get(b"retry-after"))
            else:
                if not outcome.retryable or attempt >= self.retries:
                    what = "timed out" if outcome.timeout else "failed"
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise SourceUnavailableError(
                        f"{self._where(key)}: {method.decode()} {what}{tries}: {outcome}"
                    )
                delay = self._delay(attempt, None)
            attempt += 1
            await anyio.sleep(delay)

    async def _attempt(
        self,
        method: bytes,
        target: bytes,
        headers: tuple[tuple[bytes, bytes], ...],
        body: memoryview | None,
        sink: memoryview | None,
        skip: int,
        whole_skip: int | None,
    ) -> Response:
        """One try on a pooled connection; a kept-alive one the server had dropped is replaced once."""
        pool = self._get_pool()
        fresh = False
        while True:
            conn = await pool.acquire(fresh=fresh)
            reuse = False
            try:
                fut = conn.start(sink, skip, whole_skip)
                conn.send(method, target, headers, body)
                resp = await wait_response(conn, fut, self.timeouts)
                reuse = True
                return resp
            except HttpFailure as e:
                if e.unanswered and conn.used_before and not fresh:
                    fresh = True
                    continue
                raise
            finally:
                pool.release(conn, reuse=reuse)

    def _delay(self, attempt: int, retry_after: bytes | None) -> float:
        """Full jitter: uniform in [0, min(max_backoff, backoff * 2**attempt)]; Retry-After wins, capped."""
        if retry_after is not None:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to the jittered delay
        return random.uniform(0, min(self.max_backoff, self.backoff * (2**attempt)))

    def _status_error(self, method: str, key: str, resp: Response) -> Exception:
        s = resp.status
        if s in (404, 410):
            return BlockNotFoundError(f"{self._where(key)}: not found (HTTP {s})")
        if s in (401, 403):
            return SourceUnavailableError(f"{self._where(key)}: {method} refused, access denied (HTTP {s})")
        if s in (405, 501) and method in ("PUT", "DELETE"):
            return SourceUnavailableError(
                f"{self._where(key)}: the server does not accept {method} (HTTP {s}); "
                "writes need WebDAV (nginx: dav_methods PUT DELETE)"
            )
        return SourceUnavailableError(f"{self._where(key)}: {method} failed (HTTP {s})")

    # -- reads -----------------------------------------------------------------------
    async def _get_range(self, key: str, offset: int, buf: memoryview) -> tuple[int, int | None]:
        """One ranged GET into ``buf``: (bytes stored, object size if the server said)."""
        rng = f"bytes={offset}-{offset + len(buf) - 1}".encode()
        resp = await self._request(b"GET", key, extra=((b"range", rng),), sink=buf, whole_skip=offset)
        coding = resp.headers.get(b"content-encoding", b"identity").strip().lower()
        if resp.status in (200, 206) and coding not in (b"", b"identity"):
            raise SourceUnavailableError(
                f"{self._where(key)}: the server sent the object {coding.decode('latin-1')}-encoded; "
                "serve blocks as they are (no compression)"
            )
        if resp.status == 206:
            start, end, total = _content_range(resp.headers.get(b"content-range"))
            if start != offset or end is None or end < start or end >= offset + len(buf):
                raise SourceUnavailableError(
                    f"{self._where(key)}: asked for {rng.decode()}, the server sent range "
                    f"{resp.headers.get(b'content-range', b'(none)').decode('latin-1')}"
                )
            n = end - start + 1
            if resp.body_length is not None and resp.body_length != n:
                raise SourceUnavailableError(
                    f"{self._where(key)}: Content-Length {resp.body_length} disagrees with Content-Range"
                )
            if resp.received != n:
                raise SourceUnavailableError(f"{self._where(key)}: short body: {resp.received} of {n} bytes")
            return n, total
        if resp.status == 200:  # the server ignored Range: the body is the whole object
            return self._from_whole(key, offset, buf, resp)
        if resp.status == 416:  # offset at or past the end
            _, _, total = _content_range(resp.headers.get(b"content-range"))
            return 0, total if total is not None else offset
        raise self._status_error("GET", key, resp)

    def _from_whole(self, key: str, offset: int, buf: memoryview, resp: Response) -> tuple[int, int | None]:
        total = resp.body_length
        want = len(buf) if total is None else max(0, min(len(buf), total - offset))
        if resp.received < want or (total is None and resp.received < len(buf)):
            if total is None:  # a chunked or close-delimited body ends where the object does
                return resp.received, offset + resp.received
            raise SourceUnavailableError(f"{self._where(key)}: short body: {resp.received} of {want} bytes")
        return resp.received, total

    async def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        async def run() -> int:
            if len(buf) == 0:
                await self._size(key)  # a missing key still fails, as for every source
                return 0
            done = 0
            while done < len(buf):
                n, total = await self._get_range(key, offset + done, buf[done:])
                done += n
                if n == 0 or (total is not None and offset + done >= total):
                    break
            return done

        return await self._counted_read(lambda: self._call(run))

    async def _size(self, key: str) -> int:
        resp = await self._request(b"HEAD", key)
        if resp.status == 200:
            cl = resp.headers.get(b"content-length")
            if cl is not None and cl.isdigit():
                return int(cl)
            # No length on HEAD (some dynamic servers): ask for one byte and read the total.
            probe = bytearray(1)
            resp = await self._request(b"GET", key, extra=((b"range", b"bytes=0-0"),), sink=memoryview(probe))
            if resp.status == 206:
                total = _content_range(resp.headers.get(b"content-range"))[2]
                if total is not None:
                    return total
            if resp.status == 416:
                return 0
            if resp.status == 200 and resp.body_length is not None:
                return resp.body_length
            raise SourceUnavailableError(f"{self._where(key)}: the server does not report the size")
        raise self._status_error("HEAD", key, resp)

    async def size(self, key: str) -> int:
        return await self._counted(lambda: self._call(lambda: self._size(key)))

    # -- writes --------------------------------------------------------------------------
    async def write(self, key: str, data: memoryview) -> None:
        async def run() -> None:
            resp = await self._request(b"PUT", key, body=memoryview(data).cast("B"))
            if resp.status not in (200, 201, 204):
                raise self._status_error("PUT", key, resp)

        await self._counted_write(lambda: self._call(run), len(data))

    async def delete(self, key: str) -> None:
        async def run() -> None:
            resp = await self._request(b"DELETE", key)
            if resp.status not in (200, 202, 204, 404, 410):
                raise self._status_error("DELETE", key, resp)

        await self._counted(lambda: self._call(run))

    async def _let_idle_go(self, *, forget: bool) -> None:
        """Close the idle connections (and forget the pool when ``forget``) where the pool lives."""

        async def run() -> None:
            pool = self._pool
            if forget:
                self._pool = None
            if pool is not None:
                pool.close_idle()

        if self._pool is not None:
            await self._call(run)

    async def sync(self) -> None:
        """Nothing to flush (a PUT answered 2xx is stored); idle connections are let go."""
        await self._let_idle_go(forget=False)

    async def aclose(self) -> None:
        await self._let_idle_go(forget=True)
        if self._io is not None and self._io.loop is not None:
            await anyio.to_thread.run_sync(self._io.close)
        await anyio.lowlevel.checkpoint()

    def __del__(self) -> None:
        # A source nobody closed: let its idle sockets and its I/O thread go rather than warn
        # at collection. The collector may run in any thread: only the pool's loop touches it.
        io = getattr(self, "_io", None)
        pool = getattr(self, "_pool", None)
        if io is not None:
            io.stop_soon(pool.close_idle if pool is not None else None)
            return
        if pool is None or pool.loop.is_closed():
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is pool.loop:
            pool.close_idle()
        else:
            with contextlib.suppress(RuntimeError):
                pool.loop.call_soon_threadsafe(pool.close_idle)


def _redact(location: str) -> str:
    """``location`` without user info, query string or fragment (where credentials hide)."""
    u = urlsplit(location)
    host = u.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host if u.port is None else f"{host}:{u.port}"
    return f"{u.scheme}://{netloc}{u.path.rstrip('/')}"


def _content_range(value: bytes | None) -> tuple[int | None, int | None, int | None]:
    """``bytes a-b/total`` -> (a, b, total); ``bytes */total`` -> (None, None, total)."""
    if value is None:
        return None, None, None
    try:
        unit, _, spec = value.decode("latin-1").strip().partition(" ")
        if unit.lower() != "bytes":
            return None, None, None
        rng, _, total_s = spec.partition("/")
        total = None if total_s.strip() == "*" else int(total_s)
        if rng.strip() == "*":
            return None, None, total
        a, _, b = rng.partition("-")
        return int(a), int(b), total
    except ValueError:
        return None, None, None
