"""The CUDA backend (kernels in ``csrc/cuda``, bound in ``kmem._C`` by a CUDA build): its
kernels on records.

Importing this module never touches the GPU or the extension, so it works on CPU-only
builds too. The kernels compute in float32 (queries and gradients float32; keys and
vector values float32, float16 or bfloat16): :mod:`kmem.ops.backends` declares exactly
that, so a float64 call is never served here with float32 precision.
"""

from __future__ import annotations

import torch

from .. import _ext
from .inputs import AttendInputs, CompactInputs, DenseInputs, SearchInputs


def missing() -> str | None:
    """Why the CUDA backend cannot run in this process, or None when it can."""
    ext = _ext.compiled()
    if ext is None:
        return _ext.missing_reason()
    if not getattr(ext, "with_cuda", False):
        return (
            "kmem._C was built without its CUDA kernels (torch without CUDA, no CUDA toolkit, "
            "or KMEM_CUDA=0); rebuild with a CUDA torch and KMEM_CUDA=1"
        )
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    return None


def search(s: SearchInputs) -> torch.Tensor:
    return _ext.compiled().cuda_search(
        s.queries.detach(), s.keys.detach(), s.slot_ids, s.k, s.l2, s.exclude_ids
    )


def attend_forward(a: AttendInputs, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _ext.compiled().cuda_attend_forward(
        a.queries.detach(), a.keys.detach(), a.values.detach(), slots, a.scale, a.l2, a.num_classes
    )


def attend_backward(a: AttendInputs, slots, weights, grad_out, needs_keys: bool, needs_values: bool):
    return _ext.compiled().cuda_attend_backward(
        grad_out.detach(), a.queries.detach(), a.keys.detach(), a.values.detach(), slots, weights.detach(),
        a.scale, a.l2, a.num_classes, needs_keys, needs_values,
    )  # fmt: skip


def dense_forward(d: DenseInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return _ext.compiled().cuda_dense_forward(
        d.queries.detach(), d.keys.detach(), d.values.detach(), d.slot_ids, d.exclude_ids,
        d.scale, d.l2, d.num_classes,
    )  # fmt: skip


def dense_backward(d: DenseInputs, out, lse, grad_out, grad_lse, needs_keys: bool, needs_values: bool):
    return _ext.compiled().cuda_dense_backward(
        grad_out.detach(), d.queries.detach(), d.keys.detach(), d.values.detach(), d.slot_ids, d.exclude_ids,
        out.detach(), lse.detach(), grad_lse.detach(), d.scale, d.l2, d.num_classes, needs_keys, needs_values,
    )  # fmt: skip


def compact_rows(c: CompactInputs) -> int:
    """Stable compaction on the GPU; returns the rows kept."""
    return _ext.compiled().cuda_compact_rows(c.src, c.keep, c.out)
