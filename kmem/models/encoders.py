"""Trainable encoders shared by the model families: a projection of frozen features, or
a small CNN on images."""

from __future__ import annotations

from torch import nn

ENCODERS = ("features", "cnn")


def make_encoder(kind: str, input_shape: tuple[int, ...], dim: int, hidden: int) -> nn.Module:
    """An encoder mapping inputs ``[B, *input_shape]`` to ``[B, dim]``.

    * ``"features"``: frozen key-encoder features ``[B, F]`` -> LayerNorm, Linear(F, hidden),
      GELU, Linear(hidden, dim): the trainable projection on the frozen encoder.
    * ``"cnn"``: images ``[B, C, H, W]`` -> two 3x3 conv + ReLU + 2x2 max-pool stages
      (32, 64 channels), adaptive average pool to 2x2, Linear(256, dim): trained from scratch.
    """
    if kind == "features":
        if len(input_shape) != 1:
            raise ValueError(f"encoder 'features' takes inputs [n, F], got input shape {list(input_shape)}")
        return nn.Sequential(
            nn.LayerNorm(input_shape[0]), nn.Linear(input_shape[0], hidden), nn.GELU(), nn.Linear(hidden, dim)
        )
    if kind == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"encoder 'cnn' takes images [n, C, H, W], got input shape {list(input_shape)}")
        return nn.Sequential(
            nn.Conv2d(input_shape[0], 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(256, dim),
        )
    raise ValueError(f"encoder must be one of {ENCODERS}, got {kind!r}")
