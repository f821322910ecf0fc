"""Functional ops of kmem: top-k search, top-k/dense attention, stable compaction and
the scrub of deleted rows.

Each op takes a ``backend`` argument: ``"auto"`` picks the first backend that can run
the call; a name (``"reference"``, ``"cpp"``, ...) runs exactly that backend or raises
:class:`BackendUnavailable` with the reasons. :data:`OPS` lists every op's backends.
"""

from __future__ import annotations

import math

import torch

from .. import _checks
from . import cpu, cuda, fused, reference, triton_backend
from .dispatch import Backend, BackendUnavailable, Op

__all__ = [
    "OPS",
    "BackendUnavailable",
    "compact_rows",
    "search",
    "topk_attention",
    "zero_rows",
]


_ANY_DEVICE = frozenset({"cpu", "cuda"})
_CPU = frozenset({"cpu"})
_CUDA = frozenset({"cuda"})
_KEY_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16, torch.float16})

OPS: dict[str, Op] = {
    name: Op(name) for name in ("compact_rows", "zero_rows", "search", "topk_attention", "dense_attention")
}


def _register_fused(
    name: str, devices: frozenset[str], missing, wrap=None, dense_dtypes: frozenset[torch.dtype] = _KEY_DTYPES
) -> None:
    """Register a KernelSet backend for search, top-k and dense attention, in that order of
    priority after the backends already registered. ``wrap`` turns one of fused's op
    factories into the callable (default: ``factory(name)``); ``dense_dtypes`` are the
    working dtypes its dense attention serves."""
    for op, factory, dtypes in (
        ("search", fused.searcher, _KEY_DTYPES),
        ("topk_attention", fused.topk_attention, _KEY_DTYPES),
        ("dense_attention", fused.dense_attention, dense_dtypes),
    ):
        fn = wrap(factory) if wrap else factory(name)
        OPS[op].register(Backend(name, fn, devices, dtypes, missing))


fused.register("cpp", cpu.KERNELS)
OPS["compact_rows"].register(Backend("cpp", cpu.compact_rows, _CPU, missing=cpu.missing))
OPS["zero_rows"].register(Backend("cpp", cpu.zero_rows, _CPU, missing=cpu.missing))
_register_fused("cpp", _CPU, cpu.missing)
# On a GPU the hand-written CUDA kernels come before Triton's: they are tuned per
# architecture, Triton's are portable (and the only compiled path under its interpreter).
fused.register("cuda", cuda.KERNELS)
# Its dense kernels compute in float32 only: float64 goes to a backend that keeps it.
_register_fused("cuda", _CUDA, cuda.missing, dense_dtypes=_KEY_DTYPES - {torch.float64})
OPS["compact_rows"].register(Backend("cuda", cuda.compact_rows, _CUDA, missing=cuda.missing))
_register_fused("triton", triton_backend.devices(), triton_backend.missing, triton_backend.lazily)
OPS["compact_rows"].register(
    Backend("triton", triton_backend.compact_rows, triton_backend.devices(), missing=triton_backend.missing)
)

OPS["compact_rows"].register(Backend("reference", reference.compact_rows, _ANY_DEVICE))
OPS["zero_rows"].register(Backend("reference", reference.zero_rows, _ANY_DEVICE))
OPS["search"].register(Backend("reference", reference.search_slots, _ANY_DEVICE))
OPS["topk_attention"].register(Backend("reference", reference.topk_attention, _ANY_DEVICE))
OPS["dense_attention"].register(Backend("reference", reference.dense_attention, _ANY_DEVICE))


def _check_memory(queries, keys, slot_ids) -> None:
    _checks.floating("queries", queries)
    _checks.floating("keys", keys)
    _checks.int64("slot_ids", slot_ids)
    _checks.shape("queries", queries, (None, None))
    _checks.shape("keys", keys, (None, queries.shape[1]))
    _checks.shape("slot_ids", slot_ids, (keys.shape[0],))
    for name, t in (("keys", keys), ("slot_ids", slot_ids)):
        if t.device != queries.device:
            raise ValueError(f"{name} is on {t.device} but queries are on {queries.device}")
    _checks.finite("queries", queries)


