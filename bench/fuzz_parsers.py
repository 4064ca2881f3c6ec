#!/usr/bin/env python
"""Time-bounded fuzzing of asyncload's parsers and of ``open()`` + ``load()`` on hostile files.

Not part of the test suite or CI (tests/test_format.py has the short hypothesis fuzz tests
that run there). Run it before resolving a change to a parser or to the open path::

    .venv/bin/pip install atheris                      # optional: coverage-guided (libFuzzer)
    .venv/bin/python bench/fuzz_parsers.py             # 300 s over all targets
    .venv/bin/python bench/fuzz_parsers.py --seconds 600 --target e2e
    .venv/bin/python bench/fuzz_parsers.py --target e2e --reproduce bench/results/fuzz-findings/X.bin

Targets (``--target NAME|all``; the total time is split evenly and run one target after another):

  header    ``_format.parse_header(body, file_size=...)``: the input's first byte picks file_size
            (< 0x80: len(body) + byte - 0x40; else len(body) + 2**(byte - 0x80))
  manifest  ``Manifest.from_json(data)``; whatever parses must survive ``to_json()`` unchanged
  hf_index  ``_format.parse_hf_index(data)``
  e2e       the input written as a file, then ``asyncload.open(file)`` + ``model.load()`` in a
            fresh event loop under ``anyio.fail_after(5)``, budget 256 KiB. The file sits in a
            fixture directory holding real block stores, so mutated manifests reach real blocks.
            When safetensors itself loads the input, asyncload must load it too, byte-identically.
  e2e_hf    the input written as ``model.safetensors.index.json`` of an HF directory with two
            real shards, then open(dir) + load()

Oracle. A parser may succeed or raise its documented FormatError subclass (HeaderError for
header/hf_index, ManifestError for manifests) naming the input; e2e may succeed or raise an
AsyncloadError (or KeyError). Anything else is a finding, and so is: an input that takes more
than 5 s; peak RSS growth (VmHWM, reset per input through /proc/self/clear_refs) above
max(64 MiB, 4 x input size + budget), confirmed by running the input a second time; a broken
invariant of what parsed (offsets inside the data section, no overlaps, manifest round trip,
arrays of the declared shape and size). Hangs the harness cannot interrupt (stuck in C or a
thread) are killed by libFuzzer's -timeout (or a faulthandler watchdog) and become findings too.

Engine. atheris (libFuzzer, asyncload instrumented for coverage) when it imports; otherwise a
long hypothesis run that drives the same structure-aware mutators from its seeds (no coverage
guidance, acceptance-guided pool). Each target runs in a child process, restarted if libFuzzer
stops it. Every input mutation is either libFuzzer's byte mutator or a JSON-aware one (delete,
replace, tweak ints and strings, duplicate, swap, splice, raw tokens such as 1e400 or deep nesting).

Output (bench/results/ is gitignored): findings under bench/results/fuzz-findings/ as
``<target>-<kind>-<hash>.bin`` (the smallest reproducer seen) + ``.txt`` (traceback, count,
command to reproduce); the corpus under bench/results/fuzz-corpus/<target>/ (kept between runs);
the fixture under bench/results/fuzz-fixture/; a JSON summary bench/results/fuzz-<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import faulthandler
import hashlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
FINDINGS = RESULTS / "fuzz-findings"
CORPUS = RESULTS / "fuzz-corpus"
FIXTURE = RESULTS / "fuzz-fixture"
TARGETS = ("header", "manifest", "hf_index", "e2e", "e2e_hf", "e2e_enc")
KEY = bytes(range(32))  # the fixture's encryption key and (raw Ed25519) signing key
SIGN_KEY = bytes(range(32, 64))
HANG_S = 5.0  # an input may take this long (e2e: anyio.fail_after)
KILL_S = 10  # libFuzzer -timeout / watchdog: stuck where fail_after cannot reach
E2E_BUDGET = 256 * 1024
MAX_LEN = 64 * 1024
MIB = 1 << 20
NAME = "FUZZ-INPUT"  # the name parsers are given; their errors must mention it
HF_INDEX = "model.safetensors.index.json"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the in-tree package, also without an editable install

# --------------------------------------------------------------------------- mutation

RAW = "\x00RAW:"  # a string value starting with this is written as raw JSON text
_RAW_RE = re.compile(r'"\\u0000RAW:([^"\\]*)"')
RAW_TOKENS = [
    "1e400", "-1e400", "1E309", "1.0", "-0", "-0.0", "0.5", "1e2", "NaN", "Infinity", "-Infinity",
    "9" * 5000, "-" + "9" * 4400, "18446744073709551616", "-9223372036854775809",
    "[" * 3000 + "]" * 3000, '{"a":' * 2000 + "1" + "}" * 2000, "true", "null", '""',
]  # fmt: skip
INTERESTING_INTS = [
    -(2**63), -(2**31), -8, -1, 0, 1, 2, 3, 7, 8, 9, 63, 64, 65, 255, 256, 4095, 4096, 4097,
    65535, 65536, 2**20, 2**24, 2**30, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1,
    2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, 2**100, 100 * MIB, 100 * MIB + 1,
]  # fmt: skip
INTERESTING_STRS = [
    "", ".", "..", "../x", "../../etc/passwd", "/abs", "/", "a//b", "a/./b", "a/", "\\x", "x\x00y",
    "\x00", "~", "~/x", "s0", "s1", "s2", "s9", "file", "F32", "F16", "BF16", "F4", "F6_E2M3", "U8",
    "BOOL", "I64", "U64", "C64", "F8_E4M3", "F8_E8M0", "Q7", "f32", "safetensors", "index",
    "asyncload.manifest", "__metadata__", "zzzzzzzz", "0000000g", "ffffffff", "FFFFFFFF", " 1234567",
    "-1234567", "0x123456", "1_234567", "fuzz.in", HF_INDEX, "model.safetensors", "\ud800", "é",
    "x" * 300, "h000", "d000000", "000000",
]  # fmt: skip
ODD_CHARS = ["\x00", "\ud800", "\udcff", "/", "\\", "..", "~", "\n", "é", "\U0001f600"]
FIELDS = [
    "format", "version", "id", "block_size", "total_size", "files", "tensors", "sources", "blocks",
    "path", "offset", "size", "kind", "name", "dtype", "shape", "offsets", "location", "source",
    "key", "length", "crc32c", "key_offset", "extra", "data_offsets", "__metadata__", "weight_map",
    "metadata",
]  # fmt: skip


class JsonMutator:
    """Structure-aware mutations of a decoded JSON document (values, not text)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def value(self, doc: Any, depth: int = 0) -> Any:
        r = self.rng
        pick = r.randrange(11 if depth < 2 else 8)
        if pick == 0:
            return None
        if pick == 1:
            return r.random() < 0.5
        if pick == 2:
            return r.choice(INTERESTING_INTS) if r.random() < 0.7 else r.randrange(-(2**40), 2**40)
        if pick == 3:
            return r.choice([0.0, -0.0, 1.5, 1e308, -1e-310, 4096.0])
        if pick == 4:
            return r.choice(INTERESTING_STRS)
        if pick == 5:
            return RAW + r.choice(RAW_TOKENS)
        if pick in (6, 7):
            return copy.deepcopy(self.walk(doc)[0])  # splice a piece of the document itself
        if pick == 8:
            return [self.value(doc, depth + 1) for _ in range(r.randrange(4))]
        if pick == 9:
            return {r.choice(FIELDS): self.value(doc, depth + 1) for _ in range(r.randrange(4))}
        return r.choice(FIELDS)

    def walk(self, doc: Any) -> tuple[Any, Any, Any]:
        """A random node: (node, parent, key in parent); parent is None for the root.

        Half the time by field name (each name present equally likely, then one of its
        places), so that rare fields (id, extra, mac, an envelope's nonce) get as many
        mutations as the fields of the many blocks and tensors; otherwise a random descent.
        """
        if self.rng.random() < 0.5:
            by_name: dict[str, list[tuple[Any, Any, Any]]] = {}
            stack = [doc]
            while stack:
                obj = stack.pop()
                items = (
                    obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
                )
                for k, v in items:
                    by_name.setdefault(k if isinstance(k, str) else "[]", []).append((v, obj, k))
                    stack.append(v)
            if by_name:
                return self.rng.choice(by_name[self.rng.choice(sorted(by_name))])
        node, parent, key = doc, None, None
        while (
            isinstance(node, dict | list) and node and self.rng.random() < (0.85 if parent is None else 0.75)
        ):
            k = self.rng.choice(list(node)) if isinstance(node, dict) else self.rng.randrange(len(node))
            node, parent, key = node[k], node, k
        return node, parent, key

    def tweak(self, v: Any, doc: Any) -> Any:
        r = self.rng
        if isinstance(v, bool):
            return r.choice([not v, int(v), str(v).lower()])
        if isinstance(v, int):
            ops: list[Callable[[int], Any]] = [
                lambda x: x + 1, lambda x: x - 1, lambda x: x + 8, lambda x: x - 8, lambda x: x * 2,
                lambda x: x // 2, lambda x: -x, lambda x: x + 4096, lambda x: x ^ (1 << r.randrange(70)),
                lambda x: r.choice(INTERESTING_INTS), lambda x: float(x), lambda x: str(x),
                lambda x: RAW + f"{x}.0", lambda x: RAW + f"{x}e0",
            ]  # fmt: skip
            return r.choice(ops)(v)
        if isinstance(v, str):
            ops2: list[Callable[[str], Any]] = [
                lambda s: r.choice(INTERESTING_STRS), lambda s: s + r.choice(["/", "..", "x", "\x00", "/.."]),
                lambda s: s[:-1], lambda s: s.upper(), lambda s: s.lower(), lambda s: "../" + s,
                lambda s: "/" + s, lambda s: s * 2, lambda s: s.replace("0", "1", 1), lambda s: "~" + s,
                lambda s: s[: (i := r.randrange(len(s) + 1))] + r.choice(ODD_CHARS) + s[i:],
            ]  # fmt: skip
            return r.choice(ops2)(v)
        if isinstance(v, list):
            v = list(v)
            if v and r.random() < 0.4:
                v.pop(r.randrange(len(v)))
            elif v and r.random() < 0.5:
                v.insert(r.randrange(len(v) + 1), copy.deepcopy(r.choice(v)))
            else:
                v.append(self.value(doc, 1))
            return v
        if isinstance(v, dict):
            v = dict(v)
            if v and r.random() < 0.4:
                v.pop(r.choice(list(v)))
            else:
                v[r.choice(FIELDS) if r.random() < 0.8 else r.choice(INTERESTING_STRS)] = self.value(doc, 1)
            return v
        return self.value(doc)

    def mutate(self, doc: Any) -> Any:
        doc = copy.deepcopy(doc)
        for _ in range(1 + int(self.rng.expovariate(1.5))):
            node, parent, key = self.walk(doc)
            action = self.rng.choice(["tweak", "tweak", "tweak", "replace", "delete", "dup", "swap"])
            new = self.tweak(node, doc) if action == "tweak" else self.value(doc)
            if parent is None:
                doc = new if action in ("tweak", "replace") else self.value(doc)
            elif action == "delete":
                del parent[key]
            elif action == "dup" and isinstance(parent, list):
                parent.insert(self.rng.randrange(len(parent) + 1), copy.deepcopy(node))
            elif action == "swap" and isinstance(parent, list):
                j = self.rng.randrange(len(parent))
                parent[key], parent[j] = parent[j], parent[key]
            elif action == "dup" and isinstance(parent, dict):  # a key spelt twice: last one wins
                parent[self.rng.choice(FIELDS)] = copy.deepcopy(node)
            else:
                parent[key] = new
        return doc


