"""Save and pack: bytes -> slots -> blocks scattered over sources -> atomic manifest commit.

Commit protocol. Block keys are content addresses (the BLAKE3-256 of the stored
bytes): a save never changes the bytes under a key that a manifest names. Each
block file is written to a temporary name, fsynced and renamed; then each
source directory is fsynced; only then is the manifest written to a temporary
file next to its final path, fsynced, renamed over the old one, and the
directory fsynced. A crash at any point leaves the previous manifest (and the
blocks it names, which are never touched) loadable, and running the same save
again finds the blocks already stored and does not write them again.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
import blake3
import crc32c as _crc32c
import numpy as np

from ._config import Limits
from ._dtypes import dtype_from_numpy
from ._exceptions import FormatError, IntegrityError, SourceError
from ._format import BlockRef, FileEntry, Manifest, ParityRef, SourceRef, Stripe, build_header, parse_header
from ._inputs import Opened
from ._plan import place_blocks
from ._ring import Ring, Slot
from ._scheduler import INLINE_BYTES, BlockReader, checksum, sha256_hex, unwrap_group
from ._threads import Workers, run_sync
from .sources import Source
from .sources._local import fsync_dir, makedirs_private, write_file_atomic
from .sources._open import close_sources, is_remote, source_for, split_location, write_object

if TYPE_CHECKING:
    from ._security import BlockCipher

__all__ = ["SavedPath", "ScatterWriter", "commit_manifest", "content_key", "pack_opened", "save_tensors"]

Progress = Callable[[int], None]
TensorsInput = (
    Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]] | AsyncIterable[tuple[str, np.ndarray]]
)


_LATE = 1_000_000_000  # tag base for data blocks whose stream index is fixed only at the end
_VERIFY_CHUNK = 1 << 20  # bytes read at a time when checking a block that is already stored


def content_key(digest: str) -> str:
    """The key of a stored block: its content hash (hex), fanned out over 256 directories.

    Content addressing makes a save resumable (a block already stored under its
    key is not written again) and deduplicates blocks that versions share.
    """
    return f"{digest[:2]}/{digest}"


def content_hash(data: memoryview) -> str:
    """BLAKE3-256 of ``data``, 64 hex digits: the content address of a stored block.

    BLAKE3 hashed 6.4 GB/s on one core of the development VM, SHA-256 1.3 GB/s; keys
    were SHA-256 before, and the hash of every block was a third of a save's CPU. A
    SHA-256 is still computed, and recorded, for the blocks of a signed manifest.
    (Runs in a worker thread; the blake3 package releases the GIL.)
    """
    return blake3.blake3(data).hexdigest()


class _Member:
    """A filled slot waiting to be written, alone or as part of a stripe."""

    __slots__ = ("offset", "progress", "slot", "stored", "tag")

    def __init__(self, tag: int, offset: int, slot: Slot, progress: Progress | None) -> None:
        self.tag = tag
        self.offset = offset
        self.slot = slot
        self.progress = progress
        self.stored = 0


class ScatterWriter:
    """Writes filled slots as blocks, concurrently, one limiter per source.

    Without parity each block goes to ``replicas`` consecutive sources. With
    ``parity`` P, data blocks are grouped into stripes of up to ``k - P``
    blocks (in the order they are submitted, or by ``stripe_of``); each stripe
    is written with its P Reed-Solomon parity blocks, every block of the stripe
    on a different source (positions rotate from stripe to stripe so parity
    spreads evenly). A stripe's data slots are held until its parity is
    computed; parity is computed into ``parity_ring`` (P slots of the budget).

    Block keys are content addresses (:func:`content_key`): a block that a
    source already holds, with the right length and checksum, is not written
    again; :attr:`bytes_reused` counts those bytes.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        ring: Ring,
        limits: Limits,
        ckpt_id: str,
        cipher: BlockCipher | None = None,
        hash_blocks: bool = False,
        replicas: int = 1,
        parity: int = 0,
        parity_ring: Ring | None = None,
    ) -> None:
        k = len(sources)
        if not 1 <= replicas <= k:
            raise FormatError(f"replicas must be between 1 and the number of sources ({k}), got {replicas}")
        if parity and replicas > 1:
            raise FormatError("replicas and parity cannot be combined: choose one redundancy scheme")
        if not 0 <= parity < k:
            raise FormatError(
                f"parity must be between 0 and the number of sources minus one ({k - 1}), got {parity}"
            )
        if parity and (parity_ring is None or parity_ring.statistics().slots_total < parity):
            raise ValueError("parity needs a parity ring of at least `parity` slots")
        self.replicas = replicas
        self.parity = parity
        self.data_per_stripe = k - parity
        self.parity_ring = parity_ring
        self.limits = limits
        self.sources = list(sources)
        self.cipher = cipher
        self.hash_blocks = hash_blocks  # record SHA-256 in the manifest (for a signature)
        self.ring = ring
        self.limiters = {s.id: anyio.CapacityLimiter(limits.reads_per_source) for s in self.sources}
        self.ckpt_id = ckpt_id
        self.threads = Workers(limits.threads)
        # Sources write (and fsync) under their own limiter: a thread waiting for the disk
        # must not hold one of the CPU threads that fill, hash and checksum the next blocks.
        # A 4 GiB save with every block fsynced through the page cache: 0.60 -> 0.77 GB/s.
        self.io_threads = Workers(4 * limits.threads, "asyncload-io")
        for s in self.sources:
            s.threads = self.io_threads
        self.blocks: dict[int, BlockRef] = {}
        self.stripes: list[tuple[tuple[int, ...], int, tuple[ParityRef, ...]]] = []  # tags, length, parity
        self._open: dict[int, list[_Member]] = {}  # stripe group -> members so far
        self._group_sizes: dict[int, int] = {}
        self._next_group = 0
        self.bytes_written = 0  # stored bytes sent to sources (every copy and parity block)
        self.bytes_reused = 0  # stored bytes found already in place (not written again)
        self.missing: list[str] = []  # why blocks of a parity save could not be stored
        self.blocks_reused = 0

    # -- one stored object on one source ---------------------------------------------
    async def _already_stored(self, src: Source, key: str, data: memoryview, crc: int) -> bool:
        """True when ``src`` holds ``key`` with exactly these bytes' length and crc32c."""
        try:
            if await src.size(key) != len(data):
                return False
        except SourceError:
            return False
        scratch = bytearray(min(_VERIFY_CHUNK, max(1, len(data))))
        view = memoryview(scratch)
        value = 0
        pos = 0
        try:
            while pos < len(data):
                n = await src.read_into(key, pos, view[: min(len(view), len(data) - pos)])
                if n <= 0:
                    return False
                value = int(_crc32c.crc32c(view[:n], value))
                pos += n
        except (SourceError, IntegrityError):
            return False
        return value == crc

    async def _put(self, src: Source, key: str, data: memoryview, crc: int) -> None:
        async with self.limiters[src.id]:
            if await self._already_stored(src, key, data, crc):
                self.bytes_reused += len(data)
                self.blocks_reused += 1
                return
            await src.write(key, data)
            self.bytes_written += len(data)

    async def _digests(self, data: memoryview) -> tuple[str, str | None]:
        """(content key, SHA-256 or None): the SHA-256 only for a manifest that will be signed."""
        key = content_key(await run_sync(content_hash, data, workers=self.threads))
        sha = await run_sync(sha256_hex, data, workers=self.threads) if self.hash_blocks else None
        return key, sha

    async def _prepare(self, member: _Member) -> tuple[memoryview, int, str, str | None]:
        """Seal (when encrypting) and hash one filled slot: (stored bytes, crc32c, key, sha256)."""
        slot = member.slot
        stored = slot.used
        if self.cipher is not None:  # tag = the block's stream index, bound into its AAD
            stored = await run_sync(
                self.cipher.seal, member.tag, slot.memory, slot.used, workers=self.threads
            )
        member.stored = stored
        data = slot.memory.data[:stored]
        crc = await checksum(data, self.threads)  # over what is stored: repair needs no key
        key, sha = await self._digests(data)
        return data, crc, key, sha

    # -- plain and replicated blocks ---------------------------------------------------
    async def _write_block(self, member: _Member, srcs: list[Source]) -> None:
        try:
            data, crc, key, sha = await self._prepare(member)
            async with anyio.create_task_group() as tg:  # every copy, concurrently
                for src in srcs:
                    tg.start_soon(self._put, src, key, data, crc)
            self.blocks[member.tag] = BlockRef(
                member.tag,
                srcs[0].id,
                key,
                member.offset,
                member.slot.used,
                crc,
                sha256=sha,
                copies=tuple(s.id for s in srcs[1:]),
            )
            if member.progress is not None:
                member.progress(member.slot.used)
        finally:
            self.ring.release(member.slot)

    # -- stripes -----------------------------------------------------------------------
    async def _write_stripe(self, members: list[_Member], stripe_no: int) -> None:
        from .codecs import ErasureCode, encode_into

        assert self.parity_ring is not None
        parity_slots: list[Slot] = []
        try:
            k = len(self.sources)
            prepared: list[tuple[memoryview, int, str, str | None]] = [
                (memoryview(b""), 0, "", None)
            ] * len(members)

            async def prep(i: int) -> None:
                prepared[i] = await self._prepare(members[i])

            async with anyio.create_task_group() as tg:
                for i in range(len(members)):
                    tg.start_soon(prep, i)
            length = max(m.stored for m in members)
            for m in members:  # zero-pad shorter members for coding (nothing padded is stored)
                m.slot.memory[m.stored : length] = 0
            await self.parity_ring.acquire_group(self.parity, parity_slots)
            code = ErasureCode(len(members), self.parity)
            await run_sync(
                encode_into,
                code,
                [m.slot.memory.data[:length] for m in members],
                [p.memory.data[:length] for p in parity_slots],
                workers=self.threads,
            )
            parity_refs: list[ParityRef] = []
            puts: list[tuple[Source, str, memoryview, int]] = []
            for pos, (m, (data, crc, key, sha)) in enumerate(zip(members, prepared, strict=True)):
                src = self.sources[(stripe_no + pos) % k]
                puts.append((src, key, data, crc))
                self.blocks[m.tag] = BlockRef(m.tag, src.id, key, m.offset, m.slot.used, crc, sha256=sha)
            for r, pslot in enumerate(parity_slots):
                src = self.sources[(stripe_no + len(members) + r) % k]
                pdata = pslot.memory.data[:length]
                crc = await checksum(pdata, self.threads)
                key, sha = await self._digests(pdata)
                puts.append((src, key, pdata, crc))
                parity_refs.append(ParityRef(src.id, key, crc, sha))
            failed: dict[int, SourceError] = {}

            async def put(i: int) -> None:
                try:
                    await self._put(*puts[i])
                except SourceError as e:  # a source that fails: the stripe's parity may cover it
                    failed[i] = e

            async with anyio.create_task_group() as tg:
                for i in range(len(puts)):
                    tg.start_soon(put, i)
            if len(failed) > self.parity:
                errors = [failed[i] for i in sorted(failed)]
                for other in errors[1:]:
                    errors[0].add_note(f"also: {other}")
                raise errors[0]
            for i in failed:  # recorded as missing: loads rebuild them, verify --repair stores them
                if i < len(members):
                    tag = members[i].tag
                    self.blocks[tag] = dataclasses.replace(self.blocks[tag], missing=True)
                else:
                    parity_refs[i - len(members)] = dataclasses.replace(
                        parity_refs[i - len(members)], missing=True
                    )
                self.missing.append(str(failed[i]))
            self.stripes.append((tuple(m.tag for m in members), length, tuple(parity_refs)))
            for m in members:
                if m.progress is not None:
                    m.progress(m.slot.used)
        finally:
            for m in members:
                self.ring.release(m.slot)
            for pslot in parity_slots:
                self.parity_ring.release(pslot)

    # -- submission ----------------------------------------------------------------------
    def submit(
        self,
        tg: anyio.abc.TaskGroup,
        tag: int,
        source_index: int,
        offset: int,
        slot: Slot,
        progress: Progress | None = None,
        *,
        group: int | None = None,
        group_size: int | None = None,
    ) -> None:
        """Start writing ``slot`` (ownership passes to the writer, which releases it).

        Without parity, with ``replicas`` R the block goes to sources ``source_index ..
        source_index + R - 1`` (mod k), R distinct sources; the first is its primary.
        With parity the block joins a stripe: the open one (filled in submission
        order, written when it holds ``k - P`` blocks or at :meth:`flush`), or
        stripe ``group`` of ``group_size`` blocks when given (blocks may then
        arrive in any order; the stripe is written when its last block arrives).
        """
        member = _Member(tag, offset, slot, progress)
        if not self.parity:
            k = len(self.sources)
            srcs = [self.sources[(source_index + j) % k] for j in range(self.replicas)]
            tg.start_soon(self._write_block, member, srcs)
            return
        if group is None:
            group = self._next_group
            size = self.data_per_stripe
        else:
            size = group_size or self.data_per_stripe
        members = self._open.setdefault(group, [])
        members.append(member)
        self._group_sizes[group] = size
        if len(members) >= size:
            self._start_stripe(tg, group)

    def _start_stripe(self, tg: anyio.abc.TaskGroup, group: int) -> None:
        members = sorted(self._open.pop(group), key=lambda m: m.tag)
        self._group_sizes.pop(group, None)
        if group == self._next_group:
            self._next_group += 1
        # Positions rotate by the stripe's number, so the same input always lands the same way
        # (a re-run finds every block where the interrupted run put it).
        tg.start_soon(self._write_stripe, members, group)

    def flush(self, tg: anyio.abc.TaskGroup) -> None:
        """Write the open stripe even if it is short (end of the data, or before the header)."""
        for group in sorted(self._open):
            self._start_stripe(tg, group)
        self._next_group = max(self._next_group, max(self._open, default=-1) + 1)

    def release_pending(self) -> None:
        """After a failure: give back the slots of stripes that were never started."""
        for members in self._open.values():
            for m in members:
                self.ring.release(m.slot)
        self._open.clear()

    def manifest_stripes(self, index_of: Mapping[int, int]) -> tuple[Stripe, ...]:
        """The stripes written, with member tags turned into block indices, ordered by first block."""
        rows = sorted(
            (tuple(sorted(index_of[t] for t in tags)), length, parity)
            for tags, length, parity in self.stripes
        )
        return tuple(Stripe(i, members, length, parity) for i, (members, length, parity) in enumerate(rows))

    async def sync(self) -> None:
        async with anyio.create_task_group() as tg:
            for s in self.sources:
                tg.start_soon(s.sync)


