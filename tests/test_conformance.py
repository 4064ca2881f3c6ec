"""Every source passes the same conformance suite (asyncload.testing.SourceConformance).

Local directories, memory and HTTP on a private nginx here; S3 on a real Ceph RGW in
tests/test_s3.py (TestS3Conformance), next to its server fixture.
"""

from __future__ import annotations

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


class TestHttpSourceOnTheCallersLoop(SourceConformance):
    """``HttpSource(io_thread=False)``: the connections on the calling event loop, no I/O thread."""

    unreachable_within = 10.0

    @pytest.fixture
    async def source(self, nginx: Nginx) -> AsyncIterator[Source]:
        src = HttpSource("http", f"{nginx.url}/conformance-{uuid.uuid4().hex[:10]}", io_thread=False)
        yield src
        await src.aclose()

    @pytest.fixture
    def unreachable_source(self) -> Source:
        port = _servers.free_port()
        return HttpSource("gone", f"http://127.0.0.1:{port}/x", retries=1, backoff=0.01, io_thread=False)


# S3Source runs the same suite against a real Ceph RGW: tests/test_s3.py::TestS3Conformance.
