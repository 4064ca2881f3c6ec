"""Tests for asyncload._plan: cut_blocks, place_blocks and plan_load (pure, hypothesis-driven)."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncload._format import BlockRef, TensorInfo
from asyncload._plan import cut_blocks, place_blocks, plan_load

# --------------------------------------------------------------------------- cut_blocks

block_sizes = st.integers(1, 64) | st.sampled_from([1, 3, 7, 13, 4096, 10**9])


@st.composite
def file_layouts(draw: st.DrawFn) -> tuple[int, list[int]]:
    """(total, boundaries): file sizes (some zero), and the stream offsets where files start."""
    sizes = draw(st.lists(st.integers(0, 200) | st.just(0), max_size=6))
    total = sum(sizes)
    bounds = [sum(sizes[:i]) for i in range(1, len(sizes))]
    junk = draw(st.lists(st.integers(-50, total + 50), max_size=3))  # out of range / duplicates: ignored
    return total, bounds + junk + bounds


@given(file_layouts(), block_sizes)
def test_cut_blocks_cover_exactly_and_respect_boundaries(layout: tuple[int, list[int]], m: int) -> None:
    total, bounds = layout
    out = cut_blocks(total, m, bounds)
    pos = 0
    for off, n in out:
        assert off == pos and 1 <= n <= m
        pos += n
    assert pos == total
    cuts = sorted({b for b in bounds if 0 < b < total} | {0, total})
    for off, n in out:
        assert not any(off < b < off + n for b in cuts), (off, n)
    # and no more blocks than needed: each file-piece is cut greedily
    assert len(out) == sum(math.ceil((hi - lo) / m) for lo, hi in itertools.pairwise(cuts))
    block_starts = {off for off, _ in out}
    assert {b for b in cuts if b < total} <= block_starts


@given(st.integers(0, 1000), block_sizes)
def test_cut_blocks_without_boundaries(total: int, m: int) -> None:
    out = cut_blocks(total, m)
    assert [off for off, _ in out] == list(range(0, total, m))
    assert all(n == m for _, n in out[:-1])
    assert sum(n for _, n in out) == total


def test_cut_blocks_examples() -> None:
    assert cut_blocks(0, 4) == []
    assert cut_blocks(10, 4) == [(0, 4), (4, 4), (8, 2)]
    assert cut_blocks(10, 4, [5]) == [(0, 4), (4, 1), (5, 4), (9, 1)]
    assert cut_blocks(10, 100, [3, 3, 0, 10, 12, -1]) == [(0, 3), (3, 7)]


@pytest.mark.parametrize("m", [0, -1])
def test_cut_blocks_rejects_non_positive_block_size(m: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        cut_blocks(10, m)


# --------------------------------------------------------------------------- place_blocks


@given(st.integers(0, 300), st.integers(1, 12), st.integers(0, 40))
def test_place_blocks_is_i_mod_k(count: int, k: int, start: int) -> None:
    got = place_blocks(count, k, start=start)
    assert got == [(start + i) % k for i in range(count)]
    counts = Counter(got)
    assert max(counts.values(), default=0) - min((counts[s] for s in range(k)), default=0) <= 1


def test_place_blocks_default_start() -> None:
    assert place_blocks(5, 3) == [0, 1, 2, 0, 1]


@pytest.mark.parametrize("k", [0, -2])
def test_place_blocks_needs_a_source(k: int) -> None:
    with pytest.raises(ValueError):
        place_blocks(3, k)


# --------------------------------------------------------------------------- plan_load


@st.composite
def load_cases(draw: st.DrawFn) -> tuple[list[BlockRef], list[TensorInfo], list[TensorInfo]]:
    """Blocks from cut_blocks over random files, tensors with gaps (some empty, maybe one huge),
    and a random subset of the tensors in random order."""
    tensors: list[TensorInfo] = []
    pos = 0
    for i in range(draw(st.integers(0, 10))):
        pos += draw(st.integers(0, 9))  # gap (header bytes, padding)
        size = draw(st.integers(0, 40) | st.just(0) | st.integers(200, 3000))
        tensors.append(TensorInfo(f"t{i}", "U8", (size,), pos, pos + size))
        pos += size
    total = pos + draw(st.integers(0, 9))
    bounds = draw(st.lists(st.integers(0, max(total, 0)), max_size=4))
    m = draw(block_sizes)
    k = draw(st.integers(1, 4))
    cuts = cut_blocks(total, m, bounds)
    srcs = place_blocks(len(cuts), k)
    blocks = [BlockRef(i, f"s{srcs[i]}", f"{i:06d}", off, n, None) for i, (off, n) in enumerate(cuts)]
    chosen = draw(st.lists(st.sampled_from(tensors), unique_by=lambda t: t.name) if tensors else st.just([]))
    chosen = draw(st.permutations(chosen))
    return blocks, tensors, list(chosen)


def _intersects(b: BlockRef, t: TensorInfo) -> bool:
    return t.nbytes > 0 and b.offset < t.end and t.begin < b.end


@settings(max_examples=300, deadline=None)
@given(load_cases())
def test_plan_load_covers_each_selected_byte_once(
    case: tuple[list[BlockRef], list[TensorInfo], list[TensorInfo]],
) -> None:
    blocks, _all, chosen = case
    plan = plan_load(blocks, chosen)
    assert list(plan.tensors) == sorted(chosen, key=lambda t: (t.begin, t.end))
    assert plan.nbytes == sum(t.nbytes for t in chosen)

    # only blocks that intersect a selected tensor, each once, in stream order
    read = [bp.block for bp in plan.blocks]
    assert [b.offset for b in read] == sorted({b.offset for b in read})
    assert read == [b for b in blocks if any(_intersects(b, t) for t in chosen)]
    assert plan.read_bytes == sum(b.length for b in read)

    covered: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(plan.tensors))}
    for bp in plan.blocks:
        assert bp.segments, "a block is read only when it carries something"
        assert [s.tensor for s in bp.segments] == sorted(s.tensor for s in bp.segments)
        for s in bp.segments:
            t = plan.tensors[s.tensor]
            assert s.length > 0
            assert 0 <= s.block_start and s.block_start + s.length <= bp.block.length  # within the block
            assert 0 <= s.tensor_start and s.tensor_start + s.length <= t.nbytes  # within the tensor
            # the same stream bytes on both sides
            assert bp.block.offset + s.block_start == t.begin + s.tensor_start
            covered[s.tensor].append((s.tensor_start, s.length))
    for i, t in enumerate(plan.tensors):
        pieces = sorted(covered[i])
        pos = 0
        for start, n in pieces:  # contiguous from 0 to nbytes: every byte exactly once
            assert start == pos
            pos += n
        assert pos == t.nbytes
        assert plan.pieces[i] == len(pieces) == sum(_intersects(b, t) for b in blocks)
        assert (plan.pieces[i] == 0) == (t.nbytes == 0)


@settings(deadline=None)
@given(load_cases())
def test_plan_load_of_a_subset_is_the_restriction(
    case: tuple[list[BlockRef], list[TensorInfo], list[TensorInfo]],
) -> None:
    blocks, tensors, chosen = case
    full = plan_load(blocks, tensors)
    part = plan_load(blocks, chosen)
    assert {bp.block.index for bp in part.blocks} <= {bp.block.index for bp in full.blocks}
    assert part.read_bytes <= full.read_bytes

    def segs(plan):  # (tensor name, absolute stream start, length) for each segment
        return sorted(
            (plan.tensors[s.tensor].name, bp.block.offset + s.block_start, s.length)
            for bp in plan.blocks
            for s in bp.segments
        )

    names = {t.name for t in chosen}
    assert segs(part) == [s for s in segs(full) if s[0] in names]


def test_plan_load_example() -> None:
    blocks = [BlockRef(i, "s0", f"{i}", off, n, None) for i, (off, n) in enumerate(cut_blocks(20, 8))]
    a = TensorInfo("a", "U8", (6,), 2, 8)
    big = TensorInfo("big", "U8", (11,), 8, 19)
    empty = TensorInfo("e", "U8", (0,), 19, 19)
    plan = plan_load(blocks, [empty, big, a])
    assert [t.name for t in plan.tensors] == ["a", "big", "e"]
    assert plan.pieces == (1, 2, 0)
    assert [bp.block.index for bp in plan.blocks] == [0, 1, 2]
    assert [
        [(s.tensor, s.block_start, s.tensor_start, s.length) for s in bp.segments] for bp in plan.blocks
    ] == [
        [(0, 2, 0, 6)],
        [(1, 0, 0, 8)],
        [(1, 0, 8, 3)],
    ]
    only_empty = plan_load(blocks, [empty])
    assert only_empty.blocks == () and only_empty.pieces == (0,)
    assert plan_load(blocks, []).blocks == ()


@pytest.mark.parametrize(
    ("blocks", "tensor"),
    [
        ([(0, 8), (10, 8)], (4, 12)),  # a hole between blocks
        ([(0, 8)], (4, 12)),  # past the last block
        ([(4, 8)], (0, 6)),  # before the first block
        ([], (0, 1)),  # no blocks at all
    ],
)
def test_plan_load_uncovered_tensor_raises_value_error(
    blocks: list[tuple[int, int]], tensor: tuple[int, int]
) -> None:
    refs = [BlockRef(i, "s0", f"{i}", off, n, None) for i, (off, n) in enumerate(blocks)]
    t = TensorInfo("w", "U8", (tensor[1] - tensor[0],), *tensor)
    with pytest.raises(ValueError, match="'w'"):
        plan_load(refs, [t])
