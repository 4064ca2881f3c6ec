#!/usr/bin/env python3
"""Remote benchmark: asyncload loading over HTTP from nginx on loopback, against curl, and striped.

One run starts --servers private nginx instances (scripts/nginx-up.sh, one worker each unless
--workers), saves one synthetic checkpoint (--size, tensors of --tensor-size random bytes) as a
store of --servers sources, and hard-links every source directory into every server's web root,
so each server can serve every block from the same page-cache pages. Then, warm, it measures:

  curl                 one `curl` process fetching every block file from one server in turn
                       (one keep-alive connection, output to /dev/null): the plain baseline
  curl-parallel        the same with `--parallel --parallel-max C` (C = sources x reads)
  asyncload-1-server   `asyncload load MANIFEST_URL --mode lease` with every source re-pointed
                       (--source) at ONE server; best of the servers is reported
  asyncload-striped    the same with source i on server i: the same blocks, the same number of
                       concurrent reads, only the number of servers differs

--server-rate R models servers of bounded bandwidth (on one small machine the client's CPU,
not the servers, is the limit, and no striping can beat that): nginx caps each connection at R
and each server is taken to serve at most --reads-per-source streams, so asyncload-1-server runs
with reads-per-source / servers per source (the same server streams in all) and striped with
reads-per-source on each server. A server then serves at most reads-per-source x R.

--server-bandwidth B (e.g. 4gbit; needs root and `tc`) models servers behind links of bandwidth
B, the case striping is for: an HTB class per server port on the loopback device caps
everything that server sends at B in all, however many connections the client opens, so
asyncload-1-server and asyncload-striped run with the same reads per source. The qdisc is
removed at the end (the run refuses to start if lo already has one).

"cpu" is the whole machine's busy CPU (all processes and the kernel, from /proc/stat) during
the sample divided by its wall time, in cores: when it is at the core count, the machine, not
the servers or the loader, is the limit.

Every sample is a fresh process; methods are interleaved and the median of --repeat is
reported, in GB/s (decimal) and as ratios: asyncload-1-server / curl (acceptance: >= 0.8) and
asyncload-striped / asyncload-1-server (acceptance: > 1). asyncload's time includes fetching
the manifest and opening; curl's includes starting curl. `--mode lease` keeps tensors as
zero-copy views into the slots, as `curl -o /dev/null` keeps nothing; crc32c is still
checked on every block.

    .venv/bin/python bench/bench_remote.py --size 1GiB --servers 2 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from asyncload._config import parse_size  # noqa: E402


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(dir: Path, workers: int, rate: str) -> int:
    env = {**os.environ, "NGINX_WORKERS": str(workers), "NGINX_LIMIT_RATE": rate}
    for _ in range(5):
        port = _free_port()
        r = subprocess.run(
            ["bash", str(REPO / "scripts/nginx-up.sh"), str(dir), str(port)],
            env=env,
            capture_output=True,
            text=True,
        )
        if r.returncode == 0:
            return port
    raise SystemExit(f"nginx did not start: {r.stderr}")


def make_store(root: Path, servers: int, size: int, tensor_size: int, block_size: int, budget: int) -> Path:
    """Save the checkpoint with one source per server dir; return the manifest (local path)."""
    import anyio

    import asyncload

    rng = np.random.default_rng(0)
    count = max(1, size // tensor_size)

    def tensors() -> Any:
        for i in range(count):
            yield f"layer{i:04d}.weight", rng.integers(0, 256, tensor_size, dtype=np.uint8)

    store = root / "s0" / "www" / "store"
    dirs = [os.path.relpath(store / f"d{i}") for i in range(servers)]
    path = anyio.run(
        lambda: asyncload.save(
            tensors(), store / "m.asyncload.json", sources=dirs, block_size=block_size, budget=budget
        )
    )
    # Every server gets every source dir (hard links: one copy in the page cache).
    for j in range(1, servers):
        dst = root / f"s{j}" / "www" / "store"
        dst.mkdir(parents=True, exist_ok=True)
        for i in range(servers):
            shutil.copytree(store / f"d{i}", dst / f"d{i}", copy_function=os.link, dirs_exist_ok=True)
        shutil.copy(store / "m.asyncload.json", dst / "m.asyncload.json")
    return Path(path)


def block_urls(manifest: Path, base: str) -> tuple[list[str], int]:
    doc = json.loads(manifest.read_bytes())
    loc = {s["id"]: s["location"] for s in doc["sources"]}
    urls = [f"{base}/store/{loc[b['source']]}/{b['key']}" for b in doc["blocks"]]
    total = sum(b["length"] for b in doc["blocks"])
    return urls, total


def run_curl(urls: list[str], total: int, parallel: int, cfg: Path) -> float:
    cfg.write_text("".join(f'url = "{u}"\noutput = "/dev/null"\n' for u in urls))
    cmd = ["curl", "-s", "--fail", "-K", str(cfg)]
    if parallel > 1:
        cmd += ["--parallel", "--parallel-max", str(parallel)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return total / (time.perf_counter() - t0) / 1e9


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine so far, all cores (Linux /proc/stat; else 0)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def shape_servers(ports: list[int], rate: str) -> None:
    """Cap each server port's egress on lo at ``rate`` (an HTB class per port; others unshaped)."""
    have = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True, check=True)
    if "htb" in have.stdout or "netem" in have.stdout:
        raise SystemExit(f"lo already has a qdisc ({have.stdout.strip()}); not touching it")
    cmds = [
        "qdisc add dev lo root handle 1: htb default 99 r2q 1000",
        "class add dev lo parent 1: classid 1:99 htb rate 100gbit",
    ]
    for i, port in enumerate(ports):
        cls = f"1:{10 + i}"
        cmds.append(f"class add dev lo parent 1: classid {cls} htb rate {rate} ceil {rate}")
        match = f"protocol ip prio 1 u32 match ip sport {port} 0xffff flowid {cls}"
        cmds.append(f"filter add dev lo parent 1: {match}")
    for c in cmds:
        subprocess.run(["tc", *c.split()], check=True, capture_output=True)


