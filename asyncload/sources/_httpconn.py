"""HTTP/1.1 connections for :class:`~asyncload.sources.HttpSource`: a bounded keep-alive pool.

h11 parses and frames every message (request line, headers, HEAD/204/304,
chunked and close-delimited bodies). The one thing done by hand is where the
bytes of a ``Content-Length`` response body go: the connection is an
:class:`asyncio.BufferedProtocol` whose ``get_buffer`` hands the socket a
slice of the caller's buffer, so a ranged GET lands in slot memory with no
intermediate ``bytes`` object. Measured on nginx over loopback, that is what
keeps pace with ``curl`` (docs/remote.md); aiohttp and httpx copy each chunk at
least twice.

Runs on asyncio and uvloop (the backends asyncload supports). Nothing here
knows about keys, retries or the exception tree: failures come out as
:class:`HttpFailure` (``retryable`` says whether a fresh attempt may succeed),
and :mod:`._http` maps them.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import h11

__all__ = ["Connection", "HttpFailure", "Pool", "Response", "Timeouts"]

_SCRATCH = 64 * 1024
_DRAIN_LIMIT = 64 * 1024  # unwanted body bytes read to keep a connection alive; beyond, close it


class HttpFailure(Exception):
    """One request failed below HTTP semantics (connect, reset, timeout, truncated body)."""

    def __init__(
        self, message: str, *, retryable: bool, timeout: bool = False, unanswered: bool = False
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.timeout = timeout
        self.unanswered = unanswered  # closed before a single response byte


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds: TCP/TLS connect; request sent -> response head; no body bytes (a stall)."""

    connect: float
    first_byte: float
    stall: float


@dataclass(slots=True)
class Response:
    """Status and headers of a response; ``received`` body bytes of the wanted window were stored."""

    status: int
    headers: dict[bytes, bytes]
    received: int = 0
    body_length: int | None = None


