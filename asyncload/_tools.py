"""Whole-store operations: pack (file -> blocks), unpack (blocks -> file), verify."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._config import DEFAULT_BLOCK_SIZE, DEFAULT_BUDGET, MIN_BLOCK_SIZE, Limits, parse_size
from ._exceptions import BudgetError, FormatError
from ._format import BlockRef, FileEntry
from ._inputs import Opened, open_input
from ._repair import BadBlock, VerifyReport
from ._ring import Slot
from ._scheduler import open_reader, unwrap_group
from ._threads import run_sync
from ._writer import Progress, SavedPath, pack_opened
from .sources._local import fsync_dir, makedirs_private
from .sources._open import close_sources, join_location, parent_location

if TYPE_CHECKING:
    from ._security import BlockCipher

__all__ = ["BadBlock", "VerifyReport", "pack", "rekey", "unpack", "verify"]


async def _cipher_for(opened: Opened, key: Any | None, verify_key: Any | None) -> BlockCipher | None:
    """Check the manifest's signature and MAC (when asked or needed); the block cipher, if encrypted."""
    if key is None and verify_key is None and opened.manifest.encryption is None:
        return None
    from ._security import open_manifest
    from .codecs._aead import aload_key

    if opened.kind != "manifest":  # files read in place cannot be encrypted
        key = None
    user_key = None if key is None else await aload_key(key)
    return open_manifest(opened.manifest, user_key, verify_key=verify_key, name=opened.origin)


def _limits(budget: int | str, block_size: int, sources: int, overhead: int = 0) -> Limits:
    limits = Limits(parse_size(budget, what="budget"), block_size, overhead=overhead)
    limits.check(sources)
    return limits


async def pack(
    src: str | os.PathLike[str],
    to: Sequence[str | os.PathLike[str]],
    manifest: str | os.PathLike[str] | None = None,
    *,
    block_size: int | str = DEFAULT_BLOCK_SIZE,
    budget: int | str = DEFAULT_BUDGET,
    progress: Progress | None = None,
    key: Any | None = None,
    sign_key: Any | None = None,
    replicas: int = 1,
    parity: int = 0,
) -> SavedPath:
    """Cut a ``.safetensors`` file or HF directory into blocks over the ``to`` directories.

    Block i goes to directory i mod k (with ``parity`` P: stripes of k - P blocks plus P parity
    blocks, positions rotating per stripe). The manifest (default:
    ``<name>.asyncload.json`` beside the first directory) is committed last, atomically.
    ``key`` encrypts the blocks, ``sign_key`` signs the manifest, ``replicas`` R puts every
    block on R distinct directories (i, i+1, ... mod k) (see :func:`asyncload.save`).
    Returns a :class:`SavedPath` (bytes written and reused, blocks marked missing).
    """
    m = parse_size(block_size, what="block_size")
    if m < MIN_BLOCK_SIZE:
        raise BudgetError(f"block_size {m} is below the minimum {MIN_BLOCK_SIZE} bytes")
    if not to:
        raise FormatError("pack needs at least one destination directory (--to)")
    opened = await open_input(src, block_size=m)
    if opened.kind == "manifest":
        raise FormatError(f"{src}: already an asyncload manifest; pack takes .safetensors or an HF directory")
    if manifest is None:
        name = Path(os.fspath(src)).name.removesuffix(".safetensors") or "model"
        manifest = join_location(parent_location(os.fspath(to[0])), f"{name}.asyncload.json")
    limits = _limits(budget, m, len(to))
    out = await pack_opened(
        opened,
        manifest,
        to,
        limits=limits,
        progress=progress,
        key=key,
        sign_key=sign_key,
        replicas=replicas,
        parity=parity,
    )
    return out


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _outputs(files: Sequence[FileEntry], out: Path, as_dir: bool) -> dict[str, Path]:
    if len(files) == 1 and not out.is_dir() and not as_dir:
        return {files[0].path: out}
    return {f.path: out / f.path for f in files}


def _output_dir(out: Path, target: Path, name: str) -> None:
    """Make ``target``'s directory (0700 where made); under ``out`` no link may lead outside ``out``.

    ``out`` itself may be a link (the user chose it). File names come from the manifest, already
    checked as plain relative paths; this refuses an existing symbolic link under ``out`` that
    would carry a shard elsewhere, before anything is created or written.
    """
    if target == out:  # one file, written where the user said
        makedirs_private(target.parent)
        return
    makedirs_private(out)
    real_out = os.path.realpath(out)
    d = out
    for part in target.relative_to(out).parts[:-1]:
        d = d / part
        if not os.path.lexists(d):
            d.mkdir(mode=0o700)
        real = os.path.realpath(d)
        if os.path.commonpath([real_out, real]) != real_out:
            raise FormatError(
                f"file {name!r}: output directory {str(d)!r} leads outside {str(out)!r} "
                "through a symbolic link; refused"
            )


