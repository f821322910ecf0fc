"""Samples: what a model trains on -- inputs, labels and the stable ids forget requests use."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..datasets.features import encode
from ..datasets.splits import SampleRows, Split, check_labels_and_ids

INPUTS = ("features", "images")


@dataclass(frozen=True)
class Samples(SampleRows):
    """Model inputs with their labels and stable sample ids.

    Attributes:
        inputs: float32 ``[n, ...]``: frozen encoder features ``[n, 1280]`` (default) or
            images ``[n, C, H, W]``.
        labels: int64 ``[n]`` class indices.
        ids: int64 ``[n]`` distinct sample ids: the ids memory rows and forget requests use.
    """

    per_sample = ("inputs", "labels", "ids")
    inputs: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor

    def __post_init__(self) -> None:
        n = self.inputs.shape[0] if self.inputs.ndim else -1
        if self.inputs.dtype != torch.float32 or self.inputs.ndim < 2:
            raise ValueError(
                f"inputs must be float32 [n, ...], got {self.inputs.dtype} {list(self.inputs.shape)}"
            )
        check_labels_and_ids(n, self.labels, self.ids)

    def without(self, ids: torch.Tensor | list[int]) -> Samples:
        """These samples minus those whose id is in ``ids`` (order kept; unknown ids ignored)."""
        drop = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        return self[~torch.isin(self.ids, drop)]


def samples(split: Split, inputs: str = "features", resolution: int = 64) -> Samples:
    """A split as :class:`Samples`: its frozen-encoder features at ``resolution`` (read
    from or written to the on-disk cache, see :func:`kmem.encode`) or its images."""
    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    x = encode(split, resolution) if inputs == "features" else split.images
    return Samples(x, split.labels, split.ids)
