"""How concurrent failures of block reads surface (asyncload._scheduler.unwrap_group).

Async tests: telling cancellations apart needs the running loop's cancellation class.
"""

from __future__ import annotations

import pytest

import asyncload
from asyncload._scheduler import unwrap_group


@pytest.mark.anyio
async def test_a_single_error_comes_out_as_itself() -> None:
    err = asyncload.ChecksumError("block 3 is corrupt")
    assert unwrap_group(ExceptionGroup("g", [err])) is err


@pytest.mark.anyio
async def test_errors_of_one_kind_become_the_first_with_the_rest_as_notes() -> None:
    a, b = asyncload.BlockNotFoundError("block 1 missing"), asyncload.BlockNotFoundError("block 2 missing")
    out = unwrap_group(ExceptionGroup("g", [ExceptionGroup("inner", [a]), b]))
    assert out is a and any("block 2 missing" in n for n in a.__notes__)


@pytest.mark.anyio
async def test_different_asyncload_errors_are_one_group_that_except_asyncload_error_catches() -> None:
    errs = [asyncload.ChecksumError("block 3 is corrupt"), asyncload.BlockNotFoundError("block 1 missing")]
    out = unwrap_group(ExceptionGroup("g", errs))
    assert isinstance(out, asyncload.AsyncloadErrorGroup) and isinstance(out, ExceptionGroup)
    with pytest.raises(asyncload.AsyncloadError):
        raise out
    assert list(out.exceptions) == errs and "block 3 is corrupt" in str(out)


@pytest.mark.anyio
async def test_a_foreign_error_keeps_the_group() -> None:
    group = ExceptionGroup("g", [asyncload.ChecksumError("x"), ValueError("bug")])
    assert unwrap_group(group) is group
