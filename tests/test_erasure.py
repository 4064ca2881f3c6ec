"""Reed-Solomon stripe codec (asyncload.codecs): every loss pattern, the error path, the layout."""

from __future__ import annotations

import itertools
import pickle
import random
from collections.abc import Collection

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncload._exceptions import AsyncloadError, IntegrityError
from asyncload.codecs import MAX_WIDTH, ErasureCode, StripeError, _erasure, decode_into, encode_into

# (k, P) from issue 4: k = width = data + parity sources, P parity blocks per stripe.
CODES = [(3, 1), (4, 2), (6, 2), (10, 4)]
BLOCK_LENS = [1, 4095, 4096 + 7]
SENTINEL = 0xA5


def make_stripe(code: ErasureCode, block_len: int, seed: int) -> list[bytes]:
    """Random data blocks plus their parity, as immutable bytes (index order: data first)."""
    rng = random.Random(seed)
    data = [rng.randbytes(block_len) for _ in range(code.data)]
    parity = [bytearray(block_len) for _ in range(code.parity)]
    encode_into(code, [memoryview(b) for b in data], [memoryview(p) for p in parity])
    return data + [bytes(p) for p in parity]


def sentinel_buffers(indices: list[int] | tuple[int, ...], block_len: int) -> dict[int, bytearray]:
    return {i: bytearray([SENTINEL]) * block_len for i in indices}


def survivors(blocks: list[bytes], lost: Collection[int]) -> dict[int, memoryview]:
    return {i: memoryview(b) for i, b in enumerate(blocks) if i not in lost}


# --- the acceptance matrix: every loss pattern -------------------------------------------------------------


@pytest.fixture(params=["segment-32KiB", "segment-1000"])
def segment(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run with the real segment size, and with a small one so blocks span several segments + a tail."""
    if request.param == "segment-1000":
        monkeypatch.setattr(_erasure, "_SEGMENT", 1000)
        monkeypatch.setattr(_erasure, "_DECODE_SEGMENT", 1000)
    return _erasure._SEGMENT


@pytest.mark.parametrize("block_len", BLOCK_LENS)
@pytest.mark.parametrize(("width", "parity"), CODES, ids=[f"k{k}P{p}" for k, p in CODES])
def test_every_loss_pattern_rebuilds_byte_identical(
    width: int, parity: int, block_len: int, segment: int
) -> None:
    code = ErasureCode(width - parity, parity)
    blocks = make_stripe(code, block_len, seed=width * 1000 + block_len)
    patterns = 0
    for n_lost in range(1, parity + 1):  # every loss set up to P, the C(k, P) ones included
        for lost in itertools.combinations(range(width), n_lost):
            out = sentinel_buffers(lost, block_len)
            decode_into(code, survivors(blocks, set(lost)), {i: memoryview(b) for i, b in out.items()})
            for i in lost:
                assert out[i] == blocks[i], f"{code} lost {lost}: block {i} differs"
            patterns += 1
    assert patterns == sum(len(list(itertools.combinations(range(width), n))) for n in range(1, parity + 1))


@pytest.mark.parametrize(("width", "parity"), CODES, ids=[f"k{k}P{p}" for k, p in CODES])
def test_only_missing_data_blocks_requested(width: int, parity: int) -> None:
    """The loader's case: rebuild just the lost data blocks, from exactly the survivors."""
    code = ErasureCode(width - parity, parity)
    block_len = 2 * max(_erasure._SEGMENT, _erasure._DECODE_SEGMENT) + 7  # several segments + a tail
    blocks = make_stripe(code, block_len, seed=width)
    for lost in itertools.combinations(range(width), parity):
        wanted = [i for i in lost if i < code.data]
        out = sentinel_buffers(wanted, block_len)
        decode_into(code, survivors(blocks, set(lost)), {i: memoryview(b) for i, b in out.items()})
        assert all(out[i] == blocks[i] for i in wanted)


@pytest.mark.parametrize("block_len", [1, 4096 + 7])
@pytest.mark.parametrize(("width", "parity"), CODES, ids=[f"k{k}P{p}" for k, p in CODES])
def test_losing_parity_plus_one_raises_and_writes_nothing(width: int, parity: int, block_len: int) -> None:
    code = ErasureCode(width - parity, parity)
    blocks = make_stripe(code, block_len, seed=7)
    for lost in itertools.combinations(range(width), parity + 1):
        out = sentinel_buffers(lost, block_len)
        with pytest.raises(StripeError) as info:
            decode_into(code, survivors(blocks, set(lost)), {i: memoryview(b) for i, b in out.items()})
        assert all(buf == bytearray([SENTINEL]) * block_len for buf in out.values()), f"lost {lost}: wrote"
        err = info.value
        assert err.needed == code.data and err.width == width
        assert err.available == tuple(i for i in range(width) if i not in lost)
        assert f"{width - parity - 1} of {width} blocks available" in str(err)
        assert f"{code.data} needed" in str(err)


def test_losing_everything_raises() -> None:
    code = ErasureCode(4, 2)
    out = sentinel_buffers([0], 16)
    with pytest.raises(StripeError, match="0 of 6 blocks available, 4 needed"):
        decode_into(code, {}, {0: memoryview(out[0])})
    assert out[0] == bytearray([SENTINEL]) * 16


def test_stripe_error_is_an_integrity_error_and_pickles() -> None:
    err = StripeError("RS(4+2) stripe cannot be rebuilt", available=(0, 1, 5), needed=4, width=6)
    assert isinstance(err, IntegrityError) and isinstance(err, AsyncloadError)
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.available, back.needed, back.width) == (str(err), (0, 1, 5), 4, 6)


