"""Merging the shards' partial results into the result of one memory holding every row."""

from __future__ import annotations

import torch

from ..ops import reference

LAST = torch.iinfo(torch.int64).max  # sequence number of "no row": after every real row


def topk_order(scores: torch.Tensor, seq: torch.Tensor, k: int) -> torch.Tensor:
    """Columns of the ``k`` best candidates per query: int64 ``[B, k]``.

    ``scores [B, C]`` (``-inf`` for no row) and ``seq [B, C]`` int64 global insertion
    numbers (``LAST`` for no row) of the candidates every shard sent. Ranks like one
    :class:`~kmem.KeyMemory`: by the score rounded to float32, ties to the row added
    first (lower ``seq``) -- two stable sorts, the tie-breaker first.
    """
    by_seq = seq.argsort(dim=1, stable=True)
    ranked = scores.detach().float().gather(1, by_seq)
    by_score = ranked.argsort(dim=1, descending=True, stable=True)
    return by_seq.gather(1, by_score)[:, :k]


def local_logsumexp(
    queries: torch.Tensor,
    keys: torch.Tensor,
    slot_ids: torch.Tensor,
    scale: float,
    metric: str,
    exclude_ids: torch.Tensor | None,
) -> torch.Tensor:
    """``log sum_j exp(scale * score_j)`` over a shard's live, non-excluded rows, up to a
    per-query constant (the ``-||q||^2`` of l2, the same on every shard): ``[B]``,
    ``-inf`` where no row qualifies. Streams over chunks of rows like the reference
    dense attention; differentiable in ``queries``."""
    q = queries.to(reference.working_dtype(queries, keys))
    exclude = None
    if exclude_ids is not None and exclude_ids.shape[1] > 0:
        exclude = exclude_ids.sort(dim=1).values
    maxima, sums = [], []
    step = reference.chunk_rows(q.shape[0])
    for start in range(0, keys.shape[0], step):
        ids = slot_ids[start : start + step]
        s = scale * reference.chunk_scores(q, keys[start : start + step], metric)
        dead = (ids < 0).expand_as(s)
        if exclude is not None:
            dead = dead | reference.excluded(ids.expand_as(s).contiguous(), exclude)
        s = s.masked_fill(dead, float("-inf"))
        top = s.detach().amax(1, keepdim=True)
        maxima.append(top)
        # A chunk with no row shifts by 0: exp(-inf) is 0 and its gradient too, never NaN.
        sums.append(torch.exp(s - torch.where(torch.isfinite(top), top, 0)).sum(1, keepdim=True))
    if not maxima:
        return q.new_full((q.shape[0],), float("-inf"))
    top = torch.cat(maxima, 1)
    best = top.amax(1, keepdim=True)
    best = torch.where(torch.isfinite(best), best, 0)
    total = (torch.cat(sums, 1) * torch.exp(top - best)).sum(1)
    lse = best[:, 0] + torch.log(total.clamp(min=torch.finfo(total.dtype).tiny))
    return lse.masked_fill(total.detach() <= 0, float("-inf"))


def combine_dense(partial: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Dense attention from the shards' normalised partial results ``partial [B, P, V]``
    and their log-sum-exps ``lse [B, P]``: weights ``exp(lse_r - logsumexp(lse))``, the
    split-k / flash-decoding rescaling. ``[B, V]``; zeros where no shard has a row."""
    weights = reference.masked_softmax(lse, torch.isfinite(lse))
    return torch.einsum("bp,bpv->bv", weights, partial)
