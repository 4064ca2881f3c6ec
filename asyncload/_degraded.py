"""Reading a striped (parity) manifest: stripe by stripe, rebuilding what fails or lags.

The driver walks the stripes that hold wanted blocks, in stream order, and
takes one ring slot per data block of the stripe (wanted or not: a block that
is not wanted is read only if it is needed to rebuild another). Then, per
stripe, concurrently with the next ones:

1. *Direct reads.* The wanted blocks are read from their sources — except
   those on a source that is down (its last read failed) or slow (its reads
   take ``hedge`` times longer than its peers'), which are read around; every
   ``_PROBE_EVERY``-th stripe still reads them, so a source that recovers is
   used again.
2. *Hedging.* Once every other direct read of the stripe has landed, a read
   still running after ``hedge`` times the slowest of them is cancelled and its
   block rebuilt instead; its source is marked slow.
3. *Rebuild.* Blocks that failed (missing, I/O error, timeout, wrong length,
   checksum) or were read around are decoded from any ``n`` verified blocks of
   the stripe (``n`` = its data blocks): the wanted blocks that landed, the
   others read now, and parity blocks read into the parity ring (P slots of
   the budget, one rebuild at a time). Every rebuilt block is checked against
   its recorded crc32c before use, so wrong bytes are never handed on; when
   fewer than ``n`` blocks can be read, even after retrying the failed ones,
   :class:`~asyncload.StripeError` names the stripe and each failed block.

Memory stays inside the budget: data blocks only ever land in ring slots, and
parity in the P parity slots.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import anyio
import numpy as np

from ._exceptions import IntegrityError, SourceError
from ._format import BlockRef, Stripe
from ._ring import Slot
from ._scheduler import ReadAround
from ._threads import run_sync
from .codecs import ErasureCode, StripeError, decode_into

if TYPE_CHECKING:
    from ._scheduler import BlockReader

__all__ = ["run_striped"]

_PROBE_EVERY = 8
_MIN_HEDGE_S = 0.02  # never give up on a read sooner than this


class _Member:
    __slots__ = ("block", "error", "landed", "pos", "slot", "wanted")

    def __init__(self, pos: int, block: BlockRef, slot: Slot, wanted: bool) -> None:
        self.pos = pos
        self.block = block
        self.slot = slot
        self.wanted = wanted
        self.landed = False  # stored bytes verified in the slot
        self.error: Exception | None = None


def _update_slow(reader: BlockReader) -> None:
    """Mark sources whose bytes take ``hedge`` times longer than the median of the others as slow."""
    if not reader.limits.hedge:
        return
    speeds = {k: h.sec_per_byte for k, h in reader._health.items() if h.sec_per_byte is not None}
    if len(speeds) < 3:
        return
    for k, h in reader._health.items():
        if h.sec_per_byte is None:
            continue
        was = h.slow
        h.slow = reader.paced_slower(k)
        if h.slow and not was:  # give up its reads in progress wherever their stripe can spare them
            for give_up in list(reader._running.get(k, {}).values()):
                give_up()


def _read_around(reader: BlockReader, source_id: str) -> bool:
    """Whether to skip a direct read from this source for the current stripe (down or slow)."""
    h = reader._health[source_id]
    if not (h.failures or h.slow):
        return False
    h.probe += 1
    if h.probe >= _PROBE_EVERY:
        h.probe = 0
        return False
    return True


async def _direct_reads(reader: BlockReader, members: list[_Member], budget_lost: int) -> None:
    """Read ``members`` concurrently; hedge the last ones when they lag far behind the others."""
    if not members:
        return
    scopes: dict[int, anyio.CancelScope] = {}
    started: dict[int, float] = {}  # when each read got its turn on its source
    took: list[float] = []  # how long the landed reads took from their turn
    progress = anyio.Event()
    hedge = reader.limits.hedge

    def wake() -> None:
        nonlocal progress
        progress.set()
        progress = anyio.Event()

    def can_spare() -> bool:
        return len(scopes) + sum(1 for m in members if m.error is not None) <= budget_lost

    def give_up_on(pos: int) -> None:
        if pos in scopes and can_spare() and not scopes[pos].cancel_called:
            scopes[pos].cancel()

    async def one(m: _Member, scope: anyio.CancelScope) -> None:
        def begin() -> None:
            started[m.pos] = time.monotonic()
            reader._running.setdefault(m.block.source, {})[id(scope)] = lambda: give_up_on(m.pos)
            wake()

        try:
            with scope:
                try:
                    await reader._fetch(
                        m.block, m.block.source, m.slot, retry=False, on_start=begin, skip_if_slow=True
                    )
                    m.landed = True
                    took.append(time.monotonic() - started[m.pos])
                    _update_slow(reader)
                except ReadAround as e:
                    reader._hedged += 1
                    m.error = e
                except (SourceError, IntegrityError) as e:
                    m.error = e
        finally:
            reader._running.get(m.block.source, {}).pop(id(scope), None)
        if scope.cancelled_caught and m.error is None:
            reader._hedged += 1
            health = reader._health[m.block.source]
            if m.pos in started:  # its own time on the source: a lower bound on its pace
                health.record(time.monotonic() - started[m.pos], m.block.length)
            health.slow = True
            m.error = SourceError(
                f"block {m.block.index} ({m.block.key!r} on source {m.block.source!r}): "
                f"read around, far slower than the other sources"
            )
        scopes.pop(m.pos, None)
        wake()

    async with anyio.create_task_group() as tg:
        for m in members:  # scopes exist before the tasks run: the loop below sees every read
            scopes[m.pos] = anyio.CancelScope()
            tg.start_soon(one, m, scopes[m.pos])
        if not hedge:
            return
        while scopes:
            lost = sum(1 for m in members if m.error is not None)
            running = [pos for pos in scopes if pos in started and not scopes[pos].cancel_called]
            fits = len(scopes) + lost <= budget_lost  # every read still running may be rebuilt
            if took and running and fits and len(scopes) < len(members):
                # A read that has had `hedge` times as long on its source as the slowest landed
                # peer needed is given up; its block is rebuilt from the others and parity.
                allowed = max(_MIN_HEDGE_S, hedge * max(took))
                deadline = min(started[pos] for pos in running) + allowed
                with anyio.move_on_after(deadline - time.monotonic()):
                    await progress.wait()
                now = time.monotonic()
                for pos in running:
                    if pos in scopes and now >= started[pos] + allowed:
                        scopes[pos].cancel()
            else:
                await progress.wait()


async def _read_stripe(reader: BlockReader, stripe: Stripe, members: list[_Member]) -> None:
    """Land every wanted member of ``stripe`` in its slot, verified; rebuild what fails."""
    parity = len(stripe.parity)
    direct: list[_Member] = []
    for m in members:
        if not m.wanted:
            continue
        around = sum(1 for x in members if x.error is not None)
        if m.block.missing:  # the save could not store it: rebuild without asking the source
            m.error = SourceError(f"block {m.block.index} is marked missing in the manifest (not stored)")
        elif around < parity and _read_around(reader, m.block.source):
            reader._hedged += 1
            m.error = SourceError(
                f"block {m.block.index} ({m.block.key!r} on source {m.block.source!r}): read around, "
                "source down or slow"
            )
        else:
            direct.append(m)
    await _direct_reads(reader, direct, parity - sum(1 for m in members if m.error is not None))
    lost = [m for m in members if m.wanted and not m.landed]
    if lost:
        await _rebuild(reader, stripe, members, lost)
    for m in members:
        if m.wanted:
            await reader._finish(m.block, m.block.source, m.slot)


async def _rebuild(reader: BlockReader, stripe: Stripe, members: list[_Member], lost: list[_Member]) -> None:
    assert reader.parity_ring is not None
    n = len(stripe.blocks)
    length = stripe.length
    failures: list[str] = [f"block {m.block.index} on source {m.block.source!r}: {m.error}" for m in lost]
    pslots: list[Slot] = []
    try:
        await reader.parity_ring.acquire_group(len(stripe.parity), pslots)
        have: dict[int, memoryview] = {m.pos: m.slot.memory.data[:length] for m in members if m.landed}
        # Candidates: unwanted members and parity, healthy sources first.
        cands: list[tuple[int, int, str]] = []  # (rank, index in stripe, source)
        for m in members:
            if not m.wanted and not m.landed and not m.block.missing:
                cands.append((0, m.pos, m.block.source))
        for r, p in enumerate(stripe.parity):
            if not p.missing:
                cands.append((1, n + r, p.source))
        cands.sort(key=lambda c: (bool(reader._health[c[2]].failures or reader._health[c[2]].slow), c[0]))
        by_pos = {m.pos: m for m in members}

        async def fetch(pos: int) -> None:
            try:
                if pos < n:
                    m = by_pos[pos]
                    await reader._fetch(m.block, m.block.source, m.slot, retry=False)
                    m.landed = True
                    have[pos] = m.slot.memory.data[:length]
                else:
                    buf = pslots[pos - n].memory.data[:length]
                    await reader.read_parity(stripe, pos - n, buf)
                    have[pos] = buf
            except (SourceError, IntegrityError) as e:
                failures.append(str(e))

        queue = [c[1] for c in cands]
        while len(have) < n and queue:
            batch, queue = queue[: n - len(have)], queue[n - len(have) :]
            async with anyio.create_task_group() as tg:
                for pos in batch:
                    tg.start_soon(fetch, pos)
        for m in lost:  # last resort: the failed blocks themselves, with retries
            if len(have) >= n:
                break
            if m.block.missing:
                continue
            try:
                await reader._fetch(m.block, m.block.source, m.slot, retry=True)
            except (SourceError, IntegrityError) as e:
                failures.append(str(e))
                continue
            m.landed = True
            have[m.pos] = m.slot.memory.data[:length]
        still = [m for m in lost if not m.landed]
        if not still:
            return
        if len(have) < n:
            raise StripeError(
                f"stripe {stripe.index} (blocks {list(stripe.blocks)}) cannot be rebuilt: "
                f"{len(have)} of {n + len(stripe.parity)} blocks readable, {n} needed; "
                + "; ".join(failures),
                available=tuple(sorted(have)),
                needed=n,
                width=n + len(stripe.parity),
            )
        stored = {m.pos: m.block.length + reader.overhead for m in members}
        await decode_stripe(reader, stripe, have, {m.pos: m.slot.memory.data[:length] for m in still})
        for m in still:
            where = f"block {m.block.index} ({m.block.key!r}) rebuilt from stripe {stripe.index}"
            await reader._verify(where, m.slot.memory.data[: stored[m.pos]], m.block.crc32c, m.block.sha256)
            m.slot.used = stored[m.pos]
            m.landed = True
        reader._degraded_reads += len(still)
        reader._rebuilt += len(still)
    finally:
        for s in pslots:
            reader.parity_ring.release(s)


async def decode_stripe(
    reader: BlockReader, stripe: Stripe, have: dict[int, memoryview], out: dict[int, memoryview]
) -> None:
    """Rebuild stripe positions ``out`` from the verified blocks ``have`` (``stripe.length`` bytes each).

    Positions are those of the stripe: its data blocks first, then its parity.
    A data block shorter than the stripe counts as zero-padded (docs/format.md):
    its buffer in ``have`` is zeroed past its stored bytes first.
    """
    n = len(stripe.blocks)
    for pos, view in have.items():
        if pos < n:
            stored = reader.block_table[stripe.blocks[pos]].length + reader.overhead
            np.frombuffer(view, dtype=np.uint8)[stored:] = 0
    code = ErasureCode(n, len(stripe.parity))
    await run_sync(decode_into, code, have, out, workers=reader.threads)


async def run_striped(
    reader: BlockReader,
    blocks: Sequence[BlockRef],
    on_block: Callable[[BlockRef, Slot], Awaitable[None]],
) -> None:
    """:meth:`BlockReader.run` for a striped manifest (see the module docstring)."""
    wanted: dict[int, set[int]] = {}
    order: list[Stripe] = []
    for b in blocks:
        stripe, _ = reader._stripe_of[b.index]
        if stripe.index not in wanted:
            wanted[stripe.index] = set()
            order.append(stripe)
        wanted[stripe.index].add(b.index)
    table = reader.block_table
    held: dict[int, Slot] = {}

    async def unit(stripe: Stripe, members: list[_Member]) -> None:
        try:
            await _read_stripe(reader, stripe, members)
        except BaseException:
            for m in members:
                if held.pop(m.slot.index, None) is not None:
                    reader.ring.release(m.slot)
            raise
        for m in members:
            if not m.wanted:
                held.pop(m.slot.index, None)
                reader.ring.release(m.slot)
        for m in members:
            if m.wanted:
                held.pop(m.slot.index, None)
                await on_block(m.block, m.slot)  # ownership of the slot passes to on_block

    try:
        async with anyio.create_task_group() as tg:
            for stripe in order:
                _update_slow(reader)
                members: list[_Member] = []
                for pos, index in enumerate(stripe.blocks):
                    slot = await reader.ring.acquire()
                    held[slot.index] = slot
                    members.append(_Member(pos, table[index], slot, index in wanted[stripe.index]))
                tg.start_soon(unit, stripe, members)
    finally:
        for slot in held.values():
            reader.ring.release(slot)
        held.clear()
