"""The collectives a sharded memory needs, on a ``torch.distributed`` process group.

Every call goes through :class:`Comm`, which turns a failed or timed-out collective
into a :class:`ShardError` that says what was running and why it may have failed, and
counts the tensor bytes this rank sent to other ranks (the network cost of a query).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist


class ShardError(RuntimeError):
    """A collective of a sharded memory failed: a peer rank died, hung past the process
    group's timeout, or called a different operation. The process group is then unusable."""


class Comm:
    """One process group with error reporting and a count of bytes sent.

    Args:
        group: the process group (``None``: the default group, which must exist).
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group "
                "(torchrun sets the environment for init_method='env://') before building a ShardedKeyMemory"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.bytes_sent = 0  # tensor payload sent to other ranks, since construction

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Raise :class:`ShardError` naming ``what`` if a collective inside fails."""
        try:
            yield
        except ShardError:
            raise
        except (RuntimeError, dist.DistError) as err:
            raise ShardError(
                f"kmem.distributed: {what} failed on rank {self.rank} of {self.world_size} "
                f"({self.backend}): a peer rank died, hung past the process group's timeout "
                f"(init_process_group(timeout=...)), or called another operation. "
                f"The process group cannot be used any more. Cause: {err}"
            ) from err

    def gather_objects(self, obj: object, what: str) -> list:
        """Every rank's ``obj`` (small, picklable), in rank order."""
        out: list = [None] * self.world_size
        with self.guard(what):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_ints(self, values: list[int], what: str, device: torch.device) -> torch.Tensor:
        """Every rank's ``values`` (same length on all): int64 ``[world_size, len(values)]``."""
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        out = mine.new_empty(self.world_size * len(values))  # gloo wants the flat form
        with self.guard(what):
            dist.all_gather_single(out, mine, group=self.group)
        return out.view(self.world_size, len(values))

    def all_to_all(
        self,
        x: torch.Tensor,
        what: str,
        send: list[int] | None = None,
        recv: list[int] | None = None,
    ) -> torch.Tensor:
        """Rows ``x[sum(send[:r]) : sum(send[:r+1])]`` go to rank ``r``; returns the rows
        received, by source rank (``recv[r]`` from rank ``r``). Without counts, ``x`` is
        ``[world_size, ...]`` and ``x[r]`` goes to rank ``r``. Differentiable: the
        backward is the reverse exchange, so every rank must run it (as with DDP)."""
        row = x[0].numel() * x.element_size() if x.shape[0] else 0
        others = self.world_size - 1 if send is None else sum(send) - send[self.rank]
        self.bytes_sent += row * others
        return _AllToAll.apply(x.contiguous(), self, what, send, recv)


class _AllToAll(torch.autograd.Function):
    # forward + setup_context (not ctx in forward): torch.func.vjp -- how a compiled
    # layer's backward recomputes a read (kmem.compiled_reads) -- accepts only this form.
    @staticmethod
    def forward(x: torch.Tensor, comm: Comm, what: str, send, recv) -> torch.Tensor:
        rows = x.shape[0] if recv is None else sum(recv)
        out = x.new_empty(rows, *x.shape[1:])
        with comm.guard(what):
            dist.all_to_all_single(out, x, recv, send, group=comm.group)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, ctx.comm, ctx.what, ctx.send, ctx.recv = inputs

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The reverse exchange (the counts swapped), itself differentiable.
        back = _AllToAll.apply(grad.contiguous(), ctx.comm, f"the backward of {ctx.what}", ctx.recv, ctx.send)
        return back, None, None, None, None
