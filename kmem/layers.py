"""KeyMemoryAttention: a drop-in module that attends from a residual stream to a KeyMemory."""

from __future__ import annotations

import torch
from torch import nn

from .memory_like import MemoryLike
from .rows import IdsLike


class KeyMemoryAttention(nn.Module):
    """Project ``x`` to queries, attend over a memory, project back.

    ``x [..., embed_dim]`` -> ``[..., embed_dim]``. Each of ``num_heads`` heads has its
    own query projection to ``memory.key_dim`` and reads the same memory; the heads'
    results (``memory.out_dim`` each: values, or class probabilities of a label memory)
    are concatenated and projected to ``embed_dim``.

    The memory is not a submodule -- its rows are data, not weights -- but it travels
    with the module: ``state_dict`` holds it as extra state (its rows and tombstones;
    ``load_state_dict`` replaces the memory's rows with them), and ``copy.deepcopy`` /
    ``pickle`` copy it. A copy forgets only what is deleted from it. ``torch.compile``
    (``fullgraph=True`` included) compiles the layer around one opaque memory read,
    which sees the memory live -- a sharded memory's too, whose read stays a collective.

    Args:
        embed_dim: width of ``x`` and of the output.
        memory: the memory to read: any :class:`~kmem.MemoryLike` -- a
            :class:`~kmem.KeyMemory`, or a :class:`~kmem.distributed.ShardedKeyMemory`,
            which makes every forward (and backward) a collective over its process group.
        num_heads: query heads.
        k: rows retrieved per query (None: attend over all live rows).
        scale: softmax temperature on scores; default ``1/sqrt(key_dim)``.
        bias: whether the projections have biases.
    """

    def __init__(
        self,
        embed_dim: int,
        memory: MemoryLike,
        num_heads: int = 1,
        k: int | None = 32,
        scale: float | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(memory, MemoryLike):
            raise TypeError(
                f"memory must be a kmem.MemoryLike (e.g. a KeyMemory or ShardedKeyMemory), got {type(memory).__name__}"
            )
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.memory = memory
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.k = k
        self.scale = scale
        factory = {"device": memory.device}
        self.q_proj = nn.Linear(embed_dim, num_heads * memory.key_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * memory.out_dim, embed_dim, bias=bias, **factory)

    def forward(self, x: torch.Tensor, exclude_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., embed_dim]``; ``exclude_ids [..., E]`` int64 ids each position must not
        retrieve (``-1`` = none). Returns ``[..., embed_dim]``."""
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must end in embed_dim={self.embed_dim}, got shape {list(x.shape)}")
        lead = x.shape[:-1]
        queries = self.q_proj(x).reshape(-1, self.memory.key_dim)
        if exclude_ids is not None:
            if exclude_ids.shape[:-1] != lead:
                raise ValueError(f"exclude_ids must have shape {[*lead, 'E']}, got {list(exclude_ids.shape)}")
            exclude_ids = exclude_ids.reshape(-1, exclude_ids.shape[-1]).repeat_interleave(self.num_heads, 0)
        # One custom op under torch.compile (fullgraph=True included): see kmem.compiled_reads.
        out = self.memory.attend(queries, k=self.k, scale=self.scale, exclude_ids=exclude_ids)
        return self.out_proj(out.to(x.dtype).reshape(*lead, self.num_heads * self.memory.out_dim))

    def get_extra_state(self) -> dict:
        """The memory's :meth:`~kmem.KeyMemory.state_dict` (rows, tombstones, version),
        so the layer's ``state_dict`` carries it."""
        return {"memory": self.memory.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Replace the memory's rows with those of ``state`` (see :meth:`get_extra_state`)."""
        self.memory.load_state_dict(state["memory"])

    def forget(self, ids: IdsLike, *, request_id: str | None = None, reason: str | None = None) -> int:
        """Delete memory rows by id (see :meth:`KeyMemory.delete`, which records
        ``request_id`` and ``reason`` in the memory's ledger); returns how many."""
        return self.memory.delete(ids, request_id=request_id, reason=reason)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, k={self.k}, memory={self.memory!r}"
