"""From a location string to a :class:`Source`, and reading/writing whole objects by location.

One place decides what a location means, so the loader, the writer and the
CLI agree: a path (relative or absolute) is a local directory; ``http://``,
``https://`` and ``s3://`` locations are remote sources (their modules are
imported only when such a location is used). Relative source locations in a
manifest resolve against the manifest's own location, whether that is a
directory, a URL or a bucket prefix.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ._base import Source
from ._local import LocalSource

__all__ = ["close_sources", "is_remote", "join_location", "parent_location", "source_for", "split_location"]

REMOTE_SCHEMES = ("http", "https", "s3")


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for ``http://``, ``https://`` and ``s3://`` locations."""
    return urlsplit(os.fspath(location)).scheme.lower() in REMOTE_SCHEMES


def parent_location(location: str) -> str:
    """The "directory" holding ``location`` (a path's parent, a URL or key without its last part)."""
    if is_remote(location):
        u = urlsplit(location)
        return urlunsplit((u.scheme, u.netloc, posixpath.dirname(u.path.rstrip("/")), "", ""))
    return str(Path(os.path.expanduser(location)).parent)


def split_location(location: str) -> tuple[str, str]:
    """``(parent, name)``: the source location holding an object and the object's key there."""
    if is_remote(location):
        u = urlsplit(location)
        return parent_location(location), posixpath.basename(u.path.rstrip("/"))
    p = Path(os.path.expanduser(location))
    return str(p.parent), p.name


def join_location(base: str, location: str) -> str:
    """Resolve a source ``location`` from a manifest against the manifest's ``base`` location.

    Absolute paths and URLs stay as they are (an absolute path is a local
    directory even under a remote manifest: a store mixing a local disk and a
    server); a relative location joins the base, so a store copied to a web
    root or a bucket loads unchanged.
    """
    if is_remote(location):
        return location
    if os.path.isabs(os.path.expanduser(location)):
        return os.path.expanduser(location)
    if is_remote(base):
        u = urlsplit(base)
        path = posixpath.normpath(posixpath.join(u.path or "/", location))
        return urlunsplit((u.scheme, u.netloc, path, "", ""))
    return str(Path(base) / Path(os.path.expanduser(location)))


def source_for(
    id: str,
    location: str | os.PathLike[str],
    *,
    create: bool = False,
    follow_symlinks: bool = False,
) -> Source:
    """The source for ``location``: a :class:`LocalSource` for paths, else the URL scheme's backend."""
    loc = os.fspath(location)
    scheme = urlsplit(loc).scheme.lower()
    if scheme in ("http", "https"):
        from ._http import HttpSource

        return HttpSource(id, loc)
    if scheme == "s3":
        from ._s3 import S3Source

        return S3Source(id, loc)
    return LocalSource(id, os.path.expanduser(loc), create=create, follow_symlinks=follow_symlinks)


async def read_object(location: str, *, limit: int) -> bytes:
    """The whole object at a remote ``location`` (a manifest URL), at most ``limit`` bytes.

    Works for every backend through the :class:`Source` interface: the parent
    location is the source, the last path component the key.
    """
    from .._exceptions import ManifestError

    parent, name = split_location(location)
    src = source_for("manifest", parent)
    try:
        size = await src.size(name)
        if size > limit:
            raise ManifestError(f"{location}: {size} bytes is larger than any manifest asyncload writes")
        buf = bytearray(size)
        n = await src.read_into(name, 0, memoryview(buf))
        if n != size:
            from .._exceptions import TruncatedBlockError

            raise TruncatedBlockError(f"{location}: read {n} of {size} bytes")
        return bytes(buf)
    finally:
        await src.aclose()


async def write_object(location: str, data: bytes) -> None:
    """Store ``data`` whole at a remote ``location`` (a manifest URL): one PUT, written last."""
    parent, name = split_location(location)
    src = source_for("manifest", parent, create=True)
    try:
        await src.write(name, memoryview(data))
    finally:
        await src.aclose()


async def close_sources(sources: Iterable[Source]) -> None:
    """Close every source (connections, handles), even while the caller is being cancelled."""
    import anyio

    with anyio.CancelScope(shield=True):
        for s in sources:
            await s.aclose()
