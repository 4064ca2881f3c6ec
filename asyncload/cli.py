"""The ``asyncload`` command: thin — parses, calls the public API, draws progress."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import anyio

from . import __version__
from ._config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_BUDGET,
    DEFAULT_HEDGE,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    format_size,
    parse_size,
)
from ._exceptions import AsyncloadError, KeyRequiredError
from ._loader import open as open_model
from ._metrics import LagMonitor, current_rss, peak_rss, reset_peak_rss
from ._tools import pack, rekey, unpack, verify

__all__ = ["main"]


class _Progress:
    """A tqdm bar on stderr when it is a terminal (and not --quiet); a no-op otherwise."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=desc,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                leave=False,
                file=sys.stderr,
            )

    def __call__(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except AsyncloadError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _sources_arg(items: Sequence[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        sid, sep, loc = item.partition("=")
        if not sep or not sid or not loc:
            raise AsyncloadError(f"--source expects ID=LOCATION, got {item!r}")
        out[sid] = loc
    return out


def _key(a: argparse.Namespace) -> Any:
    """The user key: --key-file, else $ASYNCLOAD_KEY, else None (never printed)."""
    from .codecs._aead import resolve_key

    return resolve_key(None, getattr(a, "key_file", None))


async def _total_of(target: str, sources: dict[str, str] | None) -> int:
    from ._inputs import open_input

    opened = await open_input(target, block_size=DEFAULT_BLOCK_SIZE, sources=sources)
    return opened.manifest.total_size


# --------------------------------------------------------------------------- commands


async def cmd_pack(a: argparse.Namespace) -> int:
    from ._inputs import open_input

    opened = await open_input(a.src, block_size=a.block_size)
    bar = _Progress(opened.manifest.total_size, "pack", not a.quiet)
    t0 = time.perf_counter()
    try:
        key = _key(a) if a.encrypt or a.key_file else None
        if (a.encrypt or a.key_file) and key is None:
            raise KeyRequiredError(
                "--encrypt needs a key: --key-file PATH or ASYNCLOAD_KEY (64 hex characters)"
            )
        path = await pack(
            a.src,
            a.to,
            a.output,
            block_size=a.block_size,
            budget=a.budget,
            progress=bar,
            key=key,
            sign_key=a.sign_key,
            replicas=a.replicas,
            parity=a.parity,
        )
    finally:
        bar.close()
    dt = time.perf_counter() - t0
    size = opened.manifest.total_size
    scheme = f", parity {a.parity}" if a.parity else (f", {a.replicas} replicas" if a.replicas > 1 else "")
    reused = f"; {path.bytes_reused} bytes already stored, reused" if path.bytes_reused else ""
    print(
        f"packed {size} bytes ({format_size(size)}) over {len(a.to)} sources{scheme} in {dt:.2f} s "
        f"({size / dt / 1e9:.2f} GB/s) -> {path}{reused}"
    )
    if path.missing:
        print(
            f"warning: {len(path.missing)} block(s) could not be stored (parity covers them; the manifest "
            f"marks them missing): {path.missing[0]}; run `asyncload verify {path} --repair` "
            "once the source is back, or with --source ID=NEW_LOCATION",
            file=sys.stderr,
        )
    return 0


async def cmd_unpack(a: argparse.Namespace) -> int:

    bar = _Progress(await _total_of(a.manifest, _sources_arg(a.source)), "unpack", not a.quiet)
    try:
        paths = await unpack(
            a.manifest,
            a.output,
            budget=a.budget,
            sources=_sources_arg(a.source),
            progress=bar,
            key=_key(a),
            verify_key=a.verify_key,
        )
    finally:
        bar.close()
    for p in paths:
        print(p)
    return 0


async def cmd_load(a: argparse.Namespace) -> int:
    baseline = current_rss()
    reset_peak_rss()
    t0 = time.perf_counter()
    kept: list[Any] = []
    n = tensors = 0
    async with open_model(
        a.target,
        budget=a.budget,
        block_size=a.block_size,
        sources=_sources_arg(a.source),
        threads=a.threads,
        reads_per_source=a.reads_per_source,
        key=_key(a),
        verify_key=a.verify_key,
        timeout=a.timeout if a.timeout > 0 else None,
        retries=a.retries,
        hedge=a.hedge,
        map_files=not a.no_map,
    ) as model:
        bar = _Progress(model.nbytes, "load", not a.quiet and not a.json)
        async with LagMonitor() as lag:
            try:
                async with model.stream(copy=a.mode != "lease") as stream:
                    async for _name, arr in stream:
                        n += arr.nbytes
                        tensors += 1
                        bar(arr.nbytes)
                        if a.mode == "load":
                            kept.append(arr)
                        del arr  # a streaming consumer lets go before asking for the next
            finally:
                bar.close()
        dt = time.perf_counter() - t0
        stats = model.statistics()
    growth = max(0, peak_rss() - baseline)
    lagsum = lag.summary()
    result = {
        "target": a.target,
        "mode": a.mode,
        "bytes": n,
        "tensors": tensors,
        "seconds": dt,
        "gbps": n / dt / 1e9 if dt > 0 else 0.0,
        "budget": a.budget,
        "peak_rss_growth": growth,
        "lag_ms": {
            "p50": lagsum.p50_ms,
            "p99": lagsum.p99_ms,
            "max": lagsum.max_ms,
            "max_unstolen": lagsum.max_unstolen_ms,  # beats during which the host stole no CPU
            "steal": lagsum.steal_ms,  # CPU time the hypervisor took during the load (all CPUs)
        },
        "blocks_read": stats.blocks_read,
        "mapped_blocks": stats.mapped_blocks,
        "slot_waits": stats.slot_waits,
        "degraded_reads": stats.degraded_reads,
        "rebuilt_blocks": stats.rebuilt_blocks,
        "hedged_reads": stats.hedged_reads,
        "read_retries": stats.read_retries,
        "read_timeouts": stats.read_timeouts,
        "slow_sources": list(stats.slow_sources),
        "down_sources": list(stats.down_sources),
        "bytes_read_per_source": dict(stats.bytes_read_per_source),
    }
    del kept
    if a.json:
        print(json.dumps(result))
    else:
        print(
            f"{tensors} tensors, {n} bytes ({format_size(n)}) in {dt:.3f} s = {result['gbps']:.2f} GB/s "
            f"[{a.mode}, budget {format_size(a.budget)}]"
        )
        print(
            f"peak RSS growth {format_size(growth)}; event-loop lag p50 {lagsum.p50_ms:.2f} ms, "
            f"p99 {lagsum.p99_ms:.2f} ms, max {lagsum.max_ms:.2f} ms"
            + (
                f" ({lagsum.max_unstolen_ms:.2f} ms outside {lagsum.steal_ms:.0f} ms of CPU steal)"
                if lagsum.steal_ms
                else ""
            )
        )
        per = ", ".join(f"{k}: {format_size(v)}" for k, v in stats.bytes_read_per_source.items())
        degraded = f", degraded reads {stats.degraded_reads}" if stats.degraded_reads else ""
        if stats.rebuilt_blocks:
            degraded += f" ({stats.rebuilt_blocks} rebuilt from parity)"
        if stats.hedged_reads:
            degraded += f", reads around lagging/down sources {stats.hedged_reads}"
        if stats.down_sources or stats.slow_sources:
            down, slow = ", ".join(stats.down_sources) or "-", ", ".join(stats.slow_sources) or "-"
            degraded += f" [down: {down}; slow: {slow}]"
        print(
            f"blocks read {stats.blocks_read}{degraded}, waits for a slot {stats.slot_waits}; "
            f"per source: {per}"
        )
    return 0


async def cmd_verify(a: argparse.Namespace) -> int:
    total = await _total_of(a.manifest, _sources_arg(a.source)) if not a.quiet else 0
    bar = _Progress(total, "repair" if a.repair else "verify", not a.quiet and not a.json)
    try:
        report = await verify(
            a.manifest,
            budget=a.budget,
            sources=_sources_arg(a.source),
            progress=bar,
            key=_key(a),
            verify_key=a.verify_key,
            repair=a.repair,
        )
    finally:
        bar.close()
    if a.json:
        print(
            json.dumps(
                {
                    "manifest": report.manifest,
                    "blocks": report.blocks,
                    "parity_blocks": report.parity_blocks,
                    "bytes_checked": report.bytes_checked,
                    "ok": report.ok,
                    "repair": report.repair,
                    "healthy": report.healthy,
                    "manifest_updated": report.manifest_updated,
                    "bad": [asdict(b) for b in report.bad],
                    "notes": list(report.notes),
                }
            )
        )
    else:
        for b in report.bad:
            fixed = " -> REPAIRED" if b.repaired else (" -> NOT REPAIRED" if report.repair else "")
            print(f"BAD {b.describe()}: {b.error}{fixed}")
        for note in report.notes:
            print(f"note: {note}")
        parity = f" + {report.parity_blocks} parity" if report.parity_blocks else ""
        if report.ok:
            state = "OK"
        elif report.repair:
            done = sum(1 for b in report.bad if b.repaired)
            state = f"{len(report.bad)} bad, {done} repaired" + (
                "; manifest updated" if report.manifest_updated else ""
            )
        else:
            state = f"{len(report.bad)} bad block(s)"
        checked = f"{report.bytes_checked} bytes checked"
        print(f"{report.manifest}: {report.blocks} blocks{parity}, {checked}: {state}")
    if report.repair:
        return 0 if report.healthy else 1
    return 0 if report.ok else 1


async def cmd_info(a: argparse.Namespace) -> int:
    from ._inputs import open_input

    opened = await open_input(a.target, block_size=DEFAULT_BLOCK_SIZE, sources=_sources_arg(a.source))
    key = _key(a)
    key = key if opened.kind == "manifest" else None
    if key is not None or a.verify_key is not None:  # check MAC / signature when asked
        from ._security import open_manifest

        open_manifest(opened.manifest, key, verify_key=a.verify_key, name=opened.origin)
    m = opened.manifest
    if a.json:
        print(m.to_json().decode(), end="")
        return 0
    state = "encrypted" if m.encryption is not None else "not encrypted"
    signed = ", signed" if m.signature is not None else ""
    print(f"{opened.origin} ({opened.kind}), id {m.id}, {state}{signed}")
    print(
        f"  {len(m.tensors)} tensors, {m.total_size} bytes ({format_size(m.total_size)}), "
        f"{len(m.blocks)} blocks of up to {format_size(m.block_size)}"
    )
    replicas = max((1 + len(b.copies) for b in m.blocks), default=1)
    if m.parity:
        missing = sum(b.missing for b in m.blocks) + sum(p.missing for st in m.stripes for p in st.parity)
        note = f"; {missing} blocks marked missing (run verify --repair)" if missing else ""
        print(
            f"  redundancy: Reed-Solomon parity {m.parity} per stripe, {len(m.stripes)} stripes "
            f"(any {m.parity} of the {len(m.sources)} sources may be lost){note}"
        )
    elif replicas > 1:
        print(f"  redundancy: {replicas} replicas of every block")
    for f in m.files:
        print(f"  file {f.path}: {f.size} bytes ({f.kind})")
    for s in m.sources:
        count = sum(1 for b in m.blocks if b.source == s.id or s.id in b.copies)
        pcount = sum(1 for st in m.stripes for p in st.parity if p.source == s.id)
        extra = f" + {pcount} parity" if pcount else ""
        print(f"  source {s.id}: {s.location} ({count} blocks{extra})")
    shown = m.tensors if a.all else m.tensors[:20]
    for t in shown:
        print(f"  {t.name}: {t.dtype} {list(t.shape)} {t.nbytes} bytes")
    if len(shown) < len(m.tensors):
        print(f"  ... {len(m.tensors) - len(shown)} more (use --all)")
    return 0


async def cmd_rekey(a: argparse.Namespace) -> int:
    from .codecs._aead import key_from_file

    old = _key(a)
    if old is None:
        raise KeyRequiredError("rekey needs the current key: --key-file PATH or ASYNCLOAD_KEY")
    path = await rekey(a.manifest, old, key_from_file(a.new_key_file), sign_key=a.sign_key)
    print(f"{path}: data key re-wrapped under the new key; no block changed")
    return 0


async def cmd_demo(a: argparse.Namespace) -> int:
    from ._demo import run_demo

    return await run_demo(
        size=a.size,
        budget=a.budget,
        block_size=a.block_size,
        sources=a.sources,
        keep=a.keep,
        quiet=a.quiet,
        parity=a.parity,
    )


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="asyncload",
        description="Store model checkpoints as blocks over several sources; load them back "
        "with asyncio inside a fixed memory budget.",
    )
    p.add_argument("--version", action="version", version=f"asyncload {__version__}")
    p.add_argument(
        "--backend",
        choices=["asyncio", "uvloop"],
        default="uvloop" if os.name != "nt" else "asyncio",
        help="event loop to run on (default: uvloop where available)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    size_help = "a size in bytes or with a unit, e.g. 64MiB, 1GiB"

    def budget(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--budget",
            type=_size,
            default=DEFAULT_BUDGET,
            help=f"memory budget S for the slot ring (default {format_size(DEFAULT_BUDGET)}; {size_help})",
        )

    def keys(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--key-file",
            metavar="PATH",
            help="key of an encrypted checkpoint: 32 raw bytes or 64 hex characters "
            "(default: $ASYNCLOAD_KEY if set)",
        )
        sp.add_argument(
            "--verify-key",
            metavar="PATH",
            help="Ed25519 public key (PEM, 32 raw bytes or 64 hex): require a valid publisher signature",
        )

    def source(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--source",
            action="append",
            metavar="ID=LOCATION",
            help="re-point a manifest source at a new location (repeatable)",
        )

    sp = sub.add_parser(
        "pack", help="cut a .safetensors file or HF model directory into blocks over directories"
    )
    sp.add_argument("src", help=".safetensors file or Hugging Face model directory")
    sp.add_argument(
        "--to",
        nargs="+",
        required=True,
        metavar="DIR",
        help="source directories or URLs (block i goes to the i-th mod k; with --parity, stripes rotate)",
    )
    sp.add_argument(
        "-o", "--output", help="manifest path (default: <name>.asyncload.json beside the first DIR)"
    )
    sp.add_argument(
        "--block-size",
        type=_size,
        default=DEFAULT_BLOCK_SIZE,
        help=f"block size m (default {format_size(DEFAULT_BLOCK_SIZE)}, at least 4KiB)",
    )
    budget(sp)
    sp.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt every block (AES-256-GCM) under --key-file or $ASYNCLOAD_KEY",
    )
    sp.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="R",
        help="store every block on R distinct directories (default 1); loads read another copy on failure",
    )
    sp.add_argument(
        "--parity",
        type=int,
        default=0,
        metavar="P",
        help="add P Reed-Solomon parity blocks to every stripe of k-P data blocks: any P of the k "
        "sources may be lost (default 0)",
    )
    sp.add_argument("--key-file", metavar="PATH", help="32 raw bytes or 64 hex characters; implies --encrypt")
    sp.add_argument(
        "--sign-key", metavar="PATH", help="Ed25519 private key (PEM or raw) to sign the manifest"
    )
    sp.set_defaults(func=cmd_pack)

    sp = sub.add_parser("unpack", help="rebuild the original file(s) byte-identically")
    sp.add_argument("manifest")
    sp.add_argument(
        "-o",
        "--output",
        required=True,
        help="output file for a one-file checkpoint (a path ending in / or an existing directory "
        "receives it), or the directory for a sharded one",
    )
    budget(sp)
    source(sp)
    keys(sp)
    sp.set_defaults(func=cmd_unpack)

    sp = sub.add_parser(
        "load", help="read every tensor through the ring and report speed, memory and loop lag"
    )
    sp.add_argument("target", help="manifest, .safetensors file or HF model directory")
    budget(sp)
    sp.add_argument(
        "--block-size",
        type=_size,
        default=None,
        help="block size for inputs read in place (default: min(16MiB, budget/2))",
    )
    sp.add_argument(
        "--mode",
        choices=["load", "stream", "lease"],
        default="load",
        help="load: keep owned arrays (like load_file); stream: drop each owned array; "
        "lease: zero-copy views into slots (default: load)",
    )
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.add_argument(
        "--threads",
        type=int,
        default=None,
        help="worker threads for reads and copies (default: cores, min 2)",
    )
    sp.add_argument("--reads-per-source", type=int, default=4, help="concurrent reads per source (default 4)")
    sp.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"seconds one read may take before it fails (default {DEFAULT_TIMEOUT:g}; 0: no limit)",
    )
    sp.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help=f"retries of a failed read when no replica or parity can serve it (default {DEFAULT_RETRIES})",
    )
    sp.add_argument(
        "--hedge",
        type=float,
        default=DEFAULT_HEDGE,
        metavar="X",
        help=f"with parity, read around a source X times slower than its peers (default {DEFAULT_HEDGE:g}; "
        "0: off)",
    )
    sp.add_argument(
        "--no-map",
        action="store_true",
        help="copy every block into the ring; by default a block of a local file that the page cache "
        "holds whole is mapped there instead (read-only, no copy)",
    )
    source(sp)
    keys(sp)
    sp.set_defaults(func=cmd_load)

    sp = sub.add_parser(
        "verify",
        help="check every stored block (each replica and parity block); exit 1 naming each bad one; "
        "--repair rebuilds them",
    )
    sp.add_argument("manifest")
    budget(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    sp.add_argument(
        "--repair",
        action="store_true",
        help="rebuild bad blocks from replicas or parity and write them back (to --source ID=NEW if given, "
        "then recorded in the manifest); exit 0 when everything bad was repaired",
    )
    source(sp)
    keys(sp)
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("info", help="show tensors, sizes, sources and blocks")
    sp.add_argument("target", help="manifest, .safetensors file or HF model directory")
    sp.add_argument("--all", action="store_true", help="list every tensor")
    sp.add_argument("--json", action="store_true", help="print the manifest as JSON")
    source(sp)
    keys(sp)
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("rekey", help="re-wrap an encrypted checkpoint's data key under a new key")
    sp.add_argument("manifest")
    sp.add_argument("--key-file", metavar="PATH", help="current key (default: $ASYNCLOAD_KEY)")
    sp.add_argument("--new-key-file", metavar="PATH", required=True, help="new key: 32 raw bytes or 64 hex")
    sp.add_argument("--sign-key", metavar="PATH", help="re-sign the manifest with this Ed25519 key")
    sp.set_defaults(func=cmd_rekey)

    sp = sub.add_parser(
        "demo",
        help="save a synthetic model over temp dirs (4 by default), stream it back in a small budget, verify",
    )
    sp.add_argument("--size", type=_size, default=256 << 20, help="model size (default 256MiB)")
    sp.add_argument("--budget", type=_size, default=64 << 20, help="memory budget (default 64MiB)")
    sp.add_argument("--block-size", type=_size, default=4 << 20, help="block size (default 4MiB)")
    sp.add_argument("--sources", type=int, default=4, help="number of source directories (default 4)")
    sp.add_argument("--keep", metavar="DIR", help="keep the store in DIR instead of a temp dir")
    sp.add_argument(
        "--parity",
        type=int,
        default=1,
        metavar="P",
        help="parity blocks per stripe (default 1; 0 skips the lost-disk and repair steps)",
    )
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        return int(
            anyio.run(
                func,
                args,
                backend="asyncio",
                backend_options={"use_uvloop": args.backend == "uvloop"},
            )
        )
    except AsyncloadError as e:
        print(f"asyncload: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 1
