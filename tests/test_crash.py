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
