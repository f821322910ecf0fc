"""Compiled backends of top-k and dense attention as ``torch.library`` custom ops.

A backend registers a :class:`KernelSet` -- its fused scan kernel, and optionally its
own attend and dense kernels -- under a name. The custom ops ``kmem::search``,
``kmem::topk_attention`` and ``kmem::dense_attention`` (with their backward ops) take
that name as an argument, so autograd, fake tensors and ``torch.compile`` see one op
per operation whatever kernel serves it. Gradients are the kernels' own, never
autograd through them.

Kernel contracts (``queries [B, d]``, ``keys [N, d]``, ``values [N, V]`` or int64 labels
``[N]``, ``slot_ids [N]``, ``exclude_ids [B, E]`` or None; ``num_classes == 0`` means
vector values; results in the working dtype, float32 or float64):

* ``search(queries, keys, slot_ids, k, metric, exclude_ids) -> slots [B, k]`` int64,
  best first by (float32 score desc, slot asc), ``-1`` past the qualifying rows.
* ``attend_forward(queries, keys, values, slots, scale, metric, num_classes) -> (out, weights [B, k])``
* ``attend_backward(grad_out, queries, keys, values, slots, weights, scale, metric,
  num_classes, needs_keys, needs_values) -> (dq, dkeys [N, d], dvalues [N, V])`` --
  see :mod:`kmem.ops.composite`, which is the default for both; a gradient not needed
  may be None (or anything: it is dropped), which spares an ``[N, d]`` allocation.
* ``dense_forward(queries, keys, values, slot_ids, exclude_ids, scale, metric, num_classes) -> (out, lse [B])``
  and ``dense_backward(grad_out, queries, keys, values, slot_ids, exclude_ids, out, lse,
  scale, metric, num_classes, needs_keys, needs_values) -> (dq, dkeys, dvalues)``; ``lse`` is the
  log-sum-exp of ``scale * score`` over the attended rows (``-inf`` when none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import composite
from .reference import working_dtype


@dataclass(frozen=True)
class KernelSet:
    """The kernels one compiled backend brings (see the module docstring)."""

    search: Callable
    attend_forward: Callable = composite.attend_forward
    attend_backward: Callable = composite.attend_backward
    dense_forward: Callable | None = None
    dense_backward: Callable | None = None


KERNELS: dict[str, KernelSet] = {}


def register(name: str, kernels: KernelSet) -> None:
    KERNELS[name] = kernels


def _width(values: torch.Tensor, num_classes: int) -> int:
    return num_classes if num_classes else values.shape[1]


def _grads_like(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    grads: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    needs_keys: bool,
    needs_values: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cast kernel gradients to the inputs' dtypes; empty tensors stand for 'not needed'."""
    dq, dk, dv = grads
    return (
        dq.to(queries.dtype),
        dk.to(keys.dtype) if needs_keys and dk is not None else queries.new_empty(0),
        dv.to(values.dtype) if needs_values and dv is not None else queries.new_empty(0),
    )


# ------------------------------------------------------------------ search
@torch.library.custom_op("kmem::search", mutates_args=())
def search_op(
    queries: torch.Tensor,
    keys: torch.Tensor,
    slot_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None,
    k: int,
    metric: str,
    backend: str,
) -> torch.Tensor:
    return KERNELS[backend].search(queries, keys, slot_ids, k, metric, exclude_ids)


@search_op.register_fake
def _(queries, keys, slot_ids, exclude_ids, k, metric, backend):
    return queries.new_empty((queries.shape[0], k), dtype=torch.int64)


