"""Argument checks shared by the memory, the ops and the layers.

Each check names the offending argument, raises before any state changes, and uses
``TypeError`` for a wrong dtype or kind and ``ValueError`` for a wrong shape, device
or value.
"""

from __future__ import annotations

import math

import torch

METRICS = ("ip", "l2")


def tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def floating(name: str, x: object) -> torch.Tensor:
    x = tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def int64(name: str, x: object) -> torch.Tensor:
    x = tensor(name, x)
    if x.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {x.dtype}")
    return x


def shape(name: str, x: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    """``expected`` lists the sizes, ``None`` for any size."""
    ok = x.dim() == len(expected) and all(e is None or s == e for s, e in zip(x.shape, expected, strict=True))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(x.shape)}")


def device(name: str, x: torch.Tensor, expected: torch.device) -> None:
    if x.device != expected:
        raise ValueError(f"{name} is on {x.device} but the memory is on {expected}")


def concrete(name: str, x: torch.Tensor) -> None:
    """For a tensor read on the host (ids): a meta tensor holds no values to read."""
    if x.device.type == "meta":
        raise ValueError(f"{name} is on meta: it holds no values to read")


def finite(name: str, x: torch.Tensor) -> None:
    """NaN/Inf check of a CPU tensor. Skipped off the CPU (on a GPU reading the answer
    would synchronise the host with the device on every call; meta tensors hold no
    values) and while torch.compile traces (a data-dependent branch breaks the graph)."""
    if not x.is_cpu or not x.numel() or torch.compiler.is_compiling():
        return
    # One reduction answers almost every call: a sum of finite values is finite unless it
    # overflows, and only then is the exact element-wise test needed (isfinite().all()
    # costs several ops: ~4x the sum on a read's few queries).
    if not math.isfinite(x.sum().item()) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def metric(value: str) -> str:
    if value not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {value!r}")
    return value


def k(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"k must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"k must be >= 1, got {value}")
    return value


def exclude_ids(x: object, batch: int, device_: torch.device) -> torch.Tensor | None:
    """``exclude_ids``: None or int64 ``[batch, E]``, -1 meaning no id."""
    if x is None:
        return None
    x = int64("exclude_ids", x)
    shape("exclude_ids", x, (batch, None))
    if x.device != device_:
        raise ValueError(f"exclude_ids is on {x.device} but queries are on {device_}")
    return x
