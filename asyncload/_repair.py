"""Scrub and repair: read every stored block (every copy, every parity block), rebuild what is bad.

``verify`` reads each block of a manifest from every source that holds it —
each replica, and for a striped manifest each data block *and* each parity
block — and checks its length and crc32c (and, given the keys, its GCM tag
and signed SHA-256). With ``repair=True`` it then rebuilds what it found bad:

* a replica from a good copy of the same block;
* up to P blocks of a stripe (data or parity) from any ``n`` good blocks of
  the stripe (Reed-Solomon decode over the *stored* bytes, so an encrypted
  store is repaired without its key);

checks every rebuilt block against its recorded crc32c, writes it to its
source (atomically, like any block write) and syncs the sources. A source
re-pointed with ``sources={"s1": NEW}`` receives the rebuilt blocks of ``s1``
in ``NEW`` (created if needed), and the manifest is then committed again,
atomically, with ``s1`` at its new location — unless it is signed (a new
signature needs the publisher's key) or MAC'd and no key was given, in which
case the report says so and the old location stays in the manifest.
A stripe with more than P bad blocks, or a block with no good copy, is
reported as not repairable; nothing is written for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from ._config import Limits
from ._degraded import decode_stripe
from ._exceptions import DecryptionError, IntegrityError, SourceError
from ._format import BlockRef, Manifest, SourceRef, Stripe
from ._inputs import Opened
from ._ring import Slot
from ._scheduler import BlockReader, checksum, open_reader
from ._writer import _seal, commit_manifest, recorded_location
from .codecs import StripeError
from .sources import Source
from .sources._open import close_sources, parent_location, source_for

if TYPE_CHECKING:
    from ._security import BlockCipher

__all__ = ["BadBlock", "VerifyReport", "scrub"]

Progress = Any


@dataclass(frozen=True, slots=True)
class BadBlock:
    """One stored object that failed its check: a data block copy (``parity is None``) or a parity block."""

    index: int  # block index; for a parity block, the first data block of its stripe
    source: str
    key: str
    error: str
    stripe: int | None = None
    parity: int | None = None  # parity row, for a parity block
    repaired: bool = False

    def describe(self) -> str:
        what = (
            f"parity block {self.parity} of stripe {self.stripe}"
            if self.parity is not None
            else f"block {self.index}"
        )
        return f"{what} (source {self.source}, key {self.key})"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What ``verify`` found (and, with ``repair``, fixed): every stored object read and checked."""

    manifest: str
    blocks: int
    bytes_checked: int
    bad: tuple[BadBlock, ...] = field(default_factory=tuple)
    parity_blocks: int = 0
    repair: bool = False
    manifest_updated: bool = False
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Nothing was bad when read."""
        return not self.bad

    @property
    def healthy(self) -> bool:
        """Every bad object was repaired (or none was bad): full redundancy again."""
        return all(b.repaired for b in self.bad)

    @property
    def unrepaired(self) -> tuple[BadBlock, ...]:
        return tuple(b for b in self.bad if not b.repaired)


class _Scrub:
    def __init__(self, reader: BlockReader, manifest: Manifest, repair: bool, progress: Progress | None):
        self.reader = reader
        self.man = manifest
        self.repair = repair
        self.progress = progress
        self.bad: list[BadBlock] = []
        self.checked = 0
        self.written: set[str] = set()

    async def _write(self, source_id: str, key: str, data: memoryview) -> None:
        src = self.reader.sources[source_id]
        async with self.reader.limiters[source_id]:
            await src.write(key, data)
        self.written.add(source_id)

    async def _check_tag(self, block: BlockRef, source_id: str, slot: Slot) -> str | None:
        """With the key: decrypt in place (checks the GCM tag); the error text if it fails."""
        if self.reader.cipher is None:
            return None
        try:
            await self.reader._finish(block, source_id, slot)
        except DecryptionError as e:
            return str(e)
        return None

    # -- plain and replicated blocks ---------------------------------------------------
    async def block(self, block: BlockRef, slot: Slot) -> None:
        copies = (block.source, *block.copies)
        good: str | None = None
        failed: list[tuple[str, str]] = []
        for source_id in copies:
            try:
                await self.reader._fetch(block, source_id, slot, retry=False)
            except (SourceError, IntegrityError) as e:
                failed.append((source_id, str(e)))
                continue
            self.checked += block.length
            if good is None:
                good = source_id
        if good is not None and failed:  # the last fetch may have been a bad copy: reload a good one
            await self.reader._fetch(block, good, slot, retry=False)
        repaired: set[str] = set()
        if self.repair and good is not None and failed:
            stored = slot.memory.data[: block.length + self.reader.overhead]
            for source_id, _ in failed:
                await self._write(source_id, block.key, stored)
                repaired.add(source_id)
        for source_id, err in failed:
            self.bad.append(BadBlock(block.index, source_id, block.key, err, repaired=source_id in repaired))
        if good is not None:
            tag_error = await self._check_tag(block, good, slot)
            if tag_error is not None:
                self.bad.append(BadBlock(block.index, good, block.key, tag_error))
        if self.progress is not None:
            self.progress(block.length)

    # -- stripes -------------------------------------------------------------------------
    async def stripe(self, stripe: Stripe, slots: list[Slot]) -> None:
        reader = self.reader
        assert reader.parity_ring is not None
        n, p, length = len(stripe.blocks), len(stripe.parity), stripe.length
        members = [self.man.blocks[i] for i in stripe.blocks]
        pslots: list[Slot] = []
        try:
            await reader.parity_ring.acquire_group(p, pslots)
            bufs = [s.memory.data[:length] for s in slots] + [s.memory.data[:length] for s in pslots]
            errors: dict[int, str] = {}

            async def read(pos: int) -> None:
                if members[pos].missing if pos < n else stripe.parity[pos - n].missing:
                    errors[pos] = "marked missing in the manifest: the save could not store it"
                    return
                try:
                    if pos < n:
                        await reader._fetch(members[pos], members[pos].source, slots[pos], retry=False)
                        self.checked += members[pos].length
                    else:
                        await reader.read_parity(stripe, pos - n, bufs[pos])
                        self.checked += length
                except (SourceError, IntegrityError) as e:
                    errors[pos] = str(e)

            async with anyio.create_task_group() as tg:
                for pos in range(n + p):
                    tg.start_soon(read, pos)
            stored = [b.length + reader.overhead for b in members]
            fixed: set[int] = set()
            if self.repair and errors and len(errors) <= p:
                good = {pos: bufs[pos] for pos in range(n + p) if pos not in errors}
                out = {pos: bufs[pos] for pos in errors}
                try:
                    await decode_stripe(reader, stripe, good, out)
                except StripeError as e:
                    for pos in errors:
                        errors[pos] += f"; rebuild failed: {e}"
                else:
                    for pos in sorted(errors):
                        if pos < n:
                            data, crc, source_id, key = (
                                bufs[pos][: stored[pos]],
                                members[pos].crc32c,
                                members[pos].source,
                                members[pos].key,
                            )
                        else:
                            ref = stripe.parity[pos - n]
                            data, crc, source_id, key = bufs[pos], ref.crc32c, ref.source, ref.key
                        if crc is not None and await checksum(data, reader.threads) != crc:
                            errors[pos] += "; rebuilt bytes do not match the recorded crc32c (not written)"
                            continue
                        await self._write(source_id, key, data)
                        fixed.add(pos)
            elif self.repair and errors:
                for pos in errors:
                    errors[pos] += f"; not repairable: {len(errors)} bad blocks in the stripe, parity {p}"
            for pos, err in sorted(errors.items()):
                if pos < n:
                    b = members[pos]
                    self.bad.append(BadBlock(b.index, b.source, b.key, err, stripe.index, None, pos in fixed))
                else:
                    ref = stripe.parity[pos - n]
                    self.bad.append(
                        BadBlock(
                            stripe.blocks[0], ref.source, ref.key, err, stripe.index, pos - n, pos in fixed
                        )
                    )
            for pos, b in enumerate(members):
                if pos not in errors or pos in fixed:
                    slots[pos].used = stored[pos]
                    tag_error = await self._check_tag(b, b.source, slots[pos])
                    if tag_error is not None:
                        self.bad.append(BadBlock(b.index, b.source, b.key, tag_error, stripe.index))
            if self.progress is not None:
                self.progress(sum(b.length for b in members))
        finally:
            for s in pslots:
                reader.parity_ring.release(s)


def _writable(opened: Opened, repoint: Mapping[str, str]) -> dict[str, Source]:
    """The store's sources, able to create their directories (a repaired source may be gone)."""
    out: dict[str, Source] = {}
    for sid, src in opened.sources.items():
        out[sid] = source_for(sid, src.location, create=True) if opened.kind == "manifest" else src
    return out


