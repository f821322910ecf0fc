"""Pure-PyTorch reference twins of kmem's ops.

They are the definition every compiled backend is tested against, and the one
fallback (:mod:`kmem.ops.registry`: last in priority, serving every call).
They stream over the memory in chunks of rows, so the ``[B, N]`` score matrix is
never held whole and they stay usable at millions of rows.

Conventions shared by all backends:

* A memory is ``keys [N, d]`` with ``slot_ids [N]`` int64; ``slot_ids[j] == -1`` marks
  slot ``j`` as empty or deleted (the tombstone), which no op ever returns.
* ``score = q . k`` (``metric="ip"``) or ``-||q - k||^2`` (``metric="l2"``).
* Top-k ranks by the score rounded to float32, ties going to the lower slot (the row
  added earlier; compaction keeps that order). A search returns those float32 ranking
  scores (for l2 the ranking drops the per-query constant: ``2 q . k - ||k||^2``);
  attention recomputes the chosen rows' scores in the working precision, which is what
  gradients flow through.
* ``exclude_ids [B, E]`` removes rows whose id is listed for that query (-1 = none).
"""

from __future__ import annotations

import torch

from .inputs import AttendInputs, CompactInputs, DenseInputs, ScrubInputs, SearchInputs

_NONE = torch.iinfo(torch.int64).min  # packed key of "no row": below every real row
_LOW32 = 0xFFFFFFFF


