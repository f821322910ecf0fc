"""ExemplarTokens: learnable per-sample vectors addressed by sample id, each row with its
own optimiser state, so rows can be added, deleted and compacted mid-training.

MUNKEY's memory values are learnable. :meth:`KeyMemory.attend` is differentiable in the
queries only, so the model searches the memory for ids and gathers the rows' tokens
from this table; the gather is sparse, so only the rows retrieved get gradient.

Optimiser state follows its row. The table is trained by its own lazy Adam
(:meth:`step`): the first and second moments and the step count of every row are
buffers beside the weights, indexed like them, and every operation that moves rows
moves them together -- growth (:meth:`add`) appends rows with zero state, deletion
zeroes a row's weight and state and frees its id, compaction moves the live rows
(weight, moments, step count) to the front in order. A row's update depends only on
its own gradients and step count, so a row's trajectory is the same whatever other
rows are added, deleted or compacted meanwhile. No weight decay on tokens: a row that
is not retrieved is not touched.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .. import ops
from ..rows import IdsLike, id_tensor
from ..slot_index import SlotIndex, repeats


class ExemplarTokens(nn.Module):
    """Rows ``weight [n, dim]`` (a parameter) with ids ``ids [n]`` (``-1``: deleted).

    Args:
        dim: token width.
        lr: learning rate of :meth:`step`; betas, eps: Adam's.
        compact_threshold: compact once this fraction of rows is deleted.
    """

    def __init__(
        self,
        dim: int,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        compact_threshold: float = 0.25,
    ) -> None:
        super().__init__()
        self.dim, self.lr, self.betas, self.eps = dim, lr, betas, eps
        self.compact_threshold = compact_threshold
        self.weight = nn.Parameter(torch.empty(0, dim))
        self.register_buffer("ids", torch.empty(0, dtype=torch.int64))
        # Optimiser state: not part of a checkpoint, and released (None) when training
        # ends -- :meth:`step` restarts it at zero, as after loading a checkpoint.
        self.register_buffer("exp_avg", torch.empty(0, dim), persistent=False)
        self.register_buffer("exp_avg_sq", torch.empty(0, dim), persistent=False)
        self.register_buffer("steps", torch.empty(0, dtype=torch.int64), persistent=False)
        self._index = SlotIndex(self.ids)
        self._dead = 0  # rows deleted since the last compaction

    def __len__(self) -> int:
        return self.weight.shape[0] - self._dead

    def __contains__(self, id_: object) -> bool:
        return self._index.holds(id_, self.ids)

    # -------------------------------------------------------------- rows
    def add(self, ids: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append rows ``ids`` (int64 ``[n]``, new) holding ``tokens [n, dim]``, state zero."""
        ids = id_tensor("ids", ids).to(self.ids.device)
        m = len(ids)
        if tokens.shape != (m, self.dim):
            raise ValueError(f"tokens must be [{m}, {self.dim}], got {list(tokens.shape)}")
        taken = ids[self._index.find(ids, self.ids) >= 0].tolist()
        if taken or bool((ids < 0).any()) or len(ids.unique()) != m:
            raise ValueError(
                f"ids must be new, distinct and >= 0 (already held: {taken[:5]}, "
                f"repeated: {repeats(ids.tolist())[:5]})"
            )
        n = self.weight.shape[0]
        self._set_rows(
            torch.cat([self.weight.detach(), tokens.detach().to(self.weight.dtype)]),
            torch.cat([self.ids, ids]),
            *(torch.cat([t, t.new_zeros(m, *t.shape[1:])]) for t in self._state()),
        )
        self._index.insert(ids, torch.arange(n, n + m, device=ids.device), self.ids)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of each id (any shape, int64; ``-1`` stays ``-1``); ``KeyError`` if unknown."""
        ids = ids.to(self.ids.device)
        rows = self._index.find(ids, self.ids)
        unknown = ids[(rows < 0) & (ids >= 0)]
        if len(unknown):
            raise KeyError(f"id {int(unknown[0])} has no exemplar token")
        return rows

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokens of ``ids`` (any shape) -> ``[*ids.shape, dim]``; zeros where ``ids == -1``.
        The gather is sparse: only these rows get gradient."""
        rows = self.rows(ids)
        found = rows >= 0
        # Only the rows found are looked up: a -1 must not reach a row as a zero gradient,
        # which step() would count as a step of that row.
        tokens = nn.functional.embedding(rows[found], self.weight, sparse=True)
        return self.weight.new_zeros(*rows.shape, self.dim).index_put((found,), tokens)

    def get(self, ids: IdsLike) -> torch.Tensor:
        """Copies of the tokens of ``ids`` ``[n, dim]`` (no gradient)."""
        rows = self.rows(id_tensor("ids", ids))
        if bool((rows < 0).any()):
            raise KeyError("ids must be >= 0")
        return self.weight.detach()[rows].clone()

    def delete(self, ids: IdsLike) -> int:
        """Delete rows by id: weight and optimiser state zeroed, id freed; returns how many.
        Unknown ids raise ``KeyError``, repeated ones ``ValueError``, and then nothing is
        deleted."""
        ids = id_tensor("ids", ids).to(self.ids.device)
        if not len(ids):
            return 0
        rows = self._index.take(ids, self.ids, "with an exemplar token", distinct=True, verb="deleted")
        with torch.no_grad():
            for t in (self.weight, *self._state()):
                ops.zero_rows(t, rows)
            self.ids.index_fill_(0, rows, -1)  # which takes the ids out of the index
        self._dead += len(ids)
        if self._dead > self.compact_threshold * self.weight.shape[0]:
            self.compact()
        return len(ids)

    def compact(self) -> int:
        """Drop deleted rows, moving the live ones (weight and state together) to the
        front in order; returns how many rows were dropped."""
        keep = self.ids >= 0
        dropped = int((~keep).sum())
        if dropped:
            self._set_rows(self.weight.detach()[keep], self.ids[keep], *(t[keep] for t in self._state()))
            self._index.rebuild(self.ids)
        return dropped

    def release_state(self) -> None:
        """Free the optimiser state (at the end of training): it is not part of a
        checkpoint, and deletion then scrubs only the rows. A later :meth:`step`
        restarts it at zero."""
        self.exp_avg = self.exp_avg_sq = self.steps = None

    def _state(self) -> tuple[torch.Tensor, ...]:
        """The optimiser state ``(exp_avg, exp_avg_sq, steps)``, or ``()`` once released."""
        return () if self.exp_avg is None else (self.exp_avg, self.exp_avg_sq, self.steps)

    def _set_rows(self, weight, ids, exp_avg=None, exp_avg_sq=None, steps=None) -> None:
        # A new Parameter: rows changed number, so the optimiser state above (not a
        # torch.optim optimiser's, which would point at the old tensor) is what follows them.
        self.weight = nn.Parameter(weight.contiguous())
        self.ids, self.exp_avg, self.exp_avg_sq, self.steps = ids, exp_avg, exp_avg_sq, steps
        self._dead = int((ids < 0).sum())

    def fingerprint(self, only: torch.Tensor | None = None) -> str:
        """SHA-256 of the live rows in order -- ids, tokens and their optimiser state
        (moments, step counts; none once released) -- or of just the live rows whose id
        is in ``only`` (int64).

        After deleting ids and compacting, the table fingerprints as it did before,
        restricted to the ids kept: the rows kept are untouched, the others gone.
        """
        keep = self.ids >= 0
        if only is not None:
            keep &= torch.isin(self.ids, only)
        digest = hashlib.sha256()
        for t in (self.ids, self.weight.detach(), *self._state()):
            part = t[keep].contiguous()
            digest.update(str((part.dtype, tuple(part.shape))).encode())
            digest.update(part.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    # --------------------------------------------------------- optimiser
    @torch.no_grad()
    def step(self, lr_scale: float = 1.0) -> None:
        """One lazy-Adam step on the rows that received gradient (then cleared); each row
        keeps its own step count for bias correction."""
        grad = self.weight.grad
        self.weight.grad = None
        if grad is None:
            return
        if self.exp_avg is None:  # released: restart at zero
            n = self.weight.shape[0]
            self._set_rows(
                self.weight.detach(), self.ids, torch.zeros(n, self.dim), torch.zeros(n, self.dim),
                torch.zeros(n, dtype=torch.int64),
            )  # fmt: skip
        grad = grad.coalesce() if grad.is_sparse else grad.to_sparse().coalesce()
        rows, g = grad.indices()[0], grad.values()
        b1, b2 = self.betas
        self.steps[rows] += 1
        t = self.steps[rows].unsqueeze(1).to(g.dtype)
        m = self.exp_avg[rows].mul_(b1).add_(g, alpha=1 - b1)
        v = self.exp_avg_sq[rows].mul_(b2).addcmul_(g, g, value=1 - b2)
        self.exp_avg[rows], self.exp_avg_sq[rows] = m, v
        update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
        self.weight[rows] -= self.lr * lr_scale * update

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A checkpoint holds however many rows it holds: take its size, zero state.
        n = state_dict[prefix + "weight"].shape[0] if prefix + "weight" in state_dict else 0
        self._set_rows(torch.zeros(n, self.dim), torch.full((n,), -1, dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._index.rebuild(self.ids)
        self._dead = int((self.ids < 0).sum())
