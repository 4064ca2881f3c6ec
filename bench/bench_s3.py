#!/usr/bin/env python3
"""S3 load benchmark: asyncload loading from a Ceph RADOS Gateway against the raw S3 client.

One run starts a private single-node Ceph (scripts/ceph-up.sh; memstore OSD, so the objects
live in RAM) on 127.0.0.1 -- or uses --endpoint with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY --
makes a bucket, saves a synthetic checkpoint (--size, random fp16 tensors of --tensor-size) with
asyncload.save over --sources prefixes of that bucket (--block-size blocks), then loads it:

  obstore-raw         the client library asyncload uses (obstore), on its own: one ranged GET
                      per stored block object, --sources x --reads-per-source in flight, each
                      body collected by obstore and dropped (no copy, no checksum)
  obstore-raw+copy    the same, each body then copied into one of a set of reused buffers
                      (what any reader that owns its memory has to do with obstore's bytes)
  aiobotocore-raw     the same GETs through aiobotocore, each body read into one of a set of
                      reused buffers (only when aiobotocore is installed)
  asyncload-lease     asyncload.open(s3://.../m.asyncload.json) and model.stream(copy=False):
                      blocks copied into the slot ring, crc32c checked, tensors inside one
                      block as zero-copy views (the others copied out), each dropped
  asyncload-stream    the same with model.stream(): every tensor copied out to an owned array
  cli-lease, cli-stream  (only when asked for with --methods) `python -m asyncload load URL
                      --mode lease|stream --json`, whose event-loop lag monitor (a 1 ms timer)
                      costs CPU of its own

Every sample runs in a fresh subprocess, methods interleaved (order rotated per repetition),
median of --repeat. "process CPU" is the sample process's user+system time (start-up and
imports included) per GB; the gateway's own CPU is not in it. GB/s are decimal, of the bytes
each method delivers (the raw methods count whole block objects, asyncload counts tensor
bytes: the same within the header's few KiB). Every sample times its work after imports;
asyncload's includes opening the model (manifest GET, slot ring allocated and touched).
The acceptance line checks asyncload-lease and asyncload-stream against obstore-raw (>= 0.8x).
Results go to bench/results/s3-<timestamp>.json.

  python bench/bench_s3.py                                  # 1 GiB, 2 prefixes, 16 MiB blocks
  python bench/bench_s3.py --size 512MiB --repeat 5 --reads-per-source 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = ("obstore-raw", "obstore-raw+copy", "aiobotocore-raw", "asyncload-lease", "asyncload-stream")
OPTIONAL = ("cli-lease", "cli-stream")
ACCESS_KEY = "bench-access"
SECRET_KEY = "bench-secret"


def parse_size(text: str) -> int:
    from asyncload._config import parse_size as parse

    return parse(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------- samples (subprocess side)


def _blocks(manifest: dict[str, Any], bucket_url: str) -> list[tuple[str, int]]:
    """(object path in the bucket, length) of every stored block."""
    locs = {s["id"]: s["location"] for s in manifest["sources"]}
    out = []
    for b in manifest["blocks"]:
        loc = locs[b["source"]]
        prefix = loc.removeprefix(bucket_url).strip("/") if loc.startswith("s3://") else loc.strip("/")
        out.append((f"{prefix}/{b['key']}" if prefix else b["key"], int(b["length"])))
    return out


async def _sample_obstore(
    endpoint: str, bucket: str, blocks: list[tuple[str, int]], conc: int, copy: bool = False
) -> int:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1",
        client_options={"allow_http": True, "pool_max_idle_per_host": str(conc)},
    )
    sem = asyncio.Semaphore(conc)
    total = 0
    longest = max(n for _, n in blocks)
    bufs = [bytearray(longest) for _ in range(conc)] if copy else []
    free = list(range(conc))

    async def one(path: str, length: int) -> None:
        nonlocal total
        async with sem:
            data = await obstore.get_range_async(store, path, start=0, length=length)
            if copy:
                i = free.pop()
                bufs[i][: len(data)] = memoryview(data)
                free.append(i)
            total += len(data)

    await asyncio.gather(*(one(p, n) for p, n in blocks))
    return total


async def _sample_aiobotocore(endpoint: str, bucket: str, blocks: list[tuple[str, int]], conc: int) -> int:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    longest = max(n for _, n in blocks)
    bufs = [bytearray(longest) for _ in range(conc)]
    free = list(range(conc))
    sem = asyncio.Semaphore(conc)
    total = 0
    async with get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=AioConfig(max_pool_connections=conc, s3={"addressing_style": "path"}),
    ) as client:

        async def one(path: str, length: int) -> None:
            nonlocal total
            async with sem:
                i = free.pop()
                try:
                    r = await client.get_object(Bucket=bucket, Key=path, Range=f"bytes=0-{length - 1}")
                    view = memoryview(bufs[i])
                    done = 0
                    async with r["Body"] as body:
                        while done < length:
                            n = await body.readinto(view[done:length])
                            if not n:
                                break
                            done += n
                    total += done
                finally:
                    free.append(i)

        await asyncio.gather(*(one(p, n) for p, n in blocks))
    return total


def _run(coro: Any, backend: str) -> Any:
    if backend == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


_OPENED: list[float] = []  # when the asyncload sample's model was open (perf_counter)


async def _sample_asyncload(url: str, mode: str, budget: int, reads_per_source: int) -> int:
    import asyncload

    n = 0
    async with asyncload.open(url, budget=budget, reads_per_source=reads_per_source) as model:
        _OPENED.append(time.perf_counter())
        async with model.stream(copy=mode == "stream") as stream:
            async for _name, arr in stream:
                n += arr.nbytes
                del arr  # a streaming consumer lets go before asking for the next
    return n


def run_sample(method: str, backend: str, args: list[str]) -> None:
    import atexit

    # The reason is in asyncload/sources/_s3.py (_let_client_threads_finish): without it a
    # process that exits right after its last obstore call may abort.
    atexit.register(time.sleep, 0.02)
    if method.startswith("asyncload-"):
        url, budget, rps = args
        coro = _sample_asyncload(url, method.removeprefix("asyncload-"), int(budget), int(rps))
    else:
        endpoint, bucket, manifest_path, conc = args
        blocks = _blocks(json.loads(Path(manifest_path).read_text()), f"s3://{bucket}")
        if method == "aiobotocore-raw":
            coro = _sample_aiobotocore(endpoint, bucket, blocks, int(conc))
        else:
            coro = _sample_obstore(endpoint, bucket, blocks, int(conc), copy=method == "obstore-raw+copy")
    t0 = time.perf_counter()
    n = _run(coro, backend)
    t1 = time.perf_counter()
    dt = t1 - t0
    out = {"bytes": n, "seconds": dt, "gbps": n / dt / 1e9}
    if _OPENED:  # asyncload: also the rate after open (manifest read, ring allocated and touched)
        out["open_seconds"] = _OPENED[0] - t0
        out["gbps_after_open"] = n / (t1 - _OPENED[0]) / 1e9
    print(json.dumps(out))


# --------------------------------------------------------------------------- orchestration


def sample(method: str, a: argparse.Namespace, env: dict[str, str], ctx: dict[str, str]) -> dict[str, Any]:
    conc = a.sources * a.reads_per_source
    if method.startswith("cli-"):
        cmd = [sys.executable, "-m", "asyncload", "--backend", a.backend, "-q", "load", ctx["url"],
               "--mode", method.removeprefix("cli-"), "--budget", str(a.budget),
               "--reads-per-source", str(a.reads_per_source), "--json"]  # fmt: skip
    elif method.startswith("asyncload-"):
        cmd = [sys.executable, __file__, "--_sample", method, a.backend, ctx["url"], str(a.budget),
               str(a.reads_per_source)]  # fmt: skip
    else:
        cmd = [sys.executable, __file__, "--_sample", method, a.backend, ctx["endpoint"], ctx["bucket"],
               ctx["local_manifest"], str(conc)]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        return {"failed": (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit status {p.returncode}"]}
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    # The whole sample process, start-up and imports included, the same way for every method.
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out["process_cpu_s_per_gb"] = cpu / (out["bytes"] / 1e9)
    return out


def raw_store(endpoint: str, bucket: str, env: dict[str, str]) -> Any:
    from obstore.store import S3Store

    return S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id=env["AWS_ACCESS_KEY_ID"],
        secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region="us-east-1",
        client_options={"allow_http": True},
    )


def make_bucket(endpoint: str, env: dict[str, str]) -> str:
    """A fresh bucket, made with a presigned ``PUT /bucket/``."""
    import urllib.request
    from datetime import timedelta

    import obstore

    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    url = obstore.sign(raw_store(endpoint, bucket, env), "PUT", "", timedelta(minutes=5))
    with urllib.request.urlopen(urllib.request.Request(url, method="PUT", data=b""), timeout=60):
        pass
    return bucket


async def setup(
    a: argparse.Namespace, endpoint: str, bucket: str, env: dict[str, str], work: Path
) -> dict[str, str]:
    import numpy as np
    import obstore

    import asyncload

    os.environ.update(env)
    store = raw_store(endpoint, bucket, env)
    rng = np.random.default_rng(0)
    per = a.tensor_size
    count = max(1, a.size // per)

    def tensors() -> Any:
        for i in range(count):
            yield f"layer{i:03d}.weight", rng.integers(0, 1 << 16, per // 2, dtype=np.uint16).view(np.float16)

    manifest_url = f"s3://{bucket}/m.asyncload.json"
    t0 = time.perf_counter()
    await asyncload.save(
        tensors(),
        manifest_url,
        sources=[f"s3://{bucket}/p{i}" for i in range(a.sources)],
        block_size=a.block_size,
        budget=a.budget,
    )
    save_s = time.perf_counter() - t0
    raw = await obstore.get_async(store, "m.asyncload.json")
    local = work / "m.asyncload.json"
    local.write_bytes(bytes(await raw.bytes_async()))
    print(f"saved {count * per / 1e9:.2f} GB to {manifest_url} in {save_s:.1f} s "
          f"({count * per / save_s / 1e9:.2f} GB/s)", flush=True)  # fmt: skip
    return {"endpoint": endpoint, "bucket": bucket, "url": manifest_url, "local_manifest": str(local),
            "save_gbps": f"{count * per / save_s / 1e9:.3f}"}  # fmt: skip


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_sample":
        run_sample(sys.argv[2], sys.argv[3], sys.argv[4:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    ap.add_argument("--sources", type=int, default=2, help="prefixes in the bucket (asyncload sources)")
    ap.add_argument("--block-size", type=parse_size, default=parse_size("16MiB"))
    ap.add_argument(
        "--tensor-size",
        type=parse_size,
        default=parse_size("64MiB"),
        help="bytes per synthetic tensor; tensors inside one block are leased without a copy",
    )
    ap.add_argument("--budget", type=parse_size, default=parse_size("256MiB"))
    ap.add_argument("--reads-per-source", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backend", default="uvloop", choices=["asyncio", "uvloop"])
    ap.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS + OPTIONAL)}"
    )
    ap.add_argument(
        "--endpoint", help="use this S3 endpoint (credentials from AWS_*) instead of a private Ceph"
    )
    a = ap.parse_args()
    methods = [m for m in a.methods.split(",") if m]
    if "aiobotocore-raw" in methods:
        try:
            import aiobotocore  # noqa: F401
        except ImportError:
            print("aiobotocore not installed: aiobotocore-raw skipped (pip install aiobotocore)")
            methods.remove("aiobotocore-raw")
    work = Path(tempfile.mkdtemp(prefix="asyncload-bench-s3-"))
    ceph_dir = work / "ceph"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    started = False
    try:
        if a.endpoint:
            endpoint = a.endpoint
            env["AWS_ENDPOINT_URL"] = endpoint
        else:
            if shutil.which("radosgw") is None:
                print("Ceph is not installed: bash scripts/install-servers.sh", file=sys.stderr)
                return 2
            port = free_port()
            mem = int(a.size * 1.25) + (256 << 20)
            up_env = {**env, "CEPH_S3_ACCESS_KEY": ACCESS_KEY, "CEPH_S3_SECRET_KEY": SECRET_KEY,
                      "MEMSTORE_BYTES": str(mem)}  # fmt: skip
            t0 = time.perf_counter()
            subprocess.run(["bash", str(REPO / "scripts/ceph-up.sh"), str(ceph_dir), str(port)], env=up_env,
                           check=True, timeout=300)  # fmt: skip
            started = True
            print(f"ceph-up.sh: {time.perf_counter() - t0:.1f} s", flush=True)
            endpoint = f"http://127.0.0.1:{port}"
            env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                       AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_REGION="us-east-1")  # fmt: skip
        ctx = asyncio.run(setup(a, endpoint, make_bucket(endpoint, env), env, work))
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for r in range(a.repeat):
            order = methods[r % len(methods) :] + methods[: r % len(methods)]
            for m in order:
                s = sample(m, a, env, ctx)
                samples[m].append(s)
                shown = f"{s['gbps']:.3f} GB/s" if "gbps" in s else f"failed: {s['failed']}"
                print(f"  rep {r + 1} {m:18s} {shown}", flush=True)
        med: dict[str, float | None] = {}
        cpu: dict[str, float | None] = {}
        after_open: dict[str, str] = {}
        for m, ss in samples.items():
            ok = [s for s in ss if "gbps" in s]
            med[m] = statistics.median(s["gbps"] for s in ok) if ok else None
            if ok and "gbps_after_open" in ok[0]:
                g = statistics.median(s["gbps_after_open"] for s in ok)
                o = statistics.median(s["open_seconds"] for s in ok)
                after_open[m] = f"{g:.3f} GB/s after an open of {o:.2f} s"
            cpus = [s["process_cpu_s_per_gb"] for s in ok]
            cpu[m] = statistics.median(cpus) if cpus else None
        base = med.get("obstore-raw")
        print()
        print(f"{a.size / 2**30:.2f} GiB over {a.sources} prefixes, {a.block_size >> 20} MiB blocks, "
              f"budget {a.budget >> 20} MiB, {a.sources * a.reads_per_source} requests in flight, "
              f"median of {a.repeat}, {platform.node()} ({os.cpu_count()} cores), "
              f"{'Ceph RGW memstore on 127.0.0.1' if not a.endpoint else a.endpoint}")  # fmt: skip
        print(f"| {'method':18s} | GB/s  | x obstore-raw | process CPU s/GB |")
        print(f"|{'-' * 20}|-------|---------------|------------------|")
        for m in methods:
            g = med[m]
            ratio = f"{g / base:.2f}" if g is not None and base else "-"
            c = f"{cpu[m]:.2f}" if cpu[m] is not None else "-"
            print(
                f"| {m:18s} | {g:.3f} | {ratio:>13s} | {c:>15s} |"
                if g is not None
                else f"| {m:18s} | failed |"
            )
        for m, text in after_open.items():
            print(f"{m}: {text}")
        verdicts = []
        for m in ("asyncload-lease", "asyncload-stream"):
            if med.get(m) is not None and base:
                ratio = med[m] / base  # type: ignore[operator]
                verdicts.append(f"{m} {ratio:.2f}x {'PASS' if ratio >= 0.8 else 'FAIL'}")
        print("acceptance (>= 0.8x obstore-raw): " + ("; ".join(verdicts) or "n/a"))
        print("command: python " + " ".join([os.path.relpath(__file__, REPO), *sys.argv[1:]]))
        out = REPO / "bench" / "results" / f"s3-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"args": vars(a), "context": ctx, "samples": samples, "median_gbps": med, "cpu_s_per_gb": cpu,
               "after_open": after_open}  # fmt: skip
        out.write_text(json.dumps(doc, indent=2))
        print(f"results: {os.path.relpath(out, REPO)}")
        return 0
    finally:
        if started:
            subprocess.run(
                ["bash", str(REPO / "scripts/ceph-down.sh"), str(ceph_dir)], check=False, timeout=120
            )
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
