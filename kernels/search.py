"""Triton top-k search: scores key tiles, keeps a running top-k of packed (score, slot) keys.

A packed key is one int64 that orders like (float32 score desc, slot asc): the score's
order-preserving int32 bits in the high word, ``0xFFFFFFFF - slot`` in the low word. So
one integer max/sort ranks by the tie rule, and "no row" is INT64_MIN, below every row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function

from kmem.ops.inputs import SearchInputs
from kmem.ops.reference import unpack

from ._common import MIN_DOT, excluded, launch, pow2

_NONE = torch.iinfo(torch.int64).min
_NONE_TL: tl.constexpr = tl.constexpr(_NONE)

_BLOCK_B = 16  # queries per program (the M side of tl.dot)
_MIN_TILE = 64  # key rows per tile when k is small
_MAX_BLOCK_D = 64  # the key dimension is streamed in chunks of this width
_CANDIDATES = 1 << 16  # bound on per-query candidates left for the final merge
# Warps per scan program: with Triton's default 4, ptxas gave the scan 255 registers and
# spilled up to 836 bytes per thread at KP <= 32 (scripts/check-triton-compile); with 8,
# 176-180 registers and no spills (KP = 256 still spills, about half as much).
_NUM_WARPS = 8
# Above this many queries the keys' tiles are scored on tensor cores first (TF32, then
# float32 only where a tile may reach a top-k); at or below it the kernel is bound by
# reading the keys, and scores them in float32 once.
TENSOR_CORE_BATCH = 16


@triton.jit
def _tf32(x):
    """``x`` (float32) with its mantissa cut to TF32's 10 bits: the operand a tensor-core
    TF32 MMA reads, made explicit so the interpreter scores exactly as the GPU does."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _tile_dots(
    q_ptr,
    k_ptr,
    rows,
    row_ok,
    cols,
    N,
    D,
    TF32: tl.constexpr,
    NORMS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``(q . k [BLOCK_B, BLOCK_N], ||k||^2 [BLOCK_N] if NORMS)`` of query rows ``rows``
    against key rows ``cols``, the key dimension streamed in chunks: float32 products, or
    with ``TF32`` TF32 operands on tensor cores. fp16/bf16 keys are read as float32."""
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    sq = tl.zeros([BLOCK_N], tl.float32)
    col_ok = cols < N
    for d0 in range(0, D, BLOCK_D):
        dc = d0 + tl.arange(0, BLOCK_D)
        d_ok = dc < D
        q = tl.load(
            q_ptr + rows.to(tl.int64)[:, None] * D + dc[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        kt = tl.load(
            k_ptr + cols.to(tl.int64)[:, None] * D + dc[None, :],
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if TF32:
            acc += tl.dot(_tf32(q), tl.trans(_tf32(kt)), input_precision="tf32")
        else:
            acc += tl.dot(q, tl.trans(kt), input_precision="ieee")
        if NORMS:
            sq += tl.sum(kt * kt, 1)
    return acc, sq


@triton.jit
def _tile_scores(
    q_ptr, k_ptr, rows, row_ok, cols, N, D,
    L2: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """float32 ranking scores ``[BLOCK_B, BLOCK_N]``; for l2 ``2 q.k - ||k||^2`` (the
    per-query ``-||q||^2`` does not change a query's ranking)."""
    acc, sq = _tile_dots(q_ptr, k_ptr, rows, row_ok, cols, N, D, False, L2, BLOCK_B, BLOCK_N, BLOCK_D)
    if L2:
        acc = 2.0 * acc - sq[None, :]
    return acc


@triton.jit
def _tile_scores_tf32(
    q_ptr, k_ptr, rows, row_ok, cols, N, D,
    L2: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """:func:`_tile_scores` on tensor cores, TF32 operands: approximate scores ``[BLOCK_B,
    BLOCK_N]`` and the keys' float32 norms ``[BLOCK_N]``, which bound the error."""
    acc, sq = _tile_dots(q_ptr, k_ptr, rows, row_ok, cols, N, D, True, True, BLOCK_B, BLOCK_N, BLOCK_D)
    if L2:
        acc = 2.0 * acc - sq[None, :]
    return acc, tl.sqrt(sq)


@triton.jit
def _floor_score(floor):
    """The float32 score of packed keys ``floor`` (:func:`_pack`'s inverse); -inf for none."""
    bits = (floor >> 32).to(tl.int32)
    bits = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return tl.where(floor == _NONE_TL, float("-inf"), bits.to(tl.float32, bitcast=True))


@triton.jit
def _pack(scores, cols):
    """int64 keys ``[BLOCK_B, BLOCK_N]`` ordering like (score desc, slot asc)."""
    bits = (scores + 0.0).to(tl.int32, bitcast=True)  # + 0.0 turns -0.0 into +0.0
    bits = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # order-preserving as signed int
    low = 4294967295 - cols.to(tl.int64)
    return (bits.to(tl.int64) << 32) | low[None, :]


@constexpr_function
def _log2(n: int) -> int:
    return n.bit_length() - 1


@triton.jit
def _compare_swap(
    x, R: tl.constexpr, W: tl.constexpr, S: tl.constexpr, DIR_BIT: tl.constexpr, DESC: tl.constexpr
):
    """One bitonic step on ``x [R, W]``: order each pair (j, j + S) (bit S of j clear),
    descending where bit ``DIR_BIT`` of j differs from ``DESC``.

    A min/max over an axis of size 2 rather than tl.sort's xor reduction: the interpreter
    runs min/max in numpy but a custom reduction element by element.
    """
    h = tl.reshape(x, [R, W // (2 * S), 2, S])
    lo = tl.min(h, axis=2, keep_dims=True)
    hi = tl.max(h, axis=2, keep_dims=True)
    j = tl.reshape(tl.arange(0, W), [1, W // (2 * S), 2, S])
    right = (j & S) != 0
    flip = (j >> DIR_BIT) & 1
    if DESC:
        flip = 1 - flip
    desc = flip == 1
    return tl.reshape(tl.where(right != desc, hi, lo), [R, W])


@triton.jit
def _bitonic_merge(x, R: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, DESC: tl.constexpr):
    """Sort every bitonic block of ``BLOCK`` columns of ``x [R, W]``; block b goes
    descending when bit log2(BLOCK) of its start differs from ``DESC`` (so all the
    same way when ``BLOCK == W``)."""
    LOG: tl.constexpr = _log2(BLOCK)
    for t in tl.static_range(LOG):
        x = _compare_swap(x, R, W, BLOCK >> (t + 1), LOG, DESC)
    return x


@triton.jit
def _top(x, R: tl.constexpr, W: tl.constexpr, KP: tl.constexpr, DESC: tl.constexpr):
    """The ``KP`` largest of each row of ``x [R, W]``, sorted (descending if ``DESC``): ``[R, KP]``.

    Bitonic sort into blocks of KP, then halve: the elementwise max of an ascending and a
    descending block holds their KP largest, as a bitonic block to merge again.
    """
    LOG_KP: tl.constexpr = _log2(KP)
    for stage in tl.static_range(1, LOG_KP + 1):
        x = _bitonic_merge(x, R, W, 1 << stage, DESC)
    LOG_W: tl.constexpr = _log2(W)
    # The width halves each round; it is written out rather than named because compiled
    # Triton refuses to re-assign a constexpr in an unrolled loop (the interpreter allows it).
    for r in tl.static_range(LOG_W - LOG_KP):
        x = tl.reshape(tl.max(tl.reshape(x, [R, (W >> (r + 1)) // KP, 2, KP]), axis=2), [R, W >> (r + 1)])
        x = _bitonic_merge(x, R, W >> (r + 1), KP, DESC)
    return x


@triton.jit
def _scan(
    q_ptr, k_ptr, ids_ptr, ex_ptr, theta_ptr, B, N, D, E, n_tiles, slack,
    L2: tl.constexpr, TENSOR_CORES: tl.constexpr, SPLITS: tl.constexpr, KP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (query block, split)'s share of a search: ``(rows [BLOCK_B], row_ok, best
    [BLOCK_B, KP])``, ``best`` the top ``KP`` packed keys of tiles ``split, split + SPLITS,
    ...``, best first.

    With ``TENSOR_CORES`` a tile is first scored in TF32, and only a tile where some live
    key's TF32 score comes within its error bound (``slack * ||q|| * ||k||``) of its
    query's running threshold is scored again in float32 -- every score that is ranked
    is the exact float32 one, so the result is the float32 kernel's, bit for bit.

    ``theta [B]`` (packed keys, INT64_MIN at first) is shared by every program: each
    raises it (atomic max) to its queries' ``KP``-th best so far and skips what falls
    below it. That is exact: a program's ``KP``-th best has ``KP >= k`` distinct keys at
    or above it, so it never exceeds the query's overall ``k``-th best.
    """
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    best = tl.full([BLOCK_B, KP], _NONE_TL, tl.int64)
    floor = tl.full([BLOCK_B], _NONE_TL, tl.int64)  # each query's KP-th best so far
    if TENSOR_CORES:
        q_sq = tl.zeros([BLOCK_B], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dc = d0 + tl.arange(0, BLOCK_D)
            qc = tl.load(
                q_ptr + rows.to(tl.int64)[:, None] * D + dc[None, :],
                mask=row_ok[:, None] & (dc < D)[None, :],
                other=0.0,
            )
            q_sq += tl.sum(qc * qc, 1)
        q_slack = slack * tl.sqrt(q_sq)
    for t in range(split, n_tiles, SPLITS):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        ids = tl.load(ids_ptr + cols, mask=cols < N, other=-1)
        live = (ids >= 0)[None, :] & row_ok[:, None]
        # What other programs raised theta to since (volatile: read anew each tile, never
        # hoisted out of the loop); a stale value is still a valid bound.
        shared = tl.load(theta_ptr + rows, mask=row_ok, other=_NONE_TL, volatile=True)
        theta = tl.maximum(floor, shared)
        reach = True
        if TENSOR_CORES:
            approx, norms = _tile_scores_tf32(
                q_ptr, k_ptr, rows, row_ok, cols, N, D, L2, BLOCK_B, BLOCK_N, BLOCK_D
            )
            # Written as "not below" so that a NaN bound counts as a reach (scored exactly).
            # D * 2^-110: what products flushed to zero below float32's normal range may lose.
            bound = q_slack[:, None] * norms[None, :] + D * 7.7e-34
            below = approx + bound < _floor_score(theta)[:, None]
            reach = tl.max((live & ~below).to(tl.int32)) > 0
        if reach:
            scores = _tile_scores(q_ptr, k_ptr, rows, row_ok, cols, N, D, L2, BLOCK_B, BLOCK_N, BLOCK_D)
            packed = tl.where(live, _pack(scores, cols), _NONE_TL)
            # The running threshold: a tile with no live key above its query's KP-th best
            # so far cannot change `best` (keys are distinct), so it skips the exclusions,
            # the sort and the merge -- once the floors settle, nearly every tile of
            # scores in random order.
            if tl.max((packed > theta[:, None]).to(tl.int32)) > 0:
                packed = tl.where(excluded(ex_ptr, rows, row_ok, ids, E, BLOCK_B, BLOCK_N), _NONE_TL, packed)
                top = _top(packed, BLOCK_B, BLOCK_N, KP, False)
                # best descending, top ascending: their elementwise max holds the KP largest
                # of both as a bitonic sequence; merge it back into descending order.
                best = _bitonic_merge(tl.maximum(best, top), BLOCK_B, KP, KP, True)
                floor = tl.min(best, 1)
                tl.atomic_max(theta_ptr + rows, floor, mask=row_ok)
    return rows, row_ok, best


@triton.jit
def _store_candidates(cand_ptr, rows, row_ok, best, SPLITS: tl.constexpr, KP: tl.constexpr):
    """Write a program's ``best [BLOCK_B, KP]`` to its split of ``cand [B, SPLITS, KP]``."""
    ks = tl.arange(0, KP)
    out = cand_ptr + (rows.to(tl.int64)[:, None] * SPLITS + tl.program_id(1)) * KP + ks[None, :]
    tl.store(out, best, mask=row_ok[:, None])


@triton.jit
def _search_kernel(
    q_ptr, k_ptr, ids_ptr, ex_ptr, theta_ptr, B, N, D, E, n_tiles, slack,  # the scan's
    cand_ptr,
    L2: tl.constexpr, TENSOR_CORES: tl.constexpr, SPLITS: tl.constexpr, KP: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """:func:`_scan`, its candidates written to ``cand [B, SPLITS, KP]`` for the merge."""
    rows, row_ok, best = _scan(
        q_ptr, k_ptr, ids_ptr, ex_ptr, theta_ptr, B, N, D, E, n_tiles, slack,
        L2, TENSOR_CORES, SPLITS, KP, BLOCK_B, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    _store_candidates(cand_ptr, rows, row_ok, best, SPLITS, KP)


def tf32_slack(d: int, l2: bool) -> float:
    """``s`` such that ``|TF32 score - float32 score| <= s * ||q|| * ||k||`` for ``d``-wide rows.

    TF32 keeps 10 of float32's 23 mantissa bits (cut, not rounded): each operand is off
    by under 2^-10 of itself, a product by under 2^-9 of ``|q_i k_i|``, and a dot by under
    2^-9 of ``sum |q_i k_i| <= ||q|| ||k||``. Each float32 sum of ``d`` terms adds under
    ``d * 2^-24`` of that (two sums, and the norms' rounding: ``d * 2^-21`` covers them).
    l2 ranks by ``2 q.k - ||k||^2``: twice the dot's error. The factor 2 is margin: a wider
    bound rescores a few more tiles, never changes a result.
    """
    bound = 2.0 * (2.0**-9 + d * 2.0**-21)
    return 2.0 * bound if l2 else bound


def _grid_shape(batch: int, n: int, k: int) -> tuple[int, int, int]:
    """``(candidates per split KP, tile rows, splits)`` for a search of ``k`` among ``n`` rows."""
    kp = pow2(min(k, n))
    tile = max(kp, _MIN_TILE)
    n_tiles = triton.cdiv(n, tile)
    q_blocks = triton.cdiv(batch, _BLOCK_B)
    # Enough programs to fill a GPU, few enough that the merge input stays small.
    splits = max(1, min(n_tiles, triton.cdiv(512, q_blocks), _CANDIDATES // kp))
    return kp, tile, splits


class Scan(NamedTuple):
    """How one search's scan is launched: the leading arguments and the constexprs of
    :func:`_scan` (the query block size is ``BLOCK_B`` of ``meta``), and its warps."""

    grid: tuple[int, int]
    args: tuple  # q, keys, slot ids, exclusions, theta, B, N, D, E, n_tiles, slack
    meta: dict[str, object]
    kp: int
    splits: int


def plan(s: SearchInputs, theta: torch.Tensor) -> Scan:
    """The scan of search ``s`` (``B, N >= 1``), sharing running thresholds through
    ``theta`` (int64 ``[B]``, filled with INT64_MIN)."""
    queries, keys, slot_ids, k, exclude_ids = s.queries, s.keys, s.slot_ids, s.k, s.exclude_ids
    batch, n = queries.shape[0], keys.shape[0]
    q = queries.float().contiguous()
    width = 0 if exclude_ids is None else exclude_ids.shape[1]
    exclude = slot_ids if width == 0 else exclude_ids.contiguous()  # never read when E == 0
    kp, tile, splits = _grid_shape(batch, n, k)
    d, l2 = q.shape[1], s.metric == "l2"
    return Scan(
        (triton.cdiv(batch, _BLOCK_B), splits),
        (q, keys.contiguous(), slot_ids.contiguous(), exclude, theta, batch, n, d, width,
         triton.cdiv(n, tile), tf32_slack(d, l2)),
        {
            "L2": l2,
            "TENSOR_CORES": batch > TENSOR_CORE_BATCH,
            "SPLITS": splits,
            "KP": kp,
            "BLOCK_B": _BLOCK_B,
            "BLOCK_N": tile,
            "BLOCK_D": min(pow2(d, MIN_DOT), _MAX_BLOCK_D),
            "num_warps": _NUM_WARPS,
        },
        kp,
        splits,
    )  # fmt: skip


def search(s: SearchInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores float32, slots int64)``, each ``[B, k]``: the top-``k`` live, non-excluded
    rows, best first, ``-inf`` / ``-1`` past the end; each score is the one it was ranked
    by (l2: ``2 q . k - ||k||^2``).

    Queries are scored in float32; keys float32/16/bf16 (or float64, read as float32).
    Above ``TENSOR_CORE_BATCH`` queries tiles are screened in TF32 first (same result).
    """
    batch, n, k = s.queries.shape[0], s.keys.shape[0], s.k
    packed = torch.full((batch, k), _NONE, dtype=torch.int64, device=s.queries.device)
    if batch == 0 or n == 0:
        return unpack(packed)
    scan = plan(s, torch.full((batch,), _NONE, dtype=torch.int64, device=s.queries.device))
    cand = torch.empty((batch, scan.splits, scan.kp), dtype=torch.int64, device=s.queries.device)
    launch(_search_kernel, scan.grid, *scan.args, cand, **scan.meta)
    # The merge runs on [B, splits * KP] candidates, independent of N.
    flat = cand.view(batch, -1)
    best = flat.topk(min(k, flat.shape[1]), dim=1).values
    packed[:, : best.shape[1]] = best
    return unpack(packed)
