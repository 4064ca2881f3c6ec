"""Pure planning: which blocks to read for which tensors, and where blocks go on save.

No I/O and no event loop: everything here is a function of its arguments, so
it is tested with hypothesis directly.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from ._format import BlockRef, TensorInfo

__all__ = ["BlockPlan", "LoadPlan", "Segment", "cut_blocks", "place_blocks", "plan_load"]


@dataclass(frozen=True, slots=True)
class Segment:
    """Copy ``length`` bytes from block offset ``block_start`` to tensor offset ``tensor_start``."""

    tensor: int  # index into LoadPlan.tensors
    block_start: int
    tensor_start: int
    length: int


@dataclass(frozen=True, slots=True)
class BlockPlan:
    """One block to read and the tensor pieces it carries, in tensor order."""

    block: BlockRef
    segments: tuple[Segment, ...]


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """The reads for a set of tensors: blocks in stream order, tensors in stream order."""

    tensors: tuple[TensorInfo, ...]
    blocks: tuple[BlockPlan, ...]
    pieces: tuple[int, ...]  # per tensor, how many segments fill it (0 for empty tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def read_bytes(self) -> int:
        return sum(b.block.length for b in self.blocks)


def plan_load(blocks: Sequence[BlockRef], tensors: Sequence[TensorInfo]) -> LoadPlan:
    """Plan the block reads that cover ``tensors`` (sorted by offset, non-overlapping).

    Only blocks that intersect a wanted tensor are read. Each tensor's bytes are
    covered exactly once by the segments of the returned plan.
    """
    tensors = tuple(sorted(tensors, key=lambda t: (t.begin, t.end)))
    starts = [b.offset for b in blocks]
    per_block: dict[int, list[Segment]] = {}
    pieces = [0] * len(tensors)
    for ti, t in enumerate(tensors):
        if t.nbytes == 0:
            continue
        bi = bisect.bisect_right(starts, t.begin) - 1
        pos = t.begin
        while pos < t.end:
            b = blocks[bi] if 0 <= bi < len(blocks) else None  # past the last block / none at all
            if b is None or not b.offset <= pos < b.end:
                raise ValueError(f"tensor {t.name!r} byte {pos} is not covered by block {bi}")
            n = min(t.end, b.end) - pos
            per_block.setdefault(bi, []).append(Segment(ti, pos - b.offset, pos - t.begin, n))
            pieces[ti] += 1
            pos += n
            bi += 1
    plans = tuple(BlockPlan(blocks[bi], tuple(segs)) for bi, segs in sorted(per_block.items()))
    return LoadPlan(tensors, plans, tuple(pieces))


def cut_blocks(total: int, block_size: int, boundaries: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Cut [0, total) into (offset, length) pieces of at most ``block_size``.

    A piece never crosses one of ``boundaries`` (file starts in a sharded
    checkpoint), so each block belongs to exactly one file.
    """
    if block_size < 1:
        raise ValueError("block_size must be positive")
    cuts = sorted({b for b in boundaries if 0 < b < total} | {0, total})
    out: list[tuple[int, int]] = []
    for lo, hi in itertools.pairwise(cuts):
        pos = lo
        while pos < hi:
            n = min(block_size, hi - pos)
            out.append((pos, n))
            pos += n
    return out


def place_blocks(count: int, sources: int, *, start: int = 0) -> list[int]:
    """Source index for each of ``count`` blocks: block i on source (start + i) mod k."""
    if sources < 1:
        raise ValueError("need at least one source")
    return [(start + i) % sources for i in range(count)]