def _manifest_sources(
    sources: Sequence[str | os.PathLike[str]], manifest_dir: str | os.PathLike[str]
) -> list[SourceRef]:
    """Source locations as the manifest records them, relative to ``manifest_dir`` where possible.

    Local sources beside a local manifest, and URLs under a remote manifest's own URL, are
    recorded relative, so the tree can be copied elsewhere; a local source of a remote
    manifest is recorded as an absolute path.
    """
    return [SourceRef(f"s{i}", recorded_location(loc, manifest_dir)) for i, loc in enumerate(sources)]


def recorded_location(location: str | os.PathLike[str], manifest_dir: str | os.PathLike[str]) -> str:
    """How a manifest in ``manifest_dir`` records a source at ``location`` (see _manifest_sources)."""
    base = os.fspath(manifest_dir)
    if is_remote(location):
        return _relative_url(os.fspath(location), base)
    p = Path(os.fspath(location)).expanduser()
    if is_remote(base):
        return str(p.resolve())
    return str(p) if p.is_absolute() else os.path.relpath(p.resolve(), Path(base).resolve())


def _relative_url(location: str, base: str) -> str:
    """``location`` relative to the remote ``base`` when it lies under it (same scheme and host)."""
    u, b = urlsplit(location), urlsplit(base)
    if not is_remote(base) or (u.scheme, u.netloc) != (b.scheme, b.netloc) or u.query or b.query:
        return location
    prefix = b.path.rstrip("/") + "/"
    path = u.path.rstrip("/")
    if not path.startswith(prefix) or path == prefix.rstrip("/"):
        return location
    rel = path[len(prefix) :]
    return location if rel.startswith("/") or ".." in rel.split("/") else rel


