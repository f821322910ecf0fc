"""Triton attend step of top-k attention: gather the chosen rows, softmax, weight the values.

One program per query (times a column block of the output); the ``k`` slots, the key
dimension and the value width are streamed in blocks. Follows
:mod:`kmem.ops.composite` formula for formula; the working dtype is float32, or
float64 when queries or keys are float64 (the kernels are generic over it; ``scale``
enters them as a float32 argument either way, as Triton passes Python floats).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kmem.ops.inputs import AttendGrads, AttendInputs, Grads

from ._common import launch, load_rows, pow2, span, store_rows, tl_dtype

_BLOCK_K = 64  # slots per step
_BLOCK_D = 32  # key columns per step
_BLOCK_V = 32  # value / class columns per program


@triton.jit
def _slot_logits(
    q_ptr,
    k_ptr,
    slots_ptr,
    b,
    k0,
    scale,
    K,
    D,
    L2: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``(scale * score [BLOCK_K] (-inf where no row), slots [BLOCK_K], valid [BLOCK_K])``
    for slots ``k0 .. k0 + BLOCK_K`` of query ``b``."""
    offs = k0 + tl.arange(0, BLOCK_K)
    slot = tl.load(slots_ptr + b * K + offs, mask=offs < K, other=-1)
    valid = slot >= 0
    s = tl.zeros([BLOCK_K], DT)
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        d_ok = dc < D
        q = tl.load(q_ptr + b * D + dc, mask=d_ok, other=0.0)
        rows = load_rows(k_ptr, slot, valid, D, dc, d_ok).to(DT)
        if L2:
            diff = q[None, :] - rows
            s -= tl.sum(diff * diff, 1)
        else:
            s += tl.sum(q[None, :] * rows, 1)
    return tl.where(valid, scale * s, float("-inf")), slot, valid


@triton.jit
def _safe_shift(m):
    """The softmax shift: the running max, or 0 while no row has been seen (avoids inf - inf)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _softmax_weights(
    q_ptr,
    k_ptr,
    slots_ptr,
    w_ptr,
    b,
    scale,
    K,
    D,
    L2: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row ``b`` of ``weights [B, K]``: softmax of the logits over the valid slots (all
    zero if none). An online max/sum pass, then a second pass that recomputes the logits
    and normalises."""
    m = tl.full([], float("-inf"), DT)
    total = tl.zeros([], DT)
    for k0 in range(0, K, BLOCK_K):
        z, _, _ = _slot_logits(q_ptr, k_ptr, slots_ptr, b, k0, scale, K, D, L2, DT, BLOCK_K, BLOCK_D)
        m_new = tl.maximum(m, tl.max(z))
        shift = _safe_shift(m_new)
        total = total * tl.exp(m - shift) + tl.sum(tl.exp(z - shift))
        m = m_new
    shift = _safe_shift(m)
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)  # no row: weights 0
    for k0 in range(0, K, BLOCK_K):
        z, _, _ = _slot_logits(q_ptr, k_ptr, slots_ptr, b, k0, scale, K, D, L2, DT, BLOCK_K, BLOCK_D)
        offs = k0 + tl.arange(0, BLOCK_K)
        tl.store(w_ptr + b * K + offs, tl.exp(z - shift) * inv, mask=offs < K)