def search(
    queries: torch.Tensor,
    keys: torch.Tensor,
    slot_ids: torch.Tensor,
    k: int,
    *,
    metric: str = "ip",
    exclude_ids: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` live rows per query.

    Args:
        queries: ``[B, d]`` floating.
        keys: ``[N, d]`` floating (any float dtype; scored in float32 or float64).
        slot_ids: ``[N]`` int64, ``-1`` for an empty or deleted slot.
        k: rows per query, ``>= 1``.
        metric: ``"ip"`` (``q . k``) or ``"l2"`` (``-||q - k||^2``).
        exclude_ids: ``[B, E]`` int64 ids to skip per query, ``-1`` = none.

    Returns:
        ``(scores [B, k], slots [B, k])`` best first; ``-inf`` / ``-1`` where fewer than
        ``k`` rows qualify. Scores are not differentiable here; use
        :func:`topk_attention` for gradients.
    """
    _check_memory(queries, keys, slot_ids)
    k = _checks.k(k)
    _checks.metric(metric)
    exclude_ids = _checks.exclude_ids(exclude_ids, queries.shape[0], queries.device)
    impl = OPS["search"].select(backend, queries.device, keys.dtype)
    slots = impl.fn(queries, keys, slot_ids, k, metric, exclude_ids)
    with torch.no_grad():
        scores = reference.gather_scores(queries, keys, slots, metric)
    return scores, slots


def topk_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_ids: torch.Tensor,
    k: int | None = 32,
    *,
    scale: float | None = None,
    metric: str = "ip",
    exclude_ids: torch.Tensor | None = None,
    num_classes: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of each query over its top-``k`` live rows (``k=None``: all live rows).

    ``out[b] = sum_j softmax_j(scale * score(q_b, k_j)) * v_j`` over the selected rows.

    Args:
        queries: ``[B, d]`` floating.
        keys: ``[N, d]`` floating.
        values: ``[N, V]`` floating, or ``[N]`` int64 class labels with ``num_classes``.
        slot_ids: ``[N]`` int64, ``-1`` for an empty or deleted slot.
        k: rows per query (``>= 1``) or None for dense attention over every live row.
        scale: multiplies scores before the softmax; default ``1/sqrt(d)``.
        metric, exclude_ids: as in :func:`search`.
        num_classes: set for label values; the result is then class probabilities.

    Returns:
        ``[B, V]`` (or ``[B, num_classes]``) in float32 (float64 if an input is float64);
        zeros for a query with no qualifying row. Differentiable in queries, keys and
        values; only retrieved rows get gradient.
    """
    _check_memory(queries, keys, slot_ids)
    _checks.metric(metric)
    if num_classes is None:
        _checks.floating("values", values)
        _checks.shape("values", values, (keys.shape[0], None))
    else:
        _checks.int64("values", values)
        _checks.shape("values", values, (keys.shape[0],))
    if values.device != queries.device:
        raise ValueError(f"values is on {values.device} but queries are on {queries.device}")
    exclude_ids = _checks.exclude_ids(exclude_ids, queries.shape[0], queries.device)
    scale = 1.0 / math.sqrt(queries.shape[1]) if scale is None else float(scale)
    if k is None:
        impl = OPS["dense_attention"].select(backend, queries.device, reference.working_dtype(queries, keys))
        return impl.fn(queries, keys, values, slot_ids, scale, metric, exclude_ids, num_classes)
    k = _checks.k(k)
    impl = OPS["topk_attention"].select(backend, queries.device, keys.dtype)
    return impl.fn(queries, keys, values, slot_ids, k, scale, metric, exclude_ids, num_classes)


def compact_rows(src: torch.Tensor, keep: torch.Tensor, out: torch.Tensor, *, backend: str = "auto") -> int:
    """Copy the rows of ``src [N, ...]`` where ``keep [N]`` (bool) is true, in order, to
    ``out[:n]``; returns ``n``. ``out`` has ``src``'s dtype and row shape, ``>= n`` rows."""
    _checks.tensor("src", src)
    _checks.tensor("out", out)
    _checks.tensor("keep", keep)
    if keep.dtype != torch.bool:
        raise TypeError(f"keep must be bool, got {keep.dtype}")
    _checks.shape("keep", keep, (src.shape[0],))
    if out.dtype != src.dtype or out.shape[1:] != src.shape[1:]:
        raise ValueError(f"out must have src's dtype and row shape, got {out.dtype} {list(out.shape)}")
    impl = OPS["compact_rows"].select(backend, src.device, src.dtype)
    return impl.fn(src.contiguous(), keep.contiguous(), out)


def zero_rows(dst: torch.Tensor, rows: torch.Tensor, *, backend: str = "auto") -> None:
    """Overwrite the bytes of rows ``rows`` (int64 ``[n]``, in ``[0, N)``) of the contiguous
    ``dst [N, ...]`` with zeros, in place: the scrub of deleted rows."""
    _checks.tensor("dst", dst)
    _checks.int64("rows", rows)
    _checks.shape("rows", rows, (None,))
    if dst.dim() < 1 or not dst.is_contiguous():
        raise ValueError(f"dst must be a contiguous tensor of rows, got shape {list(dst.shape)}")
    if rows.device != dst.device:
        raise ValueError(f"rows is on {rows.device} but dst is on {dst.device}")
    if len(rows) and not bool(((rows >= 0) & (rows < dst.shape[0])).all()):
        raise IndexError(f"rows must lie in [0, {dst.shape[0]})")
    impl = OPS["zero_rows"].select(backend, dst.device, dst.dtype)
    impl.fn(dst, rows.contiguous())
