"""Property tests for the stripe part of the manifest format (no I/O).

Random valid manifests with Reed-Solomon stripes round-trip through ``to_json``/``from_json``
unchanged; each way of breaking the stripe rules (a block in two stripes, two blocks of a stripe
on one source, the wrong number of parity blocks, a stripe length below a member's length, a
member index out of range, stripes without ``redundancy``, ...) is refused with ``ManifestError``
by the stripe checks themselves (the mutated documents carry no digest, so it is not the digest
that refuses them).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncload import Manifest, ManifestError
from asyncload._format import (
    MAX_STRIPE_WIDTH,
    BlockRef,
    FileEntry,
    ParityRef,
    SourceRef,
    Stripe,
    TensorInfo,
)

_hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)


@st.composite
def striped_manifests(draw: st.DrawFn) -> Manifest:
    k = draw(st.integers(2, 12))
    parity = draw(st.integers(1, min(k - 1, MAX_STRIPE_WIDTH - 1)))
    per_stripe = k - parity
    block_size = draw(st.sampled_from([1, 7, 4096, 1 << 20]))
    lengths = draw(st.lists(st.integers(1, block_size), min_size=1, max_size=25))
    hashed = draw(st.booleans())  # signed manifests record a sha256 of every stored object
    serial = iter(range(10**6))

    def key() -> str:
        return f"{next(serial):02x}/{draw(_hex64)}"

    def sha() -> str | None:
        return draw(_hex64) if hashed else None

    # Cut the blocks into stripes of 1..k-P consecutive blocks; positions rotate by a drawn offset.
    cuts: list[list[int]] = []
    i = 0
    while i < len(lengths):
        size = draw(st.integers(1, per_stripe))
        cuts.append(list(range(i, min(i + size, len(lengths)))))
        i += size
    source_of: dict[int, int] = {}
    stripes_spec: list[tuple[list[int], int]] = []
    for members in cuts:
        members = draw(st.permutations(members))  # coding positions need not follow stream order
        rot = draw(st.integers(0, k - 1))
        for pos, b in enumerate(members):
            source_of[b] = (rot + pos) % k
        stripes_spec.append((members, rot))
    blocks: list[BlockRef] = []
    offset = 0
    for b, length in enumerate(lengths):
        crc = draw(st.integers(0, 2**32 - 1))
        blocks.append(BlockRef(b, f"s{source_of[b]}", key(), offset, length, crc, sha256=sha()))
        offset += length
    stripes: list[Stripe] = []
    for si, (members, rot) in enumerate(stripes_spec):
        longest = max(lengths[b] for b in members)
        length = draw(st.integers(longest, block_size))
        refs = tuple(
            ParityRef(f"s{(rot + len(members) + r) % k}", key(), draw(st.integers(0, 2**32 - 1)), sha())
            for r in range(parity)
        )
        stripes.append(Stripe(si, tuple(members), length, refs))
    total = offset
    tensors = (TensorInfo("w", "U8", (total,), 0, total),) if draw(st.booleans()) else ()
    return Manifest(
        id=draw(_hex64)[:32],
        block_size=block_size,
        total_size=total,
        files=(FileEntry("m.safetensors", 0, total, "safetensors"),),
        tensors=tensors,
        sources=tuple(SourceRef(f"s{i}", f"d{i}") for i in range(k)),
        blocks=tuple(blocks),
        parity=parity,
        stripes=tuple(stripes),
    )


@given(striped_manifests())
def test_striped_manifests_round_trip(m: Manifest) -> None:
    data = m.to_json()
    back = Manifest.from_json(data)
    assert back == m
    assert back.to_json() == data
    assert json.loads(data)["redundancy"] == {"scheme": "reed-solomon-cauchy-gf256", "parity": m.parity}


@given(striped_manifests())
def test_every_stripe_member_and_parity_block_sits_on_its_own_source(m: Manifest) -> None:
    """What the generator builds is what the rules demand; the parser agrees (it accepted it)."""
    for s in Manifest.from_json(m.to_json()).stripes:
        sources = [m.blocks[b].source for b in s.blocks] + [p.source for p in s.parity]
        assert len(set(sources)) == len(sources) == len(s.blocks) + m.parity
        assert s.length >= max(m.blocks[b].length for b in s.blocks)
    assert sorted(b for s in m.stripes for b in s.blocks) == list(range(len(m.blocks)))


# --------------------------------------------------------------------------- mutations


Doc = dict[str, Any]


def _multi(doc: Doc) -> int | None:
    """Index of a stripe with at least two data blocks, if any."""
    return next((i for i, s in enumerate(doc["stripes"]) if len(s["blocks"]) >= 2), None)


def block_in_two_stripes(doc: Doc) -> bool:
    if len(doc["stripes"]) < 2:
        return False
    doc["stripes"][1]["blocks"].append(doc["stripes"][0]["blocks"][0])
    return True


def block_twice_in_one_stripe(doc: Doc) -> bool:
    s = doc["stripes"][0]
    s["blocks"].append(s["blocks"][0])
    return True


def two_members_on_one_source(doc: Doc) -> bool:
    i = _multi(doc)
    if i is None:
        return False
    a, b = doc["stripes"][i]["blocks"][:2]
    doc["blocks"][b]["source"] = doc["blocks"][a]["source"]
    return True


def parity_on_a_member_source(doc: Doc) -> bool:
    s = doc["stripes"][0]
    s["parity"][0]["source"] = doc["blocks"][s["blocks"][0]]["source"]
    return True


def one_parity_block_too_few(doc: Doc) -> bool:
    doc["stripes"][-1]["parity"].pop()
    return True


def one_parity_block_too_many(doc: Doc) -> bool:
    s = doc["stripes"][0]
    s["parity"].append(dict(s["parity"][0]))
    return True


def length_below_a_member(doc: Doc) -> bool:
    s = doc["stripes"][-1]
    s["length"] = max(doc["blocks"][b]["length"] for b in s["blocks"]) - 1
    return True


def member_index_too_large(doc: Doc) -> bool:
    doc["stripes"][0]["blocks"][0] = len(doc["blocks"])
    return True


def member_index_negative(doc: Doc) -> bool:
    doc["stripes"][0]["blocks"][0] = -1
    return True


def member_index_not_an_integer(doc: Doc) -> bool:
    doc["stripes"][0]["blocks"][0] = str(doc["stripes"][0]["blocks"][0])
    return True


def member_index_a_boolean(doc: Doc) -> bool:
    s = doc["stripes"][0]
    if s["blocks"][0] not in (0, 1):
        return False
    s["blocks"][0] = bool(s["blocks"][0])
    return True


def stripes_without_redundancy(doc: Doc) -> bool:
    del doc["redundancy"]
    return True


def redundancy_without_stripes(doc: Doc) -> bool:
    del doc["stripes"]
    return True


def block_in_no_stripe(doc: Doc) -> bool:
    i = _multi(doc)
    if i is None:
        return False
    doc["stripes"][i]["blocks"].pop()
    return True


def parity_zero(doc: Doc) -> bool:
    doc["redundancy"]["parity"] = 0
    return True


def unknown_scheme(doc: Doc) -> bool:
    doc["redundancy"]["scheme"] = "reed-solomon-vandermonde-gf256"
    return True


def unsafe_parity_key(doc: Doc) -> bool:
    doc["stripes"][0]["parity"][0]["key"] = "../escape"
    return True


def bad_parity_crc(doc: Doc) -> bool:
    doc["stripes"][0]["parity"][0]["crc32c"] = "xyz"
    return True


def unknown_stripe_field(doc: Doc) -> bool:
    doc["stripes"][0]["lenght"] = 1
    return True


def too_many_marked_missing(doc: Doc) -> bool:
    s = doc["stripes"][0]
    for b in s["blocks"]:
        doc["blocks"][b]["missing"] = True
    for p in s["parity"]:
        p["missing"] = True
    return True


MUTATIONS: dict[str, tuple[Callable[[Doc], bool], str]] = {
    f.__name__: (f, pattern)
    for f, pattern in [
        (block_in_two_stripes, r"already in stripe|two blocks of the stripe|data blocks"),
        (block_twice_in_one_stripe, r"already in stripe|data blocks"),
        (two_members_on_one_source, r"two blocks of the stripe on source"),
        (parity_on_a_member_source, r"two blocks of the stripe on source"),
        (one_parity_block_too_few, r"parity blocks, redundancy says"),
        (one_parity_block_too_many, r"parity blocks, redundancy says|data blocks"),
        (length_below_a_member, r"longer than the stripe length|length 0 must be"),
        (member_index_too_large, r"is not a block index"),
        (member_index_negative, r"is not a block index"),
        (member_index_not_an_integer, r"is not a block index"),
        (member_index_a_boolean, r"is not a block index"),
        (stripes_without_redundancy, r"'stripes' given without 'redundancy'"),
        (redundancy_without_stripes, r"missing field 'stripes'"),
        (block_in_no_stripe, r"belongs to no stripe"),
        (parity_zero, r"parity must be in"),
        (unknown_scheme, r"redundancy scheme"),
        (unsafe_parity_key, r"not a safe relative path"),
        (bad_parity_crc, r"crc32c 'xyz'"),
        (unknown_stripe_field, r"unknown fields"),
        (too_many_marked_missing, r"marked missing, more than its parity"),
    ]
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
@settings(max_examples=40)  # x 20 mutations
@given(m=striped_manifests())
def test_broken_stripes_are_refused(m: Manifest, mutation: str) -> None:
    doc = json.loads(m.to_json())
    del doc["digest"]  # an old (or hand-edited) manifest: only the stripe checks stand in the way
    Manifest.from_json(json.dumps(doc))  # unmutated, it parses
    mutate, pattern = MUTATIONS[mutation]
    if not mutate(doc):
        return  # this manifest has no room for that mutation (e.g. a single stripe)
    with pytest.raises(ManifestError, match=pattern) as info:
        Manifest.from_json(json.dumps(doc), name="m.json")
    assert "m.json" in str(info.value)
    assert "digest" not in str(info.value)


def test_the_generator_reaches_the_edges() -> None:
    """Sanity: the strategy produces multi-stripe manifests, short stripes and wide ones."""
    seen = {"multi": False, "short": False, "wide": False}

    @given(striped_manifests())
    def probe(m: Manifest) -> None:
        width = len(m.sources) - m.parity
        seen["multi"] |= len(m.stripes) >= 3
        seen["short"] |= any(len(s.blocks) < width for s in m.stripes)
        seen["wide"] |= any(len(s.blocks) + m.parity >= 8 for s in m.stripes)

    probe()
    assert all(seen.values()), seen
