"""Helpers for testing code that uses asyncload (and asyncload itself)."""

from __future__ import annotations

from ._faulty import FaultySource

__all__ = ["FaultySource"]