def _relocated(manifest: Manifest, origin: str, repoint: Mapping[str, str]) -> Manifest:
    """``manifest`` with re-pointed sources recorded as a save would record them."""
    base = parent_location(origin)
    refs = tuple(
        SourceRef(s.id, recorded_location(repoint[s.id], base)) if s.id in repoint else s
        for s in manifest.sources
    )
    return dataclasses.replace(manifest, sources=refs)


async def scrub(
    opened: Opened,
    limits: Limits,
    *,
    repair: bool,
    repoint: Mapping[str, str],
    cipher: BlockCipher | None,
    verify_hashes: bool,
    progress: Progress | None = None,
) -> VerifyReport:
    """Verify every stored object of ``opened``; with ``repair``, rebuild and rewrite the bad ones."""
    man = opened.manifest
    sources = _writable(opened, repoint) if repair else opened.sources
    reader = await open_reader(man, sources, limits, cipher=cipher, verify_hashes=verify_hashes)
    job = _Scrub(reader, man, repair, progress)
    try:
        async with anyio.create_task_group() as tg:
            if man.stripes:
                for stripe in man.stripes:
                    slots = [await reader.ring.acquire() for _ in stripe.blocks]
                    tg.start_soon(_stripe_then_release, job, stripe, slots)
            else:
                for block in man.blocks:
                    slot = await reader.ring.acquire()
                    tg.start_soon(_block_then_release, job, block, slot)
        for sid in sorted(job.written):
            await sources[sid].sync()
    finally:
        reader.close()
        await close_sources({*sources.values(), *opened.sources.values()})
    bad = sorted(job.bad, key=lambda b: (b.index, b.parity is not None, b.parity or 0, b.source))
    notes: list[str] = []
    updated = False
    moved = [b for b in bad if b.source in repoint]
    healed = {(b.stripe, b.index, b.parity) for b in bad if b.repaired}
    marked = any(
        (st.index, i, None) in healed for st in man.stripes for i in st.blocks if man.blocks[i].missing
    ) or any(
        (st.index, st.blocks[0], r) in healed
        for st in man.stripes
        for r, p in enumerate(st.parity)
        if p.missing
    )
    relocate = bool(repoint) and all(b.repaired for b in moved)
    if repair and opened.kind == "manifest" and (relocate or marked):
        # Every block of a re-pointed source that was not at its new location is there now;
        # blocks a save marked missing and that are stored now lose the mark.
        new = _unmark(_relocated(man, opened.origin, repoint if relocate else {}), healed)
        if man.signature is not None:
            notes.append(
                "the manifest is signed: it was left as it was (re-sign to record repairs)"
                + (
                    "; load with --source " + " ".join(f"{k}={v}" for k, v in repoint.items())
                    if relocate
                    else ""
                )
            )
        elif man.mac is not None and cipher is None:
            notes.append("the manifest carries a MAC and no key was given: it was left unchanged")
        else:
            await commit_manifest(opened.origin, _seal(new, cipher, None))
            updated = True
    return VerifyReport(
        opened.origin,
        len(man.blocks),
        job.checked,
        tuple(bad),
        sum(len(s.parity) for s in man.stripes),
        repair,
        updated,
        tuple(notes),
    )


def _unmark(manifest: Manifest, healed: set[tuple[int | None, int, int | None]]) -> Manifest:
    """``manifest`` with the missing mark cleared on every block and parity block now repaired."""
    blocks = list(manifest.blocks)
    stripes = []
    for st in manifest.stripes:
        for i in st.blocks:
            if blocks[i].missing and (st.index, i, None) in healed:
                blocks[i] = dataclasses.replace(blocks[i], missing=False)
        parity = tuple(
            dataclasses.replace(p, missing=False)
            if p.missing and (st.index, st.blocks[0], r) in healed
            else p
            for r, p in enumerate(st.parity)
        )
        stripes.append(dataclasses.replace(st, parity=parity))
    return dataclasses.replace(manifest, blocks=tuple(blocks), stripes=tuple(stripes))


async def _stripe_then_release(job: _Scrub, stripe: Stripe, slots: list[Slot]) -> None:
    try:
        await job.stripe(stripe, slots)
    finally:
        for s in slots:
            job.reader.ring.release(s)


async def _block_then_release(job: _Scrub, block: BlockRef, slot: Slot) -> None:
    try:
        await job.block(block, slot)
    finally:
        job.reader.ring.release(slot)
