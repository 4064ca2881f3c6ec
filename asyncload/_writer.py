"""Save and pack: bytes -> slots -> blocks scattered over sources -> atomic manifest commit.

Commit protocol. Every save writes *new* block keys (under a fresh checkpoint
id), each block file written to a temporary name, fsynced and renamed; then
each source directory is fsynced; only then is the manifest written to a
temporary file next to its final path, fsynced, renamed over the old one, and
the directory fsynced. A crash at any point leaves the previous manifest (and
the blocks it names, which are never touched) loadable.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import AsyncIterable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from ._config import Limits
from ._dtypes import dtype_from_numpy
from ._exceptions import FormatError
from ._format import BlockRef, FileEntry, Manifest, SourceRef, build_header, parse_header
from ._inputs import Opened
from ._plan import place_blocks
from ._ring import Ring, Slot
from ._scheduler import INLINE_BYTES, BlockReader, checksum, sha256_hex, unwrap_group
from ._threads import run_sync
from .sources import Source
from .sources._local import fsync_dir, makedirs_private, write_file_atomic
from .sources._open import is_remote, source_for, write_object

if TYPE_CHECKING:
    from ._security import BlockCipher

__all__ = ["ScatterWriter", "commit_manifest", "pack_opened", "save_tensors"]

Progress = Callable[[int], None]
TensorsInput = (
    Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]] | AsyncIterable[tuple[str, np.ndarray]]
)


_LATE = 1_000_000_000  # tag base for data blocks whose stream index is fixed only at the end


class ScatterWriter:
    """Writes filled slots as blocks, concurrently, one limiter per source."""

    def __init__(
        self,
        sources: Sequence[Source],
        ring: Ring,
        limits: Limits,
        ckpt_id: str,
        cipher: BlockCipher | None = None,
        hash_blocks: bool = False,
        replicas: int = 1,
    ) -> None:
        if not 1 <= replicas <= len(sources):
            raise FormatError(
                f"replicas must be between 1 and the number of sources ({len(sources)}), got {replicas}"
            )
        self.replicas = replicas
        self.limits = limits
        self.sources = list(sources)
        self.cipher = cipher
        self.hash_blocks = hash_blocks  # SHA-256 per block, for a manifest that will be signed
        self.ring = ring
        self.limiters = {s.id: anyio.CapacityLimiter(limits.reads_per_source) for s in self.sources}
        self.ckpt_id = ckpt_id
        self.threads = anyio.CapacityLimiter(limits.threads)
        for s in self.sources:
            s.threads = self.threads
        self.blocks: dict[int, BlockRef] = {}
        self.bytes_written = 0

    async def _write(
        self,
        tag: int,
        srcs: list[Source],
        key: str,
        offset: int,
        slot: Slot,
        progress: Progress | None,
    ) -> None:
        try:
            length = slot.used
            stored = length
            if self.cipher is not None:  # tag = the block's stream index, bound into its AAD
                stored = await run_sync(self.cipher.seal, tag, slot.memory, length, limiter=self.threads)
            data = slot.memory.data[:stored]
            crc = await checksum(data, self.threads)  # over what is stored: repair needs no key

            async def put(src: Source) -> None:
                async with self.limiters[src.id]:
                    await src.write(key, data)

            async with anyio.create_task_group() as tg:  # every copy, concurrently
                for src in srcs:
                    tg.start_soon(put, src)
            sha = await run_sync(sha256_hex, data, limiter=self.threads) if self.hash_blocks else None
            copies = tuple(s.id for s in srcs[1:])
            self.blocks[tag] = BlockRef(tag, srcs[0].id, key, offset, length, crc, sha256=sha, copies=copies)
            self.bytes_written += stored * len(srcs)
            if progress is not None:
                progress(length)
        finally:
            self.ring.release(slot)

    def submit(
        self,
        tg: anyio.abc.TaskGroup,
        tag: int,
        source_index: int,
        key: str,
        offset: int,
        slot: Slot,
        progress: Progress | None = None,
    ) -> None:
        """Start writing ``slot`` (ownership passes to the writer, which releases it).

        With ``replicas`` R the block goes to sources ``source_index .. source_index + R - 1``
        (mod k), R distinct sources; the first is its primary.
        """
        k = len(self.sources)
        srcs = [self.sources[(source_index + j) % k] for j in range(self.replicas)]
        tg.start_soon(self._write, tag, srcs, f"{self.ckpt_id}/{key}", offset, slot, progress)

    async def sync(self) -> None:
        async with anyio.create_task_group() as tg:
            for s in self.sources:
                tg.start_soon(s.sync)


def _manifest_sources(sources: Sequence[str | os.PathLike[str]], manifest_dir: Path) -> list[SourceRef]:
    refs = []
    for i, loc in enumerate(sources):
        if is_remote(loc):
            refs.append(SourceRef(f"s{i}", os.fspath(loc)))
            continue
        p = Path(os.fspath(loc)).expanduser()
        location = str(p) if p.is_absolute() else os.path.relpath(p.resolve(), manifest_dir.resolve())
        refs.append(SourceRef(f"s{i}", location))
    return refs


def _write_manifest_sync(path: Path, data: bytes) -> None:
    makedirs_private(path.parent)
    write_file_atomic(path, data)
    fsync_dir(path.parent)


async def commit_manifest(path: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Atomically replace the manifest at ``path`` (temp file, fsync, rename, fsync dir).

    A remote ``path`` (URL) is written with one PUT of the whole manifest, after every block.
    """
    if is_remote(path):
        await write_object(os.fspath(path), manifest.to_json())
        return Path(os.fspath(path))  # TODO(remote): return the location string
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
    *,
    limits: Limits,
    metadata: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    key: Any | None = None,
    sign_key: Any | None = None,
    replicas: int = 1,
) -> Path:
    """Serialize tensors as a safetensors stream into slots, scatter, then commit.

    Without a key the input is consumed one tensor at a time and the header is
    written last. With a key every block's authentication data binds the block
    count and the tensor table, so those must be known before the first block
    is sealed: an (async) iterable is collected first (its arrays stay
    referenced until the save ends) and the header is laid out up front.
    """
    srcs = _open_sources(sources)
    limits.check(len(srcs))
    mpath = Path(os.fspath(manifest_path))
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
    writer = await _new_writer(srcs, limits, ckpt_id, cipher, sign_key=sign_key, replicas=replicas)
    ring, limits = writer.ring, writer.limits
    # Stream index of data block d: known up front when the header is; else fixed at the end.
    first_data = _header_blocks(len(planned_header), m) if planned_header is not None else _LATE
    entries: list[tuple[str, str, tuple[int, ...], int]] = []
    seen: set[str] = set()
    data_pos = 0  # bytes of the data section serialized so far
    n_data = 0
    try:
        async with anyio.create_task_group() as tg:
            slot: Slot | None = None
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
                        await run_sync(_fill, slot.memory, slot.used, flat, done, n, limiter=writer.threads)
                    else:
                        _fill(slot.memory, slot.used, flat, done, n)
                    slot.used += n
                    done += n
                    data_pos += n
                    if slot.used == m:
                        writer.submit(
                            tg, first_data + n_data, n_data % len(srcs), f"d{n_data:06d}", data_pos - m, slot,
                            progress,
                        )  # fmt: skip
                        n_data += 1
                        slot = None
            if slot is not None and slot.used:
                writer.submit(
                    tg, first_data + n_data, n_data % len(srcs), f"d{n_data:06d}", data_pos - slot.used, slot,
                    progress,
                )  # fmt: skip
                n_data += 1
            elif slot is not None:
                ring.release(slot)
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
                writer.submit(tg, n_head, n_head % len(srcs), f"h{n_head:03d}", pos, hslot, progress)
                pos += len(chunk)
                n_head += 1
        await writer.sync()
    except BaseExceptionGroup as eg:
        raise unwrap_group(eg) from None
    hsize = len(header)
    blocks: list[BlockRef] = []
    for tag in sorted(writer.blocks):  # header blocks (tags 0..) sort before data blocks
        b = writer.blocks[tag]
        off = b.offset if tag < n_head else hsize + b.offset
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
                mpath.name.removesuffix(".json").removesuffix(".asyncload") + ".safetensors",
                0,
                total,
                "safetensors",
            ),
        ),
        tensors=hdr.tensors,
        sources=tuple(_manifest_sources(sources, mpath.parent)),
        blocks=tuple(blocks),
        encryption=encryption,
    )
    return await commit_manifest(mpath, _seal(manifest, cipher, sign_key))


