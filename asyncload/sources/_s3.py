"""S3-compatible object stores (AWS S3, Ceph RGW, MinIO, Cloudflare R2) as sources.

``s3://bucket/prefix`` holds block ``key`` as the object ``prefix/key``. The
client is obstore (Rust ``object_store`` under a tokio runtime): measured
against aiobotocore on Ceph RGW it moved as many or more bytes per second
with a quarter to a half less client CPU per GB (docs/remote.md has the figures);
block reads skip it where they can (below), which removes the copy out of its buffers.

* Reads are ranged GETs. By default (``S3Options.direct_reads``, static keys
  or unsigned access) asyncload signs them itself (``_sigv4``) and sends them
  through the HTTP source's client on the source's own I/O thread, the body
  received straight into the caller's buffer; an error answer is asked again
  through obstore for its S3 code. Otherwise obstore's body is copied, chunk
  by chunk (4 MiB) as it arrives, into the caller's buffer (in a worker thread). The range
  the server says it returns is checked against the one asked for
  (``Content-Range``), and the byte count against it. A body that breaks off
  (reset, stall) is resumed from the first missing byte, pinned to the first
  response's ETag so that a replaced object is never mixed with the old one.
  A read starting at or past the end returns 0.
* Writes are one PUT, or a multipart upload above ``multipart_threshold``;
  either way the object appears whole or not at all. obstore reads the
  caller's buffer in place while it uploads, so a write that is cancelled
  still waits for its request to finish (within the timeouts) before the
  buffer is handed back.
* Timeouts (connect, stall, whole request) and retries with exponential
  backoff and jitter on 5xx, 503 SlowDown, connection errors and timeouts are
  obstore's, configured from :class:`S3Options`.
* Errors are mapped here, from the HTTP status and the S3 error code only:
  404 -> :class:`~asyncload.BlockNotFoundError` (naming the bucket for
  NoSuchBucket), anything else -> :class:`~asyncload.SourceUnavailableError`.
  The client's own message is never passed on (an S3 error body may echo the
  request signature); neither is any key.
"""

from __future__ import annotations