def _write_manifest_sync(path: Path, data: bytes) -> None:
    makedirs_private(path.parent)
    write_file_atomic(path, data)
    fsync_dir(path.parent)


async def commit_manifest(path: str | os.PathLike[str], manifest: Manifest) -> str | Path:
    """Atomically replace the manifest at ``path`` (temp file, fsync, rename, fsync dir).

    A remote ``path`` (URL) is written with one PUT of the whole manifest, after every block,
    and returned as the URL string (a ``Path`` would fold its ``//``).
    """
    if is_remote(path):
        await write_object(os.fspath(path), manifest.to_json())
        return os.fspath(path)
    p = Path(os.fspath(path))
    await run_sync(_write_manifest_sync, p, manifest.to_json())
    return p


def _open_sources(sources: Sequence[str | os.PathLike[str]]) -> list[Source]:
    if not sources:
        raise FormatError("at least one source directory is needed")
    return [source_for(f"s{i}", s, create=True) for i, s in enumerate(sources)]


# --------------------------------------------------------------------------- save


def _as_bytes(name: str, arr: Any) -> tuple[str, tuple[int, ...], np.ndarray]:
    a = np.asarray(arr)
    dtype = dtype_from_numpy(a.dtype)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    flat = a.reshape(-1).view(np.uint8) if a.size else np.empty(0, dtype=np.uint8)
    return dtype, tuple(int(d) for d in a.shape), flat


