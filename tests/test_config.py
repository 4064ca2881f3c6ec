"""Tests for asyncload._config: size parsing and the S >= k x m budget check."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from asyncload._config import Limits, parse_size
from asyncload._exceptions import AsyncloadError, BudgetError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def test_budget_error_is_value_error() -> None:
    assert issubclass(BudgetError, ValueError)
    assert issubclass(BudgetError, AsyncloadError)


@pytest.mark.parametrize("n", [0, 1, 4096, 16 * MiB, 2**40 + 3])
def test_parse_size_int_passthrough(n: int) -> None:
    assert parse_size(n) == n


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256MiB", 256 * MiB),
        ("1GiB", GiB),
        ("4KiB", 4 * KiB),
        ("1.5GB", 1_500_000_000),
        ("4096", 4096),
        ("16mib", 16 * MiB),
        (" 2 GiB ", 2 * GiB),
    ],
)
def test_parse_size_strings(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "abc", "MiB", "12 parsecs", "1.2.3MiB", "-5MiB", "0x10", "1e3", "5 Mi B"]
)
def test_parse_size_bad_strings(text: str) -> None:
    with pytest.raises(BudgetError):
        parse_size(text)
    with pytest.raises(ValueError):  # callers that do not know asyncload still catch it
        parse_size(text)


@pytest.mark.parametrize("n", [-1, -4096])
def test_parse_size_negative_int(n: int) -> None:
    with pytest.raises(BudgetError, match="negative"):
        parse_size(n)


@pytest.mark.parametrize("flag", [True, False])
def test_parse_size_rejects_bool(flag: bool) -> None:
    with pytest.raises(BudgetError):
        parse_size(flag)


@pytest.mark.parametrize("value", [1.5, None, b"1MiB", [1]])
def test_parse_size_rejects_other_types(value: object) -> None:
    with pytest.raises(BudgetError):
        parse_size(value)  # type: ignore[arg-type]


def test_parse_size_names_what_in_message() -> None:
    with pytest.raises(BudgetError, match="budget"):
        parse_size("lots", what="budget")


@given(
    n=st.integers(min_value=0, max_value=2**50),
    unit=st.sampled_from([("KiB", KiB), ("MiB", MiB), ("GiB", GiB)]),
)
def test_parse_size_binary_units_property(n: int, unit: tuple[str, int]) -> None:
    suffix, factor = unit
    assert parse_size(f"{n}{suffix}") == n * factor


def test_limits_check_too_small_names_all_numbers() -> None:
    budget, k, m = 1000, 3, 512
    with pytest.raises(BudgetError) as info:
        Limits(budget=budget, block_size=m).check(k)
    numbers = set(re.findall(r"\d+", str(info.value)))
    assert {str(budget), str(k), str(m)} <= numbers


def test_limits_check_too_small_is_value_error() -> None:
    with pytest.raises(ValueError):
        Limits(budget=4 * MiB, block_size=4 * MiB).check(2)


@pytest.mark.parametrize("k", [1, 2, 7])
def test_limits_check_exact_fit_passes(k: int) -> None:
    m = 64 * KiB
    Limits(budget=k * m, block_size=m).check(k)


def test_limits_check_one_byte_short_fails() -> None:
    m = 64 * KiB
    with pytest.raises(BudgetError):
        Limits(budget=4 * m - 1, block_size=m).check(4)


def test_limits_defaults_and_slots() -> None:
    lim = Limits()
    lim.check(1)
    assert lim.slots == lim.budget // lim.block_size
    assert lim.slots >= 1
