"""Image datasets that are there offline, with a stable int64 id per sample.

Ids: a dataset's samples are numbered train first, then test, in the order of the
dataset's files -- train ids ``0 .. n_train-1``, test ids ``n_train .. n_train+n_test-1``.
So a train id is also the sample's row in ``train``, test ids never collide with train
ids, and the same sample keeps its id in every run. Memory rows and forget requests use
these ids.

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, always installed); the
  first 1,437 form the train split and the last 360 the test split, unshuffled.
* ``fashion-mnist``: 28x28 Fashion-MNIST (60,000 train, 10,000 test) from the Debian
  package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Self

import numpy as np
import torch

from ..choices import DATASETS
from .idx import read_idx

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_DIGITS_TEST = 360


class DatasetNotInstalled(FileNotFoundError):
    """A dataset's files are not on this machine; the message says how to install them."""


def check_labels_and_ids(n: int, labels: torch.Tensor, ids: torch.Tensor) -> None:
    """``ValueError`` unless ``labels`` and ``ids`` are int64 ``[n]`` (one per sample)."""
    for name, t in (("labels", labels), ("ids", ids)):
        if t.dtype != torch.int64 or t.shape != (n,):
            raise ValueError(f"{name} must be int64 [{n}], got {t.dtype} {list(t.shape)}")


def as_index(index: int | slice | torch.Tensor | list[int]) -> slice | torch.Tensor:
    """A sample index as a slice or a 1-D tensor (int64 positions or a bool mask), so an
    int selects a one-sample set rather than dropping the sample dimension."""
    return index if isinstance(index, slice) else torch.as_tensor(index).reshape(-1)


class SampleRows:
    """Indexing for a frozen dataclass that holds one row per sample in each of its
    tensor fields ``per_sample`` (labels and ids among them)."""

    per_sample: ClassVar[tuple[str, ...]]
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int | slice | torch.Tensor | list[int]) -> Self:
        """The samples at ``index`` (a slice, int64 indices or a bool mask; an int gives a
        one-sample set), ids kept."""
        index = as_index(index)
        return replace(self, **{name: getattr(self, name)[index] for name in self.per_sample})


@dataclass(frozen=True)
class Split(SampleRows):
    """One split of a dataset.

    Attributes:
        images: float32 ``[n, C, H, W]``, values in ``[0, 1]``.
        labels: int64 ``[n]`` class indices.
        ids: int64 ``[n]`` stable sample ids (see the module docstring).
        name: ``"<dataset>/<split>"``, e.g. ``"digits/train"``; names the feature cache.
    """

    per_sample = ("images", "labels", "ids")
    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    name: str

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.dtype != torch.float32 or self.images.ndim != 4:
            raise ValueError(
                f"images must be float32 [n, C, H, W], got {self.images.dtype} {list(self.images.shape)}"
            )
        check_labels_and_ids(n, self.labels, self.ids)


@dataclass(frozen=True)
class Dataset:
    """A dataset's ``train`` and ``test`` splits and its class names (label ``i`` is ``classes[i]``)."""

    name: str
    train: Split
    test: Split
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _dataset(name: str, classes: tuple[str, ...], train: tuple, test: tuple) -> Dataset:
    """Build a :class:`Dataset` from ``(images uint8/float [n, C, H, W] scaled to [0, 1], labels)``
    pairs, numbering the samples train first."""
    splits, start = {}, 0
    for split, (images, labels) in (("train", train), ("test", test)):
        ids = torch.arange(start, start + len(labels), dtype=torch.int64)
        splits[split] = Split(
            torch.as_tensor(images, dtype=torch.float32),
            torch.as_tensor(labels, dtype=torch.int64),
            ids,
            f"{name}/{split}",
        )
        start += len(labels)
    return Dataset(name, splits["train"], splits["test"], classes)


def _digits(root: Path | None) -> Dataset:
    if root is not None:
        raise ValueError("digits is bundled with scikit-learn and takes no root folder")
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0)[:, None]  # 0..16 grey levels -> [0, 1], one channel
    cut = len(images) - _DIGITS_TEST
    classes = tuple(str(c) for c in data.target_names)
    return _dataset("digits", classes, (images[:cut], data.target[:cut]), (images[cut:], data.target[cut:]))


def _fashion_mnist(root: Path | None) -> Dataset:
    root = FASHION_MNIST_DIR if root is None else Path(root)
    missing = [f for files in _FASHION_MNIST_FILES.values() for f in files if not (root / f).is_file()]
    if missing:
        raise DatasetNotInstalled(
            f"Fashion-MNIST is not installed: {root} lacks {', '.join(missing)}. "
            "Install it with `apt-get install dataset-fashion-mnist` (as root)."
        )
    splits = []
    for images_file, labels_file in _FASHION_MNIST_FILES.values():
        images, labels = read_idx(root / images_file), read_idx(root / labels_file)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{root}: {images_file} {list(images.shape)} and {labels_file} {list(labels.shape)} do not match"
            )
        splits.append((images[:, None].astype(np.float32) / 255.0, labels))
    return _dataset("fashion-mnist", _FASHION_MNIST_CLASSES, *splits)


_LOADERS: dict[str, Callable[[Path | None], Dataset]] = {"digits": _digits, "fashion-mnist": _fashion_mnist}


def load_dataset(name: str, root: str | Path | None = None) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) with its train and test splits.

    ``root`` is the folder of the dataset's files (default: where its package puts
    them; ``digits`` has none). Raises :class:`DatasetNotInstalled` when the files
    are missing and ``ValueError`` for an unknown name or unreadable files.
    """
    try:
        loader = _LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None
    return loader(None if root is None else Path(root))
