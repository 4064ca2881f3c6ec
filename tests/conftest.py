"""Shared fixtures: every ``@pytest.mark.anyio`` test runs on asyncio and on asyncio+uvloop."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import settings

# Timing is not what the property tests check: a 2-core CI machine under load must not turn
# a slow example into a failure (the per-test pytest timeout still catches hangs).
settings.register_profile("asyncload", deadline=None, print_blob=True)
settings.load_profile("asyncload")


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    backend: tuple[str, dict[str, Any]] = request.param
    return backend


@pytest.fixture
def tmp_sources(tmp_path: pathlib.Path) -> Callable[[int], list[pathlib.Path]]:
    """Return ``make(k)``, which creates empty source dirs ``d0 .. d{k-1}`` under tmp_path."""

    def make(k: int) -> list[pathlib.Path]:
        dirs = [tmp_path / f"d{i}" for i in range(k)]
        for d in dirs:
            d.mkdir(exist_ok=True)
        return dirs

    return make
