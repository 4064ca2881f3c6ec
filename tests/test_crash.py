"""Crash safety of save(): a writer killed with SIGKILL at any moment leaves the previous manifest
at the path, byte for byte, still loadable — or, if the kill came after the commit, the new one."""

from __future__ import annotations

import json
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import anyio
import numpy as np
import pytest
from _stores import KiB, MiB, assert_same, make_tensors

import asyncload
from asyncload import Manifest

V2_TENSORS = 25
V2_TENSOR_BYTES = 8 * MiB  # 200 MiB in all, 1 MiB blocks over 3 dirs

WRITER = textwrap.dedent(
    f"""
    import sys
    import anyio
    import numpy as np
    import asyncload

    async def tensors():
        for i in range({V2_TENSORS}):
            a = np.empty({V2_TENSOR_BYTES} // 4, dtype=np.int32)
            a.fill(i)
            yield f"v2.{{i:02d}}", a

    async def main():
        path, *dirs = sys.argv[1:]
        print("ready", flush=True)
        await asyncload.save(tensors(), path, sources=dirs, block_size="1MiB", budget="32MiB")
        print("saved", flush=True)

    anyio.run(main)
    """
)


def start_writer(path: pathlib.Path, dirs: list[pathlib.Path]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), *map(str, dirs)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"  # imports done; the save starts now
    return proc


def check_v2(path: pathlib.Path) -> None:
    m = Manifest.from_json(path.read_bytes(), name=str(path))
    assert [t.name for t in m.tensors] == [f"v2.{i:02d}" for i in range(V2_TENSORS)]
    report = anyio.run(asyncload.verify, path)
    assert report.ok, report.bad

    async def spot_check() -> None:
        async with asyncload.open(path, budget="8MiB") as model:
            names = ["v2.00", f"v2.{V2_TENSORS - 1:02d}"]
            for name, arr in (await model.load(names)).items():
                assert np.all(arr == int(name[3:]))

    anyio.run(spot_check)


@pytest.fixture
def dirs(tmp_path: pathlib.Path) -> Iterator[list[pathlib.Path]]:
    made = [tmp_path / f"d{i}" for i in range(3)]
    yield made
    for d in made:  # ~1.2 GB of blocks by the end: do not leave them to pytest's tmp retention
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow  # ~11 s: six writer processes of 200 MiB each
def test_sigkill_during_save_keeps_the_previous_manifest(
    tmp_path: pathlib.Path, dirs: list[pathlib.Path]
) -> None:
    path = tmp_path / "m.asyncload.json"
    v1 = make_tensors(20, seed=2)
    anyio.run(lambda: asyncload.save(v1, path, sources=dirs, block_size=64 * KiB, budget="1MiB"))
    v1_bytes = path.read_bytes()

    # How long a whole save of v2 takes here (to a throwaway manifest), once the writer is ready.
    with start_writer(tmp_path / "measure.asyncload.json", dirs) as proc:
        t0 = time.monotonic()
        out, _ = proc.communicate(timeout=60)
    duration = time.monotonic() - t0
    assert proc.returncode == 0 and out.strip() == "saved"

    rng = random.Random(20240611)
    delays = [*sorted(rng.uniform(0, duration) for _ in range(4)), duration * 0.97]
    previous = v1_bytes
    outcomes = []
    for delay in delays:
        with start_writer(path, dirs) as proc:
            try:
                proc.wait(timeout=delay)  # picks the kill moment; the save is not waited for
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        now = path.read_bytes()  # the path always holds a whole manifest
        if now == previous:
            outcomes.append("previous")
        else:
            # The rename happened: only a complete, verified v2 may be there.
            check_v2(path)
            outcomes.append("v2")
        if now == v1_bytes:
            got = anyio.run(asyncload.load, path)
            assert sorted(got) == sorted(v1)
            for name, arr in got.items():
                assert_same(name, arr, v1)
        previous = now
        assert proc.returncode in (0, -signal.SIGKILL)
        if proc.returncode == 0:
            assert now != v1_bytes
        json.loads(now)

    assert "previous" in outcomes, (duration, delays, outcomes)