def json_decode(data: bytes) -> Any:
    keep = lambda s: RAW + s  # noqa: E731 - floats and NaN/Infinity are kept as their text
    return json.loads(data, parse_float=keep, parse_constant=keep)


def json_encode(doc: Any, rng: random.Random) -> bytes:
    style = rng.random()
    kw: dict[str, Any] = {"separators": (",", ":")} if style < 0.5 else {"indent": 1} if style < 0.6 else {}
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.8, sort_keys=rng.random() < 0.3, **kw)
    return _RAW_RE.sub(lambda m: m.group(1), text).encode("utf-8", "surrogatepass")


def bytes_mutate(data: bytes, rng: random.Random, max_size: int = MAX_LEN) -> bytes:
    """A small libFuzzer-like byte mutator, for the hypothesis engine (atheris has its own)."""
    b = bytearray(data)
    for _ in range(1 + int(rng.expovariate(1.0))):
        op = rng.randrange(8)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            j = min(i, len(b) - 1)
            b[j] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[min(i, len(b) - 1)] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, ord("{"), ord('"'), ord("\\")])
        elif op == 2:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 3:
            del b[i : i + rng.randrange(1, 64)]
        elif op == 4 and b:
            j = rng.randrange(len(b))
            b[i:i] = b[j : j + rng.randrange(1, 64)]
        elif op == 5:
            token = rng.choice(FIELDS + INTERESTING_STRS + RAW_TOKENS[:12])
            b[i:i] = json.dumps(token).encode() if rng.random() < 0.5 else token.encode("utf-8", "replace")
        elif op == 6:
            del b[i:]
        else:
            b[i : i + 8] = struct.pack("<Q", rng.choice(INTERESTING_INTS) % 2**64)
    return bytes(b[:max_size])


