"""Functional ops of kmem: top-k search, top-k/dense attention, stable compaction and
the scrub of deleted rows.

Each op checks its arguments once, into a record (:mod:`kmem.ops.inputs`), and takes
a ``backend`` argument: ``"auto"`` picks the first backend that serves the call, the
reference twin last; a name (``"reference"``, ``"cpp"``, ``"cuda"``, ``"triton"``) runs
exactly that backend's own kernels or raises :class:`BackendUnavailable` with the
reasons. :func:`explain` shows the choice for a call; :data:`REGISTRY` holds every
backend and what it declares to serve (:mod:`kmem.ops.backends`); :func:`trace`
records what served the calls inside a block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import backends as _backends  # noqa: F401  (registers every backend)
from . import reference
from .inputs import (
    AttendGrads,
    AttendInputs,
    CompactInputs,
    DenseGrads,
    DenseInputs,
    ScrubInputs,
    SearchInputs,
    attention_inputs,
)
from .registry import REGISTRY, BackendUnavailable, Plan, trace

__all__ = [
    "REGISTRY",
    "AttendGrads",
    "AttendInputs",
    "BackendUnavailable",
    "CompactInputs",
    "DenseGrads",
    "DenseInputs",
    "Plan",
    "ScrubInputs",
    "SearchInputs",
    "attention_inputs",
    "compact_rows",
    "explain",
    "run",
    "run_search",
    "search",
    "topk_attention",
    "trace",
    "zero_rows",
]


def run(inputs, backend: str = "auto"):
    """Run the op of record ``inputs`` (already valid: no checks here) on ``backend``.

    Returns what that op's backends return: slots ``[B, k]`` for a search, the output
    for top-k attention, ``(out, lse)`` for dense attention, the rows kept for a
    compaction, None for a scrub."""
    return REGISTRY.select(inputs.op, inputs, backend).run[inputs.op](inputs)


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
        keys: ``[N, d]`` floating (any float dtype; ranked by the float32 score).
        slot_ids: ``[N]`` int64, ``-1`` for an empty or deleted slot.
        k: rows per query, ``>= 1``.
        metric: ``"ip"`` (``q . k``) or ``"l2"`` (``-||q - k||^2``).
        exclude_ids: ``[B, E]`` int64 ids to skip per query, ``-1`` = none.

    Returns:
        ``(scores [B, k] float32, slots [B, k] int64)`` best first; ``-inf`` / ``-1``
        where fewer than ``k`` rows qualify. An ip score is the float32 score the row
        was ranked by; an l2 score is ``-||q - k||^2`` recomputed for the chosen row.
        Scores are not differentiable here; use :func:`topk_attention` for gradients.
    """
    return run_search(SearchInputs.checked(queries, keys, slot_ids, k, metric, exclude_ids), backend)


def run_search(s: SearchInputs, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`search` of a record already valid: ``(scores [B, k], slots [B, k])``."""
    scores, slots = run(s, backend)
    if s.l2:
        # The kernels rank by 2 q.k - ||k||^2; subtracting ||q||^2 would lose a near
        # neighbour's small distance to cancellation, so the chosen rows are rescored.
        with torch.no_grad():
            scores = reference.gather_scores(s.queries, s.keys, slots, s.metric).float()
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
    return_lse: bool = False,
    sparse_grad: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        return_lse: dense attention only: also return the log-sum-exp ``[B]`` of
            ``scale * score`` over the attended rows (``-inf`` for none), e.g. to merge
            partial results; differentiable like the output.
        sparse_grad: top-k attention only: the gradients of ``keys`` and ``values``
            are sparse COO tensors over the ``B * k`` retrieved rows (uncoalesced, as
            ``nn.Embedding(sparse=True)``'s), so a backward costs ``O(B k d)``, not a
            zero-filled ``[N, d]``. Use with an optimiser that takes sparse gradients
            (``torch.optim.SGD``, ``SparseAdam``, ``Adagrad``).

    Returns:
        ``[B, V]`` (or ``[B, num_classes]``) in float32 (float64 if the queries or keys
        are float64); zeros for a query with no qualifying row. Differentiable in
        queries, keys and values; only retrieved rows get gradient.
    """
    if return_lse and k is not None:
        raise ValueError("return_lse is for dense attention (k=None)")
    out = run(
        attention_inputs(
            queries, keys, values, slot_ids, k, scale, metric, exclude_ids, num_classes, sparse_grad
        ),
        backend,
    )
    if k is None:  # dense attention returns (out, lse)
        return out if return_lse else out[0]
    return out


def compact_rows(
    src: torch.Tensor | Sequence[torch.Tensor],
    keep: torch.Tensor,
    out: torch.Tensor | Sequence[torch.Tensor],
    *,
    backend: str = "auto",
) -> int:
    """Copy the rows of ``src [N, ...]`` where ``keep [N]`` (bool) is true, in order, to
    ``out[:n]``; returns ``n``. ``out`` has ``src``'s dtype and row shape, ``>= n`` rows.

    ``src`` and ``out`` may be equally long sequences of buffers (a memory's keys,
    values and ids): ``keep`` is then scanned once for all of them."""
    return run(CompactInputs.checked(src, keep, out), backend)


def zero_rows(dst: torch.Tensor, rows: torch.Tensor, *, backend: str = "auto") -> None:
    """Overwrite the bytes of rows ``rows`` (int64 ``[n]``, in ``[0, N)``) of the contiguous
    ``dst [N, ...]`` with zeros, in place: the scrub of deleted rows."""
    run(ScrubInputs.checked(dst, rows), backend)


def explain(op: str, *args, **kwargs) -> Plan:
    """What ``backend="auto"`` does with the call ``op(*args, **kwargs)`` (``op``: the name
    of one of this module's ops; ``topk_attention`` with ``k=None`` is dense attention):
    the backend chosen and why each one ahead of it cannot serve it. Prints well.

    >>> import torch, kmem
    >>> q, keys = torch.randn(2, 8, dtype=torch.float64), torch.randn(50, 8, dtype=torch.float64)
    >>> plan = kmem.ops.explain("topk_attention", q, keys, torch.randn(50, 3), torch.arange(50), k=4)
    >>> plan.chosen
    'reference'
    """
    builders = {
        "search": SearchInputs.checked,
        "topk_attention": attention_inputs,
        "compact_rows": CompactInputs.checked,
        "zero_rows": ScrubInputs.checked,
    }
    if op not in builders:
        raise ValueError(f"explain: unknown op {op!r}; choose from {sorted(builders)}")
    kwargs.pop("backend", None)
    kwargs.pop("return_lse", None)
    inputs = builders[op](*args, **kwargs)
    return REGISTRY.plan(inputs.op, inputs)
