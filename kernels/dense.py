"""Triton dense attention: softmax over every live, non-excluded row, flash-attention style.

The forward keeps a running max, sum and rescaled accumulator per query over the key
tiles of one split of the rows (program axis 1), the splits' results combined by their
log-sum-exps, and returns the log-sum-exp, from which the backward recomputes each tile's
probabilities: programs per (query block, split of the rows, chunk of columns) for
``dq``, whose partials add up in split order, and one per (key tile, chunk of columns)
for ``dkeys`` and ``dvalues`` (so no atomics). Scores and ``g . v`` are summed over
the key and value widths in chunks; only the forward's accumulator holds the value
width whole (padded to a power of two). Labels are handled as one-hot value rows. The
working dtype is float32, or float64 when queries or keys are float64 (``scale`` enters
as float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kmem.ops.inputs import DenseGrads, DenseInputs, Grads

from ._common import MIN_DOT, launch, live_mask, load_rows, pow2, span, store_rows, tl_dtype

_BLOCK_B = 16  # queries per block
_BLOCK_N = 32  # key rows per tile
_CHUNK_D = 32  # key (and value) columns per step of a score (and g . v) sum
_CHUNK_OUT = 64  # gradient columns per backward program


@triton.jit
def _masked_logits(dots, q_sq, k_sq, keep, scale, L2: tl.constexpr):
    """``scale * score`` from the dot products ``q . k`` (l2: ``-(|q|^2 - 2 q.k + |k|^2)``
    from the squared norms, unused for ip); -inf where not ``keep``."""
    if L2:
        dots = 2.0 * dots - k_sq[None, :] - q_sq[:, None]
    return tl.where(keep, scale * dots, float("-inf"))


@triton.jit
def _chunk(ptr, idx, idx_ok, width, c0, LABELS: tl.constexpr, DT: tl.constexpr, CHUNK: tl.constexpr):
    """Columns ``[c0, c0 + CHUNK)`` of rows ``idx`` of a row-major ``[*, width]`` matrix, or
    (``LABELS``) of the one-hot rows of labels ``ptr[idx]``: ``[len(idx), CHUNK]`` in
    ``DT``, zero where masked off or past ``width``."""
    cols, col_ok = span(c0, width, CHUNK)
    if LABELS:
        label = tl.load(ptr + idx, mask=idx_ok, other=-1)
        return ((label[:, None] == cols[None, :]) & col_ok[None, :]).to(DT)
    return load_rows(ptr, idx, idx_ok, width, cols, col_ok).to(DT)


@triton.jit
def _streamed_dots(
    a_ptr, rows, row_ok, b_ptr, cols, col_ok, width,
    NORMS: tl.constexpr, LABELS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """``(a[rows] . b[cols] [BLOCK_A, BLOCK_N], |a[rows]|^2, |b[cols]|^2)`` over rows
    ``width`` wide, streamed ``CHUNK`` columns at a time (the norms only with ``NORMS``;
    ``LABELS``: ``b`` holds labels, read as one-hot rows). Held whole, d = 256 in 3xTF32
    had ptxas spill 9 KB per thread of the forward and 16 KB of the dkeys pass."""
    dots = tl.zeros([BLOCK_A, BLOCK_N], DT)
    a_sq = tl.zeros([BLOCK_A], DT)
    b_sq = tl.zeros([BLOCK_N], DT)
    for c0 in range(0, width, CHUNK):
        a = _chunk(a_ptr, rows, row_ok, width, c0, False, DT, CHUNK)
        b = _chunk(b_ptr, cols, col_ok, width, c0, LABELS, DT, CHUNK)
        dots += tl.dot(a, tl.trans(b), out_dtype=DT, input_precision=PREC)
        if NORMS:
            a_sq += tl.sum(a * a, 1)
            b_sq += tl.sum(b * b, 1)
    return dots, a_sq, b_sq


@triton.jit
def _streamed_logits(
    q_ptr, rows, row_ok, k_ptr, cols, col_ok, D, keep, scale,
    L2: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNK_D: tl.constexpr,
):  # fmt: skip
    """``scale * score [BLOCK_B, BLOCK_N]`` of query rows ``rows`` against key rows ``cols``
    (-inf where not ``keep``), the key dimension streamed in chunks of ``CHUNK_D``."""
    dots, q_sq, k_sq = _streamed_dots(
        q_ptr, rows, row_ok, k_ptr, cols, col_ok, D, L2, False, DT, PREC, BLOCK_B, BLOCK_N, CHUNK_D
    )
    return _masked_logits(dots, q_sq, k_sq, keep, scale, L2)


@triton.jit
def _dense_fwd_kernel(
    q_ptr, k_ptr, v_ptr, ids_ptr, ex_ptr, out_ptr, lse_ptr, scale, B, N, D, W, E, SPAN,
    L2: tl.constexpr, LABELS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, CHUNK_D: tl.constexpr,
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
        vals = _chunk(v_ptr, cols, col_ok, W, 0, LABELS, DT, BLOCK_W)
        acc = acc * rescale[:, None] + tl.dot(p, vals, out_dtype=DT, input_precision=PREC)
        m = m_new
    out = acc / tl.where(total > 0, total, 1.0)[:, None]
    wc, wc_ok = span(0, W, BLOCK_W)
    store_rows(out_ptr + split * B * W, rows, row_ok, W, wc, wc_ok, out)
    lse = tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + split * B + rows, lse, mask=row_ok)


@triton.jit
def _tile_dlogits(
    q_ptr, k_ptr, v_ptr, g_ptr, rows, row_ok, cols, col_ok, D, W, lse, delta, keep, scale,
    L2: tl.constexpr, LABELS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK_D: tl.constexpr,
):  # fmt: skip
    """``(p, ds)`` of query rows ``rows`` and key rows ``cols``: ``p = exp(z - lse)``
    recomputed, and ``ds = scale * p * (g . v_j - delta)``, both ``[BLOCK_B, BLOCK_N]``;
    key and value widths streamed in chunks of ``CHUNK_D``."""
    z = _streamed_logits(
        q_ptr, rows, row_ok, k_ptr, cols, col_ok, D, keep, scale, L2, DT, PREC, BLOCK_B, BLOCK_N, CHUNK_D
    )
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # such a query keeps no row: p is all 0
    p = tl.where(keep, tl.exp(z - lse[:, None]), 0.0)
    dp, _, _ = _streamed_dots(
        g_ptr, rows, row_ok, v_ptr, cols, col_ok, W, False, LABELS, DT, PREC, BLOCK_B, BLOCK_N, CHUNK_D
    )
    return p, scale * p * (dp - delta[:, None])


@triton.jit
def _dense_dq_kernel(
    q_ptr, k_ptr, v_ptr, ids_ptr, ex_ptr, g_ptr, lse_ptr, delta_ptr, dq_ptr, scale, B, N, D, W, E, SPAN,
    L2: tl.constexpr, LABELS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK_D: tl.constexpr, CHUNK_OUT: tl.constexpr,
):  # fmt: skip
    """``dq [splits, B, D]``: one query block's (program axis 0) share of ``dq`` from the key
    rows of one split (axis 1, as the forward's), in columns ``[c0, c0 + CHUNK_OUT)`` (axis
    2): ip ``sum_j ds_j k_j``; l2 ``-2 sum_j ds_j (q - k_j)``. Each column chunk
    recomputes ``ds``, so that only a ``[BLOCK_B, CHUNK_OUT]`` accumulator is held."""
    rows, row_ok = span(tl.program_id(0) * BLOCK_B, B, BLOCK_B)
    split = tl.program_id(1).to(tl.int64)
    c0 = tl.program_id(2) * CHUNK_OUT
    start = split * SPAN
    end = tl.minimum(N, start + SPAN)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
    ds_k = tl.zeros([BLOCK_B, CHUNK_OUT], DT)
    ds_sum = tl.zeros([BLOCK_B], DT)
    for n0 in range(start, end, BLOCK_N):
        cols, col_ok = span(n0, end, BLOCK_N)
        keep = live_mask(ids_ptr, ex_ptr, rows, row_ok, cols, end, E, BLOCK_B, BLOCK_N)
        _, ds = _tile_dlogits(
            q_ptr, k_ptr, v_ptr, g_ptr, rows, row_ok, cols, col_ok, D, W, lse, delta, keep, scale,
            L2, LABELS, DT, PREC, BLOCK_B, BLOCK_N, CHUNK_D,
        )  # fmt: skip
        kc = _chunk(k_ptr, cols, col_ok, D, c0, False, DT, CHUNK_OUT)
        ds_k += tl.dot(ds, kc, out_dtype=DT, input_precision=PREC)
        ds_sum += tl.sum(ds, 1)
    if L2:
        ds_k = -2.0 * (ds_sum[:, None] * _chunk(q_ptr, rows, row_ok, D, c0, False, DT, CHUNK_OUT) - ds_k)
    dc, dc_ok = span(c0, D, CHUNK_OUT)
    store_rows(dq_ptr + split * B * D, rows, row_ok, D, dc, dc_ok, ds_k)


@triton.jit
def _dense_dkv_kernel(
    q_ptr, k_ptr, v_ptr, ids_ptr, ex_ptr, g_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, scale, B, N, D, W, E,
    L2: tl.constexpr, LABELS: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK_D: tl.constexpr, CHUNK_OUT: tl.constexpr, KEYS: tl.constexpr,
    VALUES: tl.constexpr,
):  # fmt: skip
    """Columns ``[c0, c0 + CHUNK_OUT)`` (program axis 1) of ``dkeys`` (if ``KEYS``) and
    ``dvalues`` (if ``VALUES``) of one key tile (axis 0) over all queries: ip ``dk_j =
    sum_b ds_bj q_b``; l2 ``dk_j = 2 sum_b ds_bj (q_b - k_j)``; ``dv_j = sum_b p_bj g_b``.
    Each column chunk recomputes ``p`` and ``ds``: held whole, the d = 256 accumulators
    and operands spilled 16 KB per thread."""
    cols, col_ok = span(tl.program_id(0) * BLOCK_N, N, BLOCK_N)
    c0 = tl.program_id(1) * CHUNK_OUT
    ds_q = tl.zeros([BLOCK_N, CHUNK_OUT], DT)
    ds_sum = tl.zeros([BLOCK_N], DT)
    p_g = tl.zeros([BLOCK_N, CHUNK_OUT], DT)
    for b0 in range(0, B, BLOCK_B):
        rows, row_ok = span(b0, B, BLOCK_B)
        keep = live_mask(ids_ptr, ex_ptr, rows, row_ok, cols, N, E, BLOCK_B, BLOCK_N)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        p, ds = _tile_dlogits(
            q_ptr, k_ptr, v_ptr, g_ptr, rows, row_ok, cols, col_ok, D, W, lse, delta, keep, scale,
            L2, LABELS, DT, PREC, BLOCK_B, BLOCK_N, CHUNK_D,
        )  # fmt: skip
        if KEYS:
            qc = _chunk(q_ptr, rows, row_ok, D, c0, False, DT, CHUNK_OUT)
            ds_q += tl.dot(tl.trans(ds), qc, out_dtype=DT, input_precision=PREC)
            ds_sum += tl.sum(ds, 0)
        if VALUES:
            gc = _chunk(g_ptr, rows, row_ok, W, c0, False, DT, CHUNK_OUT)
            p_g += tl.dot(tl.trans(p), gc, out_dtype=DT, input_precision=PREC)
    if KEYS:
        if L2:
            ds_q = 2.0 * (ds_q - ds_sum[:, None] * _chunk(k_ptr, cols, col_ok, D, c0, False, DT, CHUNK_OUT))
        dc, dc_ok = span(c0, D, CHUNK_OUT)
        store_rows(dk_ptr, cols, col_ok, D, dc, dc_ok, ds_q)
    if VALUES:
        wc, wc_ok = span(c0, W, CHUNK_OUT)
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
        "CHUNK_D": min(pow2(max(d.queries.shape[1], width), MIN_DOT), _CHUNK_D),
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
        launch(_dense_fwd_kernel, grid, *args, **meta, BLOCK_W=pow2(width, MIN_DOT))
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
    out_chunk = min(pow2(max(dim, width), MIN_DOT), _CHUNK_OUT)
    # dq over splits of the rows, as the forward: one program per query block had walked
    # all N (B = 64: 4 programs on 132 SMs). The partials add up in split order.
    rows, splits = _splits(batch, n, q.device)
    parts = torch.empty((splits, *q.shape), dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(batch, _BLOCK_B), splits, triton.cdiv(dim, out_chunk))
    launch(_dense_dq_kernel, grid, q, k, v, *common, parts, *sizes, rows, **meta, CHUNK_OUT=out_chunk)
    torch.sum(parts, 0, out=dq)
    if dkeys is not None or dvalues is not None:
        dk = dq if dkeys is None else dkeys  # placeholders are never written
        dv = dq if dvalues is None else dvalues
        widest = max(dim if dkeys is not None else 0, width if dvalues is not None else 0)
        grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(widest, out_chunk))
        flags = {"KEYS": dkeys is not None, "VALUES": dvalues is not None, "CHUNK_OUT": out_chunk}
        launch(_dense_dkv_kernel, grid, q, k, v, *common, dk, dv, *sizes, **meta, **flags)
    return dq, dkeys, dvalues