async def _iterate(tensors: TensorsInput) -> AsyncIterable[tuple[str, np.ndarray]]:
    if isinstance(tensors, Mapping):
        for item in tensors.items():
            yield item
    elif isinstance(tensors, AsyncIterable):
        async for item in tensors:
            yield item
    else:
        for item in tensors:
            yield item


def _fill(dst: np.ndarray, d0: int, src: np.ndarray, s0: int, n: int) -> None:
    dst[d0 : d0 + n] = src[s0 : s0 + n]


async def _materialize(tensors: TensorsInput) -> list[tuple[str, np.ndarray]]:
    return [item async for item in _iterate(tensors)]


def _header_blocks(header_size: int, m: int) -> int:
    return -(-header_size // m)


async def save_tensors(
    tensors: TensorsInput,
    manifest_path: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    **kw: Any,
) -> SavedPath:
    """Serialize tensors as a safetensors stream into slots, scatter, then commit (see _save_into)."""
    srcs = _open_sources(sources)
    try:
        return await _save_into(srcs, tensors, manifest_path, sources, **kw)
    finally:
        await close_sources(srcs)


async def _save_into(
    srcs: list[Source],
    tensors: TensorsInput,
    manifest_path: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    *,
    limits: Limits,
    metadata: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    key: Any | None = None,
    sign_key: Any | None = None,
    replicas: int = 1,
    parity: int = 0,
) -> SavedPath:
    """Serialize tensors as a safetensors stream into slots, scatter, then commit.

    Without a key the input is consumed one tensor at a time and the header is
    written last. With a key every block's authentication data binds the block
    count and the tensor table, so those must be known before the first block
    is sealed: an (async) iterable is collected first (its arrays stay
    referenced until the save ends) and the header is laid out up front.
    """
    limits.check(len(srcs))
    mpath = os.fspath(manifest_path)  # a path or a URL
    mdir, mname = split_location(mpath)
    ckpt_id = uuid.uuid4().hex
    m = limits.block_size
    cipher = None
    encryption = None
    planned_header: bytes | None = None
    if key is not None:
        from ._security import new_cipher_for
        from .codecs._aead import aload_key

        user_key = await aload_key(key)
        items = await _materialize(tensors)
        tensors = items
        planned = [(name, *_as_bytes(name, arr)) for name, arr in items]
        planned_header = build_header([(n, d, sh, f.nbytes) for n, d, sh, f in planned], metadata)
        data_total = sum(f.nbytes for *_, f in planned)
        count = _header_blocks(len(planned_header), m) + -(-data_total // m)
        total = len(planned_header) + data_total
        table = parse_header(planned_header, file_size=total, name="new checkpoint")
        cipher, encryption = new_cipher_for(user_key, ckpt_id, max(count, 1), table.tensors)
    writer = await _new_writer(
        srcs, limits, ckpt_id, cipher, sign_key=sign_key, replicas=replicas, parity=parity
    )
    ring, limits = writer.ring, writer.limits
    # Stream index of data block d: known up front when the header is; else fixed at the end.
    first_data = _header_blocks(len(planned_header), m) if planned_header is not None else _LATE
    entries: list[tuple[str, str, tuple[int, ...], int]] = []
    seen: set[str] = set()
    data_pos = 0  # bytes of the data section serialized so far
    n_data = 0
    slot: Slot | None = None
    try:
        async with anyio.create_task_group() as tg:
            async for name, arr in _iterate(tensors):
                if not isinstance(name, str) or name in seen or name == "__metadata__":
                    raise FormatError(f"tensor name {name!r} is not a string, is reserved, or repeats")
                seen.add(name)
                dtype, shape, flat = _as_bytes(name, arr)
                entries.append((name, dtype, shape, flat.nbytes))
                done = 0
                while done < flat.nbytes:
                    if slot is None:
                        slot = await ring.acquire()
                    n = min(m - slot.used, flat.nbytes - done)
                    if n >= INLINE_BYTES:
                        await run_sync(_fill, slot.memory, slot.used, flat, done, n, workers=writer.threads)
                    else:
                        _fill(slot.memory, slot.used, flat, done, n)
                    slot.used += n
                    done += n
                    data_pos += n
                    if slot.used == m:
                        writer.submit(
                            tg, first_data + n_data, n_data % len(srcs), data_pos - m, slot, progress
                        )
                        n_data += 1
                        slot = None
            if slot is not None and slot.used:
                writer.submit(
                    tg, first_data + n_data, n_data % len(srcs), data_pos - slot.used, slot, progress
                )
                n_data += 1
            elif slot is not None:
                ring.release(slot)
            slot = None
            writer.flush(tg)  # the last data stripe; the header blocks stripe on their own
            header = build_header(entries, metadata)
            if planned_header is not None and header != planned_header:
                raise FormatError("the tensors changed while they were being saved")
            pos = 0
            n_head = 0
            while pos < len(header):
                hslot = await ring.acquire()
                chunk = header[pos : pos + m]
                hslot.memory[: len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
                hslot.used = len(chunk)
                writer.submit(tg, n_head, n_head % len(srcs), pos, hslot, progress)
                pos += len(chunk)
                n_head += 1
            writer.flush(tg)
        await writer.sync()
    except BaseExceptionGroup as eg:
        raise unwrap_group(eg) from None
    finally:
        if slot is not None:
            ring.release(slot)
        writer.release_pending()
    hsize = len(header)
    blocks: list[BlockRef] = []
    index_of: dict[int, int] = {}
    for tag in sorted(writer.blocks):  # header blocks (tags 0..) sort before data blocks
        b = writer.blocks[tag]
        off = b.offset if tag < n_head else hsize + b.offset
        index_of[tag] = len(blocks)
        blocks.append(dataclasses.replace(b, index=len(blocks), offset=off))
        if cipher is not None and tag != len(blocks) - 1:
            raise AssertionError(f"block {tag} was sealed for the wrong position {len(blocks) - 1}")
    total = hsize + data_pos
    hdr = parse_header(header, file_size=total, name="new checkpoint")
    manifest = Manifest(
        id=ckpt_id,
        block_size=m,
        total_size=total,
        files=(
            FileEntry(
                mname.removesuffix(".json").removesuffix(".asyncload") + ".safetensors",
                0,
                total,
                "safetensors",
            ),
        ),
        tensors=hdr.tensors,
        sources=tuple(_manifest_sources(sources, mdir)),
        blocks=tuple(blocks),
        encryption=encryption,
        parity=writer.parity,
        stripes=writer.manifest_stripes(index_of),
    )
    return _saved(await commit_manifest(mpath, _seal(manifest, cipher, sign_key)), writer)


async def _new_writer(
    sources: Sequence[Source],
    limits: Limits,
    ckpt_id: str,
    cipher: BlockCipher | None,
    *,
    sign_key: Any | None,
    replicas: int,
    parity: int,
) -> ScatterWriter:
    """The rings and writer of one save or pack; slots carry the GCM tag when encrypting.

    With parity P, P slots of the budget hold parity blocks being written; the
    rest (at least k - P, by the budget rule S >= k x m) hold data blocks.
    """
    if cipher is not None:
        limits = dataclasses.replace(limits, overhead=cipher.overhead)
        limits.check(len(sources))
    if not 0 <= parity < len(sources):
        raise FormatError(
            f"parity must be between 0 and the number of sources minus one ({len(sources) - 1}), got {parity}"
        )
    held_for_parity = limits.parity_slots(len(sources), parity)
    ring = await run_sync(Ring, limits.slot_size, limits.slots - held_for_parity)
    parity_ring = await run_sync(Ring, limits.slot_size, held_for_parity) if parity else None
    return ScatterWriter(
        sources,
        ring,
        limits,
        ckpt_id,
        cipher,
        hash_blocks=sign_key is not None,
        replicas=replicas,
        parity=parity,
        parity_ring=parity_ring,
    )


class SavedPath(str):
    """The manifest location a save or pack returns (a ``str``), with what it wrote and reused.

    ``bytes_written`` counts stored bytes sent to sources (every copy and parity
    block); ``bytes_reused`` and ``blocks_reused`` count stored blocks that a
    source already held under their content key (a resumed save, or tensors
    shared with an earlier version), which were therefore not written again.
    """

    bytes_written: int = 0
    bytes_reused: int = 0
    blocks_reused: int = 0
    missing: tuple[str, ...] = ()  # blocks a failing source could not store (parity covers them)


def _saved(path: str | os.PathLike[str], writer: ScatterWriter) -> SavedPath:
    out = SavedPath(os.fspath(path))
    out.missing = tuple(writer.missing)
    out.bytes_written = writer.bytes_written
    out.bytes_reused = writer.bytes_reused
    out.blocks_reused = writer.blocks_reused
    return out


def _seal(manifest: Manifest, cipher: BlockCipher | None, sign_key: Any | None) -> Manifest:
    if cipher is None and sign_key is None:
        return manifest
    from ._security import seal_manifest

    return seal_manifest(manifest, cipher, sign_key)


# --------------------------------------------------------------------------- pack


async def pack_opened(
    opened: Opened,
    manifest_path: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    **kw: Any,
) -> SavedPath:
    """Copy an in-place input (safetensors file or HF directory) into a block store (see _pack_into)."""
    dest = _open_sources(sources)
    try:
        return await _pack_into(dest, opened, manifest_path, sources, **kw)
    finally:
        await close_sources(dest)


async def _pack_into(
    dest: list[Source],
    opened: Opened,
    manifest_path: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    *,
    limits: Limits,
    progress: Progress | None = None,
    key: Any | None = None,
    sign_key: Any | None = None,
    replicas: int = 1,
    parity: int = 0,
) -> SavedPath:
    """Copy an in-place input (safetensors file or HF directory) into a block store."""
    limits.check(len(dest))
    src_man = opened.manifest
    mpath = os.fspath(manifest_path)  # a path or a URL
    mdir = split_location(mpath)[0]
    ckpt_id = uuid.uuid4().hex
    cipher = encryption = None
    if key is not None:
        from ._security import new_cipher_for
        from .codecs._aead import aload_key

        user_key = await aload_key(key)
        cipher, encryption = new_cipher_for(user_key, ckpt_id, len(src_man.blocks), src_man.tensors)
    writer = await _new_writer(
        dest, limits, ckpt_id, cipher, sign_key=sign_key, replicas=replicas, parity=parity
    )
    ring, limits = writer.ring, writer.limits
    reader = BlockReader.for_sources(ring, opened.sources, limits, writer.threads)
    n_blocks = len(src_man.blocks)
    placement = place_blocks(n_blocks, len(dest))
    per = writer.data_per_stripe
    try:
        async with anyio.create_task_group() as tg:

            async def on_block(block: BlockRef, slot: Slot) -> None:
                # With parity, stripe g holds blocks g*D .. g*D+D-1 of the stream (in any arrival order).
                g = block.index // per
                writer.submit(
                    tg,
                    block.index,
                    placement[block.index],
                    block.offset,
                    slot,
                    progress,
                    group=g,
                    group_size=min(per, n_blocks - g * per),
                )

            await reader.run(src_man.blocks, on_block)
        await writer.sync()
    except BaseExceptionGroup as eg:
        raise unwrap_group(eg) from None
    finally:
        writer.release_pending()
    blocks = tuple(writer.blocks[i] for i in range(n_blocks))
    manifest = Manifest(
        id=ckpt_id,
        block_size=limits.block_size,
        total_size=src_man.total_size,
        files=src_man.files,
        tensors=src_man.tensors,
        sources=tuple(_manifest_sources(sources, mdir)),
        blocks=blocks,
        encryption=encryption,
        parity=writer.parity,
        stripes=writer.manifest_stripes({i: i for i in range(n_blocks)}),
    )
    return _saved(await commit_manifest(mpath, _seal(manifest, cipher, sign_key)), writer)