# ---------------------------------------------------------- top-k attention
@torch.library.custom_op("kmem::topk_attention", mutates_args=())
def topk_attention_op(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None,
    k: int,
    scale: float,
    metric: str,
    num_classes: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernels = KERNELS[backend]
    slots = kernels.search(queries, keys, slot_ids, k, metric, exclude_ids)
    out, weights = kernels.attend_forward(queries, keys, values, slots, scale, metric, num_classes)
    return out, slots, weights


@topk_attention_op.register_fake
def _(queries, keys, values, slot_ids, exclude_ids, k, scale, metric, num_classes, backend):
    dtype = working_dtype(queries, keys)
    batch = queries.shape[0]
    return (
        queries.new_empty((batch, _width(values, num_classes)), dtype=dtype),
        queries.new_empty((batch, k), dtype=torch.int64),
        queries.new_empty((batch, k), dtype=dtype),
    )


@torch.library.custom_op("kmem::topk_attention_backward", mutates_args=())
def topk_attention_backward_op(
    grad_out: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
    metric: str,
    num_classes: int,
    backend: str,
    needs_keys: bool,
    needs_values: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = KERNELS[backend].attend_backward(
        grad_out, queries, keys, values, slots, weights, scale, metric, num_classes, needs_keys, needs_values
    )
    return _grads_like(queries, keys, values, grads, needs_keys, needs_values)


@topk_attention_backward_op.register_fake
def _(
    grad_out,
    queries,
    keys,
    values,
    slots,
    weights,
    scale,
    metric,
    num_classes,
    backend,
    needs_keys,
    needs_values,
):
    return (
        torch.empty_like(queries),
        torch.empty_like(keys) if needs_keys else queries.new_empty(0),
        torch.empty_like(values) if needs_values and not num_classes else queries.new_empty(0),
    )


def _topk_setup(ctx, inputs, output):
    queries, keys, values, _, _, _, scale, metric, num_classes, backend = inputs
    _, slots, weights = output
    ctx.save_for_backward(queries, keys, values, slots, weights)
    ctx.config = (scale, metric, num_classes, backend)


def _topk_backward(ctx, grad_out, _grad_slots, _grad_weights):
    queries, keys, values, slots, weights = ctx.saved_tensors
    scale, metric, num_classes, backend = ctx.config
    needs_keys, needs_values = ctx.needs_input_grad[1], ctx.needs_input_grad[2] and not num_classes
    dq, dk, dv = topk_attention_backward_op(
        grad_out,
        queries,
        keys,
        values,
        slots,
        weights,
        scale,
        metric,
        num_classes,
        backend,
        needs_keys,
        needs_values,
    )
    return (
        dq,
        dk if needs_keys else None,
        dv if needs_values else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


topk_attention_op.register_autograd(_topk_backward, setup_context=_topk_setup)


# ----------------------------------------------------------- dense attention
@torch.library.custom_op("kmem::dense_attention", mutates_args=())
def dense_attention_op(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None,
    scale: float,
    metric: str,
    num_classes: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return KERNELS[backend].dense_forward(
        queries, keys, values, slot_ids, exclude_ids, scale, metric, num_classes
    )


@dense_attention_op.register_fake
def _(queries, keys, values, slot_ids, exclude_ids, scale, metric, num_classes, backend):
    dtype = working_dtype(queries, keys)
    batch = queries.shape[0]
    return (
        queries.new_empty((batch, _width(values, num_classes)), dtype=dtype),
        queries.new_empty((batch,), dtype=dtype),
    )


@torch.library.custom_op("kmem::dense_attention_backward", mutates_args=())
def dense_attention_backward_op(
    grad_out: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_ids: torch.Tensor,
    exclude_ids: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    metric: str,
    num_classes: int,
    backend: str,
    needs_keys: bool,
    needs_values: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = KERNELS[backend].dense_backward(
        grad_out,
        queries,
        keys,
        values,
        slot_ids,
        exclude_ids,
        out,
        lse,
        scale,
        metric,
        num_classes,
        needs_keys,
        needs_values,
    )
    return _grads_like(queries, keys, values, grads, needs_keys, needs_values)


@dense_attention_backward_op.register_fake
def _(
    grad_out,
    queries,
    keys,
    values,
    slot_ids,
    exclude_ids,
    out,
    lse,
    scale,
    metric,
    num_classes,
    backend,
    needs_keys,
    needs_values,
):
    return (
        torch.empty_like(queries),
        torch.empty_like(keys) if needs_keys else queries.new_empty(0),
        torch.empty_like(values) if needs_values and not num_classes else queries.new_empty(0),
    )


def _dense_setup(ctx, inputs, output):
    queries, keys, values, slot_ids, exclude_ids, scale, metric, num_classes, backend = inputs
    out, lse = output
    ctx.save_for_backward(queries, keys, values, slot_ids, exclude_ids, out, lse)
    ctx.config = (scale, metric, num_classes, backend)


def _dense_backward(ctx, grad_out, _grad_lse):
    queries, keys, values, slot_ids, exclude_ids, out, lse = ctx.saved_tensors
    scale, metric, num_classes, backend = ctx.config
    needs_keys, needs_values = ctx.needs_input_grad[1], ctx.needs_input_grad[2] and not num_classes
    dq, dk, dv = dense_attention_backward_op(
        grad_out,
        queries,
        keys,
        values,
        slot_ids,
        exclude_ids,
        out,
        lse,
        scale,
        metric,
        num_classes,
        backend,
        needs_keys,
        needs_values,
    )
    return dq, dk if needs_keys else None, dv if needs_values else None, None, None, None, None, None, None


dense_attention_op.register_autograd(_dense_backward, setup_context=_dense_setup)


# ------------------------------------------------- the functions dispatch runs
def searcher(backend: str) -> Callable:
    """``search`` with the signature of :func:`kmem.ops.reference.search_slots`."""

    def run(queries, keys, slot_ids, k, metric, exclude_ids):
        return search_op(queries, keys, slot_ids, exclude_ids, k, metric, backend)

    return run


def topk_attention(backend: str) -> Callable:
    """``topk_attention`` with the signature of :func:`kmem.ops.reference.topk_attention`."""

    def run(queries, keys, values, slot_ids, k, scale, metric, exclude_ids, num_classes):
        out, _, _ = topk_attention_op(
            queries, keys, values, slot_ids, exclude_ids, k, scale, metric, num_classes or 0, backend
        )
        return out

    return run


def dense_attention(backend: str) -> Callable:
    """``dense_attention`` with the signature of :func:`kmem.ops.reference.dense_attention`."""

    def run(queries, keys, values, slot_ids, scale, metric, exclude_ids, num_classes):
        out, _ = dense_attention_op(
            queries, keys, values, slot_ids, exclude_ids, scale, metric, num_classes or 0, backend
        )
        return out

    return run