class JsonCodec:
    def structural(self, data: bytes, rng: random.Random) -> bytes | None:
        try:
            doc = json_decode(data)
        except (ValueError, RecursionError):
            return None
        return json_encode(JsonMutator(rng).mutate(doc), rng)


def structural(codec: Any, data: bytes, rng: random.Random) -> bytes | None:
    """A structure-aware mutant of ``data``, or None (not decodable, or a mutator limit hit)."""
    try:
        return codec.structural(data, rng)  # type: ignore[no-any-return]
    except (ValueError, OverflowError, RecursionError, TypeError):  # e.g. float(2**2000), deep nesting
        return None


class SafetensorsCodec:
    """[file-size byte] + u64 header length + JSON header + data section."""

    def __init__(self, size_byte: bool) -> None:
        self.pre = 1 if size_byte else 0

    def structural(self, data: bytes, rng: random.Random) -> bytes | None:
        if len(data) < self.pre + 8:
            return None
        (n,) = struct.unpack("<Q", data[self.pre : self.pre + 8])
        if self.pre + 8 + n > len(data):
            return None
        try:
            doc = json_decode(data[self.pre + 8 : self.pre + 8 + n])
        except (ValueError, RecursionError):
            return None
        prefix, tail = data[: self.pre], data[self.pre + 8 + n :]
        if rng.random() < 0.85:
            doc = JsonMutator(rng).mutate(doc)
        text = json_encode(doc, rng)
        if rng.random() < 0.5:
            text += b" " * (-(len(text) + 8) % 8)  # safetensors pads the header to 8 bytes
        length = len(text)
        if rng.random() < 0.05:
            length = max(0, length + rng.choice([-8, -1, 1, 8, 2**32, 100 * MIB + 1]))
        if self.pre and rng.random() < 0.15:
            prefix = bytes([rng.choice([0x40, 0x40, 0x3F, 0x41, 0x48, 0x38, 0x00, 0x80, 0xA0, 0xC0, 0xFF])])
        r = rng.random()
        if r < 0.07:
            tail = tail[: rng.randrange(len(tail) + 1)]
        elif r < 0.14:
            tail += bytes(rng.choice([1, 7, 8, 4096]))
        return prefix + struct.pack("<Q", length) + text + tail


class E2ECodec:
    def __init__(self) -> None:
        self.manifest, self.st = JsonCodec(), SafetensorsCodec(size_byte=False)

    def structural(self, data: bytes, rng: random.Random) -> bytes | None:
        codec = self.manifest if data[:1] == b"{" else self.st
        return codec.structural(data, rng)


CODECS: dict[str, Any] = {
    "header": SafetensorsCodec(size_byte=True),
    "manifest": JsonCodec(),
    "hf_index": JsonCodec(),
    "e2e": E2ECodec(),
    "e2e_hf": JsonCodec(),
    "e2e_enc": JsonCodec(),
}


def libfuzzer_dict(path: Path) -> None:
    """Tokens for libFuzzer's -dict (its byte mutator inserts them)."""

    def esc(b: bytes) -> str:
        return "".join(chr(c) if 32 <= c < 127 and c not in b'"\\' else f"\\x{c:02x}" for c in b)

    tokens = {json.dumps(f).encode() for f in FIELDS + INTERESTING_STRS if len(f) < 40}
    tokens |= {t.encode() for t in RAW_TOKENS if len(t) < 40}
    tokens |= {str(i).encode() for i in INTERESTING_INTS}
    tokens |= {b"\\u0000", b"\\ud800", b"[0,0]", b"[]", b"{}", b'"shape":[0]', b'"crc32c":null'}
    path.write_text("".join(f'"{esc(t)}"\n' for t in sorted(tokens)))


