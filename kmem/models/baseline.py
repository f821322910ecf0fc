"""The parametric baseline: the same encoder with a linear or MLP head, no memory. The
model post-hoc unlearning methods are applied to."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .base import TRAINING, Classifier
from .encoders import make_encoder


class Baseline(Classifier):
    """Encoder + head -> logits ``[B, num_classes]``; trained with cross-entropy.

    Settings: ``encoder`` (``"features"`` or ``"cnn"``, see :func:`make_encoder`),
    ``hidden`` (encoder width), ``dim`` (embedding width), ``head`` (``"linear"`` or
    ``"mlp"``: Linear(dim, dim), GELU, Linear(dim, C)), ``dropout`` (before the head), and
    the training settings.
    """

    name = "baseline"
    defaults: ClassVar[dict[str, Any]] = {
        **TRAINING,
        "encoder": "features",
        "hidden": 256,
        "dim": 128,
        "head": "linear",
        "dropout": 0.1,
    }

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], **config: Any) -> None:
        super().__init__(num_classes, input_shape, **config)
        c = self.config
        self.encoder = make_encoder(c["encoder"], self.input_shape, c["dim"], c["hidden"])
        if c["head"] == "linear":
            head = nn.Linear(c["dim"], num_classes)
        elif c["head"] == "mlp":
            head = nn.Sequential(nn.Linear(c["dim"], c["dim"]), nn.GELU(), nn.Linear(c["dim"], num_classes))
        else:
            raise ValueError(f"head must be 'linear' or 'mlp', got {c['head']!r}")
        self.head = nn.Sequential(nn.GELU(), nn.Dropout(c["dropout"]), head)

    def forward(self, inputs: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.encoder(inputs))
