"""The C++ CPU backend (kmem._C): its kernels in the :class:`~kmem.ops.fused.KernelSet` form."""

from __future__ import annotations

import torch

from .. import _ext
from . import composite
from .fused import KernelSet

_ROW_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def missing() -> str | None:
    """Why the C++ backend cannot run, or None."""
    return _ext.missing_reason()


def search(queries, keys, slot_ids, k, metric, exclude_ids):
    # Ranking is by float32 score in every backend, so float64 keys are scored as float32.
    if keys.dtype == torch.float64:
        keys = keys.float()
    return _ext.compiled().search(queries.detach(), keys.detach(), slot_ids, k, metric == "l2", exclude_ids)


def _rows_in_kernel_dtypes(queries, keys, values, num_classes) -> bool:
    """The C++ top-k attend kernels work in float32 on keys and vector values stored
    alike in float32/bfloat16/float16; other combinations (float64 inputs, mixed
    key/value dtypes) take the PyTorch composite step after the C++ search."""
    same_rows = num_classes or values.dtype == keys.dtype
    return queries.dtype != torch.float64 and keys.dtype in _ROW_DTYPES and bool(same_rows)


def attend_forward(queries, keys, values, slots, scale, metric, num_classes):
    if not _rows_in_kernel_dtypes(queries, keys, values, num_classes):
        return composite.attend_forward(queries, keys, values, slots, scale, metric, num_classes)
    return _ext.compiled().attend_forward(queries, keys, values, slots, scale, metric == "l2", num_classes)


def attend_backward(grad_out, queries, keys, values, slots, weights, scale, metric, num_classes, *needs):
    if not _rows_in_kernel_dtypes(queries, keys, values, num_classes):
        return composite.attend_backward(
            grad_out, queries, keys, values, slots, weights, scale, metric, num_classes, *needs
        )
    return _ext.compiled().attend_backward(
        grad_out, queries, keys, values, slots, weights, scale, metric == "l2", num_classes, *needs
    )


def dense_forward(queries, keys, values, slot_ids, exclude_ids, scale, metric, num_classes):
    return _ext.compiled().dense_forward(
        queries, keys, values, slot_ids, exclude_ids, scale, metric == "l2", num_classes
    )


def dense_backward(
    grad_out, queries, keys, values, slot_ids, exclude_ids, out, lse, scale, metric, num_classes, *needs
):
    return _ext.compiled().dense_backward(
        grad_out,
        queries,
        keys,
        values,
        slot_ids,
        exclude_ids,
        out,
        lse,
        scale,
        metric == "l2",
        num_classes,
        *needs,
    )


def compact_rows(src: torch.Tensor, keep: torch.Tensor, out: torch.Tensor) -> int:
    return _ext.compiled().compact_rows(src, keep, out)


def zero_rows(dst: torch.Tensor, rows: torch.Tensor) -> None:
    _ext.compiled().zero_rows(dst, rows)


KERNELS = KernelSet(search, attend_forward, attend_backward, dense_forward, dense_backward)