# --------------------------------------------------------------------------- fixture & seeds


def _seed_tensors() -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(7)
    return {
        "embed": rng.standard_normal((16, 8)).astype(np.float32),
        "norm": rng.standard_normal(8).astype(np.float16),
        "ids": np.arange(5, dtype=np.int64),
        "mask": np.array([1, 0, 1, 1, 0, 0, 1], dtype=np.bool_),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "wide": rng.integers(0, 255, 9000, dtype=np.uint8),  # crosses 4 KiB blocks
        "u16": np.arange(6, dtype=np.uint16).reshape(2, 3),
    }


def build_fixture(fx: Path) -> None:
    """Real inputs, written by safetensors and asyncload themselves (rebuilt when asyncload changes)."""
    digest = hashlib.sha1()
    for src in sorted((ROOT / "asyncload").rglob("*.py")):
        digest.update(src.read_bytes())
    stamp = fx / ".complete"
    if stamp.exists() and stamp.read_text() == digest.hexdigest():
        return
    import anyio
    import numpy as np
    from safetensors.numpy import save_file

    import asyncload

    shutil.rmtree(fx, ignore_errors=True)
    (fx / "hf").mkdir(parents=True)
    tensors = _seed_tensors()
    save_file(tensors, str(fx / "model.safetensors"), metadata={"format": "np"})
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(fx / "hf" / shard))
    index = {
        "metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
        "weight_map": {n: s for s, part in shards.items() for n in part},
    }
    (fx / "hf" / HF_INDEX).write_text(json.dumps(index, indent=2))
    rel = lambda p: os.path.relpath(fx / p)  # noqa: E731 - the manifests record relative locations
    kw: dict[str, Any] = {"block_size": "4KiB", "budget": "64KiB"}

    async def write() -> None:
        await asyncload.save(
            tensors, fx / "saved.asyncload.json", sources=[rel("s0"), rel("s1"), rel("s2")],
            metadata={"note": "fuzz seed"}, **kw,
        )  # fmt: skip
        await asyncload.pack(
            fx / "model.safetensors", [rel("p0"), rel("p1")], fx / "packed.asyncload.json", **kw
        )
        await asyncload.pack(fx / "hf", [rel("h0")], fx / "hf.asyncload.json", **kw)
        enc = {"sources": [rel("e0"), rel("e1")], "key": KEY, **kw}
        await asyncload.save(tensors, fx / "enc.asyncload.json", **enc)
        await asyncload.save(tensors, fx / "signed.asyncload.json", sign_key=SIGN_KEY, **enc)
        for target in ("enc.asyncload.json", "signed.asyncload.json"):
            got = await asyncload.load(fx / target, budget=E2E_BUDGET, key=KEY)
            assert all(np.array_equal(got[n], tensors[n]) for n in tensors), target
        for target in ("saved.asyncload.json", "packed.asyncload.json", "hf.asyncload.json", "hf"):
            got = await asyncload.load(fx / target, budget=E2E_BUDGET)
            assert all(np.array_equal(got[n], tensors[n]) for n in tensors), target

    anyio.run(write)
    stamp.write_text(digest.hexdigest())


def seeds(target: str, fx: Path) -> list[bytes]:
    from asyncload._format import build_header

    st_files = [fx / "model.safetensors", *sorted((fx / "hf").glob("*.safetensors"))]
    manifests = [fx / "saved.asyncload.json", fx / "packed.asyncload.json", fx / "hf.asyncload.json"]
    encrypted = [(fx / "enc.asyncload.json").read_bytes(), (fx / "signed.asyncload.json").read_bytes()]
    index = (fx / "hf" / HF_INDEX).read_bytes()
    small = build_header([("a", "F32", (2, 2), 16), ("z", "U8", (0,), 0)], {"k": "v"}) + bytes(16)
    empty = build_header([])
    if target == "header":
        return [b"\x40" + p.read_bytes() for p in st_files] + [
            b"\x40" + small,
            b"\x40" + empty,
            b"\xa0" + small,
        ]
    doc = json.loads(manifests[0].read_bytes())
    doc["extra"] = {"note": "x", "n": [1, 2.5, None, True]}  # the optional field no writer fills yet
    with_extra = json.dumps(doc).encode()
    if target == "manifest":
        return [p.read_bytes() for p in manifests] + [with_extra, *encrypted]
    if target == "hf_index":
        return [index, b'{"weight_map": {}}']
    if target == "e2e":
        return [p.read_bytes() for p in st_files + manifests] + [small, empty, with_extra]
    if target == "e2e_enc":
        return [*encrypted, manifests[0].read_bytes()]
    if target == "e2e_hf":
        return [index, json.dumps({"weight_map": {"embed": "model-00001-of-00002.safetensors"}}).encode()]
    raise SystemExit(f"unknown target {target!r}")


# --------------------------------------------------------------------------- targets & oracle