# --- layout: what a manifest can rely on -------------------------------------------------------------------


def _gf_mul(a: int, b: int) -> int:
    product = 0
    while b:
        if b & 1:
            product ^= a
        a <<= 1
        if a & 0x100:
            a ^= 0x11D
        b >>= 1
    return product


_GF_INV = {x: next(y for y in range(1, 256) if _gf_mul(x, y) == 1) for x in range(1, 256)}


@pytest.mark.parametrize(("data", "parity"), [(1, 1), (2, 1), (4, 2), (6, 4), (3, 5), (20, 12)])
def test_parity_is_the_documented_cauchy_code(data: int, parity: int) -> None:
    """Pins the on-disk parity bytes to the math in the docs, independent of the library version."""
    code = ErasureCode(data, parity)
    blocks = make_stripe(code, 13, seed=data * 100 + parity)
    for r in range(parity):
        expected = bytearray(13)
        for j in range(data):
            coefficient = _GF_INV[(data + r) ^ j]
            for t in range(13):
                expected[t] ^= _gf_mul(coefficient, blocks[j][t])
        assert blocks[data + r] == bytes(expected), f"parity row {r}"


@pytest.mark.parametrize("segment", [1000, 32 * 1024])
def test_segmented_parity_equals_one_whole_stripe_encode(
    segment: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Segmenting is an implementation detail: the bytes are those of one pyeclib call on the stripe."""
    monkeypatch.setattr(_erasure, "_SEGMENT", segment)
    code = ErasureCode(6, 4)
    block_len = 3 * segment + 5
    blocks = make_stripe(code, block_len, seed=11)
    fragments = _erasure._driver(6, 4).encode(b"".join(blocks[:6]))
    header_len = len(fragments[0]) - block_len
    assert [f[header_len:] for f in fragments] == blocks


@pytest.mark.parametrize(("data", "parity"), [(2, 1), (6, 4)])
@pytest.mark.parametrize("block_len", [1, 4103])
def test_fragment_headers_do_not_depend_on_content(data: int, parity: int, block_len: int) -> None:
    """Why parity blocks can be stored without pyeclib's header: it is regenerated from zeros."""
    driver = _erasure._driver(data, parity)
    fragments = driver.encode(random.Random(1).randbytes(data * block_len))
    headers = _erasure._headers(data, parity, block_len)
    assert len(headers) == data + parity
    assert all(len(f) == len(headers[0]) + block_len for f in fragments)
    assert [f[: len(headers[0])] for f in fragments] == list(headers)


def test_parity_blocks_have_block_len_and_data_blocks_are_untouched() -> None:
    code = ErasureCode(4, 2)
    data = [bytearray(random.Random(i).randbytes(4095)) for i in range(4)]
    before = [bytes(b) for b in data]
    parity = [bytearray(4095) for _ in range(2)]
    encode_into(code, [memoryview(b) for b in data], [memoryview(p) for p in parity])
    assert [bytes(b) for b in data] == before
    assert all(len(p) == 4095 for p in parity)
    assert parity[0] != parity[1]


def test_typed_buffers_are_taken_as_bytes() -> None:
    code = ErasureCode(2, 1)
    arrays = [np.arange(1024, dtype=np.float32) + i for i in range(2)]
    parity = np.zeros(1024, dtype=np.float32)
    encode_into(code, [a.data for a in arrays], [parity.data])
    rebuilt = np.full(1024, -1, dtype=np.float32)
    decode_into(code, {1: arrays[1].data, 2: parity.data}, {0: rebuilt.data})
    assert np.array_equal(rebuilt, arrays[0])


def test_surviving_indices_in_out_are_copied() -> None:
    code = ErasureCode(3, 1)
    blocks = make_stripe(code, 100, seed=3)
    out = sentinel_buffers([0, 2], 100)
    decode_into(code, survivors(blocks, {0}), {i: memoryview(b) for i, b in out.items()})
    assert out[0] == blocks[0] and out[2] == blocks[2]


def test_no_parity_code_copies_or_raises() -> None:
    code = ErasureCode(3, 0)
    assert code.width == 3
    blocks = [random.Random(i).randbytes(64) for i in range(3)]
    encode_into(code, [memoryview(b) for b in blocks], [])
    out = sentinel_buffers([1], 64)
    decode_into(code, survivors(blocks, set()), {1: memoryview(out[1])})
    assert out[1] == blocks[1]
    with pytest.raises(StripeError, match="2 of 3 blocks available, 3 needed"):
        decode_into(code, survivors(blocks, {1}), {1: memoryview(out[1])})


# --- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "parity", "exc"),
    [(0, 1, ValueError), (1, -1, ValueError), (30, 3, ValueError), (True, 1, TypeError), (2.0, 1, TypeError)],
)
def test_erasure_code_rejects_bad_geometry(data: object, parity: object, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        ErasureCode(data, parity)  # type: ignore[arg-type]


def test_erasure_code_is_a_frozen_value() -> None:
    code = ErasureCode(10, 4)
    assert code == ErasureCode(10, 4) and hash(code) == hash(ErasureCode(10, 4))
    assert (code.width, str(code)) == (14, "RS(10+4)")
    assert ErasureCode(1, MAX_WIDTH - 1).width == MAX_WIDTH
    with pytest.raises(AttributeError):
        code.data = 3  # type: ignore[misc]


def test_encode_rejects_bad_arguments_before_writing() -> None:
    code = ErasureCode(2, 2)
    data = [memoryview(bytes(8)), memoryview(bytes(8))]
    good = sentinel_buffers([0, 1], 8)
    with pytest.raises(ValueError, match="data blocks"):
        encode_into(code, data[:1], [memoryview(b) for b in good.values()])
    with pytest.raises(ValueError, match="parity blocks"):
        encode_into(code, data, [memoryview(good[0])])
    with pytest.raises(ValueError, match="same length"):
        encode_into(code, [data[0], memoryview(bytes(9))], [memoryview(b) for b in good.values()])
    with pytest.raises(ValueError, match="8 bytes"):
        encode_into(code, data, [memoryview(good[0]), memoryview(bytearray(9))])
    with pytest.raises(ValueError, match="writable"):
        encode_into(code, data, [memoryview(good[0]), memoryview(bytes(8))])
    assert all(b == bytearray([SENTINEL]) * 8 for b in good.values())


def test_decode_rejects_bad_arguments_before_writing() -> None:
    code = ErasureCode(3, 1)
    blocks = make_stripe(code, 32, seed=5)
    out = sentinel_buffers([0], 32)
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        decode_into(code, survivors(blocks, {0}), {4: memoryview(out[0])})
    with pytest.raises(ValueError, match=r"outside 0\.\.3"):
        decode_into(code, {**survivors(blocks, {0}), -1: memoryview(blocks[0])}, {0: memoryview(out[0])})
    with pytest.raises(ValueError, match="same length"):
        decode_into(code, {1: memoryview(blocks[1]), 2: memoryview(blocks[2][:-1])}, {0: memoryview(out[0])})
    with pytest.raises(ValueError, match="32 bytes"):
        decode_into(code, survivors(blocks, {0}), {0: memoryview(out[0]), 3: memoryview(bytearray(31))})
    with pytest.raises(ValueError, match="writable"):
        decode_into(code, survivors(blocks, {0}), {0: memoryview(out[0]), 3: memoryview(bytes(32))})
    assert out[0] == bytearray([SENTINEL]) * 32


# --- property test -----------------------------------------------------------------------------------------


@st.composite
def stripes(draw: st.DrawFn) -> tuple[ErasureCode, int, frozenset[int], int]:
    data = draw(st.integers(1, 12))
    parity = draw(st.integers(0, min(6, MAX_WIDTH - data)))
    block_len = draw(st.one_of(st.integers(1, 64), st.integers(1, 9000)))
    width = data + parity
    lost = draw(st.sets(st.integers(0, width - 1), max_size=min(width, parity + 2)))
    seed = draw(st.integers(0, 2**32 - 1))
    return ErasureCode(data, parity), block_len, frozenset(lost), seed


@settings(max_examples=150, deadline=None)
@given(stripes())
def test_property_rebuilds_or_refuses(case: tuple[ErasureCode, int, frozenset[int], int]) -> None:
    code, block_len, lost, seed = case
    blocks = make_stripe(code, block_len, seed)
    wanted = sorted(lost) or [0]
    out = sentinel_buffers(wanted, block_len)
    views = {i: memoryview(b) for i, b in out.items()}
    if len(lost) <= code.parity:
        decode_into(code, survivors(blocks, lost), views)
        assert all(out[i] == blocks[i] for i in wanted)
    else:
        with pytest.raises(StripeError):
            decode_into(code, survivors(blocks, lost), views)
        assert all(b == bytearray([SENTINEL]) * block_len for b in out.values())
