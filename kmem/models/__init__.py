"""Model families on KeyMemory: MUNKEY-style and SPM-style classifiers, and a parametric
baseline; one training loop, predictions, checkpoints and forgetting by id.

* :class:`Samples`, :func:`samples` -- inputs (frozen features by default), labels, ids.
* :class:`Classifier` -- the interface: ``forward``, ``forget``, ``memories``, ``memory_for``.
* :class:`Munkey`, :class:`SPM`, :class:`Baseline` -- the families (:data:`MODELS` names them).
* :func:`train`, :func:`predict_proba`, :func:`accuracy` -- seeded training, evaluation.
* :func:`save_checkpoint`, :func:`load_checkpoint` -- weights + memories + settings.
* :func:`choose_core` -- exact mode's core: ``train(..., core=choose_core(...))``.
"""

from .base import Classifier
from .baseline import Baseline
from .checkpoint import load_checkpoint, save_checkpoint
from .core import choose_core
from .exemplars import ExemplarTokens
from .munkey import Munkey
from .registry import MODELS, model_class
from .samples import Samples, samples
from .spm import SPM
from .training import TrainReport, accuracy, predict_proba, train

__all__ = [
    "MODELS",
    "SPM",
    "Baseline",
    "Classifier",
    "ExemplarTokens",
    "Munkey",
    "Samples",
    "TrainReport",
    "accuracy",
    "choose_core",
    "load_checkpoint",
    "model_class",
    "predict_proba",
    "samples",
    "save_checkpoint",
    "train",
]
