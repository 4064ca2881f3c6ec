"""Helpers for testing code that uses asyncload (and asyncload itself).

``FaultySource`` wraps a source and injects faults; ``ThrottledSource`` wraps one
to behave like a device of a given bandwidth and latency. ``SourceConformance`` is the
conformance suite every source passes (subclass it in a pytest module); it
needs pytest, so it is imported only when asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._faulty import FaultySource
from ._throttled import ThrottledSource

if TYPE_CHECKING:
    from ._conformance import SourceConformance

__all__ = ["FaultySource", "SourceConformance", "ThrottledSource"]


def __getattr__(name: str) -> Any:
    if name == "SourceConformance":
        from ._conformance import SourceConformance

        return SourceConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
