"""The data model and the two on-disk formats asyncload reads: safetensors headers and manifests.

Pure: no I/O. Parsers take bytes and return frozen value objects or raise a
:class:`~asyncload.FormatError` subclass *before* allocating anything whose
size comes from the input.

A checkpoint is a *byte stream*: the concatenation of one or more files (a
single ``.safetensors`` file, or the shards and the index of a Hugging Face
model directory). The stream is cut into blocks; each block lives on one
source under one key. Tensor byte ranges are absolute offsets in the stream.
See docs/format.md for the manifest schema.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._dtypes import expected_nbytes
from ._exceptions import HeaderError, ManifestError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_HEADER_SIZE",
    "BlockRef",
    "FileEntry",
    "Manifest",
    "ParityRef",
    "SafetensorsHeader",
    "SourceRef",
    "Stripe",
    "TensorInfo",
    "build_header",
    "parse_header",
    "parse_header_length",
    "parse_hf_index",
]

FORMAT_NAME = "asyncload.manifest"
FORMAT_VERSION = 1
ENCRYPTION_SCHEME = "aes-256-gcm-v1"
REDUNDANCY_SCHEME = "reed-solomon-cauchy-gf256"  # isa_l_rs_cauchy's code, see docs/erasure.md
MAX_STRIPE_WIDTH = 32
_TOP_LEVEL = frozenset(
    {"format", "version", "id", "block_size", "total_size", "files", "tensors", "sources", "blocks"}
    | {"extra", "encryption", "mac", "signature", "redundancy", "stripes", "digest"}
)
MAX_HEADER_SIZE = 100 * 1024 * 1024  # the limit safetensors itself enforces
MAX_MANIFEST_SIZE = 1 << 30
_MAX_DIMS = 64
_MAX_ELEMENTS = 1 << 60  # numpy refuses elements (zero dims aside) x itemsize (<= 8) >= 2**63
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")  # int(x, 16) alone accepts " 1_2", "-1234567"


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor: its safetensors dtype string, shape and absolute byte range in the stream."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A parsed safetensors header; offsets in ``tensors`` are relative to the file start."""

    header_size: int  # 8 + length of the JSON text: where the data section starts
    data_size: int  # bytes after the header that tensors may occupy
    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str] | None


@dataclass(frozen=True, slots=True)
class SourceRef:
    """A storage source named in a manifest: an id and a location (dir, later URL)."""

    id: str
    location: str


@dataclass(frozen=True, slots=True)
class BlockRef:
    """One block: stream range [offset, offset+length) stored on ``source`` under ``key``.

    ``key_offset`` is where the block starts inside the stored object (0 for
    packed blocks; the file offset when a plain safetensors file is read in place).
    ``crc32c`` is None only for blocks read in place from files that carry no checksum.
    ``sha256`` (hex, of the stored bytes) is recorded when the manifest is signed:
    a crc32c can be forged, a SHA-256 under a signature cannot.
    """

    index: int
    source: str
    key: str
    offset: int
    length: int
    crc32c: int | None
    key_offset: int = 0
    sha256: str | None = None
    copies: tuple[str, ...] = ()  # other sources holding the same bytes under the same key
    missing: bool = False  # a save could not store it (its stripe's parity covers it; repair heals)

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class ParityRef:
    """One parity block of a stripe: stored on ``source`` under ``key``, ``crc32c`` of its bytes."""

    source: str
    key: str
    crc32c: int
    sha256: str | None = None
    missing: bool = False  # a save could not store it (repair heals)


@dataclass(frozen=True, slots=True)
class Stripe:
    """A Reed-Solomon stripe: data blocks ``blocks`` (indices) and their ``parity`` blocks.

    Every block of the stripe counts as ``length`` bytes (the longest stored
    member; shorter members are zero-padded for coding, not on storage). The
    code is ``RS(len(blocks), len(parity))``: any ``len(parity)`` of the
    stripe's blocks may be lost. Members and parity sit on distinct sources.
    """

    index: int
    blocks: tuple[int, ...]
    length: int
    parity: tuple[ParityRef, ...]


