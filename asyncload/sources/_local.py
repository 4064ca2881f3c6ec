"""Local directories (and plain files read in place) as sources.

Every syscall runs in a worker thread; reads go straight into the caller's
buffer with ``os.preadv`` — no intermediate bytes objects.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from .._exceptions import BlockNotFoundError, SourceUnavailableError
from .._threads import run_sync
from ._base import Source

__all__ = ["LocalSource"]

_DIR_MODE = 0o700
_FILE_MODE = 0o600


class LocalSource(Source):
    """Blocks stored as files under a root directory: ``root/key``."""

    supports_writes = True

    def __init__(self, id: str, location: str | os.PathLike[str], *, create: bool = False) -> None:
        super().__init__(id, os.fspath(location))
        self.root = Path(location)
        self._create = create
        self._dirs_to_sync: set[Path] = set()

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise BlockNotFoundError(f"source {self.id!r}: key {key!r} is not a safe relative path")
        return self.root.joinpath(*parts)

    def _missing(self, key: str, path: Path) -> BlockNotFoundError:
        if not self.root.is_dir():
            return BlockNotFoundError(
                f"source {self.id!r}: directory {str(self.root)!r} does not exist (needed for key {key!r})"
            )
        return BlockNotFoundError(f"source {self.id!r}: block {key!r} not found ({path})")

    # -- reads ---------------------------------------------------------------------
    def _read_sync(self, key: str, offset: int, buf: memoryview) -> int:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise self._missing(key, path) from None
        except OSError as e:
            raise SourceUnavailableError(f"source {self.id!r}: cannot open {key!r}: {e.strerror}") from None
        try:
            done = 0
            want = len(buf)
            while done < want:
                n = os.preadv(fd, [buf[done:]], offset + done)
                if n == 0:
                    break
                done += n
            return done
        except OSError as e:
            raise SourceUnavailableError(
                f"source {self.id!r}: read of {key!r} at {offset + done} failed: {e.strerror}"
            ) from None
        finally:
            os.close(fd)

    async def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        self._in_flight += 1
        try:
            n = await run_sync(self._read_sync, key, offset, buf, limiter=self.threads)
        except Exception:  # a cancelled read is not an error
            self._errors += 1
            raise
        finally:
            self._in_flight -= 1
        self._reads += 1
        self._bytes_read += n
        return n

    async def size(self, key: str) -> int:
        path = self._path(key)
        try:
            return (await run_sync(os.stat, path)).st_size
        except FileNotFoundError:
            raise self._missing(key, path) from None
        except OSError as e:
            raise SourceUnavailableError(f"source {self.id!r}: cannot stat {key!r}: {e.strerror}") from None

    # -- writes --------------------------------------------------------------------
    def _write_sync(self, key: str, data: memoryview) -> None:
        path = self._path(key)
        if not self.root.is_dir():
            if not self._create:
                raise BlockNotFoundError(f"source {self.id!r}: directory {str(self.root)!r} does not exist")
            self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            self._dirs_to_sync.add(self.root.parent)
        if not path.parent.is_dir():
            path.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            self._dirs_to_sync.add(path.parent.parent)  # the new directory's entry
        write_file_atomic(path, data)
        self._dirs_to_sync.add(path.parent)

    async def write(self, key: str, data: memoryview) -> None:
        self._in_flight += 1
        try:
            await run_sync(self._write_sync, key, data, limiter=self.threads)
        except OSError as e:
            self._errors += 1
            if isinstance(e, BlockNotFoundError | SourceUnavailableError):
                raise
            kind = "disk full" if e.errno == errno.ENOSPC else e.strerror
            raise SourceUnavailableError(f"source {self.id!r}: writing {key!r} failed: {kind}") from None
        finally:
            self._in_flight -= 1
        self._writes += 1
        self._bytes_written += len(data)

    def _sync_dirs(self) -> None:
        dirs, self._dirs_to_sync = self._dirs_to_sync, set()
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)

    async def sync(self) -> None:
        await run_sync(self._sync_dirs)

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await run_sync(lambda: path.unlink(missing_ok=True))


def write_file_atomic(path: Path, data: memoryview | bytes, mode: int = _FILE_MODE) -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync it, rename it over ``path``.

    The file appears whole or not at all; fsync the directory afterwards to make
    the rename itself durable.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and new entries in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
