"""Raw memory buffers for the kernel tests of every backend: the ops take these directly."""

from __future__ import annotations

import torch


def buffers(
    n: int, d: int, dead_every: int = 0, data=torch.randn, *, scrub: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU ``keys [n, d]`` and int64 ``slot_ids [n]`` (ids 100..), every ``dead_every``-th row
    dead; ``scrub=False`` keeps a dead row's key, so one that would score high must still be
    skipped."""
    keys = data(n, d)
    slot_ids = torch.arange(100, 100 + n)
    if dead_every:
        slot_ids[::dead_every] = -1
        if scrub:
            keys[::dead_every] = 0
    return keys, slot_ids


def exclusions(slot_ids: torch.Tensor, batch: int, width: int) -> torch.Tensor:
    """int64 ``[batch, width]`` random live ids to exclude, with -1 padding and an id not in
    the memory."""
    live = slot_ids[slot_ids >= 0]
    ex = live[torch.randint(0, len(live), (batch, width))]
    ex[:, -1] = -1
    ex[0, 0] = 10**9
    return ex