import atexit
import random
import re
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import anyio
import obstore
from obstore.exceptions import (
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from .._exceptions import BlockNotFoundError, SourceError, SourceUnavailableError
from .._threads import run_sync
from ._base import Source
from ._http import HttpSource
from ._s3config import DEFAULT_S3_OPTIONS, S3Options, S3Settings, boto3_provider, display_endpoint, resolve
from ._sigv4 import Signer

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig

__all__ = ["S3Options", "S3Source", "parse_s3_location"]

# Chunks handed from the client to Python while a body streams in: few enough hand-offs per
# block that their overhead is small; at most one chunk per read in flight is held outside
# the caller's buffer. Each chunk of 64 KiB or more is copied into the buffer in a worker
# thread (the project's rule for copies), so the event loop only schedules.
_CHUNK = 4 << 20
_COPY_IN_THREAD = 64 << 10
# What the client raises: its own classes, and builtin OSErrors (a missing object is a
# FileNotFoundError, some I/O failures are plain OSErrors).
_CLIENT_ERRORS = (BaseError, OSError)
_CODE_RE = re.compile(r"<Code>([A-Za-z0-9.]+)</Code>")
_STATUS_RE = re.compile(r"status code: (\d{3})")
_SECRETISH_RE = re.compile(
    r"(?i)(signature|credential|x-amz-security-token|x-amz-signature|authorization)=[^&\s]*"
)
_HINTS = {
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "InvalidAccessKeyId": "the access key is not known to the server",
    "AccessDenied": "the credentials are not allowed to do this",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is not valid",
    "RequestTimeTooSkewed": "the local clock differs too much from the server's",
    "AllAccessDisabled": "all access to this object has been disabled",
}


def _let_client_threads_finish() -> None:
    """At interpreter exit, give the client's threads a moment with the GIL released.

    obstore completes each call on one of its own threads, which hands the result to the
    event loop and then needs the GIL once more to return. A program that exits within a
    few milliseconds of its last S3 call can start finalizing Python before that thread
    gets the GIL; on Python < 3.13 the thread is then ended with ``pthread_exit`` inside
    Rust frames, and the process aborts (SIGABRT, exit status 134) after having done all
    its work -- measured here in 6 of 40 runs of a short script. atexit handlers run
    before finalization starts, so sleeping 20 ms here lets such a thread finish (0 of 40).
    """
    time.sleep(0.02)


_exit_hook_registered = False


def parse_s3_location(location: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://bucket/prefix`` (prefix without leading or trailing ``/``)."""
    if not location.lower().startswith("s3://"):
        raise BlockNotFoundError(f"{location!r} is not an s3://bucket/prefix location")
    rest = location[5:]
    bucket, _, prefix = rest.partition("/")
    if not bucket or "?" in rest or "#" in rest:
        raise BlockNotFoundError(f"{location!r} is not an s3://bucket/prefix location")
    prefix = prefix.strip("/")
    if prefix and ("" in prefix.split("/") or {".", ".."} & set(prefix.split("/"))):
        raise BlockNotFoundError(f"{location!r}: the prefix has empty, '.' or '..' parts")
    return bucket, prefix


def _copy(dst: memoryview, src: memoryview) -> None:
    dst[:] = src


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


_STORES: dict[tuple[str, S3Options, S3Settings], S3Store] = {}


class S3Source(Source):
    """Blocks stored as objects ``prefix/key`` in an S3 bucket (``s3://bucket/prefix``)."""

    supports_writes = True

    def __init__(self, id: str, location: str, *, options: S3Options | None = None) -> None:
        super().__init__(id, location)
        global _exit_hook_registered
        if not _exit_hook_registered:
            atexit.register(_let_client_threads_finish)
            _exit_hook_registered = True
        self.bucket, self.prefix = parse_s3_location(location)
        self.options = options if options is not None else DEFAULT_S3_OPTIONS
        self.settings: S3Settings = resolve(self.options)
        self.endpoint = display_endpoint(self.settings.endpoint, self.settings.region)
        # Sources of one bucket with the same settings share one client, and so its warm
        # connections (the manifest GET's too): no new handshakes per source or per open.
        shared = (self.bucket, self.options, self.settings)
        store = _STORES.get(shared)
        if store is None:
            store = _STORES[shared] = self._make_store()
        self._store = store
        self._limiter: anyio.CapacityLimiter | None = None  # made on first use, inside the event loop
        self._bucket_exists = False  # set once an answer showed it (a 404 is then NoSuchKey)
        self._direct = self._make_direct_reader()

    def _make_store(self) -> S3Store:
        o, s = self.options, self.settings
        client: ClientConfig = {
            "allow_http": s.allow_http,
            "connect_timeout": _seconds(o.connect_timeout),
            "read_timeout": _seconds(o.stall_timeout),
            "timeout": _seconds(o.request_timeout),
            "pool_max_idle_per_host": str(o.max_connections),
        }
        retry: RetryConfig = {
            "max_retries": o.max_retries,
            "retry_timeout": _seconds(o.retry_timeout),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": _seconds(5), "base": 2},
        }
        config: dict[str, Any] = {
            "region": s.region,
            "virtual_hosted_style_request": s.virtual_hosted_style,
            # As botocore does: over TLS the body is protected by TLS and not hashed into the
            # signature (UNSIGNED-PAYLOAD; hashing costs ~0.9 s CPU per GiB written); over
            # plain http the signature covers the body's SHA-256.
            "unsigned_payload": not s.allow_http,
        }
        if s.endpoint is not None:
            config["endpoint"] = s.endpoint
        provider = None
        if s.access_key_id and s.secret_access_key:
            config["access_key_id"] = s.access_key_id
            config["secret_access_key"] = s.secret_access_key
            if s.session_token:
                config["session_token"] = s.session_token
        elif s.credentials_from.startswith("boto3 profile "):
            provider = boto3_provider(s.credentials_from.removeprefix("boto3 profile "))
        elif s.credentials_from == "none":
            config["skip_signature"] = True
        try:
            return S3Store(
                self.bucket,
                config=config,  # type: ignore[arg-type]
                client_options=client,
                retry_config=retry,
                credential_provider=provider,
            )
        except _CLIENT_ERRORS as e:
            raise SourceUnavailableError(
                f"source {self.id!r}: cannot configure S3 access to {self.location!r} at {self.endpoint}: "
                f"{type(e).__name__}"
            ) from None

    def _make_direct_reader(self) -> _DirectReader | None:
        """The signed-GET reader for this bucket, or None where obstore must read (see S3Options)."""
        o, s = self.options, self.settings
        if not o.direct_reads:
            return None
        sign = None
        if s.access_key_id and s.secret_access_key:
            signer = Signer(s.access_key_id, s.secret_access_key, s.region, s.session_token)
            sign = signer.sign
        elif s.credentials_from != "none":
            return None  # credentials from a chain or provider that only the client follows
        u = urlsplit(s.endpoint or f"https://s3.{s.region}.amazonaws.com")
        if u.hostname is None:
            return None
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        port = f":{u.port}" if u.port else ""
        base = u.path.rstrip("/")
        if s.virtual_hosted_style:
            if "." in self.bucket and u.scheme == "https":
                return None  # bucket.with.dots.host does not match the server's certificate
            location = f"{u.scheme}://{self.bucket}.{host}{port}{base}"
        else:
            location = f"{u.scheme}://{host}{port}{base}/{quote(self.bucket, safe='-._~')}"
        return _DirectReader(
            self.id,
            location,
            connections=o.max_connections,
            connect_timeout=o.connect_timeout,
            first_byte_timeout=o.stall_timeout,
            stall_timeout=o.stall_timeout,
            retries=o.max_retries,
            sign=sign,
            names=lambda path: f"source {self.id!r}: s3://{self.bucket}/{path} at {self.endpoint}",
        )

    # -- names and errors ----------------------------------------------------------
    def _path(self, key: str) -> str:
        parts = key.split("/")
        if "" in parts or "." in parts or ".." in parts or "\0" in key:
            raise BlockNotFoundError(f"source {self.id!r}: key {key!r} is not a safe relative path")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._path(key)}"

    def _redact(self, text: str) -> str:
        text = _SECRETISH_RE.sub(lambda m: f"{m.group(1)}=<redacted>", text)
        for secret in (self.settings.secret_access_key, self.settings.session_token):
            if secret:
                text = text.replace(secret, "<redacted>")
        return text

    def _error(self, e: Exception, key: str, op: str) -> SourceError:
        """Our exception for the client's ``e``: status and S3 code only, never the client's message."""
        text = str(e)
        code_m, status_m = _CODE_RE.search(text), _STATUS_RE.search(text)
        code = code_m.group(1) if code_m else ""
        status = int(status_m.group(1)) if status_m else None
        where = self._where(key)
        at = f"source {self.id!r}: {op} {where} at {self.endpoint}"
        if isinstance(e, NotFoundError | FileNotFoundError) or status == 404:
            if code == "NoSuchBucket":
                return BlockNotFoundError(f"{at}: bucket {self.bucket!r} does not exist (NoSuchBucket)")
            if code == "NoSuchKey":
                return BlockNotFoundError(f"{at}: no object {self._path(key)!r} in bucket {self.bucket!r}")
            return BlockNotFoundError(f"{at}: not found (no such object {self._path(key)!r} or bucket)")
        if isinstance(e, PermissionDeniedError | UnauthenticatedError) or status in (401, 403):
            hint = _HINTS.get(code, "access refused")
            detail = f"HTTP {status or 403}{' ' + code if code else ''}: {hint}"
            return SourceUnavailableError(
                f"{at}: {detail} (credentials from {self.settings.credentials_from})"
            )
        if isinstance(e, PreconditionError) or status == 412:
            return SourceUnavailableError(f"{at}: the object was replaced while it was being read")
        if status is not None:
            return SourceUnavailableError(
                f"{at}: HTTP {status}{' ' + code if code else ''} (after {self.options.max_retries} retries)"
            )
        first = text.split("\n", 1)[0].split(": <?xml", 1)[0]
        if "timed out" in text.lower() or "TimedOut" in text:
            first = f"timed out ({first})"
        return SourceUnavailableError(f"{at}: {self._redact(first)[:400]}")

    def _limit(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.options.max_connections)
        return self._limiter

    async def _backoff(self, attempt: int) -> None:
        """Wait before retry ``attempt`` (1, 2, ...): full jitter over 0.1 s x 2**attempt, at most 5 s."""
        await anyio.sleep(random.uniform(0, min(5.0, 0.1 * 2**attempt)))

    # -- reads ---------------------------------------------------------------------
    async def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        path = self._path(key)
        if self._direct is not None and len(buf) > 0:
            return await self._counted_read(lambda: self._read_direct(path, key, offset, buf))
        return await self._counted_read(lambda: self._read(path, key, offset, buf))

    async def _read_direct(self, path: str, key: str, offset: int, buf: memoryview) -> int:
        """A signed ranged GET into ``buf``; an error answer is asked again through the client,
        whose S3 error code makes the message (NoSuchBucket, SignatureDoesNotMatch...)."""
        assert self._direct is not None
        async with self._limit():
            try:
                n = await self._direct.read_into(path, offset, buf)
            except _Answered as answer:
                if answer.status >= 500:  # retried already, as the client would: no second round
                    raise SourceUnavailableError(
                        f"source {self.id!r}: GET {self._where(key)} at {self.endpoint}: "
                        f"HTTP {answer.status} (after {self.options.max_retries} retries)"
                    ) from None
            else:
                self._bucket_exists = True
                return n
        return await self._read(path, key, offset, buf)

    async def _read(self, path: str, key: str, offset: int, buf: memoryview) -> int:
        want = len(buf)
        if want == 0:
            await self.size(key)  # a missing object is missing for an empty read too
            return 0
        done = 0
        expected = want  # bytes this read can return; lowered once the object's size is known
        etag: str | None = None
        attempt = 0
        async with self._limit():
            while True:
                options: dict[str, Any] = {"range": (offset + done, offset + want)}
                if etag is not None:
                    options["if_match"] = etag
                try:
                    result = await obstore.get_async(self._store, path, options=options)  # type: ignore[arg-type]
                except _CLIENT_ERRORS as e:
                    if done == 0 and "status code: 416" in str(e):
                        return 0  # the range starts at or after the end of the object
                    raise self._error(e, key, "GET") from None
                size = int(result.meta["size"])
                expected = max(0, min(want, size - offset))
                first, stop = result.range
                if first != offset + done or stop != offset + expected:
                    raise SourceUnavailableError(
                        f"source {self.id!r}: GET {self._where(key)} at {self.endpoint}: asked for bytes "
                        f"{offset + done}-{offset + want - 1}, the server sent {first}-{stop - 1} "
                        f"of {size}"
                    )
                etag = etag or result.meta.get("e_tag")
                overflow = False
                try:
                    async for chunk in result.stream(min_chunk_size=_CHUNK):
                        view = memoryview(chunk)
                        n = len(view)
                        if done + n > expected:
                            overflow = True
                            break
                        if n >= _COPY_IN_THREAD:
                            await run_sync(_copy, buf[done : done + n], view, workers=self.threads)
                        else:
                            buf[done : done + n] = view
                        done += n
                except _CLIENT_ERRORS as e:
                    failure: SourceError = self._error(e, key, "GET (body)")
                else:
                    if overflow:
                        raise SourceUnavailableError(
                            f"source {self.id!r}: GET {self._where(key)} at {self.endpoint}: the server "
                            f"sent more than the {expected} bytes of the range"
                        )
                    if done == expected:
                        self._bucket_exists = True
                        return done
                    failure = SourceUnavailableError(
                        f"source {self.id!r}: GET {self._where(key)} at {self.endpoint}: the body ended "
                        f"after {done} of {expected} bytes"
                    )
                if attempt >= self.options.max_retries:
                    raise failure
                attempt += 1
                await self._backoff(attempt)

    async def size(self, key: str) -> int:
        path = self._path(key)
        async with self._limit():
            try:
                meta = await obstore.head_async(self._store, path)
            except _CLIENT_ERRORS as e:
                raise await self._explain(e, path, key) from None
        self._bucket_exists = True
        return int(meta["size"])

    async def _explain(self, e: Exception, path: str, key: str) -> SourceError:
        """The error for a failed HEAD. A HEAD answer has no body, so no S3 error code; for a 403,
        or a 404 before anything showed that the bucket exists, one 1-byte GET asks again to
        learn it (SignatureDoesNotMatch, NoSuchBucket...). The writer HEADs every block before
        writing it, so a 404 in a bucket known to exist must cost no second request."""
        error = self._error(e, key, "HEAD")
        if isinstance(e, NotFoundError | FileNotFoundError):
            if self._bucket_exists:
                return BlockNotFoundError(
                    f"source {self.id!r}: HEAD {self._where(key)} at {self.endpoint}: no object "
                    f"{path!r} in bucket {self.bucket!r}"
                )
        elif not isinstance(e, PermissionDeniedError | UnauthenticatedError):
            return error
        try:
            await obstore.get_range_async(self._store, path, start=0, length=1)
        except _CLIENT_ERRORS as e2:
            if _CODE_RE.search(str(e2)):
                if "<Code>NoSuchKey</Code>" in str(e2):
                    self._bucket_exists = True
                return self._error(e2, key, "HEAD")
        return error

    # -- writes --------------------------------------------------------------------
    async def write(self, key: str, data: memoryview) -> None:
        path = self._path(key)
        o = self.options
        multipart = len(data) > o.multipart_threshold

        async def run() -> None:
            async with self._limit():
                # obstore reads ``data`` in place during the upload: even when cancelled, wait
                # until the request is over before the caller may reuse the buffer.
                with anyio.CancelScope(shield=True):
                    try:
                        await obstore.put_async(
                            self._store,
                            path,
                            data,
                            use_multipart=multipart,
                            chunk_size=o.part_size,
                            max_concurrency=o.multipart_concurrency,
                        )
                    except _CLIENT_ERRORS as e:
                        raise self._error(e, key, "multipart upload" if multipart else "PUT") from None
                    self._bucket_exists = True

        await self._counted_write(run, len(data))

    async def delete(self, key: str) -> None:
        path = self._path(key)
        async with self._limit():
            try:
                await obstore.delete_async(self._store, path)
            except (NotFoundError, FileNotFoundError):
                pass
            except _CLIENT_ERRORS as e:
                raise self._error(e, key, "DELETE") from None

    async def aclose(self) -> None:
        """The direct reader's connections and thread end here; the client's when it is dropped."""
        if self._direct is not None:
            await self._direct.aclose()


class _Answered(Exception):
    """The server answered a direct GET with an error status (the client asks again for the code)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class _DirectReader(HttpSource):
    """:class:`HttpSource` for an S3 bucket: its failures name the source, the ``s3://`` object and
    the endpoint (``names``; never the URL it signs), and error answers come back as
    :class:`_Answered`."""

    def __init__(self, id: str, location: str, *, names: Callable[[str], str], **kw: Any) -> None:
        super().__init__(id, location, **kw)
        self._names = names

    def _where(self, key: str) -> str:
        return self._names(key)

    def _status_error(self, method: str, key: str, resp: Any) -> Exception:
        return _Answered(resp.status)
