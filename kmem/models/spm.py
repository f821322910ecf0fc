"""SPM-style semi-parametric classifier (arXiv 2603.22870): attention from a query to
labelled supports, ``softmax((Wq e(x)) (Ws e(s))^T / sqrt(d)) @ onehot(labels)``.

Training (episodic, as in the paper): each step takes a batch of queries and a support
set of ``supports`` training samples that contains the batch; the queries exclude the
batch's ids (leave-batch-out, through ``exclude_ids``); class labels are permuted by a
fresh random permutation per batch, for supports and targets alike; the loss is the NLL
of the log class distribution. Gradients reach Wq, Ws and the encoder through queries
and supports (the fused top-k attention is differentiable in keys too).

After training, every training sample becomes a row of a label memory: key
``Ws e(s)``, value its label. Modes:

* ``spm-r``: attend over the top-``k`` supports of the memory.
* ``spm-c``: attend over one prototype per class, the mean key of the class. The
  per-class sums are kept in fixed point (int64 counts of 2^-28), where addition is
  exact and order-free: deleting a sample subtracts its key in O(d), and the sums --
  hence the means -- are then bit-identical to those of a model that never held it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .. import ops
from ..memory import IdsLike, KeyMemory
from . import rowwise
from .base import TRAINING, Classifier, batch_out, check_ids
from .encoders import make_encoder
from .samples import Samples

MODES = ("spm-r", "spm-c")
_FIXED_ONE = 2.0**28  # fixed-point unit of the class sums
_FIXED_MAX = 2.0**15  # |key| bound: 2^43 per term leaves room for 2^20 samples a class
_TINY = 1e-12  # floor of probabilities before the log: a class no support votes for


class SPM(Classifier):
    """Settings: ``mode`` (``"spm-r"`` / ``"spm-c"``), ``encoder`` (``"features"``: the
    frozen encoder's features through a trainable projection, or ``"cnn"``: a small CNN
    on images, trained), ``hidden``, ``dim`` (encoder widths), ``key_dim`` (width of
    Wq, Ws), ``k`` (supports attended per query in ``spm-r``), ``supports`` (support
    set per training step), ``permute_labels``, and the training settings.

    ``forward`` returns log class probabilities ``[B, num_classes]``.
    """

    name = "spm"
    defaults: ClassVar[dict[str, Any]] = {
        **TRAINING,
        "epochs": 2,
        "mode": "spm-r",
        "encoder": "features",
        "hidden": 256,
        "dim": 128,
        "key_dim": 128,
        "k": 256,
        "supports": 2048,
        "permute_labels": True,
    }

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], **config: Any) -> None:
        super().__init__(num_classes, input_shape, **config)
        c = self.config
        if c["mode"] not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {c['mode']!r}")
        if int(c["k"]) < 1 or int(c["supports"]) < 2:
            raise ValueError(f"k must be >= 1 and supports >= 2, got {c['k']} and {c['supports']}")
        self.encoder = make_encoder(c["encoder"], self.input_shape, c["dim"], c["hidden"])
        self.w_q = nn.Linear(c["dim"], c["key_dim"], bias=False)
        self.w_s = nn.Linear(c["dim"], c["key_dim"], bias=False)
        self.use_memories([self._empty_memory()])
        self._train: Samples | None = None

    # ------------------------------------------------------------ model
    @property
    def memory(self) -> KeyMemory:
        """The supports: one row per training sample, key ``Ws e(s)``, value its label."""
        return self._held[0]

    def queries(self, inputs: torch.Tensor) -> torch.Tensor:
        """``Wq e(x)``: ``[B, key_dim]``."""
        return self.w_q(self.encoder(inputs))

    @torch.no_grad()
    def support_keys(self, inputs: torch.Tensor) -> torch.Tensor:
        """The support keys ``Ws e(s)`` of ``inputs``: ``[n, key_dim]``, in eval mode; each
        row a function of its own input alone (:mod:`~kmem.models.rowwise`), so a
        memory rebuilt from any subset holds the very same rows."""
        was = self.training
        self.eval()
        try:
            return rowwise.apply(lambda x: self.w_s(self.encoder(x)), inputs)
        finally:
            self.train(was)

    def forward(self, inputs: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        q = self.queries(inputs)
        ids = check_ids(ids, q.shape[0])
        if self.config["mode"] == "spm-r":
            probs = self.memory.attend(q, k=int(self.config["k"]), exclude_ids=batch_out(ids))
        else:
            probs = self._prototypes(excluding=ids).attend(q, k=None)
        return probs.clamp_min(_TINY).log()

    # --------------------------------------------------------- training
    def begin_training(self, train: Samples, generator: torch.Generator) -> None:
        self._train = train

    def loss(self, batch: Samples, generator: torch.Generator) -> torch.Tensor:
        """NLL of the log class distribution of the batch's queries over a support set
        that holds the batch and ``supports - B`` other training samples, the batch's
        ids excluded, labels permuted."""
        supports = self._support_set(batch, generator)
        e = self.encoder(supports.inputs)
        b = len(batch)
        queries, keys = self.w_q(e[:b]), self.w_s(e)
        c = self.num_classes
        perm = torch.randperm(c, generator=generator) if self.config["permute_labels"] else torch.arange(c)
        labels, targets = perm[supports.labels], perm[batch.labels]
        exclude = batch_out(batch.ids)
        if self.config["mode"] == "spm-r":
            probs = ops.topk_attention(
                queries, keys, labels, supports.ids, min(int(self.config["k"]), len(supports)),
                exclude_ids=exclude, num_classes=c,
            )  # fmt: skip
        else:
            # Class means of the supports outside the batch, then attention over them.
            keep = ~torch.isin(supports.ids, batch.ids)
            sums = torch.zeros(c, keys.shape[1]).index_add(0, labels[keep], keys[keep])
            counts = torch.zeros(c).index_add(0, labels[keep], torch.ones(int(keep.sum())))
            means = sums / counts.clamp(min=1).unsqueeze(1)
            slot_ids = torch.where(counts > 0, torch.arange(c), -1)
            probs = ops.topk_attention(queries, means, torch.arange(c), slot_ids, None, num_classes=c)
        return nn.functional.nll_loss(probs.clamp_min(_TINY).log(), targets)

    def _support_set(self, batch: Samples, generator: torch.Generator) -> Samples:
        """The batch followed by up to ``supports - B`` other training samples, at random."""
        train = self._train
        want = max(0, min(int(self.config["supports"]), len(train)) - len(batch))
        others = torch.randperm(len(train), generator=generator)[: want + len(batch)]
        others = others[~torch.isin(train.ids[others], batch.ids)][:want]
        rest = train[others]
        return Samples(
            torch.cat([batch.inputs, rest.inputs]),
            torch.cat([batch.labels, rest.labels]),
            torch.cat([batch.ids, rest.ids]),
        )

    def end_training(self, train: Samples) -> None:
        self._train = None
        self.use_memories(self.memory_for(train))

    def admit(self, samples: Samples) -> None:
        """Support rows for ``samples`` the frozen model never trained on (exact mode):
        key ``Ws e(s)``, value the label -- each a function of its own sample alone."""
        mem = self.memory
        mem.add(samples.ids, self.support_keys(samples.inputs), samples.labels)
        self.use_memories([mem])  # SPM-C's class sums, now over the new rows too

    # -------------------------------------------------------- forgetting
    def _delete_rows(self, ids: IdsLike, *, request_id: str | None, reason: str | None) -> int:
        if self.config["mode"] == "spm-c":
            keys, labels = self.memory.get(ids)  # KeyError before anything changes
        n = self.memory.delete(ids, request_id=request_id, reason=reason)
        if self.config["mode"] == "spm-c" and n:
            self._sums.index_add_(0, labels, -_fixed(keys))
            self._counts.index_add_(0, labels, -torch.ones_like(labels))
        return n

    def memory_for(self, samples: Samples) -> list[KeyMemory]:
        mem = self._empty_memory()
        mem.add(samples.ids, self.support_keys(samples.inputs), samples.labels)
        return [mem]

    def use_memories(self, memories: list[KeyMemory]) -> None:
        if len(memories) != 1 or not isinstance(memories[0], KeyMemory):
            raise ValueError(f"spm reads one KeyMemory, got {memories!r}")
        mem = memories[0]
        if mem.key_dim != self.config["key_dim"] or mem.num_classes != self.num_classes:
            raise ValueError(
                f"spm needs a label memory with key_dim={self.config['key_dim']} and "
                f"num_classes={self.num_classes}, got {mem!r}"
            )
        self._held = [mem]
        # SPM-C's class sums, from the rows (a checkpoint holds the rows, not the sums).
        _, keys, labels = mem.state()
        self._sums = torch.zeros(self.num_classes, mem.key_dim, dtype=torch.int64).index_add_(
            0, labels, _fixed(keys)
        )
        self._counts = torch.zeros(self.num_classes, dtype=torch.int64).index_add_(
            0, labels, torch.ones_like(labels)
        )

    def class_means(self) -> torch.Tensor:
        """SPM-C's prototypes: float32 ``[num_classes, key_dim]``, the mean key of each
        class (zeros for a class with no row)."""
        return _means(self._sums, self._counts)

    def _prototypes(self, excluding: torch.Tensor | None = None) -> KeyMemory:
        """A label memory of the class means, row ``c`` for class ``c`` (classes without
        rows left out); ``excluding``: ids whose rows do not count (leave-batch-out)."""
        sums, counts = self._sums, self._counts
        if excluding is not None:
            held = excluding[self.memory.has(excluding).to(excluding.device)]
            if len(held):
                keys, labels = self.memory.get(held)
                sums = sums.index_add(0, labels, -_fixed(keys))
                counts = counts.index_add(0, labels, -torch.ones_like(labels))
        present = torch.nonzero(counts > 0).reshape(-1)
        protos = KeyMemory(self.config["key_dim"], num_classes=self.num_classes, capacity=self.num_classes)
        protos.add(present, _means(sums, counts)[present], present)
        return protos

    def _empty_memory(self) -> KeyMemory:
        return KeyMemory(self.config["key_dim"], num_classes=self.num_classes)


def _fixed(keys: torch.Tensor) -> torch.Tensor:
    """Keys in fixed point: int64 multiples of 2^-28 (rounded), exact to add and subtract."""
    if keys.numel() and float(keys.abs().max()) >= _FIXED_MAX:
        raise ValueError(f"SPM-C keys must stay below {_FIXED_MAX:g} in magnitude for exact class sums")
    return torch.round(keys.double() * _FIXED_ONE).to(torch.int64)


def _means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return (sums.double() / _FIXED_ONE / counts.clamp(min=1).unsqueeze(1)).float()
