"""The core of exact mode: the training samples the dense weights are fitted on, which
are never to be forgotten (public or consented data, or a declared slice)."""

from __future__ import annotations

import torch

from .samples import Samples

# Seeds the draw of a --core-fraction core: one fixed core for every evaluation seed,
# never the draw of a forget request or of any model's initialisation.
CORE_SEED = 1_000_003


def choose_core(
    train: Samples, *, fraction: float | None = None, ids: torch.Tensor | list[int] | None = None
) -> Samples:
    """The samples of ``train`` forming the core: those whose id is in ``ids``, or a
    ``fraction`` in (0, 1) of them drawn with :data:`CORE_SEED` (order kept). Exactly
    one of the two; ``ValueError`` naming the argument for an empty core, a fraction
    outside (0, 1) or ids not in ``train``."""
    if (fraction is None) == (ids is None):
        raise ValueError("give the core as exactly one of fraction and ids")
    if ids is not None:
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        unknown = ids[~torch.isin(ids, train.ids)].tolist()
        if unknown:
            raise ValueError(f"core ids: {len(unknown)} not in the training set, e.g. {unknown[:5]}")
        if not len(ids):
            raise ValueError("core ids: the core holds no samples")
        return train[torch.isin(train.ids, ids)]
    if not 0 < fraction < 1:  # NaN fails too
        raise ValueError(f"core fraction must be in (0, 1), got {fraction}")
    n = round(fraction * len(train))
    if n < 1:
        raise ValueError(f"core fraction {fraction} of {len(train)} samples holds no sample")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(CORE_SEED))[:n]
    return train[pick.sort().values]
