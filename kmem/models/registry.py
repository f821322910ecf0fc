"""The model families by name."""

from __future__ import annotations

from ..choices import MODELS
from .base import Classifier
from .baseline import Baseline
from .munkey import Munkey
from .spm import SPM

_CLASSES: dict[str, type[Classifier]] = {"munkey": Munkey, "spm": SPM, "baseline": Baseline}


def model_class(name: str) -> type[Classifier]:
    """The :class:`Classifier` subclass called ``name`` (one of :data:`MODELS`)."""
    try:
        return _CLASSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"model must be one of {MODELS}, got {name!r}") from None
