"""The public facade: ``open()``, ``load()``, ``save()`` and the :class:`Model` they share."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import numpy as np

from ._assemble import AssemblyStatistics, TensorStream
from ._config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_BUDGET,
    DEFAULT_HEDGE,
    DEFAULT_RETRIES,
    DEFAULT_THREADS,
    DEFAULT_TIMEOUT,
    MIN_BLOCK_SIZE,
    Limits,
    parse_size,
)
from ._exceptions import BudgetError, ClosedError
from ._format import Manifest, TensorInfo
from ._inputs import Opened, open_input
from ._plan import plan_load
from ._ring import Ring, RingStatistics
from ._scheduler import BlockReader, open_reader, unwrap_group
from ._writer import Progress, SavedPath, TensorsInput, save_tensors
from .sources import Source, SourceStatistics

if TYPE_CHECKING:
    from ._security import BlockCipher

__all__ = ["LoaderStatistics", "Model", "load", "open", "save"]


@dataclass(frozen=True, slots=True)
class LoaderStatistics:
    """A snapshot of a model's ring, reads and sources (see ``Model.statistics()``)."""

    slots_total: int
    slots_in_use: int
    slot_size: int
    budget: int
    bytes_in_slots: int  # slot bytes held right now (never more than budget)
    peak_slots_in_use: int
    bytes_in_flight: int  # bytes of reads started and not yet landed
    reads_in_flight: int
    reads_waiting_for_slot: int  # reads that cannot start for lack of a free slot, now
    slot_waits: int  # times a read had to wait for a slot, since open
    blocks_read: int
    checksum_failures: int
    degraded_reads: int  # blocks served by another copy or rebuilt from parity after a failure
    bytes_read_per_source: Mapping[str, int]
    sources: Mapping[str, SourceStatistics]
    assembly: AssemblyStatistics | None  # the active stream's reservations, if any
    ring: RingStatistics  # the data slots (slots_total etc. above include the parity slots)
    rebuilt_blocks: int = 0  # blocks decoded from their stripe's other blocks and parity
    hedged_reads: int = 0  # reads given up on or skipped because their source lagged or was down
    read_retries: int = 0
    read_timeouts: int = 0
    slow_sources: tuple[str, ...] = ()  # sources read around right now: far slower than their peers
    down_sources: tuple[str, ...] = ()  # sources whose last read failed
    mapped_blocks: int = 0  # blocks whose cached file pages were mapped into their slot (no copy)


