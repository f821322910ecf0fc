"""Classifier: what every model family implements, so training, checkpoints and
unlearning code can treat them alike."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from ..memory import KeyMemory
from ..rows import IdsLike, id_tensor
from .samples import Samples

# Settings of the training loop every model accepts; families override the defaults.
TRAINING: dict[str, Any] = {"epochs": 5, "batch_size": 256, "lr": 1e-3, "weight_decay": 1e-4}


class Classifier(nn.Module):
    """A classifier over :class:`Samples` inputs, possibly holding :class:`KeyMemory` rows.

    Subclasses set :attr:`name` and :attr:`defaults` (their settings with default
    values, training settings included), implement :meth:`forward`, and override the
    training hooks where the defaults do not fit. Memories are data, not weights: they are
    kept out of ``state_dict`` and saved beside it (see :mod:`kmem.models.checkpoint`).

    Args:
        num_classes: number of classes.
        input_shape: shape of one input, e.g. ``(1280,)`` for frozen features.
        **config: settings (see the subclass's :attr:`defaults`); unknown names raise.
    """

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]]
    # The dataset it was trained on, where known (``kmem train`` sets it, checkpoints keep
    # it): what ``kmem forget --data`` checks its test set against.
    dataset: str | None = None
    # Exact mode: the sorted ids of the core the dense weights were fitted on (int64),
    # which cannot be forgotten; None when the weights saw every training sample.
    core_ids: torch.Tensor | None = None

    def __init__(self, num_classes: int, input_shape: tuple[int, ...] | list[int], **config: Any) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        unknown = sorted(set(config) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"{self.name} has no setting(s) {unknown}; its settings are {sorted(self.defaults)}"
            )
        self.num_classes = num_classes
        self.input_shape = tuple(int(s) for s in input_shape)
        self.config: dict[str, Any] = {**self.defaults, **config}
        self._held: list[KeyMemory] = []  # the memories, in the order memories() lists them

    # ----------------------------------------------------------------- model
    def forward(self, inputs: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``inputs [B, *input_shape]`` -> logits or log-probabilities ``[B, num_classes]``.

        ``ids`` int64 ``[B]``: the samples' ids, which no query may retrieve (leave-batch-out,
        as in training); ignored by models without a memory.
        """
        raise NotImplementedError

    def loss(self, batch: Samples, generator: torch.Generator) -> torch.Tensor:
        """The training objective on one batch: cross-entropy of :meth:`forward` with
        leave-batch-out. Families whose objective differs override it."""
        return nn.functional.cross_entropy(self(batch.inputs, batch.ids), batch.labels)

    # ------------------------------------------------------ training hooks
    def begin_training(self, train: Samples, generator: torch.Generator) -> None:
        """Called once before the first step with all training samples."""

    def end_training(self, train: Samples) -> None:
        """Called once after the last step (memory models fill their memories here)."""

    def row_tables(self) -> list[nn.Module]:
        """Per-row parameter tables trained by their own sparse optimiser (their
        ``step()``), not by the dense optimiser of the training loop."""
        return []

    def rows_fit_own_sample_only(self) -> bool:
        """Whether each row of :meth:`row_tables` is trained by its own sample's loss alone
        (then deleting a sample leaves no trace of it in any retained row)."""
        return True

    # ----------------------------------------------------------- forgetting
    def forget(self, ids: IdsLike, *, request_id: str | None = None, reason: str | None = None) -> int:
        """Forget samples by id: delete their memory rows (no weight update, no data
        needed); returns how many. The memory's ledger, if any, records ``request_id``
        and ``reason``. A model without a memory raises ``TypeError``; in exact mode an
        id of the :attr:`core` the dense weights were fitted on raises ``ValueError``,
        and then nothing is deleted."""
        if self.core_ids is not None:
            ids = id_tensor("ids", ids)  # converted once: the deletion below takes it as it is
            core = ids[torch.isin(ids, self.core_ids)].tolist()
            if core:
                raise ValueError(
                    f"{len(core)} id(s) of the core, e.g. {core[:5]}: the dense weights were fitted on "
                    "the core, so its samples cannot be forgotten by deleting rows; nothing was deleted"
                )
        return self._delete_rows(ids, request_id=request_id, reason=reason)

    def _delete_rows(self, ids: IdsLike, *, request_id: str | None, reason: str | None) -> int:
        """What :meth:`forget` does once the ids are known to be forgettable."""
        raise TypeError(
            f"{self.name} keeps no per-sample memory, so it cannot forget by deleting rows: "
            "what it learned from a sample is spread over its weights (retrain, or use a "
            "post-hoc unlearning method)"
        )

    def admit(self, samples: Samples) -> None:
        """Give the trained model rows for ``samples`` its dense weights never saw (exact
        mode, see :func:`~kmem.models.train`): each row a function of its own sample and
        the frozen weights alone. A model without a memory raises ``TypeError``."""
        raise TypeError(
            f"{self.name} keeps no per-sample memory: samples can only reach it through its weights"
        )

    def memories(self) -> list[KeyMemory]:
        """The memories this model reads ([] for a model without one)."""
        return list(self._held)

    def memory_for(self, samples: Samples) -> list[KeyMemory]:
        """The memories this model would hold had it only been given ``samples`` (same
        weights; learnable values taken by id)."""
        return []

    def with_memories(self, memories: list[KeyMemory]) -> Classifier:
        """A copy of this model (same weights) reading ``memories`` instead of its own,
        e.g. ``model.with_memories(model.memory_for(retain))`` -- the model that never
        held the forgotten rows."""
        held, self._held = self._held, []  # the clone reads the memories given, not copies of these
        try:
            clone = copy.deepcopy(self)
        finally:
            self._held = held
        clone.use_memories(list(memories))
        return clone

    def use_memories(self, memories: list[KeyMemory]) -> None:
        """Read ``memories`` (as :meth:`memories` lists them) from now on."""
        if memories:
            raise ValueError(f"{self.name} holds no memory, got {len(memories)}")

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, input_shape={self.input_shape}, config={self.config}"


def check_ids(ids: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """``ids`` as int64 ``[batch]`` or None."""
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.shape != (batch,):
        got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ids must be int64 [{batch}], got {got}")
    return ids


def batch_out(ids: torch.Tensor | None) -> torch.Tensor | None:
    """Leave-batch-out exclusions for a batch with ``ids [B]``: every query excludes every
    id of the batch, ``[B, B]`` (None without ids)."""
    return None if ids is None else ids.expand(ids.shape[0], -1).contiguous()