class Violation(Exception):
    """An outcome the oracle forbids, other than an unexpected exception."""

    def __init__(self, kind: str, sig: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.sig, self.detail = kind, sig, detail


def _check_named(e: BaseException) -> None:
    if NAME not in str(e):
        raise Violation("invariant", f"message-without-name:{type(e).__name__}", f"{type(e).__name__}: {e}")


class Target:
    budget = 0
    name = ""
    error: BaseException | None = None

    def run(self, data: bytes) -> str:  # "ok" | "rejected"
        raise NotImplementedError

    def after(self, data: bytes) -> None:
        """Checks that run outside the memory measurement (reference loaders)."""


class HeaderTarget(Target):
    name = "header"

    def __init__(self, fx: Path) -> None:
        from asyncload._dtypes import expected_nbytes
        from asyncload._format import HeaderError, parse_header

        self.parse, self.err, self.nbytes = parse_header, HeaderError, expected_nbytes

    def run(self, data: bytes) -> str:
        if not data:
            return "rejected"
        body, b0 = data[1:], data[0]
        file_size = len(body) + (b0 - 0x40 if b0 < 0x80 else 1 << (b0 - 0x80))
        try:
            hdr = self.parse(body, file_size=file_size, name=NAME)
        except self.err as e:
            self.error = e
            _check_named(e)
            return "rejected"
        end = hdr.header_size + hdr.data_size
        if hdr.header_size + hdr.data_size != file_size:
            raise Violation(
                "invariant", "sizes", f"header {hdr.header_size} + data {hdr.data_size} != {file_size}"
            )
        prev = None
        for t in hdr.tensors:
            want = self.nbytes(t.dtype, t.shape)
            if not hdr.header_size <= t.begin <= t.end <= end or (want is not None and want != t.nbytes):
                raise Violation("invariant", "tensor-range", f"{t} outside [{hdr.header_size}, {end}]")
            if prev is not None and t.begin < prev.end:
                raise Violation("invariant", "overlap", f"{prev} and {t} overlap")
            prev = t
        return "ok"


class ManifestTarget(Target):
    name = "manifest"

    def __init__(self, fx: Path) -> None:
        from asyncload import Manifest, ManifestError

        self.m, self.err = Manifest, ManifestError

    def run(self, data: bytes) -> str:
        try:
            m = self.m.from_json(data, name=NAME)
        except self.err as e:
            self.error = e
            _check_named(e)
            return "rejected"
        again = self.m.from_json(m.to_json(), name=NAME)  # an exception here is a finding too
        if again != m:
            raise Violation(
                "invariant", "roundtrip", f"to_json/from_json changed the manifest:\n{m}\n{again}"
            )
        if sum(b.length for b in m.blocks) != m.total_size or any(t.end > m.total_size for t in m.tensors):
            raise Violation("invariant", "coverage", "blocks or tensors disagree with total_size")
        return "ok"


class HfIndexTarget(Target):
    name = "hf_index"

    def __init__(self, fx: Path) -> None:
        from asyncload._format import HeaderError, parse_hf_index

        self.parse, self.err = parse_hf_index, HeaderError

    def run(self, data: bytes) -> str:
        try:
            wm = self.parse(data, name=NAME)
        except self.err as e:
            self.error = e
            _check_named(e)
            return "rejected"
        if not isinstance(wm, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wm.items()
        ):
            raise Violation("invariant", "weight-map-type", repr(wm)[:500])
        return "ok"


class E2ETarget(Target):
    """Write the input, open it with asyncload, load everything, in a fresh event loop."""

    name = "e2e"
    budget = E2E_BUDGET

    def __init__(self, fx: Path) -> None:
        import anyio

        import asyncload
        from asyncload._dtypes import numpy_dtype

        self.anyio, self.al, self.numpy_dtype = anyio, asyncload, numpy_dtype
        self.fx = fx
        self.path = fx / "fuzz.in"
        self.open_target: Path = self.path
        self.result: tuple[dict[str, Any], dict[str, Any]] | None = None
        self.error: BaseException | None = None

    def write(self, data: bytes) -> None:
        self.path.write_bytes(data)

    def keys(self, data: bytes) -> dict[str, Any]:
        return {}

    async def _load(self, keys: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        with self.anyio.fail_after(HANG_S):
            async with self.al.open(self.open_target, budget=self.budget, **keys) as model:
                infos = dict(model.tensors)
                return infos, await model.load()

    def run(self, data: bytes) -> str:
        self.result = self.error = None
        self.write(data)
        try:
            self.result = self.anyio.run(self._load, self.keys(data), backend="asyncio")
        except (self.al.AsyncloadError, KeyError) as e:
            self.error = e
            return "rejected"
        except BaseExceptionGroup as eg:  # documented (README "Errors"): faults of different kinds
            if all(isinstance(x, self.al.AsyncloadError) for x in _leaves(eg)):
                self.error = eg
                return "rejected-group"
            raise
        except TimeoutError as e:
            raise Violation("hang", "fail_after", f"open()+load() still running after {HANG_S} s") from e
        infos, arrays = self.result
        if list(arrays) != [t.name for t in sorted(infos.values(), key=lambda t: t.begin)]:
            raise Violation(
                "invariant", "names", f"load() returned {list(arrays)[:5]}, tensors {list(infos)[:5]}"
            )
        for name, arr in arrays.items():
            t = infos[name]
            if arr.shape != t.shape or arr.nbytes != t.nbytes or arr.dtype != self.numpy_dtype(t.dtype):
                raise Violation("invariant", "array", f"{name}: {arr.dtype}{arr.shape} for {t}")
        return "ok"

    def after(self, data: bytes) -> None:
        if data[:1] == b"{":
            return
        from safetensors.numpy import load

        try:
            ref = load(data)
        except Exception:  # safetensors refuses it: asyncload may be more lenient, never stricter
            return
        if self.result is None:
            e = self.error
            raise Violation(
                "divergence", f"rejects:{type(e).__name__}", f"safetensors loads it, asyncload raised {e!r}"
            )
        arrays = self.result[1]
        for name, want in ref.items():
            got = arrays.get(name)
            if got is None or got.shape != want.shape or got.tobytes() != want.tobytes():
                raise Violation("divergence", "values", f"tensor {name!r} differs from safetensors' load")


class E2EHfTarget(E2ETarget):
    name = "e2e_hf"

    def __init__(self, fx: Path) -> None:
        super().__init__(fx)
        self.open_target = fx / "hf-fuzz"  # the shards, and an index the input replaces
        self.open_target.mkdir(exist_ok=True)
        for shard in (fx / "hf").glob("*.safetensors"):
            shutil.copyfile(shard, self.open_target / shard.name)
        self.path = self.open_target / HF_INDEX

    def after(self, data: bytes) -> None:
        pass


class E2EEncTarget(E2ETarget):
    """A manifest opened with the fixture's key; with its verify key when the input length is odd."""

    name = "e2e_enc"

    def __init__(self, fx: Path) -> None:
        super().__init__(fx)
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        public = Ed25519PrivateKey.from_private_bytes(SIGN_KEY).public_key()
        self.verify_key = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.path = self.open_target = fx / "fuzz-enc.json"

    def keys(self, data: bytes) -> dict[str, Any]:
        return {"key": KEY, "verify_key": self.verify_key if len(data) % 2 else None}

    def after(self, data: bytes) -> None:
        pass


TARGET_CLASSES: dict[str, type[Target]] = {
    "header": HeaderTarget,
    "manifest": ManifestTarget,
    "hf_index": HfIndexTarget,
    "e2e": E2ETarget,
    "e2e_hf": E2EHfTarget,
    "e2e_enc": E2EEncTarget,
}

# --------------------------------------------------------------------------- harness


class RssMeter:
    """Peak RSS of one input: VmHWM after, minus VmRSS before (peak reset via clear_refs)."""

    def __init__(self) -> None:
        try:
            self.clear = os.open("/proc/self/clear_refs", os.O_WRONLY)
            self.status = os.open("/proc/self/status", os.O_RDONLY)
        except OSError:  # not Linux: ru_maxrss, which cannot be reset (catches new peaks only)
            self.clear = self.status = -1

    def _field(self, tag: bytes) -> int:
        buf = os.pread(self.status, 8192, 0)
        i = buf.index(tag) + len(tag)
        return int(buf[i : buf.index(b"kB", i)]) * 1024

    def start(self) -> int:
        if self.clear < 0:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        os.pwrite(self.clear, b"5", 0)
        return self._field(b"VmRSS:")

    def peak(self) -> int:
        if self.clear < 0:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self._field(b"VmHWM:")


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [x for sub in e.exceptions for x in _leaves(sub)]
    return [e]


def signature(e: BaseException) -> str:
    if isinstance(e, BaseExceptionGroup):
        names = sorted({type(x).__name__ for x in _leaves(e)})
        return f"{type(e).__name__}[{','.join(names)}]"
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "asyncload" in Path(f.filename).parts] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}:{ours[-1].name}" if ours else "?"
    return f"{type(e).__name__}@{where}"


