"""kmem: a deletable key/value memory with fused top-k attention, for models that must forget.

Public API:

* :class:`KeyMemory` -- the memory: ``add``, O(1) ``delete``, ``compact``, ``search``,
  ``attend``, ``save``/``load``; safe to share between threads.
* :class:`Ledger` -- a tamper-evident SQLite record of every deletion (:class:`Receipt`).
* :class:`KeyMemoryAttention` -- an ``nn.Module`` that attends over a memory.
* :class:`ShardedKeyMemory` (:mod:`kmem.distributed`) -- a memory split over the ranks
  of a ``torch.distributed`` process group, with exact global top-k.
* :mod:`kmem.ops` -- the functional ops and their backends.
* :func:`load_dataset` -- offline image datasets (a :class:`Dataset` of :class:`Split` objects
  with stable int64 sample ids).
* :class:`KeyEncoder`, :func:`encode` -- the frozen EfficientNet-Lite0 key encoder and
  its features of a split (cached on disk) or of images.
* :mod:`kmem.models` -- MUNKEY-style and SPM-style classifiers and a parametric
  baseline: training, predictions, checkpoints, ``forget(ids)``.
* :mod:`kmem.unlearn` -- evidence of forgetting: forget requests, metrics against a
  retrained oracle, post-hoc unlearning baselines, the evaluation and its report.
"""

from . import models, ops, unlearn
from .data import DATASETS, Dataset, DatasetNotInstalled, Split, load_dataset
from .distributed import ShardedKeyMemory
from .encoder import KeyEncoder
from .features import cache_path, encode
from .layers import KeyMemoryAttention
from .ledger import Ledger, Receipt
from .memory import KeyMemory
from .ops import BackendUnavailable

__all__ = [
    "DATASETS",
    "BackendUnavailable",
    "Dataset",
    "DatasetNotInstalled",
    "KeyEncoder",
    "KeyMemory",
    "KeyMemoryAttention",
    "Ledger",
    "Receipt",
    "ShardedKeyMemory",
    "Split",
    "cache_path",
    "encode",
    "load_dataset",
    "models",
    "ops",
    "unlearn",
]
__version__ = "0.1.0"
