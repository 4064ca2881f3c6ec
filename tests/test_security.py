"""Access control on the local filesystem: block keys and output names never escape their root,
what asyncload creates is private, ``open()`` never writes, and no credential leaks into messages.

The parser side (keys and file names such as ``../x``, ``/etc/passwd``, ``a//b`` rejected as
ManifestError) is covered field by field in ``test_format.BAD_MANIFESTS``; here the same names go
through ``open``/``unpack``/``verify`` end to end, and the rest is about what is on disk: symbolic
links planted inside a source or an output directory, FIFOs, file modes under a umask, and
snapshots of every file's size, mtime and mode around the read-only operations.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from _stores import KiB, block_path, data_blocks, make_tensors, read_manifest, save_store, source_dir
from safetensors.numpy import save_file

import asyncload
from asyncload import AsyncloadError, BlockNotFoundError, ChecksumError, FormatError, ManifestError
from asyncload.sources import LocalSource

BUDGET = 64 * KiB
HF_INDEX = "model.safetensors.index.json"


@pytest.fixture
def tensors() -> dict[str, np.ndarray]:
    return make_tensors(12, seed=7)


@pytest.fixture
async def store(tmp_path: Path, tensors: dict[str, np.ndarray]) -> Path:
    return await save_store(tmp_path, tensors)


def snapshot(*roots: Path) -> dict[str, tuple[int, int, int, int]]:
    """``path -> (type, size, mtime_ns, mode)`` of every entry under ``roots`` (links not followed)."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for p in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                st = os.lstat(p)
                out[p] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode))
    return out