class Harness:
    def __init__(self, target: Target, findings: Path, stats: Path, deadline: float) -> None:
        self.target, self.findings, self.stats_path, self.deadline = target, findings, stats, deadline
        self.meter = RssMeter()
        self.execs = 0
        self.outcomes = {"ok": 0, "rejected": 0, "finding": 0}
        self.counts: dict[str, int] = {}
        self.peak_growth = 0
        self._flushed = 0.0

    def limit(self, data: bytes) -> int:
        return max(64 * MIB, 4 * len(data) + self.target.budget)

    def _measure(self, data: bytes) -> tuple[str, float, int]:
        base = self.meter.start()
        t0 = time.monotonic()
        try:
            outcome = self.target.run(data)
        finally:
            dt = time.monotonic() - t0
            growth = self.meter.peak() - base
            self.peak_growth = max(self.peak_growth, growth)
        return outcome, dt, growth

    def one(self, data: bytes) -> str:
        self.execs += 1
        outcome = "finding"
        try:
            outcome, dt, growth = self._measure(data)
            if dt > HANG_S:
                self.record("hang", "slow", data, f"took {dt:.2f} s (limit {HANG_S} s); outcome {outcome}")
            elif growth > self.limit(data):
                _, _, again = self._measure(data)  # first-use effects do not repeat
                if again > self.limit(data):
                    self.record(
                        "memory", "rss", data,
                        f"peak RSS grew {growth / MIB:.1f} MiB, then {again / MIB:.1f} MiB "
                        f"(limit {self.limit(data) / MIB:.1f} MiB for {len(data)} input bytes)",
                    )  # fmt: skip
            self.target.after(data)
        except Violation as v:
            self.record(
                v.kind, v.sig, data, v.detail + "\n\n" + "".join(traceback.format_exception(v)), v.detail
            )
        except KeyboardInterrupt:
            raise
        except BaseException as e:
            self.record("exception", signature(e), data, "".join(traceback.format_exception(e)), repr(e))
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.flush()
        if time.time() > self.deadline:
            self.flush(force=True)
            os._exit(0)
        return outcome

    def record(self, kind: str, sig: str, data: bytes, detail: str, error: str = "") -> None:
        sig = f"{self.target.name}/{kind}/{sig}"
        key = f"{self.target.name}-{kind}-{hashlib.sha1(sig.encode()).hexdigest()[:10]}"
        self.counts[key] = self.counts.get(key, 0) + 1
        self.findings.mkdir(parents=True, exist_ok=True)
        repro = self.findings / f"{key}.bin"
        if not repro.exists() or len(data) < repro.stat().st_size:  # keep the smallest reproducer
            repro.write_bytes(data)
            (self.findings / f"{key}.txt").write_text(
                f"target: {self.target.name}\nkind: {kind}\nsignature: {sig}\n"
                f"error: {(error or detail).splitlines()[0][:300]}\ninput: {len(data)} bytes\n"
                f"reproduce: .venv/bin/python bench/fuzz_parsers.py --target {self.target.name} "
                f"--reproduce {os.path.relpath(repro, ROOT)}\n\n{detail}\n"
            )
        self.flush(force=True)

    def flush(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._flushed < 0.25:
            return
        self._flushed = now
        doc = {
            "execs": self.execs,
            "outcomes": self.outcomes,
            "findings": self.counts,
            "peak_rss_growth": self.peak_growth,
        }
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.stats_path)


