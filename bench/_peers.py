"""Peer loaders for bench_load.py that need torch: safetensors.torch, Run:ai Model Streamer, tensorizer.

Each reader runs inside the fresh sample subprocess of bench_load.py and returns
(seconds, bytes, tensors, result kept alive), timing only the load after the imports. The peer
packages are optional (the `peers` extra: pip install -e '.[bench,peers]' after a CPU-only torch);
a missing one makes the method report `unavailable: <reason>` and the run goes on.

  safetensors.torch  safetensors.torch.load_file(path), then one byte of every 4 KiB page of every
                     tensor is read: load_file maps the file, so the load is not done until the
                     pages are faulted in (they stay shared with the page cache: no copy)
  runai-clone        SafetensorsStreamer().stream_file(path, owned=False); every yielded tensor is
                     .clone()d and kept (owned=False yields views into reused buffers)
  runai-noclone      same, each yielded tensor dropped before the next: the streamer's own speed
  tensorizer         TensorDeserializer(FILE.tensors, device="cpu"): every tensor into owned CPU
                     memory; FILE.tensors is written once per run by TensorSerializer (not timed)
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PAGE = 4096
Read = tuple[float, int, int, object]  # seconds, bytes, tensors, result kept alive
HINT = "pip install -e '.[peers]' after a CPU-only torch"

# Imported before the RSS baseline and the clock, so neither counts import time or library size.
IMPORTS: dict[str, tuple[str, ...]] = {
    "safetensors.torch": ("torch", "safetensors.torch"),
    "runai-clone": ("torch", "runai_model_streamer"),
    "runai-noclone": ("torch", "runai_model_streamer"),
    "tensorizer": ("torch", "tensorizer"),
}


class Unavailable(Exception):
    """The peer cannot run here (package missing, no serialized file): not a failure of the peer."""


def import_all(method: str) -> None:
    """Import a peer's modules; Unavailable names what is missing."""
    for name in IMPORTS.get(method, ()):
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing = e.name or name
            raise Unavailable(f"{missing} not installed ({HINT})") from e
        except Exception as e:  # e.g. a native library that fails to load
            raise Unavailable(f"import {name} failed: {type(e).__name__}: {e}") from e


def tensorizer_path(st: str | Path) -> Path:
    """Where the tensorizer copy of the checkpoint lives: beside the .safetensors file."""
    return Path(st).with_suffix(".tensors")


def prepare_tensorizer(st: str) -> dict[str, Any]:
    """Serialize the safetensors checkpoint once with TensorSerializer (untimed for the table)."""
    import_all("tensorizer")
    from safetensors.torch import load_file
    from tensorizer import TensorSerializer

    out = tensorizer_path(st)
    t0 = time.perf_counter()
    state = load_file(st)
    serializer = TensorSerializer(str(out))
    serializer.write_state_dict(state)
    serializer.close()
    seconds = time.perf_counter() - t0
    nbytes = sum(int(t.nbytes) for t in state.values())
    return {"path": str(out), "seconds": seconds, "gbps": nbytes / seconds / 1e9, "bytes": nbytes}


def _read_safetensors_torch(path: str) -> Read:
    import torch
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    tensors = load_file(path)
    touched = 0
    for t in tensors.values():
        flat = t.reshape(-1).view(torch.uint8)  # contiguous: every 4 KiB of the range is one index
        if flat.numel():
            touched += int(flat[::PAGE].sum()) + int(flat[-1])
    seconds = time.perf_counter() - t0
    return seconds, sum(int(t.nbytes) for t in tensors.values()), len(tensors), (tensors, touched)


def _runai(path: str, clone: bool) -> Read:
    from runai_model_streamer import SafetensorsStreamer

    kept: list[Any] = []
    nbytes = count = 0
    t0 = time.perf_counter()
    with SafetensorsStreamer() as streamer:
        try:
            streamer.stream_file(path, owned=False)  # views into reused buffers (>= 0.17.1)
        except TypeError:  # older releases have no `owned`: they always yield reused buffers
            streamer.stream_file(path)
        for _name, tensor in streamer.get_tensors():
            nbytes += int(tensor.nbytes)
            count += 1
            if clone:
                kept.append(tensor.clone())
            del tensor  # the no-clone consumer lets go before asking for the next
    seconds = time.perf_counter() - t0
    return seconds, nbytes, count, kept


def _read_tensorizer(path: str) -> Read:
    from tensorizer import TensorDeserializer

    tz = tensorizer_path(path)
    if not tz.is_file():
        raise Unavailable(f"{tz.name} missing (the untimed TensorSerializer step failed)")
    t0 = time.perf_counter()
    tensors = TensorDeserializer(str(tz), device="cpu")  # lazy_load=False: reads every tensor here
    nbytes = sum(int(t.nbytes) for t in tensors.values())
    seconds = time.perf_counter() - t0
    return seconds, nbytes, len(tensors), tensors


READERS: dict[str, Callable[[str], Read]] = {
    "safetensors.torch": _read_safetensors_torch,
    "runai-clone": lambda p: _runai(p, clone=True),
    "runai-noclone": lambda p: _runai(p, clone=False),
    "tensorizer": _read_tensorizer,
}
