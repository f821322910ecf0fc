"""A memory's reads (:class:`~kmem.MemoryLike`: a :class:`~kmem.KeyMemory` or a
:class:`~kmem.distributed.ShardedKeyMemory`) as ``torch.library`` custom ops, for ``torch.compile``.

Dynamo cannot trace the memory's lock, its Python id bookkeeping or its checks, and the
live row count changes with every add and delete. Under compilation
:meth:`MemoryLike.search` and :meth:`MemoryLike.attend` therefore become one opaque node
each: ``kmem::memory_search`` / ``kmem::memory_attend`` take the query tensors and the
memory's integer handle (:func:`register`) and run the eager read at run time, so a
compiled model reads the memory live (forgetting shows without recompiling) and
``fullgraph=True`` holds.

Backward of ``memory_attend`` recomputes the read with the reference backend under
``torch.func.vjp`` -- the forward saved only the queries -- and checks that the memory
did not change since the forward (:meth:`MemoryLike.check_unedited`). Every backend
selects the same rows (the kernel contract, tested against the reference), so the
recomputation differentiates the forward's selection.
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

import torch

from .ops.reference import working_dtype

if TYPE_CHECKING:
    from .memory_like import MemoryLike

_MEMORIES: weakref.WeakValueDictionary[int, MemoryLike] = weakref.WeakValueDictionary()
_NEXT = itertools.count()


def register(memory: MemoryLike) -> int:
    """A new handle for ``memory`` in the ops below (held weakly: the registry never
    keeps a memory alive). Each memory, and each copy of one, registers once."""
    h = next(_NEXT)
    _MEMORIES[h] = memory
    return h


def _memory(h: int) -> MemoryLike:
    try:
        return _MEMORIES[h]
    except KeyError:
        raise RuntimeError(f"kmem: the memory (handle {h}) a compiled graph reads no longer exists") from None


# ------------------------------------------------------------------ search
@torch.library.custom_op("kmem::memory_search", mutates_args=())
def memory_search(
    queries: torch.Tensor, exclude_ids: torch.Tensor | None, h: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _memory(h).search(queries, k, exclude_ids=exclude_ids)


@memory_search.register_fake
def _(queries, exclude_ids, h, k):
    batch = queries.shape[0]
    return queries.new_empty((batch, k), dtype=torch.float32), queries.new_empty(
        (batch, k), dtype=torch.int64
    )


# ---------------------------------------------------------------- attend
@torch.library.custom_op("kmem::memory_attend", mutates_args=())
def memory_attend(
    queries: torch.Tensor, exclude_ids: torch.Tensor | None, h: int, k: int | None, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, out_dim], edits)``: the read and the memory's edit count it saw (a
    0-d int64 tensor, so the compiled graph carries the run-time value to backward)."""
    out, edits = _memory(h).read(queries, k, scale, exclude_ids)
    return out, torch.tensor(edits, dtype=torch.int64)


def _out_dtype(queries: torch.Tensor, mem: MemoryLike) -> torch.dtype:
    return working_dtype(queries, torch.empty(0, dtype=mem.dtype))


@memory_attend.register_fake
def _(queries, exclude_ids, h, k, scale):
    mem = _memory(h)
    return queries.new_empty(
        (queries.shape[0], mem.out_dim), dtype=_out_dtype(queries, mem)
    ), queries.new_empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("kmem::memory_attend_backward", mutates_args=())
def memory_attend_backward(
    grad: torch.Tensor,
    queries: torch.Tensor,
    exclude_ids: torch.Tensor | None,
    edits: torch.Tensor,
    h: int,
    k: int | None,
    scale: float | None,
) -> torch.Tensor:
    mem = _memory(h)
    seen = []

    def read(q: torch.Tensor) -> torch.Tensor:
        out, now = mem.read(q, k, scale, exclude_ids, backend="reference")
        seen.append(now)
        return out

    # torch.func, not autograd.grad: a custom op's body runs with autograd dispatch off;
    # and the reference twin, the one backend written in plain differentiable torch ops.
    _, vjp = torch.func.vjp(read, queries)
    mem.check_unedited(int(edits), seen[0])
    return vjp(grad.to(_out_dtype(queries, mem)))[0]


@memory_attend_backward.register_fake
def _(grad, queries, exclude_ids, edits, h, k, scale):
    return torch.empty_like(queries)


def _setup_context(ctx, inputs, output) -> None:
    queries, exclude_ids, ctx.h, ctx.k, ctx.scale = inputs
    ctx.save_for_backward(queries, exclude_ids, output[1])


def _backward(ctx, grad, _grad_edits):
    queries, exclude_ids, edits = ctx.saved_tensors
    dq = memory_attend_backward(grad.contiguous(), queries, exclude_ids, edits, ctx.h, ctx.k, ctx.scale)
    return dq, None, None, None, None


memory_attend.register_autograd(_backward, setup_context=_setup_context)