def _import_instrumented(engine: str) -> None:
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["asyncload"]):  # the first import: instrumented
            import asyncload._format
    import asyncload._dtypes  # noqa: F401

    with contextlib.suppress(ImportError):
        import ml_dtypes  # noqa: F401 - BF16 loads import it lazily: keep that out of the first input's RSS


def child(args: argparse.Namespace) -> None:
    """One target in this process, until the deadline (the parent restarts it after a kill)."""
    _import_instrumented(args.engine)
    fx, corpus = Path(args.fixture), Path(args.corpus)
    target = TARGET_CLASSES[args.child](fx)
    harness = Harness(target, Path(args.findings), Path(args.stats), args.deadline)
    codec = CODECS[args.child]
    for s in seeds(args.child, fx)[:3]:  # warm-up: imports, thread pools, first allocations
        harness.one(s)
    if args.engine == "atheris":
        import atheris

        def mutator(data: bytes, max_size: int, seed: int) -> bytes:
            rng = random.Random(seed)
            if rng.random() < 0.5:
                out = structural(codec, data, rng)
                if out is not None and len(out) <= max_size:
                    return out
            return atheris.Mutate(data, max_size)

        remaining = max(1, int(args.deadline - time.time()) + 15)
        argv = [
            sys.argv[0], f"-max_len={MAX_LEN}", f"-timeout={KILL_S}", "-rss_limit_mb=4096",
            f"-dict={args.dict}", f"-artifact_prefix={args.artifacts}/", f"-max_total_time={remaining}",
            "-use_value_profile=1", "-print_final_stats=1", str(corpus),
        ]  # fmt: skip
        atheris.Setup(argv, harness.one, custom_mutator=mutator)
        atheris.Fuzz()
        return
    hypothesis_run(harness, codec, corpus, Path(args.artifacts))


class _TimeUp(BaseException):
    pass


