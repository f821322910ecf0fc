"""The cheap half of top-k attention, written once in PyTorch with explicit gradients.

After a backend's scan has chosen ``slots [B, k]``, the rest touches only ``B * k``
rows: score them, softmax, weight their values. These functions do that with the
backward pass spelled out (no autograd graph): the specification, formula for formula,
of every compiled backend's ``attend_forward`` / ``attend_backward`` kernels
(:mod:`kmem.ops.custom`), which the tests hold them to.

Shapes: ``queries [B, d]``, ``keys [N, d]``, ``values [N, V]`` or int64 labels ``[N]``,
``slots [B, k]`` int64 (``-1`` = no row), ``weights [B, k]``. The working dtype is
float32, or float64 when an input is float64.
"""

from __future__ import annotations

import torch

from .inputs import AttendGrads, AttendInputs, Grads
from .reference import gather_scores, masked_softmax, take_rows


def attend_forward(a: AttendInputs, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, W], weights [B, k])``: softmax(scale * score) over the slots, then the
    weighted sum of values (``num_classes == 0``) or class probabilities (``W = num_classes``)."""
    weights = masked_softmax(a.scale * gather_scores(a.queries, a.keys, slots, a.metric), slots >= 0)
    if not a.labels:
        out = torch.einsum("bk,bkv->bv", weights, take_rows(a.values, slots).to(weights.dtype))
    else:
        out = weights.new_zeros(weights.shape[0], a.width).scatter_add_(
            1, take_rows(a.values, slots), weights
        )
    return out, weights


def attend_backward(g: AttendGrads) -> Grads:
    """Gradients ``(d queries [B, d], d keys [N, d], d values [N, V])``; a gradient that is
    not needed, and d values of a label memory, are None.

    With ``w = softmax(z)``, ``z = scale * s``: ``dw_j = g . v_j``,
    ``dz_j = w_j (dw_j - g . out)``; for ``ip`` ``dq = scale * sum_j dz_j k_j`` and
    ``dk_j += scale * dz_j q``; for ``l2`` (``s = -||q - k||^2``)
    ``dq = -2 scale * sum_j dz_j (q - k_j)`` and ``dk_j += 2 scale * dz_j (q - k_j)``;
    ``dv_j += w_j g``. Only retrieved rows receive gradient; where ``g.per_retrieval``
    the ``dk_j`` and ``dv_j`` come back as they are, ``[B * k, ...]`` (no sum over rows).
    """
    a, slots, weights = g.inputs, g.slots, g.weights
    keys, values, scale, num_classes = a.keys, a.values, a.scale, a.num_classes
    dtype = a.working_dtype
    grad = g.grad_out.to(dtype)
    q = a.queries.to(dtype)
    valid = slots >= 0
    rows = take_rows(keys, slots).to(dtype)  # [B, k, d]
    if num_classes == 0:
        vals = take_rows(values, slots).to(dtype)  # [B, k, V]
        dw = torch.einsum("bv,bkv->bk", grad, vals)
    else:
        dw = torch.gather(grad, 1, take_rows(values, slots))
    dz = weights * (dw - (weights * dw).sum(1, keepdim=True)) * valid
    ds = scale * dz
    flat = slots.clamp(min=0).reshape(-1)
    if a.metric == "ip":
        dq = torch.einsum("bk,bkd->bd", ds, rows)
        row_grads = ds[..., None] * q[:, None, :]
    else:
        diff = q[:, None, :] - rows
        dq = -2 * torch.einsum("bk,bkd->bd", ds, diff)
        row_grads = 2 * ds[..., None] * diff
    dkeys = dvalues = None
    if g.needs_keys:
        dkeys = _rows(g, (row_grads * valid[..., None]).reshape(-1, keys.shape[1]), flat, keys)
    if g.needs_values and num_classes == 0:
        contrib = (weights * valid)[..., None] * grad[:, None, :]
        dvalues = _rows(g, contrib.reshape(-1, values.shape[1]), flat, values)
    return dq, dkeys, dvalues


def _rows(g: AttendGrads, shares: torch.Tensor, flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-retrieval ``shares [B * k, ...]`` as they are (``g.per_retrieval``), or summed
    into the rows ``flat [B * k]`` of a zero gradient shaped like ``like [N, ...]``."""
    if g.per_retrieval:
        return shares
    return torch.zeros(like.shape, dtype=shares.dtype, device=like.device).index_add_(0, flat, shares)