@dataclass(frozen=True, slots=True)
class FileEntry:
    """A file of the original checkpoint: its relative path and range in the stream."""

    path: str
    offset: int
    size: int
    kind: str  # "safetensors" or "index"


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything a loader needs: tensors, files, sources and blocks. Immutable."""

    id: str
    block_size: int
    total_size: int
    files: tuple[FileEntry, ...]
    tensors: tuple[TensorInfo, ...]
    sources: tuple[SourceRef, ...]
    blocks: tuple[BlockRef, ...]
    version: int = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Security (optional): the wrapped data key of an encrypted checkpoint, an
    # HMAC over the canonical bytes (key holders), an Ed25519 signature (publishers).
    encryption: Mapping[str, Any] | None = None
    mac: str | None = None
    signature: Mapping[str, str] | None = None
    # Redundancy (optional): P parity blocks per stripe of data blocks (docs/reliability.md).
    parity: int = 0
    stripes: tuple[Stripe, ...] = ()

    @property
    def block_overhead(self) -> int:
        """Bytes a stored block carries beyond its stream bytes (the 16-byte GCM tag when encrypted)."""
        return 16 if self.encryption is not None else 0

    def table_bytes(self) -> bytes:
        """Canonical bytes of the tensor table, bound into every encrypted block."""
        return table_bytes(self.tensors)

    def canonical_bytes(self, *, without: tuple[str, ...] = ("mac", "signature")) -> bytes:
        """The bytes a MAC or signature covers: the manifest JSON without those fields."""
        doc = self._doc()
        for k in without:
            doc.pop(k, None)
        return json.dumps(doc, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()

    def to_json(self) -> bytes:
        """Canonical JSON bytes (sorted keys, no NaN), as written to disk, with their ``digest``.

        ``digest`` is the SHA-256 of every other field (canonical form): a reader
        rejects a manifest whose bytes changed by accident (a flipped bit, a
        truncated copy). It is no protection against a deliberate change: that
        is what the MAC and the signature are for.
        """
        doc = self._doc()
        doc["digest"] = _digest(doc)
        return (json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()

    def _doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": FORMAT_NAME,
            "version": self.version,
            "id": self.id,
            "block_size": self.block_size,
            "total_size": self.total_size,
            "files": [
                {"path": f.path, "offset": f.offset, "size": f.size, "kind": f.kind} for f in self.files
            ],
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "offsets": [t.begin, t.end],
                }
                for t in self.tensors
            ],
            "sources": [{"id": s.id, "location": s.location} for s in self.sources],
            "blocks": [_block_json(b) for b in self.blocks],
        }
        if self.extra:
            doc["extra"] = dict(self.extra)
        if self.encryption is not None:
            doc["encryption"] = dict(self.encryption)
        if self.mac is not None:
            doc["mac"] = self.mac
        if self.signature is not None:
            doc["signature"] = dict(self.signature)
        if self.parity:
            doc["redundancy"] = {"scheme": REDUNDANCY_SCHEME, "parity": self.parity}
            doc["stripes"] = [
                {
                    "blocks": list(st.blocks),
                    "length": st.length,
                    "parity": [_parity_json(p) for p in st.parity],
                }
                for st in self.stripes
            ]
        return doc

    @classmethod
    def from_json(cls, data: bytes | str, *, name: str = "manifest") -> Manifest:
        """Parse and validate manifest bytes; raise :class:`ManifestError` naming ``name``."""
        return _parse_manifest(data, name)


def _digest(doc: Mapping[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "digest"}
    canonical = json.dumps(body, separators=(",", ":"), sort_keys=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def table_bytes(tensors: Sequence[TensorInfo]) -> bytes:
    """Canonical bytes of a tensor table: ``[[name, dtype, shape, begin, end], ...]`` in stream order."""
    ordered = sorted(tensors, key=lambda t: (t.begin, t.end))
    table = [[t.name, t.dtype, list(t.shape), t.begin, t.end] for t in ordered]
    return json.dumps(table, separators=(",", ":"), ensure_ascii=True).encode()


def _block_json(b: BlockRef) -> dict[str, Any]:
    out: dict[str, Any] = {
        "source": b.source,
        "key": b.key,
        "offset": b.offset,
        "length": b.length,
        "crc32c": None if b.crc32c is None else f"{b.crc32c:08x}",
    }
    if b.key_offset:
        out["key_offset"] = b.key_offset
    if b.sha256 is not None:
        out["sha256"] = b.sha256
    if b.copies:
        out["copies"] = list(b.copies)
    if b.missing:
        out["missing"] = True
    return out


def _parity_json(p: ParityRef) -> dict[str, Any]:
    out: dict[str, Any] = {"source": p.source, "key": p.key, "crc32c": f"{p.crc32c:08x}"}
    if p.sha256 is not None:
        out["sha256"] = p.sha256
    if p.missing:
        out["missing"] = True
    return out


# --------------------------------------------------------------------------- safetensors


def parse_header_length(prefix: bytes, *, file_size: int, name: str) -> int:
    """The JSON length N from a file's first 8 bytes, checked against the file size."""
    if file_size < 8 or len(prefix) < 8:
        raise HeaderError(f"{name}: too short to be a safetensors file ({file_size} bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_SIZE:
        raise HeaderError(f"{name}: header declares {n} bytes, more than the {MAX_HEADER_SIZE} limit")
    if 8 + n > file_size:
        raise HeaderError(
            f"{name}: header declares {n} bytes but the file has {file_size - 8} after the length"
        )
    return int(n)


def _check_shape(raw: Any, where: str, exc: type[Exception]) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > _MAX_DIMS:
        raise exc(f"{where}: shape must be a list of at most {_MAX_DIMS} integers")
    for d in raw:
        if type(d) is not int or d < 0:
            raise exc(f"{where}: shape entries must be non-negative integers, got {d!r}")
    if math.prod(d for d in raw if d) >= _MAX_ELEMENTS:  # e.g. [0, 2**70]: 0 bytes, but no array
        raise exc(f"{where}: shape has more elements than an array can hold")
    return tuple(raw)


def parse_header(data: bytes, *, file_size: int, name: str = "safetensors file") -> SafetensorsHeader:
    """Parse ``data`` (at least the first 8 + N bytes of a safetensors file) and validate it.

    Checks: JSON object, dtype strings, shapes, offsets inside the data section,
    byte lengths that match dtype x shape for known dtypes, no overlaps.
    """
    n = parse_header_length(data, file_size=file_size, name=name)
    if len(data) < 8 + n:
        raise HeaderError(f"{name}: header truncated ({len(data) - 8} of {n} bytes)")
    try:
        doc = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # incl. the int digit limit
        raise HeaderError(f"{name}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(doc, dict):
        raise HeaderError(f"{name}: header must be a JSON object")
    data_size = file_size - 8 - n
    metadata = doc.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise HeaderError(f"{name}: __metadata__ must map strings to strings")
    tensors: list[TensorInfo] = []
    for tname, entry in doc.items():
        where = f"{name}: tensor {tname!r}"
        if not isinstance(entry, dict):
            raise HeaderError(f"{where}: entry must be an object")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or not dtype or len(dtype) > 64:
            raise HeaderError(f"{where}: dtype must be a non-empty string")
        shape = _check_shape(entry.get("shape"), where, HeaderError)
        offs = entry.get("data_offsets")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or not 0 <= offs[0] <= offs[1] <= data_size
        ):
            raise HeaderError(
                f"{where}: data_offsets {offs!r} must be [begin, end] "
                f"within the {data_size}-byte data section"
            )
        want = expected_nbytes(dtype, shape)
        if want is not None and want != offs[1] - offs[0]:
            raise HeaderError(
                f"{where}: {dtype} {list(shape)} needs {want} bytes but data_offsets span {offs[1] - offs[0]}"
            )
        tensors.append(TensorInfo(tname, dtype, shape, 8 + n + offs[0], 8 + n + offs[1]))
    tensors.sort(key=lambda t: (t.begin, t.end))
    _check_no_overlap(tensors, name, HeaderError)
    return SafetensorsHeader(8 + n, data_size, tuple(tensors), metadata)


def _check_no_overlap(tensors: Sequence[TensorInfo], name: str, exc: type[Exception]) -> None:
    for a, b in itertools.pairwise(tensors):
        if b.begin < a.end:
            raise exc(f"{name}: tensors {a.name!r} and {b.name!r} overlap")


def build_header(
    entries: Sequence[tuple[str, str, tuple[int, ...], int]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialize a safetensors header for (name, dtype, shape, nbytes) laid out in order.

    The JSON is padded with spaces to a multiple of 8 bytes so that the data
    section stays 8-byte aligned, as safetensors does.
    """
    doc: dict[str, Any] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    pos = 0
    for name, dtype, shape, nbytes in entries:
        if name in doc:
            raise HeaderError(f"duplicate tensor name {name!r}")
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return struct.pack("<Q", len(text)) + text


def parse_hf_index(data: bytes, *, name: str) -> dict[str, str]:
    """The ``weight_map`` (tensor -> shard file) of a ``model.safetensors.index.json``."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:  # incl. the int digit limit
        raise HeaderError(f"{name}: not valid JSON ({e})") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise HeaderError(f"{name}: needs a 'weight_map' object of tensor name -> shard file")
    return wm


# --------------------------------------------------------------------------- manifest


def _req(doc: Mapping[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in doc:
        raise ManifestError(f"{where}: missing field {key!r}")
    val = doc[key]
    if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
        raise ManifestError(f"{where}: field {key!r} has the wrong type ({type(val).__name__})")
    return val


def _nonneg(doc: Mapping[str, Any], key: str, where: str) -> int:
    v = _req(doc, key, int, where)
    if isinstance(v, bool) or v < 0:
        raise ManifestError(f"{where}: field {key!r} must be a non-negative integer")
    return int(v)


def _key_ok(key: str) -> bool:
    parts = key.split("/")
    return (
        bool(key)
        and not key.startswith("/")
        and "\\" not in key
        and "\0" not in key
        and all(p not in ("", ".", "..") for p in parts)
    )


def _only(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise ManifestError(f"{where}: unknown fields {extra[:5]}")


def _no_constant(c: str) -> Any:
    raise ValueError(f"{c} is not allowed")


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\\ud800" in the JSON)
        return False
    return True


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise ValueError(f"{text} is out of range")
    return value


def _parse_manifest(data: bytes | str, name: str) -> Manifest:
    if len(data) > MAX_MANIFEST_SIZE:
        raise ManifestError(f"{name}: {len(data)} bytes is larger than any manifest asyncload writes")
    try:  # NaN/Infinity (or 1e400) would parse here but make to_json() fail: refuse them
        doc = json.loads(data, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError) as e:  # incl. the int digit limit
        raise ManifestError(f"{name}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{name}: must be a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise ManifestError(f"{name}: not an asyncload manifest (format={doc.get('format')!r})")
    unknown = sorted(set(doc) - _TOP_LEVEL)
    if unknown:  # a MAC or signature covers the parsed fields: nothing may ride along unchecked
        raise ManifestError(
            f"{name}: unknown fields {unknown[:5]} (readers of version {FORMAT_VERSION} refuse them)"
        )
    if "digest" in doc and doc["digest"] != _digest(doc):  # absent only in manifests older than it
        raise ManifestError(
            f"{name}: the manifest's digest does not match its contents (the file was changed or damaged)"
        )
    version = _nonneg(doc, "version", name)
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{name}: manifest version {version} is not supported (this reader knows {FORMAT_VERSION})"
        )
    mid = _req(doc, "id", str, name)
    if not mid.isascii() and not _encodes(mid):  # the id is bound into encrypted blocks as UTF-8
        raise ManifestError(f"{name}: id {mid!r} is not valid Unicode")
    block_size = _nonneg(doc, "block_size", name)
    total = _nonneg(doc, "total_size", name)
    if block_size < 1:
        raise ManifestError(f"{name}: block_size must be positive")

    sources: list[SourceRef] = []
    for i, s in enumerate(_req(doc, "sources", list, name)):
        where = f"{name}: sources[{i}]"
        if not isinstance(s, dict):
            raise ManifestError(f"{where}: must be an object")
        _only(s, {"id", "location"}, where)
        sources.append(SourceRef(_req(s, "id", str, where), _req(s, "location", str, where)))
    ids = {s.id for s in sources}
    if len(ids) != len(sources) or not sources:
        raise ManifestError(f"{name}: source ids must be unique and at least one source given")

    blocks: list[BlockRef] = []
    pos = 0
    for i, b in enumerate(_req(doc, "blocks", list, name)):
        where = f"{name}: blocks[{i}]"
        if not isinstance(b, dict):
            raise ManifestError(f"{where}: must be an object")
        _only(
            b,
            {"source", "key", "offset", "length", "crc32c", "key_offset", "sha256", "copies", "missing"},
            where,
        )
        src = _req(b, "source", str, where)
        if src not in ids:
            raise ManifestError(f"{where}: unknown source {src!r}")
        key = _req(b, "key", str, where)
        if not _key_ok(key):
            raise ManifestError(f"{where}: key {key!r} is not a safe relative path")
        off, length = _nonneg(b, "offset", where), _nonneg(b, "length", where)
        if off != pos:
            raise ManifestError(f"{where}: offset {off} leaves a gap or overlap (expected {pos})")
        if not 0 < length <= block_size:
            raise ManifestError(f"{where}: length {length} must be in 1..block_size ({block_size})")
        crc_raw = b.get("crc32c")
        crc: int | None
        if crc_raw is None:
            crc = None
        elif isinstance(crc_raw, str) and _HEX8.fullmatch(crc_raw):
            crc = int(crc_raw, 16)
        else:
            raise ManifestError(f"{where}: crc32c {crc_raw!r} must be 8 hex digits")
        key_off = _nonneg(b, "key_offset", where) if "key_offset" in b else 0
        sha = b.get("sha256")
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise ManifestError(f"{where}: sha256 must be 64 lowercase hex digits")
        copies = b.get("copies", [])
        if (
            not isinstance(copies, list)
            or not all(isinstance(c, str) and c in ids for c in copies)
            or len({src, *copies}) != len(copies) + 1
        ):
            raise ManifestError(f"{where}: copies must list other known source ids, each once")
        missing = b.get("missing", False)
        if missing is not True and missing is not False:
            raise ManifestError(f"{where}: missing must be true or false")
        blocks.append(BlockRef(i, src, key, off, length, crc, key_off, sha, tuple(copies), missing))
        pos += length
    if pos != total:
        raise ManifestError(f"{name}: blocks cover {pos} bytes but total_size is {total}")

    files: list[FileEntry] = []
    fpos = 0
    for i, f in enumerate(_req(doc, "files", list, name)):
        where = f"{name}: files[{i}]"
        if not isinstance(f, dict):
            raise ManifestError(f"{where}: must be an object")
        _only(f, {"path", "offset", "size", "kind"}, where)
        path = _req(f, "path", str, where)
        if not _key_ok(path):
            raise ManifestError(f"{where}: path {path!r} is not a safe relative path")
        off, size = _nonneg(f, "offset", where), _nonneg(f, "size", where)
        kind = _req(f, "kind", str, where)
        if off != fpos or kind not in ("safetensors", "index"):
            raise ManifestError(
                f"{where}: offset must follow the previous file and kind be safetensors|index"
            )
        files.append(FileEntry(path, off, size, kind))
        fpos += size
    if fpos != total:
        raise ManifestError(f"{name}: files cover {fpos} bytes but total_size is {total}")

    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for i, t in enumerate(_req(doc, "tensors", list, name)):
        where = f"{name}: tensors[{i}]"
        if not isinstance(t, dict):
            raise ManifestError(f"{where}: must be an object")
        _only(t, {"name", "dtype", "shape", "offsets"}, where)
        tname = _req(t, "name", str, where)
        if tname in seen:
            raise ManifestError(f"{where}: duplicate tensor name {tname!r}")
        seen.add(tname)
        dtype = _req(t, "dtype", str, where)
        shape = _check_shape(t.get("shape"), where, ManifestError)
        offs = _req(t, "offsets", list, where)
        if len(offs) != 2 or not all(type(o) is int for o in offs) or not 0 <= offs[0] <= offs[1] <= total:
            raise ManifestError(f"{where}: offsets {offs!r} must be [begin, end] within total_size {total}")
        want = expected_nbytes(dtype, shape)
        if want is not None and want != offs[1] - offs[0]:
            raise ManifestError(
                f"{where}: {dtype} {list(shape)} needs {want} bytes, offsets span {offs[1] - offs[0]}"
            )
        tensors.append(TensorInfo(tname, dtype, shape, offs[0], offs[1]))
    tensors.sort(key=lambda t: (t.begin, t.end))
    _check_no_overlap(tensors, name, ManifestError)
    extra = doc.get("extra", {})
    if not isinstance(extra, dict):
        raise ManifestError(f"{name}: 'extra' must be an object")
    encryption = doc.get("encryption")
    if encryption is not None and (
        not isinstance(encryption, dict)
        or encryption.get("scheme") != ENCRYPTION_SCHEME
        or not isinstance(encryption.get("key"), dict)
    ):
        raise ManifestError(f"{name}: 'encryption' must hold scheme {ENCRYPTION_SCHEME!r} and a key envelope")
    mac = doc.get("mac")
    if mac is not None and not (isinstance(mac, str) and re.fullmatch(r"[0-9a-f]{64}", mac)):
        raise ManifestError(f"{name}: 'mac' must be 64 lowercase hex digits")
    signature = doc.get("signature")
    if signature is not None and not (
        isinstance(signature, dict) and all(isinstance(v, str) for v in signature.values())
    ):
        raise ManifestError(f"{name}: 'signature' must map strings to strings")
    overhead = 16 if encryption is not None else 0
    parity, stripes = _parse_redundancy(doc, name, ids, blocks, block_size + overhead, overhead)
    return Manifest(
        mid,
        block_size,
        total,
        tuple(files),
        tuple(tensors),
        tuple(sources),
        tuple(blocks),
        version,
        extra,
        encryption,
        mac,
        signature,
        parity,
        stripes,
    )


def _hex8(raw: Any, where: str) -> int:
    if isinstance(raw, str) and _HEX8.fullmatch(raw):
        return int(raw, 16)
    raise ManifestError(f"{where}: crc32c {raw!r} must be 8 hex digits")


def _sha(raw: Any, where: str) -> str | None:
    if raw is not None and not (isinstance(raw, str) and re.fullmatch(r"[0-9a-f]{64}", raw)):
        raise ManifestError(f"{where}: sha256 must be 64 lowercase hex digits")
    return raw


def _parse_redundancy(
    doc: Mapping[str, Any],
    name: str,
    ids: set[str],
    blocks: Sequence[BlockRef],
    max_length: int,
    overhead: int,
) -> tuple[int, tuple[Stripe, ...]]:
    """The parity scheme and its stripes: every data block in exactly one stripe, sources distinct."""
    red = doc.get("redundancy")
    if red is None:
        if "stripes" in doc:
            raise ManifestError(f"{name}: 'stripes' given without 'redundancy'")
        lost = next((b.index for b in blocks if b.missing), None)
        if lost is not None:
            raise ManifestError(f"{name}: block {lost} is marked missing but nothing can rebuild it")
        return 0, ()
    if not isinstance(red, dict):
        raise ManifestError(f"{name}: 'redundancy' must be an object")
    _only(red, {"scheme", "parity"}, f"{name}: redundancy")
    if red.get("scheme") != REDUNDANCY_SCHEME:
        raise ManifestError(f"{name}: redundancy scheme {red.get('scheme')!r} is not {REDUNDANCY_SCHEME!r}")
    parity = _nonneg(red, "parity", f"{name}: redundancy")
    if not 1 <= parity < MAX_STRIPE_WIDTH:
        raise ManifestError(f"{name}: redundancy parity must be in 1..{MAX_STRIPE_WIDTH - 1}, got {parity}")
    owner: dict[int, int] = {}
    stripes: list[Stripe] = []
    for si, st in enumerate(_req(doc, "stripes", list, name)):
        where = f"{name}: stripes[{si}]"
        if not isinstance(st, dict):
            raise ManifestError(f"{where}: must be an object")
        _only(st, {"blocks", "length", "parity"}, where)
        members = _req(st, "blocks", list, where)
        if not members or len(members) + parity > MAX_STRIPE_WIDTH:
            raise ManifestError(f"{where}: needs 1..{MAX_STRIPE_WIDTH - parity} data blocks")
        length = _nonneg(st, "length", where)
        if not 0 < length <= max_length:
            raise ManifestError(f"{where}: length {length} must be in 1..{max_length}")
        used: set[str] = set()
        for b in members:
            if type(b) is not int or not 0 <= b < len(blocks):
                raise ManifestError(f"{where}: block {b!r} is not a block index")
            if b in owner:
                raise ManifestError(f"{where}: block {b} is already in stripe {owner[b]}")
            owner[b] = si
            ref = blocks[b]
            if ref.copies or ref.key_offset or ref.crc32c is None:
                raise ManifestError(f"{where}: block {b} cannot be striped (copies, key_offset or no crc32c)")
            if ref.length + overhead > length:
                raise ManifestError(f"{where}: block {b} is longer than the stripe length {length}")
            if ref.source in used:
                raise ManifestError(f"{where}: two blocks of the stripe on source {ref.source!r}")
            used.add(ref.source)
        refs: list[ParityRef] = []
        raw_parity = _req(st, "parity", list, where)
        if len(raw_parity) != parity:
            raise ManifestError(f"{where}: {len(raw_parity)} parity blocks, redundancy says {parity}")
        for pi, p in enumerate(raw_parity):
            pw = f"{where}.parity[{pi}]"
            if not isinstance(p, dict):
                raise ManifestError(f"{pw}: must be an object")
            _only(p, {"source", "key", "crc32c", "sha256", "missing"}, pw)
            src = _req(p, "source", str, pw)
            if src not in ids:
                raise ManifestError(f"{pw}: unknown source {src!r}")
            if src in used:
                raise ManifestError(f"{pw}: two blocks of the stripe on source {src!r}")
            used.add(src)
            key = _req(p, "key", str, pw)
            if not _key_ok(key):
                raise ManifestError(f"{pw}: key {key!r} is not a safe relative path")
            pmissing = p.get("missing", False)
            if pmissing is not True and pmissing is not False:
                raise ManifestError(f"{pw}: missing must be true or false")
            refs.append(ParityRef(src, key, _hex8(p.get("crc32c"), pw), _sha(p.get("sha256"), pw), pmissing))
        lost = sum(blocks[b].missing for b in members) + sum(r.missing for r in refs)
        if lost > parity:
            raise ManifestError(f"{where}: {lost} blocks marked missing, more than its parity {parity}")
        stripes.append(Stripe(si, tuple(members), length, tuple(refs)))
    if len(owner) != len(blocks):  # (also: a block marked missing outside any stripe is refused here)
        lost = next(i for i in range(len(blocks)) if i not in owner)
        raise ManifestError(f"{name}: block {lost} belongs to no stripe")
    return parity, tuple(stripes)
