"""Turn what a user points at into a manifest and its sources.

Three inputs are understood, all without conversion:

* an asyncload manifest (``*.json``), whose sources resolve relative to it;
* a plain ``.safetensors`` file, read in place: its blocks are ranges of the file;
* a Hugging Face model directory (``model.safetensors.index.json`` + shards,
  or a single ``model.safetensors``), read in place, shard by shard.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from ._exceptions import BlockNotFoundError, FormatError, HeaderError, ManifestError, SourceUnavailableError
from ._format import (
    MAX_MANIFEST_SIZE,
    BlockRef,
    FileEntry,
    Manifest,
    SourceRef,
    TensorInfo,
    parse_header,
    parse_header_length,
    parse_hf_index,
)
from ._plan import cut_blocks
from ._threads import run_sync
from .sources import Source
from .sources._open import is_remote, join_location, parent_location, read_object, source_for

__all__ = ["HF_INDEX", "Opened", "open_input"]

HF_INDEX = "model.safetensors.index.json"
IN_PLACE_SOURCE = "file"


class Opened:
    """A manifest, its sources, and where it came from."""

    def __init__(self, manifest: Manifest, sources: dict[str, Source], origin: str, kind: str) -> None:
        self.manifest = manifest
        self.sources = sources
        self.origin = origin
        self.kind = kind  # "manifest" | "safetensors" | "hf-directory"


def _read_header_sync(path: Path) -> tuple[int, bytes]:
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise BlockNotFoundError(f"safetensors file {str(path)!r} not found") from None
    except OSError as e:  # a directory, no permission, a name too long (shard names come from the index)
        raise SourceUnavailableError(f"cannot open safetensors file {str(path)!r}: {e.strerror}") from None
    except ValueError:  # a NUL byte or a lone surrogate in a shard name
        raise HeaderError(f"{str(path)!r} is not a valid file name") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        n = parse_header_length(prefix, file_size=size, name=str(path))
        return size, prefix + f.read(n)


def _in_place(files: list[tuple[Path, str, str]], block_size: int) -> Manifest:
    """A manifest whose blocks are ranges of existing files (no checksums)."""
    entries: list[FileEntry] = []
    tensors: list[TensorInfo] = []
    pos = 0
    for path, rel, kind in files:
        if kind == "index":
            size = path.stat().st_size
        else:
            size, head = _read_header_sync(path)
            hdr = parse_header(head, file_size=size, name=str(path))
            tensors.extend(
                TensorInfo(t.name, t.dtype, t.shape, pos + t.begin, pos + t.end) for t in hdr.tensors
            )
        entries.append(FileEntry(rel, pos, size, kind))
        pos += size
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})[:3]
        raise HeaderError(f"tensor names appear in more than one shard: {dup}")
    blocks: list[BlockRef] = []
    for off, length in cut_blocks(pos, block_size, [e.offset for e in entries]):
        f = next(e for e in entries if e.offset <= off < e.offset + e.size)
        blocks.append(BlockRef(len(blocks), IN_PLACE_SOURCE, f.path, off, length, None, off - f.offset))
    return Manifest(
        id=uuid.uuid4().hex,
        block_size=block_size,
        total_size=pos,
        files=tuple(entries),
        tensors=tuple(sorted(tensors, key=lambda t: t.begin)),
        sources=(SourceRef(IN_PLACE_SOURCE, "."),),
        blocks=tuple(blocks),
    )


def _hf_files(directory: Path) -> list[tuple[Path, str, str]]:
    index = directory / HF_INDEX
    if index.is_file():
        data = index.read_bytes()
        weight_map = parse_hf_index(data, name=str(index))
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if "/" in shard or shard in ("", ".", ".."):
                raise HeaderError(f"{index}: shard name {shard!r} is not a plain file name")
        files = [(directory / s, s, "safetensors") for s in shards]
        files.append((index, HF_INDEX, "index"))
        return files
    single = sorted(directory.glob("*.safetensors"))
    if len(single) == 1:
        return [(single[0], single[0].name, "safetensors")]
    raise FormatError(
        f"{directory}: not a Hugging Face model directory (no {HF_INDEX} and "
        f"{len(single)} .safetensors files)"
    )


def _check_hf_index(m: Manifest, directory: Path) -> None:
    index = directory / HF_INDEX
    if not index.is_file():
        return
    weight_map = parse_hf_index(index.read_bytes(), name=str(index))
    by_file: dict[str, str] = {}
    for f in m.files:
        for t in m.tensors:
            if f.offset <= t.begin < f.offset + f.size or (t.nbytes == 0 and t.begin == f.offset + f.size):
                by_file.setdefault(t.name, f.path)
    for name, shard in weight_map.items():
        if by_file.get(name) != shard:
            raise HeaderError(f"{index}: tensor {name!r} is mapped to {shard!r} but is not in that shard")


def _open_sync(target: Path, block_size: int) -> tuple[Manifest, Path, str]:
    if target.is_dir():
        files = _hf_files(target)
        m = _in_place(files, block_size)
        _check_hf_index(m, target)
        return m, target, "hf-directory"
    if not target.exists():
        raise BlockNotFoundError(f"{str(target)!r} does not exist")
    with target.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        first = f.read(1)
    if first == b"{" or target.suffix == ".json":
        if size > MAX_MANIFEST_SIZE:
            raise ManifestError(f"{target}: {size} bytes is larger than any manifest asyncload writes")
        data = target.read_bytes()
        return Manifest.from_json(data, name=str(target)), target.parent, "manifest"
    return (
        _in_place([(target, target.name, "safetensors")], block_size),
        target.parent,
        "safetensors",
    )


async def open_input(
    target: str | os.PathLike[str],
    *,
    block_size: int,
    sources: Mapping[str, str] | None = None,
) -> Opened:
    """Open a manifest, a .safetensors file or an HF directory; build its sources.

    ``sources`` re-points source ids at new locations (relative locations given
    here resolve against the current directory).
    """
    repoint = dict(sources or {})
    if is_remote(target):  # a manifest URL: sources resolve against its own location
        url = os.fspath(target)
        data = await read_object(url, limit=MAX_MANIFEST_SIZE)
        manifest = Manifest.from_json(data, name=url)
        return _build(manifest, parent_location(url), url, "manifest", repoint)
    path = Path(os.path.expanduser(os.fspath(target)))  # noqa: ASYNC240 - no I/O, reads $HOME only
    manifest, base, kind = await run_sync(_open_sync, path, block_size)
    return _build(manifest, str(base), str(path), kind, repoint)


def _build(manifest: Manifest, base: str, origin: str, kind: str, repoint: dict[str, str]) -> Opened:
    known = {s.id for s in manifest.sources}
    unknown = sorted(set(repoint) - known)
    if unknown:
        raise ManifestError(f"{origin}: cannot re-point unknown source ids {unknown}; known: {sorted(known)}")
    built: dict[str, Source] = {}
    for ref in manifest.sources:
        if ref.id in repoint:
            loc = repoint[ref.id]
        elif kind == "manifest":
            loc = join_location(base, ref.location)
        else:
            loc = base
        # Files read in place may be links (a Hugging Face cache snapshot links every
        # shard to ../../blobs/); a block store's keys stay confined to their root.
        built[ref.id] = source_for(ref.id, loc, follow_symlinks=kind != "manifest")
    return Opened(manifest, built, origin, kind)