RESUME_TENSORS = 24
RESUME_TENSOR_BYTES = 1 * MiB  # 24 MiB of v2 in 128 KiB blocks: ~190 blocks + parity over 4 dirs

RESUMER = textwrap.dedent(
    f"""
    import sys
    import anyio
    import numpy as np
    import asyncload

    def tensors():
        for i in range({RESUME_TENSORS}):
            rng = np.random.default_rng(i)
            yield f"v2.{{i:02d}}", rng.integers(0, 1 << 30, size={RESUME_TENSOR_BYTES} // 4, dtype=np.int32)

    async def main():
        path, *dirs = sys.argv[1:]
        print("ready", flush=True)

        def progress(n):
            print("block", flush=True)

        out = await asyncload.save(
            tensors(), path, sources=dirs, block_size="128KiB", budget="2MiB", parity=1, progress=progress
        )
        print(f"saved {{out.bytes_written}} {{out.bytes_reused}} {{out.blocks_reused}}", flush=True)

    anyio.run(main)
    """
)


def _v2_resume() -> dict[str, np.ndarray]:
    out = {}
    for i in range(RESUME_TENSORS):
        rng = np.random.default_rng(i)
        out[f"v2.{i:02d}"] = rng.integers(0, 1 << 30, size=RESUME_TENSOR_BYTES // 4, dtype=np.int32)
    return out


@pytest.mark.slow  # ~25 s: 21 writer processes
def test_sigkill_at_20_random_points_then_the_rerun_resumes(tmp_path: pathlib.Path) -> None:
    """Kill -9 a save with parity at 20 random points: v1 stays, byte for byte, and loads exactly
    every time; the save run once more completes, reusing the blocks the killed runs stored."""
    dirs = [tmp_path / f"d{i}" for i in range(4)]
    path = tmp_path / "m.asyncload.json"
    v1 = make_tensors(12, seed=5)
    anyio.run(lambda: asyncload.save(v1, path, sources=dirs, block_size=16 * KiB, budget="1MiB", parity=1))
    v1_bytes = path.read_bytes()
    total_blocks = RESUME_TENSORS * RESUME_TENSOR_BYTES // (128 * KiB)  # data blocks: progress lines
    rng = random.Random(4)
    kills = sorted(rng.randrange(0, total_blocks) for _ in range(20))
    killed = 0
    for after in kills:
        proc = subprocess.Popen(
            [sys.executable, "-c", RESUMER, str(path), *map(str, dirs)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        with proc:
            assert proc.stdout.readline().strip() == "ready"
            seen = 0
            while seen < after:  # bounded: the writer prints one line per block, then exits
                line = proc.stdout.readline()
                if not line or not line.startswith("block"):
                    break
                seen += 1
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        if proc.returncode == -signal.SIGKILL:
            killed += 1
        assert path.read_bytes() == v1_bytes  # never a torn or partial manifest
        got = anyio.run(asyncload.load, path)
        assert sorted(got) == sorted(v1)
        for name, arr in got.items():
            assert_same(name, arr, v1)
    assert killed >= 18, killed  # (a kill can land after the process finished printing)

    done = subprocess.run(
        [sys.executable, "-c", RESUMER, str(path), *map(str, dirs)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    last = done.stdout.strip().splitlines()[-1].split()
    assert last[0] == "saved"
    written, reused, blocks_reused = map(int, last[1:])
    # The killed runs stored most blocks already (the latest was killed after `max(kills)` blocks).
    assert blocks_reused > 0 and reused > 0
    assert reused >= max(kills) * 128 * KiB * 0.5, (written, reused, kills)
    m = Manifest.from_json(path.read_bytes(), name=str(path))
    assert m.parity == 1 and m.stripes
    want = _v2_resume()
    got = anyio.run(asyncload.load, path)
    assert sorted(got) == sorted(want)
    for name, arr in got.items():
        assert_same(name, arr, want)
    assert anyio.run(asyncload.verify, path).ok
