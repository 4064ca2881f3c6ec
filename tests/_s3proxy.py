"""A fault-injecting HTTP proxy in front of the real S3 gateway, in the test's own event loop.

Requests pass through unchanged (same Host header, so S3 signatures still verify at the
gateway), one upstream connection per request. ``mode`` picks the fault:

* ``"503-first"``: the first attempt of every distinct request (method, target, Range) is
  answered ``503 SlowDown`` by the proxy; the retry goes through.
* ``"cut-first"``: the first GET response of every distinct request sends its head and half
  its body, then the connection is closed.
* ``"stall"``: every GET response sends its head and 64 KiB of body, then nothing more until
  :meth:`FaultProxy.release` or the client gives up.
* ``"pass"``: no fault; only :attr:`FaultProxy.requests` records what was asked.

``faults`` counts the faults injected; ``requests`` lists ``(method, target)`` of every request.
"""

from __future__ import annotations

from types import TracebackType

import anyio
import anyio.abc
import h11

_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    def __init__(self, upstream_port: int, *, mode: str) -> None:
        assert mode in ("503-first", "cut-first", "stall", "pass"), mode
        self.upstream_port = upstream_port
        self.mode = mode
        self.faults = 0
        self.requests: list[tuple[str, str]] = []
        self.port = 0
        self._seen: set[tuple[bytes, bytes, bytes]] = set()
        self._released = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._listener: anyio.abc.Listener[anyio.abc.SocketStream] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        self._released.set()

    async def __aenter__(self) -> FaultProxy:
        self._listener = listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(listener.serve, self._client)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._tg is not None
        self.release()
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        if self._listener is not None:
            await self._listener.aclose()

    async def _client(self, client: anyio.abc.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        async with client:
            try:
                while True:
                    request, body = await self._read_request(conn, client)
                    if request is None:
                        return
                    if not await self._serve(conn, client, request, body):
                        return
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
            except (
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                anyio.EndOfStream,
                h11.ProtocolError,
            ):
                return

    async def _read_request(
        self, conn: h11.Connection, client: anyio.abc.SocketStream
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await client.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    data = b""
                conn.receive_data(data)
                if not data and request is None:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _serve(
        self, conn: h11.Connection, client: anyio.abc.SocketStream, request: h11.Request, body: bytes
    ) -> bool:
        """Answer one request; False when the connection was closed on purpose."""
        headers = dict(request.headers)
        self.requests.append((request.method.decode(), request.target.decode()))
        key = (request.method, request.target, headers.get(b"range", b""))
        first = key not in self._seen
        self._seen.add(key)
        if self.mode == "503-first" and first:
            self.faults += 1
            await client.send(
                conn.send(
                    h11.Response(
                        status_code=503,
                        headers=[
                            ("content-type", "application/xml"),
                            ("content-length", str(len(_SLOWDOWN))),
                        ],
                    )
                )
                or b""
            )
            await client.send(conn.send(h11.Data(data=_SLOWDOWN)) or b"")
            await client.send(conn.send(h11.EndOfMessage()) or b"")
            return True
        up = h11.Connection(h11.CLIENT)
        async with await anyio.connect_tcp("127.0.0.1", self.upstream_port) as upstream:
            await upstream.send(up.send(request) or b"")
            if body:
                await upstream.send(up.send(h11.Data(data=body)) or b"")
            await upstream.send(up.send(h11.EndOfMessage()) or b"")
            sent = 0
            total = 0
            cut = False
            while True:
                event = up.next_event()
                if event is h11.NEED_DATA:
                    up.receive_data(await upstream.receive())
                    continue
                if isinstance(event, h11.Response):
                    total = int(dict(event.headers).get(b"content-length", b"0") or 0)
                    cut = (
                        request.method == b"GET"
                        and total > 0
                        and (self.mode == "stall" or (self.mode == "cut-first" and first))
                    )
                    await client.send(conn.send(event) or b"")
                elif isinstance(event, h11.Data):
                    data = bytes(event.data)
                    if cut:
                        limit = 64 * 1024 if self.mode == "stall" else total // 2
                        data = data[: max(0, limit - sent)]
                    if data:
                        await client.send(conn.send(h11.Data(data=data)) or b"")
                        sent += len(data)
                    if cut and sent >= (64 * 1024 if self.mode == "stall" else total // 2):
                        self.faults += 1
                        if self.mode == "stall":
                            await self._released.wait()
                        return False  # closes the client connection mid-body
                elif isinstance(event, h11.EndOfMessage):
                    await client.send(conn.send(event) or b"")
                    return True
                else:
                    return False
