"""What a layer or a compiled graph needs of a memory: :class:`MemoryLike`.

:class:`~kmem.KeyMemory` and :class:`~kmem.distributed.ShardedKeyMemory` both satisfy
it; so may a user's own memory. :class:`~kmem.KeyMemoryAttention` reads any of them the
same way, and :mod:`kmem.compiled_reads` turns their reads into one opaque
``torch.compile`` node each.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .rows import IdsLike


@runtime_checkable
class MemoryLike(Protocol):
    """A deletable key/value memory with top-k and dense reads.

    ``key_dim``: width of keys and queries; ``out_dim``: width of a read's result
    (values, or class probabilities of a label memory); ``dtype`` and ``device``: the
    rows'. Reads take queries ``[B, key_dim]`` and optional ``exclude_ids [B, E]`` int64
    (``-1`` = none); ``k=None`` attends over every live row.
    """

    key_dim: int
    out_dim: int
    dtype: torch.dtype
    device: torch.device

    def search(
        self, queries: torch.Tensor, k: int, exclude_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [B, k], ids [B, k])`` best first."""
        ...

    def attend(
        self,
        queries: torch.Tensor,
        k: int | None = 32,
        scale: float | None = None,
        exclude_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Softmax attention over the top-``k`` rows: ``[B, out_dim]``, differentiable in ``queries``."""
        ...

    def read(
        self,
        queries: torch.Tensor,
        k: int | None = 32,
        scale: float | None = None,
        exclude_ids: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> tuple[torch.Tensor, int]:
        """:meth:`attend`'s result and the edit count it saw (``backend`` overrides the memory's)."""
        ...

    def check_unedited(self, edits: int, now: int | None = None) -> None:
        """Raise :class:`~kmem.MemoryEditedError` if the memory changed since a read saw ``edits``."""
        ...

    def delete(self, ids: IdsLike, *, request_id: str | None = None, reason: str | None = None) -> int:
        """Delete rows by id; returns how many."""
        ...

    def state_dict(self) -> dict:
        """The rows and what a :meth:`load_state_dict` needs to restore them."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Replace the rows with those of :meth:`state_dict`."""
        ...