@triton.jit
def _weights_kernel(
    q_ptr, k_ptr, slots_ptr, w_ptr, scale, K, D,
    L2: tl.constexpr, DT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``weights [B, K]``, one program per query."""
    b = tl.program_id(0).to(tl.int64)
    _softmax_weights(q_ptr, k_ptr, slots_ptr, w_ptr, b, scale, K, D, L2, DT, BLOCK_K, BLOCK_D)


@triton.jit
def _slot_block(slots_ptr, w_ptr, b, k0, K, BLOCK_K: tl.constexpr):
    """``(slots, weights, valid)`` of slots ``k0 .. k0 + BLOCK_K`` of query ``b``."""
    offs = k0 + tl.arange(0, BLOCK_K)
    in_k = offs < K
    slot = tl.load(slots_ptr + b * K + offs, mask=in_k, other=-1)
    w = tl.load(w_ptr + b * K + offs, mask=in_k, other=0.0)
    return slot, w, slot >= 0


@triton.jit
def _query_columns(V, BLOCK_V: tl.constexpr):
    """``(query b, value columns [BLOCK_V], in range)`` of a (query, column block) program."""
    vc = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    return tl.program_id(0).to(tl.int64), vc, vc < V


@triton.jit
def _values_block(
    v_ptr,
    slots_ptr,
    w_ptr,
    b,
    vc,
    v_ok,
    K,
    V,
    LABELS: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Columns ``vc`` of row ``b`` of ``out``: ``sum_j w_j values[slot_j]``, or for labels
    the weight on each class ``sum_j w_j [label_j == c]`` (a sum, not atomic adds: the
    same bits every run)."""
    acc = tl.zeros([BLOCK_V], DT)
    for k0 in range(0, K, BLOCK_K):
        slot, w, valid = _slot_block(slots_ptr, w_ptr, b, k0, K, BLOCK_K)
        if LABELS:
            label = tl.load(v_ptr + slot, mask=valid, other=-1)
            acc += tl.sum(tl.where(label[:, None] == vc[None, :], w[:, None], 0.0), 0)
        else:
            vals = load_rows(v_ptr, slot, valid, V, vc, v_ok)
            acc += tl.sum(w[:, None] * vals.to(DT), 0)
    return acc


@triton.jit
def _weighted_values_kernel(
    v_ptr,
    slots_ptr,
    w_ptr,
    out_ptr,
    K,
    V,
    LABELS: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``out [B, V]`` (``V`` classes for labels); program (query, column block)."""
    b, vc, v_ok = _query_columns(V, BLOCK_V)
    acc = _values_block(v_ptr, slots_ptr, w_ptr, b, vc, v_ok, K, V, LABELS, DT, BLOCK_K, BLOCK_V)
    tl.store(out_ptr + b * V + vc, acc, mask=v_ok)


def attend_forward(a: AttendInputs, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, W], weights [B, k])`` over ``slots [B, k]``, as :func:`kmem.ops.composite.attend_forward`.

    ``values [N, V]`` (``num_classes == 0``, ``W = V``) or int64 labels ``[N]`` (``W = num_classes``).
    """
    dtype, scale, metric, num_classes = a.working_dtype, a.scale, a.metric, a.num_classes
    q = a.queries.to(dtype).contiguous()
    keys, values, slots = a.keys.contiguous(), a.values.contiguous(), slots.contiguous()
    batch, k = slots.shape
    width = num_classes or values.shape[1]
    weights = torch.empty((batch, k), dtype=dtype, device=q.device)
    out = torch.empty((batch, width), dtype=dtype, device=q.device)  # every element written
    if batch == 0:
        return out, weights
    dt = tl_dtype(dtype)
    block_k = min(pow2(k), _BLOCK_K)
    launch(
        _weights_kernel,
        (batch,),
        q,
        keys,
        slots,
        weights,
        scale,
        k,
        q.shape[1],
        L2=metric == "l2",
        DT=dt,
        BLOCK_K=block_k,
        BLOCK_D=min(pow2(q.shape[1]), _BLOCK_D),
    )
    if width:
        block_v = min(pow2(width), _BLOCK_V)
        grid = (batch, triton.cdiv(width, block_v))
        launch(
            _weighted_values_kernel,
            grid,
            values,
            slots,
            weights,
            out,
            k,
            width,
            LABELS=bool(num_classes),
            DT=dt,
            BLOCK_K=block_k,
            BLOCK_V=block_v,
        )
    return out, weights


@triton.jit
def _slot_dw(
    g_ptr,
    v_ptr,
    b,
    slot,
    valid,
    V,
    LABELS: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``dw_j = g . values[slot_j]`` (or ``g[label_j]``) for a block of slots: ``[BLOCK_K]``."""
    if LABELS:
        label = tl.load(v_ptr + slot, mask=valid, other=0)
        dw = tl.load(g_ptr + b * V + label, mask=valid, other=0.0)
    else:
        dw = tl.zeros([BLOCK_K], DT)
        for v0 in range(0, V, BLOCK_V):
            vc = v0 + tl.arange(0, BLOCK_V)
            v_ok = vc < V
            g = tl.load(g_ptr + b * V + vc, mask=v_ok, other=0.0)
            vals = load_rows(v_ptr, slot, valid, V, vc, v_ok)
            dw += tl.sum(g[None, :] * vals.to(DT), 1)
    return dw


@triton.jit
def _dlogits_kernel(
    g_ptr,
    v_ptr,
    slots_ptr,
    w_ptr,
    ds_ptr,
    scale,
    K,
    V,
    LABELS: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``ds [B, K] = scale * w_j (dw_j - sum_i w_i dw_i)`` (0 where no row); ``V`` is the
    width of ``g``. The first pass only sums ``w . dw``, the second recomputes ``dw``."""
    b = tl.program_id(0).to(tl.int64)
    w_dw = tl.zeros([], DT)
    for k0 in range(0, K, BLOCK_K):
        slot, w, valid = _slot_block(slots_ptr, w_ptr, b, k0, K, BLOCK_K)
        w_dw += tl.sum(w * _slot_dw(g_ptr, v_ptr, b, slot, valid, V, LABELS, DT, BLOCK_K, BLOCK_V))
    for k0 in range(0, K, BLOCK_K):
        slot, w, valid = _slot_block(slots_ptr, w_ptr, b, k0, K, BLOCK_K)
        dw = _slot_dw(g_ptr, v_ptr, b, slot, valid, V, LABELS, DT, BLOCK_K, BLOCK_V)
        ds = tl.where(valid, scale * w * (dw - w_dw), 0.0)
        offs = k0 + tl.arange(0, BLOCK_K)
        tl.store(ds_ptr + b * K + offs, ds, mask=offs < K)


@triton.jit
def _dq_dkeys_kernel(
    q_ptr,
    k_ptr,
    slots_ptr,
    ds_ptr,
    dq_ptr,
    dk_ptr,
    K,
    D,
    L2: tl.constexpr,
    KEYS: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (query, key-column block): ``dq`` columns, and (if ``KEYS``) each retrieval's
    share of its row's gradient, ``dk_ptr [B K, D]`` (summed per row by :func:`_scatter_rows`).
    ip: ``dq = sum_j ds_j k_j``, share ``ds_j q``;
    l2: ``dq = -2 sum_j ds_j (q - k_j)``, share ``2 ds_j (q - k_j)``."""
    b = tl.program_id(0).to(tl.int64)
    dc = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dc < D
    q = tl.load(q_ptr + b * D + dc, mask=d_ok, other=0.0)
    dq = tl.zeros([BLOCK_D], DT)
    for k0 in range(0, K, BLOCK_K):
        slot, ds, valid = _slot_block(slots_ptr, ds_ptr, b, k0, K, BLOCK_K)
        mask = valid[:, None] & d_ok[None, :]
        rows = load_rows(k_ptr, slot, valid, D, dc, d_ok).to(DT)
        if L2:
            diff = q[None, :] - rows
            dq -= 2.0 * tl.sum(ds[:, None] * diff, 0)
            row_grads = 2.0 * ds[:, None] * diff
        else:
            dq += tl.sum(ds[:, None] * rows, 0)
            row_grads = ds[:, None] * q[None, :]
        if KEYS:
            share = b * K + k0 + tl.arange(0, BLOCK_K)
            store_rows(dk_ptr, share, share < b * K + K, D, dc, d_ok, tl.where(mask, row_grads, 0.0))
    tl.store(dq_ptr + b * D + dc, dq, mask=d_ok)


@triton.jit
def _dvalues_kernel(
    g_ptr, slots_ptr, w_ptr, dv_ptr, K, V, DT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr
):
    """Each retrieval's share of its value row's gradient, ``dv_ptr [B K, V] = w_j g`` (0
    where no row; summed per row by :func:`_scatter_rows`); program (query, column block)."""
    b, vc, v_ok = _query_columns(V, BLOCK_V)
    g = tl.load(g_ptr + b * V + vc, mask=v_ok, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        _, w, valid = _slot_block(slots_ptr, w_ptr, b, k0, K, BLOCK_K)
        share = b * K + k0 + tl.arange(0, BLOCK_K)
        store_rows(
            dv_ptr, share, share < b * K + K, V, vc, v_ok, tl.where(valid, w, 0.0)[:, None] * g[None, :]
        )


@triton.jit
def _scatter_rows_kernel(
    rows_ptr, order_ptr, sorted_ptr, end_ptr, out_ptr, N, W, BLOCK_W: tl.constexpr
):  # fmt: skip
    """Program (position p of a stable sort of the slots, column block): the first position
    of each run of equal slots sums the run's rows in sorted order into ``out[slot]``."""
    p = tl.program_id(0)
    slot = tl.load(sorted_ptr + p)
    first = p == 0
    if p > 0:
        first = tl.load(sorted_ptr + p - 1) != slot
    if first & (slot >= 0) & (slot < N):
        wc, wc_ok = span(tl.program_id(1) * BLOCK_W, W, BLOCK_W)
        acc = tl.zeros([BLOCK_W], tl.float32)
        for i in range(p, tl.load(end_ptr + p)):
            row = tl.load(order_ptr + i)
            acc += tl.load(rows_ptr + row * W + wc, mask=wc_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + slot * W + wc, acc.to(out_ptr.dtype.element_ty), mask=wc_ok)


def _scatter_rows(shares: torch.Tensor, slots: torch.Tensor, n: int) -> torch.Tensor:
    """``[n, W]``: for each row, the sum of ``shares [M, W]`` over the retrievals ``slots
    [M]`` that name it, in retrieval order; 0 for the rest. A stable sort and one sum per
    row, not atomic adds: the same bits on every run."""
    order = slots.argsort(stable=True)
    ordered = slots[order]
    ends = torch.searchsorted(ordered, ordered, right=True)
    out = torch.zeros((n, shares.shape[1]), dtype=shares.dtype, device=shares.device)
    if slots.numel() and shares.shape[1]:
        block = min(pow2(shares.shape[1]), _BLOCK_V)
        grid = (slots.numel(), triton.cdiv(shares.shape[1], block))
        launch(
            _scatter_rows_kernel, grid, shares, order, ordered, ends, out, n, shares.shape[1], BLOCK_W=block
        )
    return out


def attend_backward(grads: AttendGrads) -> Grads:
    """``(dq [B, d], dkeys [N, d], dvalues [N, V])`` as :func:`kmem.ops.composite.attend_backward`:
    only retrieved rows receive gradient; a gradient not needed, and dvalues of labels, are None.
    Where ``grads.per_retrieval``, the row gradients are the shares ``[B * k, ...]`` unsummed."""
    a, needs_keys, needs_values = grads.inputs, grads.needs_keys, grads.needs_values
    dtype, scale, metric, num_classes = a.working_dtype, a.scale, a.metric, a.num_classes
    dt = tl_dtype(dtype)
    q = a.queries.to(dtype).contiguous()
    g = grads.grad_out.to(dtype).contiguous()
    w = grads.weights.to(dtype).contiguous()
    keys, values, slots = a.keys.contiguous(), a.values.contiguous(), grads.slots.contiguous()
    batch, k = slots.shape
    d = q.shape[1]
    width = g.shape[1]
    dq = torch.zeros_like(q)
    key_shares = torch.empty((batch * k, d), dtype=dtype, device=q.device) if needs_keys else None
    value_shares = None
    if needs_values and not num_classes:
        value_shares = torch.empty((batch * k, width), dtype=dtype, device=q.device)

    def finish() -> Grads:
        if grads.per_retrieval:
            return dq, key_shares, value_shares
        flat = slots.view(-1)
        dkeys = None if key_shares is None else _scatter_rows(key_shares, flat, keys.shape[0])
        dvalues = None if value_shares is None else _scatter_rows(value_shares, flat, values.shape[0])
        return dq, dkeys, dvalues

    if batch == 0:
        return finish()
    block_k = min(pow2(k), _BLOCK_K)
    block_v = min(pow2(width), _BLOCK_V)
    ds = torch.empty((batch, k), dtype=dtype, device=q.device)
    launch(
        _dlogits_kernel,
        (batch,),
        g,
        values,
        slots,
        w,
        ds,
        scale,
        k,
        width,
        LABELS=bool(num_classes),
        DT=dt,
        BLOCK_K=block_k,
        BLOCK_V=block_v,
    )
    block_d = min(pow2(d), _BLOCK_D)
    launch(
        _dq_dkeys_kernel,
        (batch, triton.cdiv(d, block_d)),
        q,
        keys,
        slots,
        ds,
        dq,
        dq if key_shares is None else key_shares,  # never written without KEYS
        k,
        d,
        L2=metric == "l2",
        KEYS=key_shares is not None,
        DT=dt,
        BLOCK_K=block_k,
        BLOCK_D=block_d,
    )
    if value_shares is not None and width:
        grid = (batch, triton.cdiv(width, block_v))
        launch(
            _dvalues_kernel,
            grid,
            g,
            slots,
            w,
            value_shares,
            k,
            width,
            DT=dt,
            BLOCK_K=block_k,
            BLOCK_V=block_v,
        )
    return finish()
