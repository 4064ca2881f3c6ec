"""Every source passes the same conformance suite (asyncload.testing.SourceConformance).

Local directories, memory, HTTP on a private nginx; S3 joins in when tests/_servers.py has an
``s3_server`` fixture and asyncload.sources._s3 imports (see TestS3Source at the bottom).
"""

from __future__ import annotations

import importlib.util
import pathlib
import uuid
from collections.abc import AsyncIterator

import _servers
import pytest
from _servers import Nginx, nginx_fixture  # noqa: F401 - fixture `nginx`

from asyncload.sources import LocalSource, MemorySource, Source
from asyncload.sources._http import HttpSource
from asyncload.testing import SourceConformance


class TestLocalSource(SourceConformance):
    @pytest.fixture
    async def source(self, tmp_path: pathlib.Path) -> AsyncIterator[Source]:
        src = LocalSource("local", tmp_path / "root", create=True)
        yield src
        await src.aclose()

    @pytest.fixture
    def unreachable_source(self, tmp_path: pathlib.Path) -> Source:
        return LocalSource("gone", tmp_path / "no-such-dir")  # create=False: writes fail too


class TestMemorySource(SourceConformance):
    @pytest.fixture
    async def source(self) -> AsyncIterator[Source]:
        src = MemorySource("mem")
        yield src
        await src.aclose()

    # unreachable_source: memory is always reachable (the test is skipped for it).


class TestHttpSource(SourceConformance):
    unreachable_within = 10.0

    @pytest.fixture
    async def source(self, nginx: Nginx) -> AsyncIterator[Source]:
        src = HttpSource("http", f"{nginx.url}/conformance-{uuid.uuid4().hex[:10]}")
        yield src
        await src.aclose()

    @pytest.fixture
    def unreachable_source(self) -> Source:
        port = _servers.free_port()  # nothing listens there
        return HttpSource("gone", f"http://127.0.0.1:{port}/x", retries=1, backoff=0.01)


def _s3_ready() -> bool:
    return hasattr(_servers, "s3_server") and importlib.util.find_spec("asyncload.sources._s3") is not None


if _s3_ready():  # S3 hook: the fixture's value gives `location(name) -> "s3://bucket/name"`.
    from asyncload.sources._s3 import S3Source

    s3_server = getattr(_servers, "s3_server")  # noqa: B009 - defined only once S3 lands

    class TestS3Source(SourceConformance):
        @pytest.fixture
        async def source(self, s3_server: object) -> AsyncIterator[Source]:
            src = S3Source("s3", s3_server.location(f"conformance-{uuid.uuid4().hex[:10]}"))  # type: ignore[attr-defined]
            yield src
            await src.aclose()
