"""A real S3 server for the S3-source tests: a private single-node Ceph RADOS Gateway on 127.0.0.1.

* ``s3_server`` (session) runs scripts/ceph-up.sh in a temp dir on a free port and
  scripts/ceph-down.sh at the end (also when the start fails half-way). Without Ceph
  installed it skips, or fails when ``ASYNCLOAD_TEST_SERVERS=require`` (CI).
* ``s3_env`` (per test) points the AWS environment variables at it with
  ``monkeypatch``, for code that builds its own sources (save, pack, open); nothing leaks
  into other tests. Code that builds an :class:`S3Source` itself passes
  :meth:`S3Server.options` instead.

Test modules import the fixtures they use:
``from _s3server import s3_env_fixture, s3_server_fixture  # noqa: F401`` (the functions are
named ``*_fixture`` so that test parameters do not shadow an import).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import obstore
import pytest
from obstore.store import S3Store

from asyncload.sources._s3 import S3Options

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
ACCESS_KEY = "asyncload-test-access"
SECRET_KEY = "asyncload-test-s3cr3t-Vq7w"  # asserted absent from every error message
# Every AWS variable that could steer a source away from the test server.
AWS_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_ALLOW_HTTP",
    "ASYNCLOAD_S3_ALLOW_HTTP",
)


def _servers_required() -> bool:
    return os.environ.get("ASYNCLOAD_TEST_SERVERS", "") == "require"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class S3Server:
    """A running Ceph RGW with one user; buckets are made per test with :meth:`bucket`."""

    dir: pathlib.Path
    port: int
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def options(self, **overrides: Any) -> S3Options:
        """S3Options that reach this server, with ``overrides``."""
        kw: dict[str, Any] = {
            "endpoint": self.endpoint,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "region": "us-east-1",
        }
        kw.update(overrides)
        return S3Options(**kw)

    def store(self, bucket: str) -> S3Store:
        """A raw obstore client for ``bucket`` (test setup and checks, not the code under test)."""
        return S3Store(
            bucket,
            endpoint=self.endpoint,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
            region="us-east-1",
            client_options={"allow_http": True},
        )

    def bucket(self, what: str = "b") -> str:
        """Create a fresh bucket (a presigned ``PUT /bucket/``) and return its name."""
        name = f"{what}-{uuid.uuid4().hex[:12]}"
        url = obstore.sign(self.store(name), "PUT", "", timedelta(minutes=5))
        with urllib.request.urlopen(urllib.request.Request(url, method="PUT", data=b""), timeout=30) as r:
            assert r.status == 200, r.status
        return name

    def location(self, name: str) -> str:
        """``s3://<fresh bucket>/<name>`` (for tests that only need somewhere to write)."""
        return f"s3://{self.bucket('loc')}/{name}"

    def set_env(self, monkeypatch: pytest.MonkeyPatch, **overrides: str) -> None:
        """Point the AWS variables at this server (per test: monkeypatch undoes it)."""
        for var in AWS_VARS:
            monkeypatch.delenv(var, raising=False)
        home = self.dir / "empty-home"
        home.mkdir(exist_ok=True)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))  # none there
        monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "config"))
        values = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }
        values.update(overrides)
        for var, value in values.items():
            monkeypatch.setenv(var, value)


def _down(dir: pathlib.Path) -> None:
    subprocess.run(["bash", str(SCRIPTS / "ceph-down.sh"), str(dir)], check=False, timeout=120)


@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One private Ceph RGW for the whole session (stopped at its end)."""
    needed = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool", "ceph-authtool")
    absent = [p for p in needed if shutil.which(p) is None]
    if absent:
        msg = f"Ceph is not installed (missing {', '.join(absent)}; scripts/install-servers.sh installs it)"
        if _servers_required():
            pytest.fail(msg + "; ASYNCLOAD_TEST_SERVERS=require", pytrace=False)
        pytest.skip(msg)
    dir = tmp_path_factory.mktemp("ceph")
    env = {
        **os.environ,
        "CEPH_S3_ACCESS_KEY": ACCESS_KEY,
        "CEPH_S3_SECRET_KEY": SECRET_KEY,
        "MEMSTORE_BYTES": str(1 << 30),
    }
    last = ""
    for _ in range(3):  # a port taken between choosing and binding: try another
        port = _free_port()
        try:
            r = subprocess.run(
                ["bash", str(SCRIPTS / "ceph-up.sh"), str(dir), str(port)],
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
            )
        except subprocess.TimeoutExpired:
            _down(dir)
            raise
        if r.returncode == 0:
            break
        last = r.stderr[-4000:]
        _down(dir)
    else:
        raise RuntimeError(f"Ceph RGW did not start:\n{last}")
    try:
        yield S3Server(dir, port)
    finally:
        _down(dir)


@pytest.fixture(name="s3_env")
def s3_env_fixture(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, with the AWS environment pointed at it for this test only."""
    s3_server.set_env(monkeypatch)
    return s3_server