class Connection(asyncio.BufferedProtocol):
    """One keep-alive HTTP/1.1 connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = False  # has a request been sent on it
        self.used_before = False  # had it served one before the current request
        self._scratch = bytearray(_SCRATCH)
        # Always hand out a memoryview: asyncio's SSL transport reads into ``buf[offset:]``,
        # which for a bytearray would be a copy (the bytes would be lost).
        self._scratch_view = memoryview(self._scratch)
        self._h: h11.Connection | None = None
        self._fut: asyncio.Future[Response] | None = None
        self._resp: Response | None = None
        self._fast = False  # Content-Length body: bytes go straight to the window
        self._pos = 0  # body bytes seen so far
        self._length = 0  # Content-Length in fast mode
        self._buf: memoryview = memoryview(b"")
        self._skip = 0  # body offset of self._buf[0]
        self._whole_skip = 0  # the same when the answer is 200 (whole object)
        self._keep = True
        self._got_bytes = False
        self._head = False  # the request was HEAD: no body follows whatever the headers say
        self.last_progress = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- asyncio protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._loop = asyncio.get_running_loop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._fut is None or self._fut.done():
            return
        if self._fast and self._pos >= self._skip + len(self._buf):
            self._keep = False  # the wanted window is complete; only unwanted bytes were lost
            self._finish()
            return
        if self._h is not None and not self._fast and self._resp is not None:
            # A close-delimited body ends here; h11 says whether that was allowed.
            self._feed(b"", eof=True)
            if self._fut is None or self._fut.done():
                return
        if not self._got_bytes:
            why = "the server closed the connection before answering"
            self._fail(HttpFailure(why, retryable=True, unanswered=True))
        elif self._resp is None:
            self._fail(HttpFailure("the server closed the connection inside the headers", retryable=True))
        else:
            want = f" of {self._length}" if self._fast else ""
            self._fail(
                HttpFailure(
                    f"the server closed the connection after {self._pos}{want} body bytes (truncated)",
                    retryable=True,
                )
            )

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._fast and self._fut is not None and not self._fut.done():
            pos, end = self._pos, self._skip + len(self._buf)
            if self._skip <= pos < end:
                return self._buf[pos - self._skip : min(end, self._length) - self._skip]
            nxt = self._skip if pos < self._skip else self._length
            return self._scratch_view[: max(1, min(_SCRATCH, nxt - pos))]
        return self._scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        assert self._loop is not None
        self.last_progress = self._loop.time()
        self._got_bytes = True
        if self._fut is None or self._fut.done():
            # Bytes nobody asked for: the connection's framing is lost.
            self._keep = False
            if self.transport is not None:
                self.transport.close()
            return
        if self._fast:
            self._pos += nbytes
            self._after_body_bytes()
        else:
            self._feed(bytes(self._scratch[:nbytes]))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost reports what that means

    # -- one request -------------------------------------------------------------------
    def start(
        self, sink: memoryview | None, skip: int, whole_skip: int | None = None
    ) -> asyncio.Future[Response]:
        """Arm the connection for a response whose body bytes ``[skip, skip+len(sink))`` go to ``sink``.

        ``whole_skip``: for a ranged GET, the offset to use instead when the server answers 200
        with the whole object (it ignored the Range header).
        """
        assert self._loop is not None
        self._h = h11.Connection(h11.CLIENT)
        self.used_before = self.used
        self._fut = self._loop.create_future()
        self._resp = None
        self._fast = False
        self._pos = 0
        self._length = 0
        self._buf = sink if sink is not None else memoryview(b"")
        self._skip = skip
        self._whole_skip = skip if whole_skip is None else whole_skip
        self._keep = True
        self._got_bytes = False
        self.last_progress = self._loop.time()
        return self._fut

    def send(
        self, method: bytes, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: memoryview | None
    ) -> None:
        assert self._h is not None and self.transport is not None
        hdrs = list(headers)
        if body is not None:
            hdrs.append((b"content-length", str(len(body)).encode()))
        self._head = method == b"HEAD"
        self.transport.write(self._h.send(h11.Request(method=method, target=target, headers=hdrs)))
        if body is not None and len(body):
            # h11 frames the body and passes the buffer itself through: no copy here.
            for chunk in self._h.send_with_data_passthrough(h11.Data(data=cast(bytes, body))) or ():
                self.transport.write(chunk)
        self.transport.write(self._h.send(h11.EndOfMessage()) or b"")
        self.used = True

    def write_backlog(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    @property
    def reusable(self) -> bool:
        return self._keep and not self.closed

    def close(self) -> None:
        self._keep = False
        if self._fut is not None and not self._fut.done():
            self._fut.cancel()  # nobody waits any more
        self._buf = memoryview(b"")  # drop the caller's buffer
        if self.transport is not None and not self.closed:
            self.transport.close()

    # -- parsing -------------------------------------------------------------------------
    def _fail(self, exc: HttpFailure) -> None:
        self._keep = False
        if self._fut is not None and not self._fut.done():
            self._fut.set_exception(exc)

    def _finish(self) -> None:
        assert self._resp is not None and self._fut is not None
        self._resp.received = max(0, min(self._pos, self._skip + len(self._buf)) - self._skip)
        if not self._fut.done():
            self._fut.set_result(self._resp)

    def _feed(self, data: bytes, eof: bool = False) -> None:
        h = self._h
        assert h is not None
        try:
            h.receive_data(b"" if eof else data)
            while True:
                ev = h.next_event()
                if ev is h11.NEED_DATA or ev is h11.PAUSED:
                    return
                if isinstance(ev, h11.InformationalResponse):
                    continue
                if isinstance(ev, h11.Response):
                    self._on_head(ev)
                    if self._fast or self._fut is None or self._fut.done():
                        return
                elif isinstance(ev, h11.Data):
                    self._store(ev.data)
                    if self._fut is not None and self._fut.done():
                        return
                elif isinstance(ev, h11.EndOfMessage):
                    self._finish()
                    return
                elif isinstance(ev, h11.ConnectionClosed):
                    self._fail(HttpFailure("the server closed the connection", retryable=True))
                    return
        except h11.RemoteProtocolError as e:
            self._fail(HttpFailure(f"malformed HTTP response ({e})", retryable=False))
            if self.transport is not None:
                self.transport.close()

    def _on_head(self, ev: h11.Response) -> None:
        headers: dict[bytes, bytes] = {}
        for name, value in ev.headers:
            headers[bytes(name).lower()] = bytes(value)
        self._resp = Response(ev.status_code, headers)
        conn = headers.get(b"connection", b"").lower()
        if b"close" in conn or ev.http_version == b"1.0":
            self._keep = False
        bodyless = self._head or ev.status_code in (204, 304)
        if not 200 <= ev.status_code < 300:
            # Error bodies are not wanted. A small one with a length is read and dropped so the
            # connection stays usable (a 404 per missing block must not cost a reconnect);
            # anything else: answer now and close.
            cl = headers.get(b"content-length")
            if bodyless or cl == b"0":
                self._finish()
                return
            if cl is None or b"transfer-encoding" in headers or int(cl) > _DRAIN_LIMIT or self._h is None:
                self._keep = False
                self._finish()
                return
            self._buf, self._skip = memoryview(b""), 0
            self._enter_fast(int(cl))
            return
        if ev.status_code == 200:
            self._skip = self._whole_skip
        te = headers.get(b"transfer-encoding")
        cl = headers.get(b"content-length")
        if not bodyless and te is None and cl is not None and self._h is not None:
            self._resp.body_length = int(cl)  # h11 validated it
            self._enter_fast(int(cl))

    def _enter_fast(self, length: int) -> None:
        """From here on the body's ``length`` bytes bypass h11: straight into the window."""
        assert self._h is not None
        self._fast = True
        self._length = length
        rest = self._h.trailing_data[0]
        self._h = None
        if rest:
            self._store_fast(memoryview(rest))
        if self._fut is not None and not self._fut.done():
            self._after_body_bytes()

    def _store_fast(self, data: memoryview) -> None:
        """Body bytes that arrived with the head: copy the wanted part into the window."""
        data = data[: self._length - self._pos]
        lo = max(self._pos, self._skip)
        hi = min(self._pos + len(data), self._skip + len(self._buf))
        if lo < hi:
            self._buf[lo - self._skip : hi - self._skip] = data[lo - self._pos : hi - self._pos]
        self._pos += len(data)

    def _store(self, data: bytes) -> None:
        """A chunk of a body h11 framed (chunked or close-delimited)."""
        lo = max(self._pos, self._skip)
        hi = min(self._pos + len(data), self._skip + len(self._buf))
        if lo < hi:
            self._buf[lo - self._skip : hi - self._skip] = data[lo - self._pos : hi - self._pos]
        self._pos += len(data)
        self._check_enough()

    def _after_body_bytes(self) -> None:
        if self._pos >= self._length:
            self._finish()
        else:
            self._check_enough()

    def _check_enough(self) -> None:
        """Stop early once the window is full and the rest is more than is worth draining."""
        end = self._skip + len(self._buf)
        if self._pos < end or self._resp is None:
            return
        remaining = (self._length - self._pos) if self._fast else None
        if remaining is None or remaining > _DRAIN_LIMIT:
            self._keep = False
            self._finish()


