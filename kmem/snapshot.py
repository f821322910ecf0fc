"""Snapshot files: safetensors tensors plus a JSON settings record, written atomically.

The ``fmt`` string in the metadata tells what a file holds (a memory, cached features).
A snapshot is a safetensors file, written here (one streaming pass, no serialised
copy in memory) to a temporary file in the target's folder, flushed to disk and
renamed over the target, so a reader sees the old file or the new one, never a torn
one -- even if the writing process is killed. A temporary file left by a killed
writer is removed by the next :func:`write` to the same target. The metadata holds a
SHA-256 of every tensor's bytes and of the settings, so a file corrupted after it was
written is rejected on :func:`read`. Reading never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

FORMAT = "kmem.KeyMemory"
FORMAT_VERSION = 2  # 2: checksums and the memory's version counter

# One writer at a time in this process: a write removes temporary files of the same
# target that it takes for leftovers of a killed writer.
_WRITE_LOCK = threading.Lock()


# safetensors' names of the dtypes a snapshot holds.
_DTYPE_NAMES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}


def _raw(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 array, in place for a contiguous CPU tensor."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def checksum(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's bytes."""
    return hashlib.sha256(memoryview(_raw(t))).hexdigest()


def _text_checksum(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write(path: str | Path, tensors: dict[str, torch.Tensor], config: dict, fmt: str = FORMAT) -> None:
    """Atomically write ``tensors`` and ``config`` (JSON-able) to ``path`` as format ``fmt``."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    config_json = json.dumps(config, sort_keys=True)
    sums = {name: checksum(t) for name, t in tensors.items()}
    meta = {
        "format": fmt,
        "format_version": str(FORMAT_VERSION),
        "config": config_json,
        "checksums": json.dumps({**sums, "config": _text_checksum(config_json)}, sort_keys=True),
    }
    with _WRITE_LOCK:
        _remove_leftovers(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                _write_safetensors(f, tensors, meta)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


def _write_safetensors(f: BinaryIO, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors layout: u64 header length, JSON header padded with spaces to 8
    bytes, then each tensor's bytes. (safetensors' own writer goes through a temporary
    file of its own, which a killed process would leave behind unnamed.)"""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)) + raw)
    for t in tensors.values():
        f.write(memoryview(_raw(t)))


def _remove_leftovers(path: Path) -> None:
    """Delete temporary files a killed :func:`write` to ``path`` left behind: they may
    hold rows deleted since."""
    prefix = f".{path.name}."
    for entry in path.parent.iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
            entry.unlink(missing_ok=True)


def _settings(meta: dict[str, str], path: Path, fmt: str) -> tuple[dict, dict]:
    """``(config, checksums)`` of a snapshot's metadata after checking its format, its
    version and the settings' checksum."""
    if meta.get("format") != fmt:
        raise ValueError(f"{path} is not a kmem snapshot of {fmt} (format {meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} has snapshot format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    sums = json.loads(meta["checksums"])
    config_json = meta["config"]
    if not isinstance(sums, dict) or sums.get("config") != _text_checksum(config_json):
        raise ValueError(f"{path} is corrupted: its settings do not match their checksum")
    config = json.loads(config_json)
    if not isinstance(config, dict):
        raise ValueError(f"{path} is corrupted: its settings are not a JSON object")
    return config, sums


def read_config(path: str | Path, fmt: str = FORMAT) -> dict:
    """The settings of the snapshot at ``path`` (checked, tensors not read): what a reader
    needs to know which tensors to expect. Errors as :func:`read`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return _settings(f.metadata() or {}, path, fmt)[0]
    except (SafetensorError, json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{path} is not a readable kmem snapshot: {err}") from err


def read(
    path: str | Path, expected: tuple[str, ...], fmt: str = FORMAT
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a snapshot of format ``fmt`` holding exactly the tensors ``expected``; returns
    them and the settings. ``ValueError`` when the file is not a complete, intact kmem snapshot."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            config, sums = _settings(f.metadata() or {}, path, fmt)
            names = set(f.keys())
            if names != set(expected):
                raise ValueError(f"{path} holds tensors {sorted(names)}, expected {sorted(expected)}")
            tensors = {}
            for name in expected:
                tensors[name] = f.get_tensor(name)
                if sums.get(name) != checksum(tensors[name]):
                    raise ValueError(f"{path} is corrupted: tensor {name!r} does not match its checksum")
    except (SafetensorError, json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{path} is not a readable kmem snapshot: {err}") from err
    return tensors, config