def hypothesis_run(harness: Harness, codec: Any, corpus: Path, artifacts: Path) -> None:
    """The fallback: hypothesis draws which pool entry to mutate and the mutators' random seeds."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    pool = [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()]
    known = {hashlib.sha1(p).digest() for p in pool}
    current = artifacts / "current-input"
    watchdog = (artifacts / "watchdog.txt").open("w")

    @settings(
        max_examples=10**9, deadline=None, database=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(st.integers(0, 2**32), st.integers(0, 2**64), st.integers(0, 4))
    def run(pick: int, seed: int, rounds: int) -> None:
        if time.time() > harness.deadline:
            raise _TimeUp
        rng = random.Random(seed)
        data = pool[pick % len(pool)]
        for _ in range(rounds):
            out = structural(codec, data, rng) if rng.random() < 0.5 else None
            data = out if out is not None and len(out) <= MAX_LEN else bytes_mutate(data, rng)
        current.write_bytes(data)
        faulthandler.dump_traceback_later(KILL_S, exit=True, file=watchdog)
        outcome = harness.one(data)
        faulthandler.cancel_dump_traceback_later()
        digest = hashlib.sha1(data).digest()
        if outcome == "ok" and digest not in known and len(pool) < 5000:  # acceptance guides the pool
            known.add(digest)
            pool.append(data)
            (corpus / digest.hex()).write_bytes(data)

    with contextlib.suppress(_TimeUp):
        run()
    harness.flush(force=True)
    current.unlink(missing_ok=True)
    os._exit(0)


# --------------------------------------------------------------------------- parent


def engine_available() -> str:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "hypothesis"
    return "atheris"


def run_target(name: str, seconds: float, engine: str, work: Path, dict_path: Path) -> dict[str, Any]:
    corpus = CORPUS / name
    corpus.mkdir(parents=True, exist_ok=True)
    for s in seeds(name, FIXTURE):
        (corpus / f"seed-{hashlib.sha1(s).hexdigest()[:16]}").write_bytes(s)
    artifacts = work / f"artifacts-{name}"
    artifacts.mkdir(parents=True, exist_ok=True)
    end = time.time() + seconds
    runs: list[dict[str, Any]] = []
    killed: dict[str, int] = {}
    failures = 0
    while time.time() < end - 3 and failures < 3:
        i = len(runs)
        stats, log = work / f"{name}-{i}.json", work / f"{name}-{i}.log"
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--child", name, "--engine", engine,
            "--deadline", str(end), "--fixture", str(FIXTURE), "--corpus", str(corpus),
            "--findings", str(FINDINGS), "--stats", str(stats), "--artifacts", str(artifacts),
            "--dict", str(dict_path),
        ]  # fmt: skip
        t0 = time.time()
        with log.open("wb") as out:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False
            )
        doc = (
            json.loads(stats.read_text()) if stats.exists() else {"execs": 0, "findings": {}, "outcomes": {}}
        )
        doc.update(rc=proc.returncode, seconds=round(time.time() - t0, 1), log=str(log))
        runs.append(doc)
        if proc.returncode != 0:
            tail = log.read_bytes()[-6000:].decode("utf-8", "replace")
            wd = artifacts / "watchdog.txt"
            stack = wd.read_text(errors="replace") if wd.exists() else ""
            for art in sorted(artifacts.iterdir()):  # libFuzzer's crash-/timeout-/oom-, our current-input
                if art.name == "watchdog.txt":
                    continue
                kind = "killed" if art.name == "current-input" else art.name.split("-")[0]
                data = art.read_bytes()
                key = f"{name}-{kind}-{hashlib.sha1(data).hexdigest()[:10]}"
                lib = [ln.strip() for ln in tail.splitlines() if "ERROR: libFuzzer" in ln]
                error = lib[0] if lib else f"no progress for {KILL_S} s (watchdog)" if stack else "child died"
                (FINDINGS / f"{key}.bin").write_bytes(data)
                (FINDINGS / f"{key}.txt").write_text(
                    f"target: {name}\nkind: {kind} (the child was stopped, rc={proc.returncode})\n"
                    f"signature: {name}/{kind}\nerror: {error}\ninput: {len(data)} bytes\n"
                    f"reproduce: .venv/bin/python bench/fuzz_parsers.py --target {name} "
                    f"--reproduce {os.path.relpath(FINDINGS / f'{key}.bin', ROOT)}\n\n"
                    f"log tail:\n{tail}\n{stack}\n"
                )
                art.unlink()
                killed[key] = killed.get(key, 0) + 1
            if doc["execs"] == 0:
                failures += 1
                print(
                    f"  {name}: child failed (rc={proc.returncode}), log {log}:\n{tail[-2000:]}",
                    file=sys.stderr,
                )
    findings: dict[str, int] = dict(killed)
    outcomes: dict[str, int] = {}
    for r in runs:
        for k, v in r.get("findings", {}).items():
            findings[k] = findings.get(k, 0) + v
        for k, v in r.get("outcomes", {}).items():
            outcomes[k] = outcomes.get(k, 0) + v
    return {
        "target": name,
        "seconds": seconds,
        "runs": len(runs),
        "restarts": max(0, len(runs) - 1),
        "execs": sum(r["execs"] for r in runs),
        "outcomes": outcomes,
        "peak_rss_growth_mib": round(max((r.get("peak_rss_growth", 0) for r in runs), default=0) / MIB, 1),
        "corpus": sum(1 for _ in corpus.iterdir()),
        "findings": findings,
        "child_runs": runs,
    }


def reproduce(name: str, path: Path) -> int:
    build_fixture(FIXTURE)
    _import_instrumented("none")
    data = path.read_bytes()
    target = TARGET_CLASSES[name](FIXTURE)
    meter = RssMeter()
    base = meter.start()
    t0 = time.monotonic()
    try:
        outcome = target.run(data)
        target.after(data)
    except Violation as v:
        print(f"{v.kind}: {v.sig}\n{v.detail}")
        return 1
    except Exception as e:
        traceback.print_exc()
        print(f"\nunexpected {signature(e)}")
        return 1
    finally:
        print(f"{len(data)} bytes, {time.monotonic() - t0:.3f} s, peak RSS growth "
              f"{(meter.peak() - base) / MIB:.1f} MiB")  # fmt: skip
    error = getattr(target, "error", None)
    print(f"outcome: {outcome}" + (f" ({type(error).__name__}: {error})" if error is not None else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300, help="total budget over all targets (default 300)")
    ap.add_argument("--target", default="all", help=f"one of {', '.join(TARGETS)}, or all (default)")
    ap.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    ap.add_argument("--reproduce", type=Path, help="run one saved input against --target and report")
    for internal in ("--child", "--fixture", "--corpus", "--findings", "--stats", "--artifacts", "--dict"):
        ap.add_argument(internal, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    targets = list(TARGETS) if args.target == "all" else [args.target]
    if any(t not in TARGETS for t in targets):
        ap.error(f"--target must be one of {', '.join(TARGETS)} or all")
    if args.reproduce:
        if len(targets) != 1:
            ap.error("--reproduce needs one --target")
        return reproduce(targets[0], args.reproduce)
    engine = engine_available() if args.engine == "auto" else args.engine
    build_fixture(FIXTURE)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    work = RESULTS / f"fuzz-work-{stamp}"
    work.mkdir(parents=True)
    FINDINGS.mkdir(parents=True, exist_ok=True)
    dict_path = work / "tokens.dict"
    libfuzzer_dict(dict_path)
    share = args.seconds / len(targets)
    print(f"fuzz: engine={engine}, {args.seconds:.0f} s over {len(targets)} target(s), {share:.0f} s each")
    results = []
    t_start = time.time()
    for name in targets:
        r = run_target(name, share, engine, work, dict_path)
        results.append(r)
        print(
            f"  {name:9} {r['execs']:>9} execs in {share:.0f} s, {len(r['findings'])} finding(s)", flush=True
        )
    summary = {
        "engine": engine,
        "seconds": args.seconds,
        "wall_s": round(time.time() - t_start, 1),
        "targets": results,
    }
    out = RESULTS / f"fuzz-{stamp}.json"
    out.write_text(json.dumps(summary, indent=1))
    print(f"\n{'target':9} {'runs':>4} {'execs':>9} {'exec/s':>7} {'ok':>8} {'rejected':>9} {'corpus':>6} "
          f"{'peakMiB':>7} findings")  # fmt: skip
    for r in results:
        o = r["outcomes"]
        print(
            f"{r['target']:9} {r['runs']:>4} {r['execs']:>9} {r['execs'] / r['seconds']:>7.0f} "
            f"{o.get('ok', 0):>8} {o.get('rejected', 0):>9} {r['corpus']:>6} {r['peak_rss_growth_mib']:>7} "
            f"{len(r['findings'])}"
        )
    total = [(k, v) for r in results for k, v in r["findings"].items()]
    print(
        f"\nfindings: {len(total)} unique" + (f" (reproducers and tracebacks in {FINDINGS})" if total else "")
    )
    for key, count in total:
        txt = FINDINGS / f"{key}.txt"
        lines = txt.read_text().splitlines()
        sig = next((ln for ln in lines if ln.startswith("signature")), lines[1])
        err = next((ln for ln in lines if ln.startswith("error")), "")
        print(f"  {key} x{count}\n    {sig}\n    {err[:200]}")
    print(f"summary: {out}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
