"""What a memory's rows are made of, shared by :class:`~kmem.KeyMemory` and
:class:`~kmem.ShardedKeyMemory`: the row dtypes, the checked cast of keys and values,
ids as lists or tensors, and the settings a snapshot holds."""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch

from . import _checks

IdsLike = torch.Tensor | Iterable[int] | int
# The settings a KeyMemory snapshot holds (a sharded one adds its own).
SNAPSHOT_KEYS = {"key_dim", "value_dim", "num_classes", "metric", "dtype", "compact_threshold", "version"}
DTYPES = {
    str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
}


def cast(name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (finite, checked) as ``dtype``; ``ValueError`` where a value overflows it."""
    out = x.detach().to(dtype)
    if out.dtype != x.dtype and out.numel() and not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} overflows {dtype}: magnitudes must stay below {torch.finfo(dtype).max:g}")
    return out


def id_list(name: str, ids: IdsLike) -> list[int]:
    """Ids as a list of ints: from an int64 tensor (scalar or 1-D), an int, or an
    iterable of ints (numpy integers included; bools and floats are refused)."""
    if isinstance(ids, torch.Tensor):
        _checks.int64(name, ids)
        _checks.concrete(name, ids)
        if ids.dim() > 1:
            raise ValueError(f"{name} must be a scalar or 1-D, got shape {list(ids.shape)}")
        return ids.reshape(-1).tolist()
    if isinstance(ids, int) and not isinstance(ids, bool):
        return [ids]
    try:
        return [_index(i) for i in ids]
    except TypeError:
        raise TypeError(f"{name} must be an int64 tensor, an int or an iterable of ints") from None


def id_tensor(name: str, ids: IdsLike) -> torch.Tensor:
    """Ids as int64 ``[n]`` (a tensor's own device, else CPU), from what :func:`id_list`
    takes; a tensor is only reshaped, not copied to a list. ``KeyError`` for an int
    beyond int64: it can be no row's id."""
    if isinstance(ids, torch.Tensor):
        _checks.int64(name, ids)
        _checks.concrete(name, ids)
        if ids.dim() > 1:
            raise ValueError(f"{name} must be a scalar or 1-D, got shape {list(ids.shape)}")
        return ids.reshape(-1)
    as_list = id_list(name, ids)
    if beyond := [i for i in as_list if not -(2**63) <= i < 2**63]:
        raise KeyError(f"{name} {beyond[:5]} beyond int64 are no row's ids; nothing was changed")
    return torch.tensor(as_list, dtype=torch.int64)


def _index(i: object) -> int:
    if isinstance(i, bool):
        raise TypeError("bool is not an id")
    return operator.index(i)