def write_hf_dir(directory: Path, shards: list[dict[str, np.ndarray]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, directory / fname)
        weight_map.update({n: fname for n in part})
    (directory / HF_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def edit_manifest(path: Path, field: str, value: str) -> None:
    doc = json.loads(path.read_bytes())
    section, index, name = field.split(".")
    doc[section][int(index)][name] = value
    doc.pop("digest", None)  # a hostile manifest carries no digest
    path.write_text(json.dumps(doc))


async def load_all(path: Path, **kw: Any) -> dict[str, np.ndarray]:
    with anyio.fail_after(30):
        return await asyncload.load(path, budget=BUDGET, **kw)


# --------------------------------------------------------------------------- names in the manifest


HOSTILE = ["../x", "/etc/passwd", "a/../../x", "a//b"]


@pytest.mark.anyio
@pytest.mark.parametrize("field", ["blocks.2.key", "files.0.path"])
@pytest.mark.parametrize("name", HOSTILE)
async def test_hostile_names_are_refused_and_nothing_is_written(
    tmp_path: Path, store: Path, field: str, name: str
) -> None:
    edit_manifest(store, field, name)
    before = snapshot(tmp_path)
    with pytest.raises(ManifestError, match="not a safe relative path"):
        await load_all(store)
    with pytest.raises(ManifestError, match="not a safe relative path"):
        await asyncload.verify(store, budget=BUDGET)
    with pytest.raises(ManifestError, match="not a safe relative path"):
        await asyncload.unpack(store, os.fspath(tmp_path / "out") + os.sep, budget=BUDGET)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("key", [*HOSTILE, "", "a/", "./a", "a/./b", "a\0b"])
def test_local_source_refuses_unsafe_keys_itself(tmp_path: Path, key: str) -> None:
    """The lexical check also holds for callers that build keys without a manifest."""
    src = LocalSource("s0", tmp_path, create=True)
    for op in (
        lambda: src._read_sync(key, 0, memoryview(bytearray(8))),
        lambda: src._write_sync(key, memoryview(b"x")),
    ):
        with pytest.raises(BlockNotFoundError, match=r"'s0'.*not a safe relative path"):
            op()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- links in a source


def assert_escape_refused(e: BaseException, source: str, key: str) -> None:
    msg = str(e)
    assert isinstance(e, BlockNotFoundError), repr(e)
    assert repr(source) in msg and repr(key) in msg and "outside the source root" in msg, msg


@pytest.mark.anyio
async def test_block_file_linked_outside_the_root_is_refused(tmp_path: Path, store: Path) -> None:
    """The link points at an exact copy of the block, so only the link check can refuse it."""
    block = data_blocks(read_manifest(store))[1]
    path = block_path(store, block)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(path, outside / "copy")
    path.symlink_to(outside / "copy")
    with pytest.raises(BlockNotFoundError) as info:
        await load_all(store)
    assert_escape_refused(info.value, block.source, block.key)
    report = await asyncload.verify(store, budget=BUDGET)
    assert [(b.index, b.source, b.key) for b in report.bad] == [(block.index, block.source, block.key)]
    assert "outside the source root" in report.bad[0].error
    # The source itself refuses before reading: the buffer is untouched.
    src = LocalSource(block.source, source_dir(store, block.source))
    buf = bytearray(b"\xaa" * block.length)
    with pytest.raises(BlockNotFoundError) as info:
        await src.read_into(block.key, 0, memoryview(buf))
    assert_escape_refused(info.value, block.source, block.key)
    assert buf == b"\xaa" * block.length
    with pytest.raises(BlockNotFoundError, match="outside the source root"):
        await src.size(block.key)


@pytest.mark.anyio
@pytest.mark.parametrize("relative", [False, True])
async def test_directory_component_linked_outside_the_root_is_refused(
    tmp_path: Path, store: Path, relative: bool
) -> None:
    man = read_manifest(store)
    block = data_blocks(man)[0]
    root = source_dir(store, block.source)
    ckpt_dir = root / block.key.split("/")[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(ckpt_dir, outside / ckpt_dir.name)
    ckpt_dir.symlink_to(Path("..", "outside", ckpt_dir.name) if relative else outside / ckpt_dir.name)
    with pytest.raises(BlockNotFoundError) as info:
        await load_all(store)
    assert isinstance(info.value, BlockNotFoundError)
    assert "outside the source root" in str(info.value) and repr(block.source) in str(info.value)
    # Writes through the linked component are refused too, and create nothing outside.
    before = snapshot(outside)
    src = LocalSource(block.source, root, create=True)
    with pytest.raises(BlockNotFoundError) as info:
        await src.write(block.key.split("/")[0] + "/new", memoryview(b"payload"))
    assert "outside the source root" in str(info.value)
    assert snapshot(outside) == before


@pytest.mark.anyio
async def test_links_that_stay_inside_the_root_are_followed(
    tmp_path: Path, store: Path, tensors: dict[str, np.ndarray]
) -> None:
    block = data_blocks(read_manifest(store))[0]
    path = block_path(store, block)
    root = source_dir(store, block.source)
    (root / "moved").mkdir()
    shutil.move(path, root / "moved" / "blk")
    path.symlink_to(Path("..", "moved", "blk"))  # relative, resolved against the key's directory
    got = await load_all(store)
    assert got.keys() == tensors.keys()
    assert all(np.array_equal(got[n], tensors[n]) for n in tensors)


@pytest.mark.anyio
async def test_source_root_that_is_a_link_works(tmp_path: Path, tensors: dict[str, np.ndarray]) -> None:
    real = [tmp_path / "disks" / f"real{i}" for i in range(2)]
    for r in real:
        r.mkdir(parents=True)
    links = [tmp_path / f"d{i}" for i in range(2)]
    for link, r in zip(links, real, strict=True):
        link.symlink_to(r, target_is_directory=True)
    path = await asyncload.save(
        tensors, tmp_path / "m.json", sources=links, block_size=4 * KiB, budget=BUDGET
    )
    assert all(any(r.iterdir()) for r in real)  # the blocks went through the links
    got = await load_all(Path(path))
    assert all(np.array_equal(got[n], tensors[n]) for n in tensors)
    assert (await asyncload.verify(path, budget=BUDGET)).ok


@pytest.mark.anyio
async def test_write_replaces_a_link_at_the_key_instead_of_following_it(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "victim"
    (root / "ck").mkdir(parents=True)
    outside.write_bytes(b"precious")
    (root / "ck" / "b0").symlink_to(outside)
    src = LocalSource("s0", root)
    await src.write("ck/b0", memoryview(b"new block"))
    assert outside.read_bytes() == b"precious"
    assert not (root / "ck" / "b0").is_symlink()
    assert (root / "ck" / "b0").read_bytes() == b"new block"
    assert sorted(p.name for p in (root / "ck").iterdir()) == ["b0"]  # no temp file left


@pytest.mark.anyio
async def test_fifo_under_a_key_is_refused_without_blocking(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    os.mkfifo(tmp_path / "ck" / "b0")
    src = LocalSource("s0", tmp_path)
    with anyio.fail_after(10):
        with pytest.raises(BlockNotFoundError, match=r"'s0'.*'ck/b0'.*not a regular file"):
            await src.read_into("ck/b0", 0, memoryview(bytearray(16)))


@pytest.mark.anyio
async def test_in_place_hf_cache_snapshot_with_linked_shards_loads(
    tmp_path: Path, tensors: dict[str, np.ndarray]
) -> None:
    """A Hugging Face cache snapshot: every file is a link to ``../../blobs/<hash>`` — read in place."""
    names = sorted(tensors)
    write_hf_dir(tmp_path / "hf", [{n: tensors[n] for n in names[:6]}, {n: tensors[n] for n in names[6:]}])
    snap = tmp_path / "hub" / "snapshots" / "abc123"
    blobs = tmp_path / "hub" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted((tmp_path / "hf").iterdir())):
        shutil.move(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    got = await load_all(snap)
    assert all(np.array_equal(got[n], tensors[n]) for n in tensors)


# --------------------------------------------------------------------------- unpack's output directory


@pytest.mark.anyio
async def test_unpack_refuses_a_linked_directory_under_out(
    tmp_path: Path, tensors: dict[str, np.ndarray]
) -> None:
    src = tmp_path / "model.safetensors"
    save_file(tensors, src)
    (tmp_path / "d0").mkdir()
    man = Path(
        await asyncload.pack(src, [tmp_path / "d0"], tmp_path / "m.json", block_size=4 * KiB, budget=BUDGET)
    )
    edit_manifest(man, "files.0.path", "sub/model.safetensors")
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(FormatError) as info:
        await asyncload.unpack(man, out, budget=BUDGET)
    assert "'sub/model.safetensors'" in str(info.value) and "outside" in str(info.value)
    assert list(outside.iterdir()) == []
    assert [p.name for p in out.iterdir()] == ["sub"]
    # The same manifest into a fresh directory: the subdirectory is made and the bytes are identical.
    written = await asyncload.unpack(man, os.fspath(tmp_path / "fresh") + os.sep, budget=BUDGET)
    assert written == [str(tmp_path / "fresh" / "sub" / "model.safetensors")]
    assert (tmp_path / "fresh" / "sub" / "model.safetensors").read_bytes() == src.read_bytes()


@pytest.mark.anyio
async def test_unpack_replaces_a_linked_output_file_instead_of_writing_through_it(
    tmp_path: Path, tensors: dict[str, np.ndarray]
) -> None:
    src = tmp_path / "model.safetensors"
    save_file(tensors, src)
    (tmp_path / "d0").mkdir()
    man = await asyncload.pack(src, [tmp_path / "d0"], tmp_path / "m.json", block_size=4 * KiB, budget=BUDGET)
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.write_bytes(b"precious")
    (out / "model.safetensors").symlink_to(victim)
    await asyncload.unpack(man, out, budget=BUDGET)
    assert victim.read_bytes() == b"precious"
    assert not (out / "model.safetensors").is_symlink()
    assert (out / "model.safetensors").read_bytes() == src.read_bytes()


# --------------------------------------------------------------------------- modes


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    return {os.path.relpath(p, root): m for p, (_, _, _, m) in snapshot(root).items()}


@pytest.mark.anyio
@pytest.mark.usefixtures("umask_022")
async def test_created_files_are_0600_and_directories_0700(
    tmp_path: Path, tensors: dict[str, np.ndarray]
) -> None:
    work = tmp_path / "w"
    work.mkdir()
    # save: source roots (and their missing parents), <id>/ dirs, blocks, manifest dir and manifest
    path = await asyncload.save(
        tensors,
        work / "mdir" / "m.json",
        sources=[work / "new" / "deep" / f"d{i}" for i in range(2)],
        block_size=4 * KiB,
        budget=BUDGET,
    )
    # pack into new sources, unpack into a new directory
    src = work / "model.safetensors"
    save_file(tensors, src)
    await asyncload.pack(src, [work / "p0", work / "p1"], work / "p.json", block_size=4 * KiB, budget=BUDGET)
    await asyncload.unpack(path, os.fspath(work / "out") + os.sep, budget=BUDGET)
    got = modes(work)
    got.pop(".")  # made by this test
    got.pop("model.safetensors")  # written by safetensors
    kinds = {rel: stat.S_IFMT(os.lstat(work / rel).st_mode) for rel in got}
    assert len([r for r in got if kinds[r] == stat.S_IFREG]) > 2 * len(read_manifest(Path(path)).blocks)
    wrong = {r: oct(m) for r, m in got.items() if m != (0o700 if kinds[r] == stat.S_IFDIR else 0o600)}
    assert not wrong, wrong
    for made in [
        "mdir",
        "new",
        "new/deep",
        "new/deep/d0",
        "out",
        "mdir/m.json",
        "p.json",
        "out/m.safetensors",
    ]:
        assert made in got, made


# --------------------------------------------------------------------------- open() never writes


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["manifest", "safetensors", "hf-directory"])
async def test_reading_writes_nothing(tmp_path: Path, tensors: dict[str, np.ndarray], kind: str) -> None:
    if kind == "manifest":
        target = await save_store(tmp_path, tensors)
    elif kind == "safetensors":
        target = tmp_path / "model.safetensors"
        save_file(tensors, target)
    else:
        names = sorted(tensors)
        target = tmp_path / "hf"
        write_hf_dir(target, [{n: tensors[n] for n in names[:5]}, {n: tensors[n] for n in names[5:]}])
    before = snapshot(tmp_path)
    with anyio.fail_after(30):
        async with asyncload.open(target, budget=BUDGET, block_size=4 * KiB) as model:
            assert model.tensors.keys() == tensors.keys()
            loaded = await model.load()
            async for name, arr in model.stream(copy=False):
                assert np.array_equal(arr, tensors[name])
            repr(model.statistics())
        report = await asyncload.verify(target, budget="64MiB")  # in place: 16 MiB default blocks
    assert report.ok
    assert all(np.array_equal(loaded[n], tensors[n]) for n in tensors)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- no credential in any text


@pytest.fixture
def secrets_in_env(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    values = {
        "AWS_SECRET_ACCESS_KEY": "awsSECRET" + secrets.token_hex(12),
        "AWS_SESSION_TOKEN": "awsTOKEN" + secrets.token_hex(12),
        "HF_TOKEN": "hf_SECRET" + secrets.token_hex(12),
        "ASYNCLOAD_KEY": secrets.token_hex(32),
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    # Also the first 16 characters, so a truncated echo is caught too.
    return [*values.values(), *(v[:16] for v in values.values())]


def assert_clean(text: str, leaks: list[str]) -> None:
    found = [s for s in leaks if s in text]
    assert not found, f"credential {found[0][:6]}... appears in:\n{text}"


@pytest.mark.anyio
async def test_no_credential_in_messages_or_reprs(
    tmp_path: Path, store: Path, secrets_in_env: list[str]
) -> None:
    texts: list[str] = []
    sources: list[Any] = []

    def capture(s: Any) -> Any:
        sources.append(s)
        return s

    async with asyncload.open(store, budget=BUDGET, wrap_source=capture) as model:
        stream = model.stream()
        texts += [repr(model), repr(stream), repr(model.statistics()), *map(repr, sources)]
        await stream.aclose()
    man = read_manifest(store)
    blocks = data_blocks(man)
    block_path(store, blocks[0]).unlink()
    corrupted = block_path(store, blocks[1])
    corrupted.write_bytes(b"\xff" + corrupted.read_bytes()[1:])
    texts.append(repr(await asyncload.verify(store, budget=BUDGET)))
    failures: list[tuple[Any, Any]] = [
        (lambda: load_all(store), AsyncloadError),  # two faults of two kinds: one error or a group
        (lambda: load_all(tmp_path / "missing.asyncload.json"), BlockNotFoundError),
        (
            lambda: asyncload.unpack(store, os.fspath(tmp_path / "out") + os.sep, budget=BUDGET),
            AsyncloadError,
        ),
    ]
    (tmp_path / "bad.json").write_text('{"format": "asyncload", "version": 99}')
    failures.append((lambda: load_all(tmp_path / "bad.json"), ManifestError))
    for call, exc in failures:
        with pytest.raises(exc) as info:
            await call()
        texts.append("".join(traceback.format_exception(info.value)) + repr(info.value))
    assert any(ChecksumError.__name__ in t or BlockNotFoundError.__name__ in t for t in texts)
    assert_clean("\n".join(texts), secrets_in_env)


def test_no_credential_on_cli_stderr(tmp_path: Path, secrets_in_env: list[str]) -> None:
    def cli(
        *args: str | os.PathLike[str], env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "asyncload", *(os.fspath(a) for a in args)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=90,
            env={**os.environ, **(env or {})},
            check=False,
        )

    src = tmp_path / "model.safetensors"
    save_file(make_tensors(4, seed=2), src)
    runs = [
        cli("load", tmp_path / "missing.asyncload.json"),
        cli("verify", tmp_path / "missing.asyncload.json"),
        # A malformed key in the environment must be refused without being echoed.
        bad := cli("pack", src, "--to", tmp_path / "d0", "--encrypt", env={"ASYNCLOAD_KEY": "Z" * 64}),
    ]
    for p in runs:
        assert p.returncode != 0, p
        assert_clean(p.stdout + p.stderr, [*secrets_in_env, "Z" * 16])
    assert "ASYNCLOAD_KEY" in bad.stderr or "key" in bad.stderr.lower(), bad.stderr
