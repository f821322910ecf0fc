"""Triton dense attention: softmax over every live, non-excluded row, flash-attention style.

The forward keeps a running max, sum and rescaled accumulator per query over the key
tiles of one split of the rows (program axis 1), the splits' results combined by their
log-sum-exps, and returns the log-sum-exp, from which the backward recomputes each tile's
probabilities: programs per (query block, split of the rows) for ``dq``, whose partials
add up in split order, and one per key tile for ``dkeys`` and ``dvalues`` (so no
atomics). The forward streams the key width in chunks; elsewhere key and value widths
are held whole in a block (padded to a power of two). Labels are handled as one-hot value rows. The working dtype is
float32, or float64 when queries or keys are float64 (``scale`` enters as float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kmem.ops.inputs import DenseGrads, DenseInputs, Grads

from ._common import MIN_DOT, launch, live_mask, load_rows, pow2, span, store_rows, tl_dtype

_BLOCK_B = 16  # queries per block
_BLOCK_N = 32  # key rows per tile
_CHUNK_D = 32  # key columns per step of the forward


@triton.jit
def _load_rows(ptr, idx, idx_ok, width, DT: tl.constexpr, BLOCK_W: tl.constexpr):
    """Rows ``idx`` of a row-major ``[*, width]`` matrix as ``[len(idx), BLOCK_W]`` in ``DT``, zero-padded."""
    wc, wc_ok = span(0, width, BLOCK_W)
    return load_rows(ptr, idx, idx_ok, width, wc, wc_ok).to(DT)


@triton.jit
def _query_block(q_ptr, B, D, DT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's query rows ``[BLOCK_B]``, their mask, and the queries ``[BLOCK_B, BLOCK_D]`` in ``DT``."""
    rows, row_ok = span(tl.program_id(0) * BLOCK_B, B, BLOCK_B)
    return rows, row_ok, _load_rows(q_ptr, rows, row_ok, D, DT, BLOCK_D)


@triton.jit
def _value_rows(v_ptr, cols, col_ok, W, LABELS: tl.constexpr, DT: tl.constexpr, BLOCK_W: tl.constexpr):
    """Value rows ``[BLOCK_N, BLOCK_W]``: the rows of ``values [N, W]``, or one-hot labels."""
    if LABELS:
        label = tl.load(v_ptr + cols, mask=col_ok, other=-1)
        return (label[:, None] == tl.arange(0, BLOCK_W)[None, :]).to(DT)
    return _load_rows(v_ptr, cols, col_ok, W, DT, BLOCK_W)