def _in_place_block_size(budget: int) -> int:
    m = min(DEFAULT_BLOCK_SIZE, budget // 2)
    return max(MIN_BLOCK_SIZE, m - m % MIN_BLOCK_SIZE)


class Model:
    """An open checkpoint. Use as ``async with asyncload.open(...) as model``.

    ``model.tensors`` maps names to :class:`TensorInfo` (``dtype``, ``shape``,
    ``nbytes``). ``stream()`` and ``load()`` read through one ring of slots of
    ``budget`` bytes, allocated at open and reused by every read.
    """

    def __init__(
        self, opened: Opened, limits: Limits, cipher: BlockCipher | None = None, verify_hashes: bool = False
    ) -> None:
        self._cipher = cipher
        self._verify_hashes = verify_hashes
        self._opened = opened
        self.manifest: Manifest = opened.manifest
        self.limits = limits
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in self.manifest.tensors}
        self._sources: dict[str, Source] = opened.sources
        self._ring: Ring | None = None
        self._reader: BlockReader | None = None
        self._parity_ring: Ring | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stream: TensorStream | None = None
        self._closed = False

    @property
    def origin(self) -> str:
        return self._opened.origin

    @property
    def kind(self) -> str:
        """``"manifest"``, ``"safetensors"`` or ``"hf-directory"``."""
        return self._opened.kind

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.manifest.tensors)

    async def __aenter__(self) -> Model:
        if self._closed:
            raise ClosedError("a Model can be entered once")
        self.limits.check(len(self._sources))
        # Allocating and touching S bytes takes long enough to stall the event loop: use a thread.
        self._reader = await open_reader(
            self.manifest, self._sources, self.limits, cipher=self._cipher, verify_hashes=self._verify_hashes
        )
        self._ring, self._parity_ring = self._reader.ring, self._reader.parity_ring
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if self._stream is not None:
            self._stream.cancel()
        assert self._tg is not None
        error: BaseException | None = None
        try:
            return await self._tg.__aexit__(et, e, tb)
        except BaseExceptionGroup as eg:
            # anyio wraps even the body's own exception in a group: hand back the
            # single real error as raised, so that `except BlockNotFoundError` works.
            error = unwrap_group(eg)
            if error is eg:
                raise
        finally:
            self._closed = True
            if self._ring is not None:
                self._ring.close()
            if self._parity_ring is not None:
                self._parity_ring.close()
            with anyio.CancelScope(shield=True):
                for s in self._sources.values():
                    await s.aclose()
        assert error is not None
        raise error

    def _spawn(self, fn: Any) -> None:
        if self._tg is None or self._closed:
            raise ClosedError("the model is not open: use 'async with asyncload.open(...) as model'")
        self._tg.start_soon(fn)

    def _finished(self, stream: TensorStream) -> None:
        # Kept as self._stream even when its reads are done: items (and zero-copy
        # leases holding slots) may still be queued; the next stream or the model's
        # exit closes it, which releases them.
        pass

    def _select(self, names: Iterable[str] | None) -> list[TensorInfo]:
        if names is None:
            return list(self.manifest.tensors)
        if isinstance(names, str):
            names = [names]
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in self.tensors]
        if missing:
            raise KeyError(f"no tensor named {missing[0]!r} in {self.origin}")
        return [self.tensors[n] for n in wanted]

    def stream(self, names: Iterable[str] | None = None, *, copy: bool = True) -> TensorStream:
        """Tensors as they complete: ``async for name, array in model.stream()``.

        ``names`` selects a subset. Arrays are owned unless ``copy=False`` (see
        :class:`TensorStream`). One stream runs at a time per model: starting a
        new one closes the previous (its reads are cancelled and its slots come
        back before the new one reads; asking it for more raises ClosedError).
        A loop left with ``break`` is thus cleaned up by ``aclose()``/``async with``,
        by the next stream, or when the model closes.
        """
        if self._tg is None or self._closed:
            raise ClosedError("the model is not open: use 'async with asyncload.open(...) as model'")
        if self._stream is not None:
            self._stream.cancel(superseded=True)
        assert self._reader is not None
        plan = plan_load(self.manifest.blocks, self._select(names))
        previous = self._stream
        stream = TensorStream(
            plan, self._reader, self._spawn_after(previous), copy=copy, on_finish=self._finished
        )
        self._stream = stream
        return stream

    def _spawn_after(self, previous: TensorStream | None) -> Any:
        def spawn(fn: Any) -> None:
            async def run() -> None:
                if previous is not None:
                    await previous.wait_closed()
                await fn()

            self._spawn(run)

        return spawn

    async def load(self, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Every tensor (in stream order), or each of ``names`` (in that order), as an owned array."""
        out: dict[str, np.ndarray] = {}
        async with self.stream(names) as s:
            async for name, arr in s:
                out[name] = arr
        order = [t.name for t in self._select(names)]
        return {n: out[n] for n in order}

    def statistics(self) -> LoaderStatistics:
        if self._ring is None or self._reader is None:
            raise ClosedError("statistics() needs an open model")
        r = self._ring.statistics()
        p = self._parity_ring.statistics() if self._parity_ring is not None else None
        rd = self._reader.statistics()
        srcs = {k: s.statistics() for k, s in self._sources.items()}
        return LoaderStatistics(
            slots_total=r.slots_total + (p.slots_total if p else 0),
            slots_in_use=r.slots_in_use + (p.slots_in_use if p else 0),
            slot_size=r.slot_size,
            budget=self.limits.budget,
            bytes_in_slots=r.bytes_in_use + (p.bytes_in_use if p else 0),
            peak_slots_in_use=r.peak_slots_in_use + (p.peak_slots_in_use if p else 0),
            bytes_in_flight=rd.bytes_in_flight,
            reads_in_flight=rd.reads_in_flight,
            reads_waiting_for_slot=r.waiting,
            slot_waits=r.waits,
            blocks_read=rd.blocks_read,
            checksum_failures=rd.checksum_failures,
            degraded_reads=rd.degraded_reads,
            bytes_read_per_source={k: v.bytes_read for k, v in srcs.items()},
            sources=srcs,
            assembly=self._stream.statistics() if self._stream is not None else None,
            ring=r,
            rebuilt_blocks=rd.rebuilt_blocks,
            hedged_reads=rd.hedged_reads,
            read_retries=rd.retries,
            read_timeouts=rd.timeouts,
            slow_sources=rd.slow_sources,
            down_sources=rd.down_sources,
            mapped_blocks=rd.mapped_blocks,
        )

    def __repr__(self) -> str:
        return f"<asyncload.Model {self.origin!r} {len(self.tensors)} tensors, {self.nbytes} bytes>"


class _Opener:
    """What ``asyncload.open()`` returns: use it as ``async with asyncload.open(...) as model``."""

    def __init__(self, target: str | os.PathLike[str], **kw: Any) -> None:
        self._target = target
        self._kw = kw
        self._model: Model | None = None

    async def _open(self) -> Model:
        kw = self._kw
        budget = parse_size(kw["budget"], what="budget")
        bs = kw["block_size"]
        in_place_bs = parse_size(bs, what="block_size") if bs is not None else _in_place_block_size(budget)
        if in_place_bs < MIN_BLOCK_SIZE:
            raise BudgetError(f"block_size {in_place_bs} is below the minimum {MIN_BLOCK_SIZE}")
        opened = await open_input(self._target, block_size=in_place_bs, sources=kw["sources"])
        if kw["wrap_source"] is not None:
            opened.sources = {k: kw["wrap_source"](s) for k, s in opened.sources.items()}
        limits = Limits(
            budget=budget,
            block_size=opened.manifest.block_size,
            reads_per_source=kw["reads_per_source"],
            threads=kw["threads"] or DEFAULT_THREADS,
            overhead=opened.manifest.block_overhead,
            timeout=kw["timeout"],
            retries=kw["retries"],
            hedge=kw["hedge"],
            map_files=kw["map_files"],
        )
        cipher = None
        if kw["key"] is not None or kw["verify_key"] is not None or opened.manifest.encryption is not None:
            from ._security import open_manifest
            from .codecs._aead import aload_key

            # Files read in place cannot be encrypted: a key (e.g. $ASYNCLOAD_KEY) is moot there.
            given = kw["key"] if opened.kind == "manifest" else None
            key = None if given is None else await aload_key(given)
            cipher = open_manifest(opened.manifest, key, verify_key=kw["verify_key"], name=opened.origin)
        return Model(opened, limits, cipher, verify_hashes=kw["verify_key"] is not None)

    async def __aenter__(self) -> Model:
        self._model = await self._open()
        return await self._model.__aenter__()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._model is not None
        return await self._model.__aexit__(et, e, tb)


def open(
    target: str | os.PathLike[str],
    *,
    budget: int | str = DEFAULT_BUDGET,
    block_size: int | str | None = None,
    sources: Mapping[str, str] | None = None,
    reads_per_source: int = 4,
    threads: int | None = None,
    key: Any | None = None,
    verify_key: Any | None = None,
    wrap_source: Callable[[Source], Source] | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    hedge: float = DEFAULT_HEDGE,
    map_files: bool = True,
) -> _Opener:
    """Open a manifest, a ``.safetensors`` file or a Hugging Face directory for loading.

    ``budget`` (S) is the size of the slot ring; it must hold one block per
    source. ``block_size`` only applies to inputs read in place (a manifest
    fixes its own). ``sources`` re-points manifest source ids at new locations.
    ``reads_per_source`` bounds concurrent reads per source; ``threads`` bounds the
    worker threads (syscalls, checksums, copies) of this model (default: cores, min 2).
    ``key`` opens an encrypted checkpoint (32 raw bytes, 64 hex characters, a
    path to a key file, or a sync/async callable returning one); its manifest MAC
    is checked before any block is read. ``verify_key`` (an Ed25519 public key:
    PEM, 32 raw bytes, 64 hex, or a file) requires a valid publisher signature.
    ``open()`` never writes. ``wrap_source`` is a testing hook: each source is
    replaced by ``wrap_source(source)`` before any read (see
    :class:`asyncload.testing.FaultySource`).

    Faults: one read attempt may take ``timeout`` seconds (``None``: no limit)
    before it fails; a transient failure of a block that has no other copy or
    parity is retried ``retries`` times with exponential backoff and jitter;
    in a store with parity, a source whose reads take more than ``hedge`` times
    as long as its peers' is read around (its blocks rebuilt from the others;
    0 turns this off). See docs/reliability.md.

    ``map_files``: a block of a local file that the page cache holds whole is
    mapped into its slot (read-only, no copy) instead of copied there; False
    copies every block. See docs/design.md ("Mapped slots").
    """
    return _Opener(
        target,
        budget=budget,
        block_size=block_size,
        sources=sources,
        reads_per_source=reads_per_source,
        threads=threads,
        key=key,
        verify_key=verify_key,
        wrap_source=wrap_source,
        timeout=timeout,
        retries=retries,
        hedge=hedge,
        map_files=map_files,
    )


async def load(
    target: str | os.PathLike[str],
    names: Iterable[str] | None = None,
    *,
    budget: int | str = DEFAULT_BUDGET,
    block_size: int | str | None = None,
    sources: Mapping[str, str] | None = None,
    key: Any | None = None,
    verify_key: Any | None = None,
) -> dict[str, np.ndarray]:
    """Open ``target`` and return every (or each named) tensor as an owned array."""
    async with open(
        target, budget=budget, block_size=block_size, sources=sources, key=key, verify_key=verify_key
    ) as model:
        return await model.load(names)


async def save(
    tensors: TensorsInput,
    path: str | os.PathLike[str],
    *,
    sources: Sequence[str | os.PathLike[str]],
    block_size: int | str = DEFAULT_BLOCK_SIZE,
    budget: int | str = DEFAULT_BUDGET,
    metadata: Mapping[str, str] | None = None,
    writes_per_source: int = 4,
    progress: Progress | None = None,
    key: Any | None = None,
    sign_key: Any | None = None,
    replicas: int = 1,
    parity: int = 0,
) -> SavedPath:
    """Write ``tensors`` as blocks over ``sources`` and commit a manifest at ``path``.

    ``tensors`` is a mapping or an (async) iterable of ``(name, array)``; arrays
    are consumed one at a time, so an async producer is never held whole. The
    manifest is written last, atomically: an interrupted save leaves the
    previous manifest at ``path`` loadable. Returns the manifest path.

    ``key`` (32 raw bytes, 64 hex characters, a ``Path`` to a key file, or a
    sync/async callable returning one) encrypts every block
    with AES-256-GCM under a fresh data key wrapped by ``key``, and MACs the
    manifest; an iterable input is then collected first (see docs/encryption.md).
    ``sign_key`` (Ed25519 private key: PEM, 32 raw bytes, 64 hex, or a file)
    signs the manifest, which then records a SHA-256 of every block (a loader
    given ``verify_key`` checks each one). ``replicas`` R stores every block on R
    distinct sources; a load reads another copy when one fails.
    """
    m = parse_size(block_size, what="block_size")
    if m < MIN_BLOCK_SIZE:
        raise BudgetError(f"block_size {m} is below the minimum {MIN_BLOCK_SIZE} bytes")
    limits = Limits(parse_size(budget, what="budget"), m, writes_per_source)
    out = await save_tensors(
        tensors,
        path,
        sources,
        limits=limits,
        metadata=metadata,
        progress=progress,
        key=key,
        sign_key=sign_key,
        replicas=replicas,
        parity=parity,
    )
    return out
