"""The C++ CPU backend (``kmem._C``, built from ``csrc/cpu``): its kernels on records.

What each kernel serves is declared in :mod:`kmem.ops.backends`; nothing here hands a
call to another backend. Search scores in float32 whatever the keys' dtype (the ranking
contract of every backend), so float64 keys are read as float32 there.
"""

from __future__ import annotations

import torch

from .. import _ext
from .inputs import AttendInputs, CompactInputs, DenseInputs, ScrubInputs, SearchInputs


def missing() -> str | None:
    """Why the C++ backend cannot run, or None."""
    return _ext.missing_reason()


def search(s: SearchInputs) -> torch.Tensor:
    keys = s.keys.float() if s.keys.dtype == torch.float64 else s.keys
    return _ext.compiled().search(s.queries.detach(), keys.detach(), s.slot_ids, s.k, s.l2, s.exclude_ids)


def attend_forward(a: AttendInputs, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _ext.compiled().attend_forward(
        a.queries.detach(), a.keys.detach(), a.values.detach(), slots, a.scale, a.l2, a.num_classes
    )


def attend_backward(a: AttendInputs, slots, weights, grad_out, needs_keys: bool, needs_values: bool):
    return _ext.compiled().attend_backward(
        grad_out, a.queries.detach(), a.keys.detach(), a.values.detach(), slots, weights,
        a.scale, a.l2, a.num_classes, needs_keys, needs_values,
    )  # fmt: skip


def dense_forward(d: DenseInputs) -> tuple[torch.Tensor, torch.Tensor]:
    return _ext.compiled().dense_forward(
        d.queries.detach(), d.keys.detach(), d.values.detach(), d.slot_ids, d.exclude_ids,
        d.scale, d.l2, d.num_classes,
    )  # fmt: skip


def dense_backward(d: DenseInputs, out, lse, grad_out, grad_lse, needs_keys: bool, needs_values: bool):
    return _ext.compiled().dense_backward(
        grad_out, d.queries.detach(), d.keys.detach(), d.values.detach(), d.slot_ids, d.exclude_ids,
        out, lse, grad_lse, d.scale, d.l2, d.num_classes, needs_keys, needs_values,
    )  # fmt: skip


def compact_rows(c: CompactInputs) -> int:
    return _ext.compiled().compact_rows(c.src, c.keep, c.out)


def zero_rows(z: ScrubInputs) -> None:
    _ext.compiled().zero_rows(z.dst, z.rows)