@triton.jit
def _logits(q, kt, keep, scale, L2: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """``scale * score [BLOCK_B, BLOCK_N]`` of query rows ``q`` against key rows ``kt``; -inf
    where not ``keep``. l2 uses the full ``-(||q||^2 - 2 q.k + ||k||^2)``."""
    s = tl.dot(q, tl.trans(kt), out_dtype=DT, input_precision=PREC)
    return _masked_logits(s, tl.sum(q * q, 1), tl.sum(kt * kt, 1), keep, scale, L2)


@triton.jit
def _masked_logits(dots, q_sq, k_sq, keep, scale, L2: tl.constexpr):
    """``scale * score`` from the dot products ``q . k`` (l2: ``-(|q|^2 - 2 q.k + |k|^2)``
    from the squared norms, unused for ip); -inf where not ``keep``."""
    if L2:
        dots = 2.0 * dots - k_sq[None, :] - q_sq[:, None]
    return tl.where(keep, scale * dots, float("-inf"))


@triton.jit
def _streamed_logits(
    q_ptr, rows, row_ok, k_ptr, cols, col_ok, D, keep, scale,
    L2: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK_D: tl.constexpr,
):  # fmt: skip
    """:func:`_logits` of query rows ``rows`` against key rows ``cols``, the key dimension
    streamed in chunks of ``CHUNK_D``: with d = 256 held whole (and split in two for
    3xTF32) ptxas spilled about 9 KB per thread of the forward."""
    s = tl.zeros([BLOCK_B, BLOCK_N], DT)
    q_sq = tl.zeros([BLOCK_B], DT)
    k_sq = tl.zeros([BLOCK_N], DT)
    for d0 in range(0, D, CHUNK_D):
        dc, dc_ok = span(d0, D, CHUNK_D)
        q = load_rows(q_ptr, rows, row_ok, D, dc, dc_ok).to(DT)
        kt = load_rows(k_ptr, cols, col_ok, D, dc, dc_ok).to(DT)
        s += tl.dot(q, tl.trans(kt), out_dtype=DT, input_precision=PREC)
        if L2:
            q_sq += tl.sum(q * q, 1)
            k_sq += tl.sum(kt * kt, 1)
    return _masked_logits(s, q_sq, k_sq, keep, scale, L2)


@triton.jit
def _dense_fwd_kernel(
    q_ptr, k_ptr, v_ptr, ids_ptr, ex_ptr, out_ptr, lse_ptr, scale, B, N, D, W, E, SPAN,
    L2: tl.constexpr, LABELS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, CHUNK_D: tl.constexpr,
):  # fmt: skip
    """``out [splits, B, W]`` and ``lse [splits, B]`` of one block of queries (program axis
    0) over the key rows of one split (axis 1: rows ``[split * SPAN, (split + 1) * SPAN)``),
    by an online softmax over key tiles."""
    rows, row_ok = span(tl.program_id(0) * BLOCK_B, B, BLOCK_B)
    split = tl.program_id(1).to(tl.int64)
    start = split * SPAN
    end = tl.minimum(N, start + SPAN)
    m = tl.full([BLOCK_B], float("-inf"), DT)
    total = tl.zeros([BLOCK_B], DT)
    acc = tl.zeros([BLOCK_B, BLOCK_W], DT)
    for n0 in range(start, end, BLOCK_N):
        cols, col_ok = span(n0, end, BLOCK_N)
        keep = live_mask(ids_ptr, ex_ptr, rows, row_ok, cols, end, E, BLOCK_B, BLOCK_N)
        z = _streamed_logits(
            q_ptr, rows, row_ok, k_ptr, cols, col_ok, D, keep, scale, L2, DT, PREC, BLOCK_B, BLOCK_N, CHUNK_D
        )
        m_new = tl.maximum(m, tl.max(z, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no row yet: avoid inf - inf
        p = tl.exp(z - shift[:, None])
        rescale = tl.exp(m - shift)
        total = total * rescale + tl.sum(p, 1)
        vals = _value_rows(v_ptr, cols, col_ok, W, LABELS, DT, BLOCK_W)
        acc = acc * rescale[:, None] + tl.dot(p, vals, out_dtype=DT, input_precision=PREC)
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    wc, wc_ok = span(0, W, BLOCK_W)
    store_rows(out_ptr + split * B * W, rows, row_ok, W, wc, wc_ok, out)
    lse = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + split * B + rows, lse, mask=row_ok)


@triton.jit
def _tile_dlogits(
    q, kt, vals, g, lse, delta, keep, scale, L2: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr
):
    """``(p, ds)`` of a (query block, key tile): ``p = exp(z - lse)`` recomputed, and
    ``ds = scale * p * (g . v_j - g . out)``, both ``[BLOCK_B, BLOCK_N]``."""
    z = _logits(q, kt, keep, scale, L2, DT, PREC)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # such a query keeps no row: p is all 0
    p = tl.where(keep, tl.exp(z - lse[:, None]), 0.0)
    dp = tl.dot(g, tl.trans(vals), out_dtype=DT, input_precision=PREC)
    return p, scale * p * (dp - delta[:, None])


@triton.jit
def _dense_dq_kernel(
    q_ptr, k_ptr, v_ptr, ids_ptr, ex_ptr, g_ptr, lse_ptr, delta_ptr, dq_ptr, scale, B, N, D, W, E, SPAN,
    L2: tl.constexpr, LABELS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """``dq [splits, B, D]``: one query block's share of ``dq`` from the key rows of one
    split (program axis 1, as the forward's): ip ``sum_j ds_j k_j``; l2 ``-2 sum_j ds_j
    (q - k_j)``."""
    rows, row_ok, q = _query_block(q_ptr, B, D, DT, BLOCK_B, BLOCK_D)
    split = tl.program_id(1).to(tl.int64)
    start = split * SPAN
    end = tl.minimum(N, start + SPAN)
    g = _load_rows(g_ptr, rows, row_ok, W, DT, BLOCK_W)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
    ds_k = tl.zeros([BLOCK_B, BLOCK_D], DT)
    ds_sum = tl.zeros([BLOCK_B], DT)
    for n0 in range(start, end, BLOCK_N):
        cols, col_ok = span(n0, end, BLOCK_N)
        keep = live_mask(ids_ptr, ex_ptr, rows, row_ok, cols, end, E, BLOCK_B, BLOCK_N)
        kt = _load_rows(k_ptr, cols, col_ok, D, DT, BLOCK_D)
        vals = _value_rows(v_ptr, cols, col_ok, W, LABELS, DT, BLOCK_W)
        _, ds = _tile_dlogits(q, kt, vals, g, lse, delta, keep, scale, L2, DT, PREC)
        ds_k += tl.dot(ds, kt, out_dtype=DT, input_precision=PREC)
        ds_sum += tl.sum(ds, 1)
    dq = -2.0 * (ds_sum[:, None] * q - ds_k) if L2 else ds_k
    dc, dc_ok = span(0, D, BLOCK_D)
    store_rows(dq_ptr + split * B * D, rows, row_ok, D, dc, dc_ok, dq)


@triton.jit
def _dense_dkv_kernel(
    q_ptr, k_ptr, v_ptr, ids_ptr, ex_ptr, g_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, scale, B, N, D, W, E,
    L2: tl.constexpr, LABELS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, KEYS: tl.constexpr,
    VALUES: tl.constexpr,
):  # fmt: skip
    """``dkeys`` (if ``KEYS``) and ``dvalues`` (if ``VALUES``) of one key tile over all queries: ip ``dk_j = sum_b ds_bj q_b``;
    l2 ``dk_j = 2 sum_b ds_bj (q_b - k_j)``; ``dv_j = sum_b p_bj g_b``."""
    cols, col_ok = span(tl.program_id(0) * BLOCK_N, N, BLOCK_N)
    kt = _load_rows(k_ptr, cols, col_ok, D, DT, BLOCK_D)
    vals = _value_rows(v_ptr, cols, col_ok, W, LABELS, DT, BLOCK_W)
    ds_q = tl.zeros([BLOCK_N, BLOCK_D], DT)
    ds_sum = tl.zeros([BLOCK_N], DT)
    p_g = tl.zeros([BLOCK_N, BLOCK_W], DT)
    for b0 in range(0, B, BLOCK_B):
        rows, row_ok = span(b0, B, BLOCK_B)
        keep = live_mask(ids_ptr, ex_ptr, rows, row_ok, cols, N, E, BLOCK_B, BLOCK_N)
        q = _load_rows(q_ptr, rows, row_ok, D, DT, BLOCK_D)
        g = _load_rows(g_ptr, rows, row_ok, W, DT, BLOCK_W)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        p, ds = _tile_dlogits(q, kt, vals, g, lse, delta, keep, scale, L2, DT, PREC)
        ds_q += tl.dot(tl.trans(ds), q, out_dtype=DT, input_precision=PREC)
        ds_sum += tl.sum(ds, 0)
        if VALUES:
            p_g += tl.dot(tl.trans(p), g, out_dtype=DT, input_precision=PREC)
    if KEYS:
        dk = 2.0 * (ds_q - ds_sum[:, None] * kt) if L2 else ds_q
        dc, dc_ok = span(0, D, BLOCK_D)
        store_rows(dk_ptr, cols, col_ok, D, dc, dc_ok, dk)
    if VALUES:
        wc, wc_ok = span(0, W, BLOCK_W)
        store_rows(dv_ptr, cols, col_ok, W, wc, wc_ok, p_g)


def precision(dtype: torch.dtype) -> str:
    """How ``tl.dot`` multiplies in working dtype ``dtype``: float32 as three TF32 products
    on tensor cores (each operand split into a TF32 head and tail; error near float32's,
    several times FMA's rate), float64 exactly."""
    return "ieee" if dtype == torch.float64 else "tf32x3"


def _setup(d: DenseInputs) -> tuple[tuple, dict]:
    """Contiguous operands and the constexpr arguments shared by the dense kernels."""
    dtype, width = d.working_dtype, d.width
    e = 0 if d.exclude_ids is None else d.exclude_ids.shape[1]
    operands = (
        d.queries.to(dtype).contiguous(),
        d.keys.contiguous(),
        d.values.contiguous(),
        d.slot_ids.contiguous(),
        d.slot_ids if e == 0 else d.exclude_ids.contiguous(),  # never read when E == 0
    )
    meta = {
        "L2": d.l2,
        "LABELS": d.labels,
        "DT": tl_dtype(dtype),
        "PREC": precision(dtype),
        "BLOCK_B": _BLOCK_B,
        "BLOCK_N": _BLOCK_N,
        "BLOCK_D": pow2(d.queries.shape[1], MIN_DOT),
        "BLOCK_W": pow2(width, MIN_DOT),
    }
    sizes = (d.queries.shape[0], d.keys.shape[0], d.queries.shape[1], width, e)
    return operands + sizes, meta


def _splits(batch: int, n: int, device: torch.device) -> tuple[int, int]:
    """``(key rows per split, splits)`` of the forward and of ``dq``, the rows a multiple of the tile:
    enough splits that query blocks x splits fill the GPU twice over -- with one program
    per query block, B = 64 ran 4 programs on 132 SMs, each over all N -- and a few under
    the interpreter, so that the split path is what the tests run."""
    programs = (
        2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    )
    tiles = max(1, triton.cdiv(n, _BLOCK_N))
    wanted = min(tiles, max(1, triton.cdiv(programs, triton.cdiv(batch, _BLOCK_B))))
    rows = triton.cdiv(tiles, wanted) * _BLOCK_N
    return rows, max(1, triton.cdiv(n, rows))


def dense_forward(d: DenseInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, W], lse [B])``: attention over every live, non-excluded row; ``lse`` is
    the log-sum-exp of ``scale * score`` (-inf and ``out = 0`` for a query with no row).

    Each split of the rows gives its own ``(out, lse)``; they combine exactly as softmax
    pieces do (flash-decoding): ``lse = logsumexp_s lse_s``, ``out = sum_s e^(lse_s - lse) out_s``.
    """
    (q, k, v, ids, ex, batch, n, dim, width, e), meta = _setup(d)
    rows, splits = _splits(batch, n, q.device)
    outs = torch.empty((splits, batch, width), dtype=q.dtype, device=q.device)
    lses = torch.empty((splits, batch), dtype=q.dtype, device=q.device)
    if batch:
        grid = (triton.cdiv(batch, _BLOCK_B), splits)
        args = (q, k, v, ids, ex, outs, lses, d.scale, batch, n, dim, width, e, rows)
        launch(_dense_fwd_kernel, grid, *args, **meta, CHUNK_D=min(meta["BLOCK_D"], _CHUNK_D))
    if splits == 1:
        return outs[0], lses[0]
    lse = torch.logsumexp(lses, 0)
    share = torch.exp(lses - torch.where(lse == float("-inf"), 0.0, lse))  # 0 where a split has no row
    return (share[:, :, None] * outs).sum(0), lse


def dense_backward(grads: DenseGrads) -> Grads:
    """``(dq [B, d], dkeys [N, d], dvalues [N, V])`` of :func:`dense_forward` from the
    gradients reaching ``out`` and ``lse``; a gradient not needed, and dvalues of labels, are None."""
    d, needs_keys, needs_values = grads.inputs, grads.needs_keys, grads.needs_values
    (q, k, v, ids, ex, batch, n, dim, width, e), meta = _setup(d)
    g = grads.grad_out.to(q.dtype).contiguous()
    lse = grads.lse.to(q.dtype).contiguous()
    # g . out per query, less what reaches lse (d lse / d z_j = p_j): [B], shared by every tile.
    delta = (g * grads.out.to(q.dtype)).sum(1) - grads.grad_lse.to(q.dtype)
    # Every row of each gradient is written by a kernel (a dead row's with 0), so none is
    # zero-filled first -- unless there is nothing to run.
    alloc = torch.zeros if batch == 0 or n == 0 else torch.empty
    dq = alloc(q.shape, dtype=q.dtype, device=q.device)
    dkeys = alloc(d.keys.shape, dtype=q.dtype, device=q.device) if needs_keys else None
    dvalues = None
    if needs_values and not d.labels:
        dvalues = alloc(d.values.shape, dtype=q.dtype, device=q.device)
    if batch == 0 or n == 0:
        return dq, dkeys, dvalues
    common = (ids, ex, g, lse, delta)
    sizes = (d.scale, batch, n, dim, width, e)
    # dq over splits of the rows, as the forward: one program per query block had walked
    # all N (B = 64: 4 programs on 132 SMs). The partials add up in split order.
    rows, splits = _splits(batch, n, q.device)
    parts = torch.empty((splits, *q.shape), dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(batch, _BLOCK_B), splits)
    launch(_dense_dq_kernel, grid, q, k, v, *common, parts, *sizes, rows, **meta)
    torch.sum(parts, 0, out=dq)
    if dkeys is not None or dvalues is not None:
        dk = dq if dkeys is None else dkeys  # placeholders are never written
        dv = dq if dvalues is None else dvalues
        grid = (triton.cdiv(n, _BLOCK_N),)
        flags = {"KEYS": dkeys is not None, "VALUES": dvalues is not None}
        launch(_dense_dkv_kernel, grid, q, k, v, *common, dk, dv, *sizes, **meta, **flags)
    return dq, dkeys, dvalues
