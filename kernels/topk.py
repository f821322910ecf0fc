"""Triton top-k attention in one launch: the search's scan, the merge and the attend step.

Every program scans its split of the rows for its block of queries (:func:`search._scan`)
and writes its candidates; the last program of a query block to finish -- counted by
an atomic add -- merges the splits' candidates into the top ``k`` slots and, query by
query, computes the softmax weights and the weighted values with the attend step's own
functions (:mod:`kmem.kernels.attend`). The result is that of :func:`search.search`
followed by :func:`attend.attend_forward`, bit for bit, in one kernel launch (after one
fill of the shared thresholds and counts) instead of five.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kmem.ops.inputs import AttendInputs

from . import attend, search
from ._common import launch, pow2, tl_dtype
from .attend import _softmax_weights, _values_block
from .search import _NONE, _NONE_TL, _bitonic_merge, _scan, _store_candidates


@triton.jit
def _merge_candidates(cand_ptr, rows, row_ok, SPLITS: tl.constexpr, KP: tl.constexpr, BLOCK_B: tl.constexpr):
    """The top ``KP`` packed keys of every split of ``cand [B, SPLITS, KP]``, best first."""
    best = tl.full([BLOCK_B, KP], _NONE_TL, tl.int64)
    floor = tl.full([BLOCK_B], _NONE_TL, tl.int64)
    ascending = KP - 1 - tl.arange(0, KP)  # each split's list is stored best first
    base = cand_ptr + rows.to(tl.int64)[:, None] * (SPLITS * KP) + ascending[None, :]
    for s in range(SPLITS):
        # .cg: read from L2, where the other programs' candidates are, not a stale L1 line.
        c = tl.load(base + s * KP, mask=row_ok[:, None], other=_NONE_TL, cache_modifier=".cg")
        if tl.max((c > floor[:, None]).to(tl.int32)) > 0:
            best = _bitonic_merge(tl.maximum(best, c), BLOCK_B, KP, KP, True)
            floor = tl.min(best, 1)
    return best


@triton.jit
def _store_slots(slots_ptr, rows, row_ok, best, K, KP: tl.constexpr):
    """``slots [B, K]`` from packed keys ``best [BLOCK_B, KP]``: -1 for none, and past ``KP``
    (``k`` above the number of rows)."""
    ks = tl.arange(0, KP)
    slot = tl.where(best == _NONE_TL, -1, 4294967295 - (best & 4294967295))
    base = slots_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :]
    tl.store(base, slot, mask=row_ok[:, None] & (ks < K)[None, :])
    for k0 in range(KP, K, KP):
        tl.store(base + k0, tl.full([1, KP], -1, tl.int64), mask=row_ok[:, None] & (k0 + ks < K)[None, :])


@triton.jit
def _topk_attention_kernel(
    q_ptr, k_ptr, ids_ptr, ex_ptr, theta_ptr, B, N, D, E, n_tiles, slack,
    cand_ptr, count_ptr, last, qw_ptr, v_ptr, slots_ptr, w_ptr, out_ptr, scale, K, W,
    L2: tl.constexpr, TENSOR_CORES: tl.constexpr, SPLITS: tl.constexpr, KP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    LABELS: tl.constexpr, DT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_AD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Program (query block, split): scan, write candidates, and if last of its query
    block, merge them and attend. ``count [blocks]`` starts at INT64_MIN; ``last`` is
    INT64_MIN + SPLITS - 1. ``qw``: the queries in the working dtype ``DT``."""
    rows, row_ok, best = _scan(
        q_ptr, k_ptr, ids_ptr, ex_ptr, theta_ptr, B, N, D, E, n_tiles, slack,
        L2, TENSOR_CORES, SPLITS, KP, BLOCK_B, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    _store_candidates(cand_ptr, rows, row_ok, best, SPLITS, KP)
    # Every thread's stores before the count (acq_rel: the last program's loads see them).
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel")
    if done == last:
        best = _merge_candidates(cand_ptr, rows, row_ok, SPLITS, KP, BLOCK_B)
        _store_slots(slots_ptr, rows, row_ok, best, K, KP)
        tl.debug_barrier()  # the slots, then the weights, are read back by other threads
        for i in range(BLOCK_B):
            b = (tl.program_id(0) * BLOCK_B + i).to(tl.int64)
            if b < B:
                _softmax_weights(qw_ptr, k_ptr, slots_ptr, w_ptr, b, scale, K, D, L2, DT, BLOCK_K, BLOCK_AD)
                tl.debug_barrier()
                for v0 in range(0, W, BLOCK_V):
                    vc = v0 + tl.arange(0, BLOCK_V)
                    v_ok = vc < W
                    acc = _values_block(
                        v_ptr, slots_ptr, w_ptr, b, vc, v_ok, K, W, LABELS, DT, BLOCK_K, BLOCK_V
                    )
                    tl.store(out_ptr + b * W + vc, acc, mask=v_ok)


def topk_forward(a: AttendInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [B, W], slots [B, k] int64, weights [B, k])``: :func:`search.search` then
    :func:`attend.attend_forward`, in one launch."""
    batch, n, k = a.queries.shape[0], a.keys.shape[0], a.k
    if batch == 0 or n == 0:  # nothing to scan: every slot is -1
        slots = torch.full((batch, k), -1, dtype=torch.int64, device=a.queries.device)
        out, weights = attend.attend_forward(a, slots)
        return out, slots, weights
    dtype = a.working_dtype
    blocks = triton.cdiv(batch, search._BLOCK_B)
    # One fill for the shared thresholds [B] and the per-block counts [blocks].
    sync = torch.full((batch + blocks,), _NONE, dtype=torch.int64, device=a.queries.device)
    scan = search.plan(a.search(), sync[:batch])
    cand = torch.empty((batch, scan.splits, scan.kp), dtype=torch.int64, device=a.queries.device)
    width = a.width
    slots = torch.empty((batch, k), dtype=torch.int64, device=a.queries.device)
    weights = torch.empty((batch, k), dtype=dtype, device=a.queries.device)
    out = torch.empty((batch, width), dtype=dtype, device=a.queries.device)
    launch(
        _topk_attention_kernel,
        scan.grid,
        *scan.args,
        cand,
        sync[batch:],
        _NONE + scan.splits - 1,
        a.queries.to(dtype).contiguous(),
        a.values.contiguous(),
        slots,
        weights,
        out,
        a.scale,
        k,
        width,
        **scan.meta,
        LABELS=a.labels,
        DT=tl_dtype(dtype),
        BLOCK_K=min(pow2(k), attend._BLOCK_K),
        BLOCK_AD=min(pow2(a.queries.shape[1]), attend._BLOCK_D),
        BLOCK_V=min(pow2(width), attend._BLOCK_V),
    )
    return out, slots, weights
