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


def combine_dense(partial: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Dense attention from the shards' normalised partial results ``partial [B, P, V]``
    and their log-sum-exps ``lse [B, P]``: weights ``exp(lse_r - logsumexp(lse))``, the
    split-k / flash-decoding rescaling. ``[B, V]``; zeros where no shard has a row."""
    weights = reference.masked_softmax(lse, torch.isfinite(lse))
    return torch.einsum("bp,bpv->bv", weights, partial)