async def unpack(
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    budget: int | str = DEFAULT_BUDGET,
    sources: dict[str, str] | None = None,
    progress: Progress | None = None,
    key: Any | None = None,
    verify_key: Any | None = None,
) -> list[str]:
    """Rebuild the original file(s), byte-identical: one ``.safetensors`` or a shard directory.

    With one file, ``out`` is the file to write (or a directory to write it
    into: an existing one, or a path ending in a separator); with shards,
    ``out`` is the directory that receives the shards and the index. Files
    appear whole (temp name, fsync, rename) or not at all.
    """
    opened = await open_input(manifest, block_size=DEFAULT_BLOCK_SIZE, sources=sources)
    man = opened.manifest
    cipher = await _cipher_for(opened, key, verify_key)
    limits = _limits(budget, man.block_size, len(opened.sources), man.block_overhead)
    outp = Path(os.fspath(out))
    targets = _outputs(man.files, outp, os.fspath(out).endswith(os.sep))
    for name, p in targets.items():
        await run_sync(_output_dir, outp, p, name)
    temps = {k: p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp") for k, p in targets.items()}
    fds = {k: os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600) for k, t in temps.items()}
    reader = await open_reader(
        man, opened.sources, limits, cipher=cipher, verify_hashes=verify_key is not None
    )
    ring = reader.ring
    ok = False

    def write_block(block: BlockRef, data: memoryview) -> None:
        for f in man.files:
            lo, hi = max(block.offset, f.offset), min(block.end, f.offset + f.size)
            if lo < hi:
                _pwrite_all(fds[f.path], data[lo - block.offset : hi - block.offset], lo - f.offset)

    async def on_block(block: BlockRef, slot: Slot) -> None:
        try:
            await run_sync(write_block, block, slot.memory.data[: block.length], workers=reader.threads)
        finally:
            ring.release(slot)
        if progress is not None:
            progress(block.length)

    try:
        try:
            await reader.run(man.blocks, on_block)
        except BaseExceptionGroup as eg:
            raise unwrap_group(eg) from None

        def finish() -> None:
            for k, fd in fds.items():
                os.ftruncate(fd, next(f.size for f in man.files if f.path == k))
                os.fsync(fd)
            for k, t in temps.items():
                os.replace(t, targets[k])
            for d in {p.parent for p in targets.values()}:
                fsync_dir(d)

        await run_sync(finish)
        ok = True
    finally:
        await close_sources(opened.sources.values())
        for fd in fds.values():
            os.close(fd)
        if not ok:
            for t in temps.values():
                t.unlink(missing_ok=True)
    return [os.fspath(targets[f.path]) for f in man.files]


async def verify(
    manifest: str | os.PathLike[str],
    *,
    budget: int | str = DEFAULT_BUDGET,
    sources: dict[str, str] | None = None,
    progress: Progress | None = None,
    key: Any | None = None,
    verify_key: Any | None = None,
    repair: bool = False,
) -> VerifyReport:
    """Read every stored block (every replica, every parity block) and check it; report each bad one.

    Never raises for a bad block. With ``repair=True``, bad blocks are rebuilt
    from another replica or from their stripe's parity, checked against their
    crc32c and written back (to their source, or to the location ``sources``
    re-points it to, after which the manifest records that location); the
    report marks each one repaired or not (see docs/reliability.md).
    """
    from ._repair import scrub

    opened = await open_input(manifest, block_size=DEFAULT_BLOCK_SIZE, sources=sources)
    man = opened.manifest
    # Without the key, an encrypted store is checked by crc32c of what is stored; with it,
    # every block's GCM tag is checked too (and the manifest MAC before anything is read).
    cipher = await _cipher_for(opened, key, verify_key) if key is not None or verify_key is not None else None
    limits = _limits(budget, man.block_size, len(opened.sources), man.block_overhead)
    return await scrub(
        opened,
        limits,
        repair=repair,
        repoint=sources or {},
        cipher=cipher,
        verify_hashes=verify_key is not None,
        progress=progress,
    )


async def rekey(
    manifest: str | os.PathLike[str],
    old_key: Any,
    new_key: Any,
    *,
    sign_key: Any | None = None,
) -> str:
    """Re-wrap an encrypted checkpoint's data key under ``new_key``; no block file changes.

    The manifest is checked with ``old_key`` first (a wrong key is refused) and
    replaced atomically. A signature, if any, is dropped unless ``sign_key`` re-signs.
    """
    from ._security import rekey_manifest
    from ._writer import commit_manifest

    opened = await open_input(manifest, block_size=DEFAULT_BLOCK_SIZE)
    if opened.kind != "manifest":
        raise FormatError(f"{manifest}: rekey needs an asyncload manifest")
    from .codecs._aead import aload_key

    old, new_user_key = await aload_key(old_key), await aload_key(new_key)
    new = rekey_manifest(opened.manifest, old, new_user_key, sign_key=sign_key, name=opened.origin)
    return os.fspath(await commit_manifest(manifest, new))
