"""kmem: a deletable key/value memory with fused top-k attention, for models that must forget.

Public API:

* :class:`KeyMemory` -- the memory: ``add``, O(1) ``delete``, ``compact``, ``search``,
  ``attend``, ``save``/``load``; safe to share between threads.
* :class:`Ledger` -- a tamper-evident SQLite record of every deletion (:class:`Receipt`).
* :class:`KeyMemoryAttention` -- an ``nn.Module`` that attends over a memory.
* :class:`MemoryLike` -- the protocol a memory satisfies for the layer and ``torch.compile``.
* :class:`MemoryEditedError` -- raised by a backward whose forward read a memory that
  changed since.
* :class:`ShardedKeyMemory` (:mod:`kmem.distributed`) -- a memory split over the ranks
  of a ``torch.distributed`` process group, with exact global top-k.
* :mod:`kmem.ops` -- the functional ops and their backends.
* :func:`load_dataset` -- offline image datasets (a :class:`Dataset` of :class:`Split` objects
  with stable int64 sample ids); :class:`KeyEncoder`, :func:`encode` -- the frozen
  EfficientNet-Lite0 key encoder and its features of a split (cached on disk) or of
  images: :mod:`kmem.datasets`.
* :mod:`kmem.models` -- MUNKEY-style and SPM-style classifiers and a parametric
  baseline: training, predictions, checkpoints, ``forget(ids)``.
* :mod:`kmem.unlearn` -- evidence of forgetting: forget requests, metrics against a
  retrained oracle, post-hoc unlearning baselines, the evaluation and its report.
"""

from __future__ import annotations

import importlib

# Public name -> the module that defines it. Imported on first use (PEP 562), so that
# ``import kmem`` -- and so every ``kmem`` command, ``--help`` included -- does not pay
# for torch before it needs it.
_SUBMODULES = ("datasets", "models", "ops", "unlearn")
_HOMES = {
    "DATASETS": "choices",
    "BackendUnavailable": "ops",
    "Dataset": "datasets.splits",
    "DatasetNotInstalled": "datasets.splits",
    "KeyEncoder": "datasets.encoder",
    "KeyMemory": "memory",
    "KeyMemoryAttention": "layers",
    "MemoryEditedError": "memory",
    "MemoryLike": "memory_like",
    "Ledger": "ledger",
    "Receipt": "ledger",
    "ShardedKeyMemory": "distributed",
    "Split": "datasets.splits",
    "cache_path": "datasets.features",
    "encode": "datasets.features",
    "load_dataset": "datasets.splits",
}

__all__ = [*_HOMES, *_SUBMODULES]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    elif name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # resolved once: later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
