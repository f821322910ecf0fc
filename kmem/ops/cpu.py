"""The C++ CPU backend (kmem._C): its kernels in the :class:`~kmem.ops.fused.KernelSet` form."""

from __future__ import annotations

import torch

from .. import _ext
from .fused import KernelSet


def missing() -> str | None:
    """Why the C++ backend cannot run, or None."""
    return _ext.missing_reason()


def search(queries, keys, slot_ids, k, metric, exclude_ids):
    # Ranking is by float32 score in every backend, so float64 keys are scored as float32.
    if keys.dtype == torch.float64:
        keys = keys.float()
    return _ext.compiled().search(queries.detach(), keys.detach(), slot_ids, k, metric == "l2", exclude_ids)


def compact_rows(src: torch.Tensor, keep: torch.Tensor, out: torch.Tensor) -> int:
    return _ext.compiled().compact_rows(src, keep, out)


KERNELS = KernelSet(search=search)
