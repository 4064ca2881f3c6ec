"""The ``asyncload`` command, run for real: ``python -m asyncload ...`` in a subprocess.

Help and version; pack -> unpack byte identity for a .safetensors file and an HF
shard directory; info; ``load --json`` for every mode and every kind of input;
verify on a good store and on one with a block corrupted on disk; errors (exit 2,
one ``asyncload: error:`` line, no traceback); ``--source`` after a move; the demo.
Every store is tiny (4 KiB blocks) so that each call costs little more than the
interpreter's start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _stores import block_path, read_manifest
from safetensors.numpy import save_file

import asyncload
from asyncload import Manifest

KiB = 1 << 10
BS = "4KiB"
BUDGET = "64KiB"
SUBCOMMANDS = {
    "pack": ["--to", "--output", "--block-size", "--budget"],
    "unpack": ["--output", "--budget", "--source"],
    "load": ["--budget", "--block-size", "--mode", "--json", "--threads", "--reads-per-source", "--source",
             "--timeout", "--retries", "--hedge", "--no-map"],
    "verify": ["--budget", "--json", "--source"],
    "info": ["--all", "--json", "--source", "--key-file", "--verify-key"],
    "demo": ["--size", "--budget", "--block-size", "--sources", "--keep", "--parity"],
}


def cli(
    *args: str | os.PathLike[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m asyncload ARGS`` in ``cwd``; stdout/stderr are pipes (so no progress bar)."""
    return subprocess.run(
        [sys.executable, "-m", "asyncload", *(os.fspath(a) for a in args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, **(env or {})},
        check=False,
    )


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def assert_cli_error(p: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 2, one ``asyncload: error:`` line on stderr naming every needle, no traceback."""
    assert p.returncode == 2, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert p.stderr.startswith("asyncload: error:"), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    for n in needles:
        assert n in p.stderr, (n, p.stderr)


def tensors_a() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "embed.weight": rng.standard_normal((40, 64)).astype(np.float32),  # 10 KiB: spans blocks
        "layer0.bias": rng.integers(-100, 100, size=300).astype(np.int16),
        "layer0.weight": rng.standard_normal((24, 33)).astype(np.float16),
        "scale": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 4), dtype=np.int32),
    }


def tensors_b() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    return {
        "head.weight": rng.standard_normal((30, 50)).astype(np.float32),
        "head.bias": rng.integers(0, 255, size=77).astype(np.uint8),
    }


def nbytes(*groups: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for g in groups for a in g.values())


@dataclass
class Stores:
    root: Path
    st_file: Path  # a plain .safetensors file (with __metadata__)
    manifest: Path  # st_file packed over d0 d1 d2
    hf_dir: Path  # two shards + model.safetensors.index.json
    hf_manifest: Path  # hf_dir packed over h0 h1 h2


def write_hf_dir(d: Path) -> None:
    d.mkdir()
    a, b = tensors_a(), tensors_b()
    shards = {"model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b}
    for name, ts in shards.items():
        save_file(ts, d / name, metadata={"format": "np"})
    index = {
        "metadata": {"total_size": nbytes(a, b)},
        "weight_map": {t: name for name, ts in shards.items() for t in ts},
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Stores:
    """One set of inputs and packed stores, shared read-only by the tests that do not change them."""
    root = tmp_path_factory.mktemp("cli")
    st_file = root / "m.safetensors"
    save_file(tensors_a(), st_file, metadata={"format": "np", "note": "cli test"})
    hf_dir = root / "hf"
    write_hf_dir(hf_dir)
    ok(cli("pack", st_file, "--to", "d0", "d1", "d2", "-o", "store/m.asyncload.json",
           "--block-size", BS, "--budget", BUDGET, cwd=root))  # fmt: skip
    ok(cli("pack", hf_dir, "--to", "h0", "h1", "h2", "-o", "hstore/hf.asyncload.json",
           "--block-size", BS, "--budget", BUDGET, cwd=root))  # fmt: skip
    return Stores(root, st_file, root / "store/m.asyncload.json", hf_dir, root / "hstore/hf.asyncload.json")


@pytest.fixture
def store_copy(stores: Stores, tmp_path: Path) -> Iterator[Path]:
    """A private copy of the packed single-file store (manifest + its three dirs): safe to damage."""
    for name in ("store", "d0", "d1", "d2"):
        shutil.copytree(stores.root / name, tmp_path / name)
    yield tmp_path / "store/m.asyncload.json"


# --------------------------------------------------------------------------- help, version


def test_help_lists_every_command_and_global_option(tmp_path: Path) -> None:
    out = ok(cli("--help", cwd=tmp_path)).stdout
    for word in [*SUBCOMMANDS, "--version", "--backend", "--quiet"]:
        assert word in out


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_subcommand_help_mentions_its_options(command: str, tmp_path: Path) -> None:
    out = ok(cli(command, "--help", cwd=tmp_path)).stdout
    assert out.startswith(f"usage: asyncload {command}")
    for option in SUBCOMMANDS[command]:
        assert option in out, (command, option)


def test_version(tmp_path: Path) -> None:
    p = ok(cli("--version", cwd=tmp_path))
    assert p.stdout == f"asyncload {asyncload.__version__}\n"


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    p = cli(cwd=tmp_path)
    assert p.returncode == 2
    assert "usage: asyncload" in p.stderr and "Traceback" not in p.stderr


def test_bad_size_is_a_usage_error(stores: Stores) -> None:
    p = cli("load", stores.manifest, "--budget", "lots", cwd=stores.root)
    assert p.returncode == 2
    assert "--budget" in p.stderr and "lots" in p.stderr and "Traceback" not in p.stderr


# --------------------------------------------------------------------------- pack / unpack


def test_pack_spreads_blocks_over_the_dirs(stores: Stores) -> None:
    m = read_manifest(stores.manifest)
    assert m.total_size == stores.st_file.stat().st_size
    assert len(m.blocks) >= 4 and m.block_size == 4 * KiB
    for b in m.blocks:
        assert b.source == f"s{b.index % 3}"
        path = block_path(stores.manifest, b)
        assert path.resolve().is_relative_to(stores.root.resolve() / f"d{b.index % 3}")
        assert path.stat().st_size == b.length


def test_pack_reports_and_defaults_the_manifest_beside_the_first_dir(stores: Stores, tmp_path: Path) -> None:
    shutil.copy(stores.st_file, tmp_path / "w.safetensors")
    p = ok(cli("pack", "w.safetensors", "--to", "out/a", "out/b", "--block-size", BS, cwd=tmp_path))
    manifest = tmp_path / "out/w.asyncload.json"
    assert manifest.is_file()
    assert "packed" in p.stdout and "2 sources" in p.stdout and "w.asyncload.json" in p.stdout
    assert read_manifest(manifest).total_size == stores.st_file.stat().st_size


def test_unpack_single_file_is_byte_identical(stores: Stores, tmp_path: Path) -> None:
    out = tmp_path / "restored.safetensors"
    p = ok(cli("unpack", stores.manifest, "-o", out, "--budget", BUDGET, cwd=tmp_path))
    assert p.stdout.strip() == str(out)
    assert out.read_bytes() == stores.st_file.read_bytes()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["restored.safetensors"]  # no temp files left


def test_unpack_into_a_directory_with_trailing_separator(stores: Stores, tmp_path: Path) -> None:
    p = ok(cli("unpack", stores.manifest, "-o", "outdir" + os.sep, "--budget", BUDGET, cwd=tmp_path))
    out = tmp_path / "outdir" / "m.safetensors"
    assert p.stdout.strip() == os.path.join("outdir", "m.safetensors")
    assert out.read_bytes() == stores.st_file.read_bytes()


def test_unpack_hf_directory_reproduces_every_file(stores: Stores, tmp_path: Path) -> None:
    out = tmp_path / "restored"
    p = ok(cli("unpack", stores.hf_manifest, "-o", out, "--budget", BUDGET, cwd=tmp_path))
    originals = sorted(x.name for x in stores.hf_dir.iterdir())
    assert len(originals) == 3
    assert sorted(x.name for x in out.iterdir()) == originals
    assert sorted(Path(line).name for line in p.stdout.splitlines()) == originals
    for name in originals:
        assert (out / name).read_bytes() == (stores.hf_dir / name).read_bytes(), name


# --------------------------------------------------------------------------- info


def test_info_text(stores: Stores) -> None:
    out = ok(cli("info", stores.manifest, cwd=stores.root)).stdout
    m = read_manifest(stores.manifest)
    assert f"{len(m.tensors)} tensors" in out
    assert f"{len(m.blocks)} blocks" in out
    for s in m.sources:
        assert f"source {s.id}" in out
    for t in m.tensors:
        assert t.name in out
    assert "file m.safetensors" in out


def test_info_all_lists_tensors_beyond_twenty(tmp_path: Path) -> None:
    save_file({f"t{i:02d}": np.full(3, i, np.int8) for i in range(25)}, tmp_path / "many.safetensors")
    short = ok(cli("info", "many.safetensors", cwd=tmp_path)).stdout
    assert "t19" in short and "t24" not in short and "5 more" in short
    full = ok(cli("info", "many.safetensors", "--all", cwd=tmp_path)).stdout
    assert "t24" in full and "more" not in full


@pytest.mark.parametrize("kind", ["manifest", "hf-dir"])
def test_info_json_is_the_manifest(stores: Stores, kind: str) -> None:
    target = stores.manifest if kind == "manifest" else stores.hf_dir
    out = ok(cli("info", target, "--json", cwd=stores.root)).stdout
    m = Manifest.from_json(out.encode(), name="stdout")
    if kind == "manifest":
        assert m == read_manifest(stores.manifest)
    else:
        names = set(tensors_a()) | set(tensors_b())
        assert {t.name for t in m.tensors} == names
        assert {f.path for f in m.files} == {x.name for x in stores.hf_dir.iterdir()}


# --------------------------------------------------------------------------- load


LOAD_KEYS = {"bytes", "tensors", "seconds", "gbps", "peak_rss_growth", "lag_ms"}


@pytest.mark.parametrize("mode", ["load", "stream", "lease"])
@pytest.mark.parametrize("kind", ["manifest", "safetensors", "hf-dir"])
def test_load_json(stores: Stores, kind: str, mode: str) -> None:
    target, expect = {
        "manifest": (stores.manifest, [tensors_a()]),
        "safetensors": (stores.st_file, [tensors_a()]),
        "hf-dir": (stores.hf_dir, [tensors_a(), tensors_b()]),
    }[kind]
    p = ok(cli("load", target, "--json", "--mode", mode, "--budget", BUDGET, "--block-size", BS,
               cwd=stores.root))  # fmt: skip
    assert p.stderr == ""  # no progress bar when stderr is not a terminal
    lines = p.stdout.splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert LOAD_KEYS <= r.keys()
    assert r["bytes"] == nbytes(*expect)
    assert r["tensors"] == sum(len(g) for g in expect)
    assert r["mode"] == mode
    assert r["seconds"] > 0 and r["gbps"] >= 0 and r["peak_rss_growth"] >= 0
    assert set(r["lag_ms"]) == {"p50", "p99", "max", "max_unstolen", "steal"}
    assert 0 <= r["lag_ms"]["p50"] <= r["lag_ms"]["p99"] <= r["lag_ms"]["max"]
    assert 0 <= r["lag_ms"]["max_unstolen"] <= r["lag_ms"]["max"] and r["lag_ms"]["steal"] >= 0


def test_load_text_on_asyncio_backend(stores: Stores) -> None:
    p = ok(cli("--backend", "asyncio", "load", stores.manifest, "--budget", BUDGET, cwd=stores.root))
    n = nbytes(tensors_a())
    assert f"{len(tensors_a())} tensors, {n} bytes" in p.stdout
    assert "event-loop lag" in p.stdout and "per source: s0" in p.stdout


# --------------------------------------------------------------------------- verify


def test_verify_good_store(stores: Stores) -> None:
    p = ok(cli("verify", stores.manifest, "--budget", BUDGET, cwd=stores.root))
    m = read_manifest(stores.manifest)
    assert f"{len(m.blocks)} blocks, {m.total_size} bytes checked: OK" in p.stdout
    r = json.loads(ok(cli("verify", stores.manifest, "--json", "--budget", BUDGET, cwd=stores.root)).stdout)
    assert r["ok"] is True and r["bad"] == [] and r["blocks"] == len(m.blocks)
    assert r["bytes_checked"] == m.total_size


def test_verify_names_a_corrupted_block(store_copy: Path) -> None:
    m = read_manifest(store_copy)
    victim = m.blocks[2]
    path = block_path(store_copy, victim)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    cwd = store_copy.parent.parent

    p = cli("verify", store_copy, "--budget", BUDGET, cwd=cwd)
    assert p.returncode == 1, p.stdout + p.stderr
    bad_lines = [line for line in p.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad_lines) == 1
    assert f"block {victim.index} " in bad_lines[0]
    assert f"source {victim.source}" in bad_lines[0] and f"key {victim.key}" in bad_lines[0]
    assert "1 bad block(s)" in p.stdout and "Traceback" not in p.stderr

    p = cli("verify", store_copy, "--json", "--budget", BUDGET, cwd=cwd)
    assert p.returncode == 1
    r = json.loads(p.stdout)
    assert r["ok"] is False
    assert [(b["index"], b["source"], b["key"]) for b in r["bad"]] == [
        (victim.index, victim.source, victim.key)
    ]
    assert "crc32c" in r["bad"][0]["error"].lower() or "checksum" in r["bad"][0]["error"].lower()

    # load meets the same block: an asyncload error (exit 2) naming it, not a traceback
    p = cli("load", store_copy, "--budget", BUDGET, cwd=cwd)
    assert_cli_error(p, victim.key)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("command", ["load", "info", "verify", "unpack"])
def test_missing_file(command: str, tmp_path: Path) -> None:
    extra = ["-o", "x.safetensors"] if command == "unpack" else []
    assert_cli_error(cli(command, "nope.asyncload.json", *extra, cwd=tmp_path), "nope.asyncload.json")


@pytest.mark.parametrize(
    "text",
    ['{"format": "asyncload", "tensors": [', '{"format": "something-else"}\n', "{}\n"],
    ids=["truncated", "wrong-format", "empty-object"],
)
def test_malformed_manifest(text: str, tmp_path: Path) -> None:
    (tmp_path / "broken.asyncload.json").write_text(text)
    assert_cli_error(cli("load", "broken.asyncload.json", cwd=tmp_path), "broken.asyncload.json")


@pytest.mark.parametrize("command", ["load", "verify", "unpack"])
def test_budget_too_small_names_the_three_numbers(command: str, stores: Stores, tmp_path: Path) -> None:
    extra = ["-o", str(tmp_path / "x.safetensors")] if command == "unpack" else []
    p = cli(command, stores.manifest, "--budget", "8KiB", *extra, cwd=stores.root)
    assert_cli_error(p, "8192", "3 sources", "4096")
    assert not (tmp_path / "x.safetensors").exists()


def test_pack_budget_too_small(stores: Stores, tmp_path: Path) -> None:
    p = cli(
        "pack", stores.st_file, "--to", "a", "b", "c", "--block-size", BS, "--budget", "8KiB", cwd=tmp_path
    )
    assert_cli_error(p, "8192", "3 sources", "4096")
    assert not list(tmp_path.rglob("*.asyncload.json"))


def test_pack_refuses_a_block_size_under_4kib(stores: Stores, tmp_path: Path) -> None:
    p = cli("pack", stores.st_file, "--to", "a", "--block-size", "1KiB", cwd=tmp_path)
    assert_cli_error(p, "1024", "4096")


def test_pack_refuses_a_manifest(stores: Stores, tmp_path: Path) -> None:
    p = cli("pack", stores.manifest, "--to", "a", "--block-size", BS, cwd=tmp_path)
    assert_cli_error(p, "m.asyncload.json", "already an asyncload manifest")


def test_output_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    # far more output than a pipe holds, so the writer must meet EPIPE once the reader is gone
    save_file({f"t{i:05d}": np.zeros(2, np.int8) for i in range(5000)}, tmp_path / "many.safetensors")
    with subprocess.Popen(
        [sys.executable, "-m", "asyncload", "info", "many.safetensors", "--all"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert b"many.safetensors" in proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 1
    assert b"Traceback" not in err and b"BrokenPipe" not in err


@pytest.mark.parametrize("arg", ["no-equals-sign", "=loc", "s0="])
def test_bad_source_syntax(arg: str, stores: Stores) -> None:
    assert_cli_error(cli("load", stores.manifest, "--source", arg, cwd=stores.root), arg)


def test_unknown_source_id(stores: Stores) -> None:
    assert_cli_error(cli("load", stores.manifest, "--source", "s9=/tmp", cwd=stores.root), "s9")


# --------------------------------------------------------------------------- --source after a move


def test_source_repoints_a_moved_source(store_copy: Path, stores: Stores) -> None:
    cwd = store_copy.parent.parent
    (cwd / "moved").mkdir()
    (cwd / "d1").rename(cwd / "moved" / "disk1")
    m = read_manifest(store_copy)
    moved = "s1=" + os.path.join("moved", "disk1")  # relative: against the current directory

    assert_cli_error(cli("load", store_copy, "--budget", BUDGET, cwd=cwd), "s1")
    p = cli("verify", store_copy, "--json", "--budget", BUDGET, cwd=cwd)
    assert p.returncode == 1
    assert {b["source"] for b in json.loads(p.stdout)["bad"]} == {"s1"}

    r = json.loads(
        ok(cli("load", store_copy, "--json", "--source", moved, "--budget", BUDGET, cwd=cwd)).stdout
    )
    assert r["bytes"] == nbytes(tensors_a()) and r["bytes_read_per_source"]["s1"] > 0
    p = ok(cli("verify", store_copy, "--source", moved, "--budget", BUDGET, cwd=cwd))
    assert f"{len(m.blocks)} blocks, {m.total_size} bytes checked: OK" in p.stdout
    ok(cli("unpack", store_copy, "-o", "r.safetensors", "--source", moved, "--budget", BUDGET, cwd=cwd))
    assert (cwd / "r.safetensors").read_bytes() == stores.st_file.read_bytes()


# --------------------------------------------------------------------------- demo


def test_demo_small(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    p = ok(cli("demo", "--size", "8MiB", "--budget", "8MiB", "--block-size", "1MiB", cwd=tmp_path,
               env={"TMPDIR": str(scratch)}))  # fmt: skip
    assert "every byte verified" in p.stdout
    verify_lines = [line for line in p.stdout.splitlines() if line.strip().startswith("verify")]
    assert len(verify_lines) == 1 and "crc32c OK" in verify_lines[0]
    assert "MISMATCH" not in p.stdout
    lost = [line for line in p.stdout.splitlines() if line.strip().startswith("lost")]
    assert len(lost) == 1 and "every byte verified" in lost[0] and " 0 blocks rebuilt" not in lost[0]
    repair = [line for line in p.stdout.splitlines() if line.strip().startswith("repair")]
    assert len(repair) == 1 and repair[0].endswith("verify again: OK")
    assert list(scratch.iterdir()) == []  # the temp store is removed


def test_demo_keep_leaves_a_verifiable_store(tmp_path: Path) -> None:
    p = ok(cli("demo", "--size", "1MiB", "--budget", "1MiB", "--block-size", "64KiB", "--sources", "2",
               "--keep", "kept", cwd=tmp_path))  # fmt: skip
    assert "every byte verified" in p.stdout
    manifest = tmp_path / "kept" / "model.asyncload.json"
    assert "OK" in ok(cli("verify", manifest, "--budget", "1MiB", cwd=tmp_path)).stdout