def working_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: float32, or float64 when any input is float64."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def chunk_rows(batch: int) -> int:
    """Rows per chunk so a chunk of scores stays near 16M elements."""
    return max(1024, min(1 << 17, (1 << 24) // max(batch, 1)))


def _pack(scores: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """int64 keys that order by (float32 score, then lower slot): ``[B, C]``."""
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # order-preserving as signed int
    return (bits.to(torch.int64) << 32) | (_LOW32 - slots)


def _unpack_slots(packed: torch.Tensor) -> torch.Tensor:
    return torch.where(packed == _NONE, -1, _LOW32 - (packed & _LOW32))


def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed keys ``[B, k]`` -> ``(scores float32, slots int64)``; ``-inf`` and ``-1``
    for "no row" (the compiled backends' searches end the same way)."""
    bits = (packed >> 32).to(torch.int32)
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    scores = bits.view(torch.float32).masked_fill(packed == _NONE, float("-inf"))
    return scores, _unpack_slots(packed)


def _excluded(ids: torch.Tensor, exclude_sorted: torch.Tensor) -> torch.Tensor:
    """``ids [B, C]`` found in the row's sorted ``exclude_sorted [B, E]``: bool ``[B, C]``."""
    pos = torch.searchsorted(exclude_sorted, ids).clamp_(max=exclude_sorted.shape[1] - 1)
    return torch.gather(exclude_sorted, 1, pos) == ids


def _chunk_scores(q: torch.Tensor, keys: torch.Tensor, metric: str) -> torch.Tensor:
    """Ranking scores ``[B, C]``; for l2 the per-query constant ``-||q||^2`` is left out."""
    kc = keys.to(q.dtype)
    s = q @ kc.T
    if metric == "l2":
        s = 2 * s - kc.pow(2).sum(1)
    return s


def _chunk_top(scores: torch.Tensor, start: int, m: int) -> torch.Tensor:
    """The ``m`` best rows of one chunk as packed keys ``[B, m]``, by the tie rule.

    A float top-k finds them fast; only queries whose m-th score ties with a row left
    out (topk's choice among equals is arbitrary) are re-ranked through packed keys.
    """
    scores = scores.float()
    vals, idx = scores.topk(m, dim=1)
    packed = _pack(vals, idx + start)
    bound = vals[:, -1:]
    tied = torch.isfinite(bound[:, 0]) & ((scores == bound).sum(1) > (vals == bound).sum(1))
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        slots = torch.arange(start, start + scores.shape[1], device=scores.device)
        packed[rows] = _pack(scores[rows], slots).topk(m, dim=1).values
    return packed


def _sorted_exclusions(exclude_ids: torch.Tensor | None) -> torch.Tensor | None:
    if exclude_ids is None or exclude_ids.shape[1] == 0:
        return None
    return exclude_ids.sort(dim=1).values


def search(s: SearchInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` live rows per query, best first: ``(scores float32 [B, k], slots
    int64 [B, k])``, ``-inf`` / ``-1`` past the end; the scores are the ranking's (see
    the module's conventions). Not differentiable.
    """
    keys, slot_ids, k, metric = s.keys, s.slot_ids, s.k, s.metric
    with torch.no_grad():
        q = s.queries.to(working_dtype(s.queries, keys))
        batch, n = q.shape[0], keys.shape[0]
        exclude = _sorted_exclusions(s.exclude_ids)
        # A chunk keeps k + E candidates: at most E of them can be excluded for a query.
        extra = 0 if exclude is None else exclude.shape[1]
        best = torch.full((batch, k), _NONE, dtype=torch.int64, device=q.device)
        step = chunk_rows(batch)
        for start in range(0, n, step):
            ids = slot_ids[start : start + step]
            scores = _chunk_scores(q, keys[start : start + step], metric)
            dead = ids < 0
            if bool(dead.any()):
                scores.masked_fill_(dead, float("-inf"))
            top = _chunk_top(scores, start, min(k + extra, ids.shape[0]))
            top_ids = ids[_unpack_slots(top) - start]
            top.masked_fill_(top_ids < 0, _NONE)
            if exclude is not None:
                top.masked_fill_(_excluded(top_ids, exclude), _NONE)
            best = torch.cat([best, top], 1).topk(k, dim=1).values
        return unpack(best)


def take_rows(rows: torch.Tensor, slots: torch.Tensor, sparse_grad: bool = False) -> torch.Tensor:
    """``rows[slots]``, reading row 0 for slot -1 (callers mask those); zeros if there are no
    rows. ``sparse_grad``: ``rows [N, C]``'s gradient is a sparse COO tensor, one entry per slot."""
    if rows.shape[0] == 0:
        return rows.new_zeros(*slots.shape, *rows.shape[1:])
    if sparse_grad:
        return torch.nn.functional.embedding(slots.clamp(min=0), rows, sparse=True)
    return rows[slots.clamp(min=0)]


def gather_scores(
    queries: torch.Tensor, keys: torch.Tensor, slots: torch.Tensor, metric: str, sparse_grad: bool = False
) -> torch.Tensor:
    """Differentiable scores of the chosen rows ``slots [B, k]``: ``[B, k]``, -inf where slot is -1."""
    dtype = working_dtype(queries, keys)
    q = queries.to(dtype)
    rows = take_rows(keys, slots, sparse_grad).to(dtype)  # [B, k, d]
    if metric == "ip":
        s = torch.bmm(rows, q.unsqueeze(-1)).squeeze(-1)  # einsum's parsing costs more than the product
    else:
        s = -(q[:, None, :] - rows).pow(2).sum(-1)
    return s.masked_fill(slots < 0, float("-inf"))


def masked_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the valid entries of each row; all-zero weights for a row with none."""
    logits = logits.masked_fill(~valid, float("-inf"))
    logits = torch.where(valid.any(-1, keepdim=True), logits, torch.zeros_like(logits))
    return torch.softmax(logits, -1) * valid


def topk_attention(a: AttendInputs) -> torch.Tensor:
    """softmax(scale * score) over the top-k live rows, then the weighted sum of their values.

    Vector values ``[N, V]`` give ``[B, V]``; int64 labels ``[N]`` give class
    probabilities ``[B, num_classes]``. Differentiable in queries, keys and values; only
    the retrieved rows receive gradient (sparse gradients with ``a.sparse_grad``).
    """
    _, slots = search(a.search())
    valid = slots >= 0
    weights = masked_softmax(
        a.scale * gather_scores(a.queries, a.keys, slots, a.metric, a.sparse_grad), valid
    )
    if not a.labels:
        rows = take_rows(a.values, slots, a.sparse_grad)
        return torch.einsum("bk,bkv->bv", weights, rows.to(weights.dtype))
    out = weights.new_zeros(weights.shape[0], a.num_classes)
    return out.scatter_add(1, take_rows(a.values, slots), weights)


def dense_attention(d: DenseInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`topk_attention` over every live row, by an online softmax over chunks:
    ``(out [B, W], lse [B])``, ``lse`` the log-sum-exp of ``scale * score`` over those
    rows (``-inf`` for a query with none)."""
    keys, values, slot_ids, scale, metric = d.keys, d.values, d.slot_ids, d.scale, d.metric
    dtype = d.working_dtype
    q = d.queries.to(dtype)
    batch, n = q.shape[0], keys.shape[0]
    width = d.width
    exclude = _sorted_exclusions(d.exclude_ids)
    run_max = torch.full((batch, 1), float("-inf"), dtype=dtype, device=q.device)
    total = q.new_zeros(batch, 1)
    acc = q.new_zeros(batch, width)
    step = chunk_rows(batch)
    for start in range(0, n, step):
        stop = min(n, start + step)
        ids = slot_ids[start:stop]
        s = scale * _chunk_scores(q, keys[start:stop], metric)
        if metric == "l2":
            s = s - scale * q.pow(2).sum(1, keepdim=True)
        dead = (ids < 0).expand(batch, -1)
        if exclude is not None:
            dead = dead | _excluded(ids.expand(batch, -1).contiguous(), exclude)
        s = s.masked_fill(dead, float("-inf"))
        new_max = torch.maximum(run_max, s.amax(1, keepdim=True))
        shift = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        p = torch.exp(s - shift)
        rescale = torch.exp(run_max - shift)
        if not d.labels:
            contrib = p @ values[start:stop].to(dtype)
        else:
            contrib = p.new_zeros(batch, width).index_add(1, values[start:stop], p)
        acc = acc * rescale + contrib
        total = total * rescale + p.sum(1, keepdim=True)
        run_max = new_max
    has = total > 0
    out = acc / torch.where(has, total, torch.ones_like(total))
    return out, torch.where(has, run_max + total.log(), float("-inf")).squeeze(1)


def compact_rows(c: CompactInputs) -> int:
    """Stable compaction: the rows of each ``srcs[i] [N, ...]`` where ``keep [N]`` holds go,
    in order, to ``outs[i][:n]``."""
    rows = c.keep.nonzero().squeeze(1)
    n = rows.shape[0]
    for out in c.outs:
        if out.shape[0] < n:
            raise ValueError(f"out holds {out.shape[0]} rows but {n} are kept")
    for src, out in zip(c.srcs, c.outs, strict=True):
        torch.index_select(src, 0, rows, out=out[:n])
    return n


def zero_rows(z: ScrubInputs) -> None:
    """Zero the rows ``rows`` (int64 ``[n]``) of ``dst [N, ...]`` in place."""
    z.dst.index_fill_(0, z.rows, 0)