def unshape() -> None:
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False, capture_output=True)


def run_asyncload(murl: str, repoint: dict[str, str], budget: str, rps: int, backend: str) -> float:
    cmd = [sys.executable, "-m", "asyncload", "--backend", backend, "-q", "load", murl, "--mode", "lease"]
    cmd += ["--json", "--budget", budget, "--reads-per-source", str(rps)]
    for sid, loc in repoint.items():
        cmd += ["--source", f"{sid}={loc}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return float(json.loads(out.stdout)["gbps"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="nginx worker processes per server")
    ap.add_argument(
        "--server-rate",
        default="0",
        help="nginx limit_rate per connection (e.g. 50m); with it each server is also taken to serve at "
        "most --reads-per-source streams (one server: reads-per-source / servers per source): a model "
        "of servers of bounded bandwidth; 0 (default) = none",
    )
    ap.add_argument(
        "--server-bandwidth",
        default="",
        help="cap each server's total egress at this rate with tc on lo (e.g. 4gbit; needs root): "
        "servers behind links of bounded bandwidth; default none",
    )
    ap.add_argument("--tensor-size", default="8MiB")
    ap.add_argument("--block-size", default="8MiB")
    ap.add_argument("--budget", default="64MiB")
    ap.add_argument("--reads-per-source", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backend", default="uvloop", choices=["asyncio", "uvloop"])
    ap.add_argument("--json-out", type=Path, help="write samples and medians here")
    a = ap.parse_args()
    if a.servers < 2:
        ap.error("--servers must be at least 2 (striping is compared with one server)")
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed for the baseline")
    size = parse_size(a.size, what="size")
    if a.server_bandwidth and (os.geteuid() != 0 or shutil.which("tc") is None):
        raise SystemExit("--server-bandwidth needs root and tc (iproute2)")
    root = Path(tempfile.mkdtemp(prefix="asyncload-remote-"))
    ports: list[int] = []
    shaped = False
    try:
        for j in range(a.servers):
            ports.append(start_server(root / f"s{j}", a.workers, a.server_rate))
        if a.server_bandwidth:
            shape_servers(ports, a.server_bandwidth)
            shaped = True
        bases = [f"http://127.0.0.1:{p}" for p in ports]
        t0 = time.perf_counter()
        manifest = make_store(
            root,
            a.servers,
            size,
            parse_size(a.tensor_size, what="tensor size"),
            parse_size(a.block_size, what="block size"),
            parse_size(a.budget, what="budget"),
        )
        print(f"store: {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s; servers {bases}")
        srcs = [f"s{i}" for i in range(a.servers)]
        one = {
            f"asyncload-1-server@{j}": {s: f"{bases[j]}/store/d{i}" for i, s in enumerate(srcs)}
            for j in range(a.servers)
        }
        striped = {s: f"{bases[i]}/store/d{i}" for i, s in enumerate(srcs)}
        murl = f"{bases[0]}/store/m.asyncload.json"
        cfg = root / "curl.cfg"
        conc = a.servers * a.reads_per_source
        methods: dict[str, Any] = {}
        for j in range(a.servers):
            urls, total = block_urls(manifest, bases[j])
            methods[f"curl@{j}"] = lambda urls=urls, total=total: run_curl(urls, total, 1, cfg)
        urls0, total = block_urls(manifest, bases[0])
        methods["curl-parallel@0"] = lambda: run_curl(urls0, total, conc, cfg)
        # Server-bound model (--server-rate): each server takes at most --reads-per-source
        # streams, so one server holding every source gets that many reads in all.
        rps_one = max(1, a.reads_per_source // a.servers) if a.server_rate != "0" else a.reads_per_source
        for name, rp in one.items():
            methods[name] = lambda rp=rp: run_asyncload(murl, rp, a.budget, rps_one, a.backend)
        methods["asyncload-striped"] = lambda: run_asyncload(
            murl, striped, a.budget, a.reads_per_source, a.backend
        )
        for f in methods.values():  # warm: page cache, nginx's open-file state
            f()
        samples: dict[str, list[float]] = {k: [] for k in methods}
        cores: dict[str, list[float]] = {k: [] for k in methods}
        names = list(methods)
        for r in range(a.repeat):
            order = names[r % len(names) :] + names[: r % len(names)]
            for k in order:
                b0, w0 = machine_busy(), time.perf_counter()
                samples[k].append(methods[k]())
                b1, w1 = machine_busy(), time.perf_counter()
                cores[k].append((b1 - b0) / (w1 - w0))
        med = {k: statistics.median(v) for k, v in samples.items()}
        curl = max(v for k, v in med.items() if k.startswith("curl@"))
        single = max(v for k, v in med.items() if k.startswith("asyncload-1-server"))
        print()
        print(f"{'method':<26} {'GB/s (median)':>14} {'min':>7} {'max':>7} {'cpu (cores)':>12}")
        for k in names:
            print(
                f"{k:<26} {med[k]:>14.2f} {min(samples[k]):>7.2f} {max(samples[k]):>7.2f} "
                f"{statistics.median(cores[k]):>12.2f}"
            )
        print()
        print(f"asyncload 1 server / curl (fastest server): {single / curl:.2f}  (acceptance >= 0.8)")
        ratio = med["asyncload-striped"] / single
        print(f"asyncload striped / fastest 1 server:       {ratio:.2f}  (acceptance > 1)")
        print(
            f"[{size / 2**30:.2f} GiB, {a.servers} servers x {a.workers} nginx worker(s), "
            f"limit_rate {a.server_rate}/connection, "
            f"bandwidth {a.server_bandwidth or 'unlimited'}/server, "
            f"block {a.block_size}, "
            f"budget {a.budget}, reads/source {a.reads_per_source}, {a.backend}, {os.cpu_count()} cores, "
            f"{platform.python_version()}, repeat {a.repeat}]"
        )
        print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
        if a.json_out:
            a.json_out.write_text(
                json.dumps(
                    {"args": vars(a) | {"json_out": None}, "samples": samples, "median": med, "cores": cores}
                )
            )
        return 0
    finally:
        if shaped:
            unshape()
        for j in range(len(ports)):
            subprocess.run(["bash", str(REPO / "scripts/nginx-down.sh"), str(root / f"s{j}")], check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