async def _new_writer(
    sources: Sequence[Source],
    limits: Limits,
    ckpt_id: str,
    cipher: BlockCipher | None,
    *,
    sign_key: Any | None,
    replicas: int,
) -> ScatterWriter:
    """The ring and writer of one save or pack; slots carry the GCM tag when encrypting."""
    if cipher is not None:
        limits = dataclasses.replace(limits, overhead=cipher.overhead)
        limits.check(len(sources))
    ring = await run_sync(Ring, limits.slot_size, limits.slots)
    return ScatterWriter(
        sources, ring, limits, ckpt_id, cipher, hash_blocks=sign_key is not None, replicas=replicas
    )


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
    *,
    limits: Limits,
    progress: Progress | None = None,
    key: Any | None = None,
    sign_key: Any | None = None,
    replicas: int = 1,
) -> Path:
    """Copy an in-place input (safetensors file or HF directory) into a block store."""
    dest = _open_sources(sources)
    limits.check(len(dest))
    src_man = opened.manifest
    mpath = Path(os.fspath(manifest_path))
    ckpt_id = uuid.uuid4().hex
    cipher = encryption = None
    if key is not None:
        from ._security import new_cipher_for
        from .codecs._aead import aload_key

        user_key = await aload_key(key)
        cipher, encryption = new_cipher_for(user_key, ckpt_id, len(src_man.blocks), src_man.tensors)
    writer = await _new_writer(dest, limits, ckpt_id, cipher, sign_key=sign_key, replicas=replicas)
    ring, limits = writer.ring, writer.limits
    reader = BlockReader.for_sources(ring, opened.sources, limits, writer.threads)
    placement = place_blocks(len(src_man.blocks), len(dest))
    try:
        async with anyio.create_task_group() as tg:

            async def on_block(block: BlockRef, slot: Slot) -> None:
                writer.submit(
                    tg,
                    block.index,
                    placement[block.index],
                    f"{block.index:06d}",
                    block.offset,
                    slot,
                    progress,
                )

            await reader.run(src_man.blocks, on_block)
        await writer.sync()
    except BaseExceptionGroup as eg:
        raise unwrap_group(eg) from None
    blocks = tuple(writer.blocks[i] for i in range(len(src_man.blocks)))
    manifest = Manifest(
        id=ckpt_id,
        block_size=limits.block_size,
        total_size=src_man.total_size,
        files=src_man.files,
        tensors=src_man.tensors,
        sources=tuple(_manifest_sources(sources, mpath.parent)),
        blocks=blocks,
        encryption=encryption,
    )
    return await commit_manifest(mpath, _seal(manifest, cipher, sign_key))