class Pool:
    """At most ``limit`` connections to one host; idle ones are kept alive and reused."""

    def __init__(
        self, host: str, port: int, *, tls: _ssl.SSLContext | None, limit: int, timeouts: Timeouts
    ) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.timeouts = timeouts
        self.limit = limit
        self._idle: list[Connection] = []
        self._sem = asyncio.Semaphore(limit)
        self.loop = asyncio.get_running_loop()

    async def acquire(self, *, fresh: bool = False) -> Connection:
        await self._sem.acquire()
        try:
            while self._idle and not fresh:
                c = self._idle.pop()
                if c.reusable:
                    return c
            return await self._connect()
        except BaseException:
            self._sem.release()
            raise

    async def _connect(self) -> Connection:
        try:
            async with asyncio.timeout(self.timeouts.connect):
                _, proto = await self.loop.create_connection(
                    Connection,
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls is not None else None,
                )
        except TimeoutError:
            raise HttpFailure(
                f"no connection within the connect timeout ({self.timeouts.connect:g} s)",
                retryable=False,
                timeout=True,
            ) from None
        except _ssl.SSLError as e:
            raise HttpFailure(f"TLS handshake failed ({e.reason})", retryable=False) from None
        except OSError as e:
            raise HttpFailure(f"cannot connect ({e.strerror or type(e).__name__})", retryable=True) from None
        return proto

    def release(self, conn: Connection, *, reuse: bool) -> None:
        if reuse and conn.reusable and len(self._idle) < self.limit:
            self._idle.append(conn)
        else:
            conn.close()
        self._sem.release()

    def close_idle(self) -> None:
        idle, self._idle = self._idle, []
        if self.loop.is_closed():
            return
        for c in idle:
            c.close()


async def wait_response(conn: Connection, fut: asyncio.Future[Response], timeouts: Timeouts) -> Response:
    """Await ``fut``: fail when no byte moves for ``first_byte`` seconds (before the head) or ``stall``."""
    loop = asyncio.get_running_loop()
    backlog = conn.write_backlog()
    while not fut.done():
        limit = timeouts.stall if conn._resp is not None else timeouts.first_byte
        left = conn.last_progress + limit - loop.time()
        if left <= 0:
            now = conn.write_backlog()
            if now < backlog:  # the request body is still going out: that is progress
                backlog = now
                conn.last_progress = loop.time()
                continue
            what = "body bytes" if conn._resp is not None else "response"
            kind = "stall" if conn._resp is not None else "first-byte"
            raise HttpFailure(f"no {what} for {limit:g} s ({kind} timeout)", retryable=False, timeout=True)
        # Wake at least every min(timeouts): the head arriving switches which limit applies.
        await asyncio.wait((fut,), timeout=min(left, timeouts.first_byte, timeouts.stall))
    return fut.result()
