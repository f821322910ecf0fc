"""Checkpoints: a model's weights, memories and settings in one snapshot file.

One safetensors file (format ``kmem.Classifier``) written atomically with checksums by
:mod:`kmem.snapshot`: the ``state_dict`` tensors under their own names, each memory's
live rows as ``memory.<i>.ids|keys|values``, and as settings the family, its config,
the dataset it was trained on (``model.dataset``, where known) and each memory's
settings and version counter; in exact mode the core's ids as ``core.ids``. Loading rebuilds the model from the
settings, checks every tensor against its checksum and never unpickles anything.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import snapshot
from ..memory import KeyMemory
from ..rows import DTYPES
from .base import Classifier
from .registry import model_class

FORMAT = "kmem.Classifier"
_MEMORY_FIELDS = ("ids", "keys", "values")
_CORE = "core.ids"


def checkpoint_tensors(model: Classifier) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The tensors a checkpoint of ``model`` holds, by name, and each memory's settings
    (with its version) -- taken under each memory's lock, rows and version together."""
    tensors = dict(model.state_dict())
    memories = []
    for i, mem in enumerate(model.memories()):
        with mem._lock:  # rows and version from the same moment
            rows = mem.state()
            memories.append({**mem._config(), "version": mem.version})
        tensors.update({f"memory.{i}.{f}": t for f, t in zip(_MEMORY_FIELDS, rows, strict=True)})
    if model.core_ids is not None:
        tensors[_CORE] = model.core_ids
    return tensors, memories


def save_checkpoint(model: Classifier, path: str | Path) -> None:
    """Write ``model`` (weights, memories, settings) to ``path`` atomically."""
    tensors, memories = checkpoint_tensors(model)
    config = {
        "model": model.name,
        "num_classes": model.num_classes,
        "input_shape": list(model.input_shape),
        "config": model.config,
        "dataset": model.dataset,
        "memories": memories,
        "core": model.core_ids is not None,
    }
    snapshot.write(path, tensors, config, fmt=FORMAT)


def load_checkpoint(path: str | Path) -> Classifier:
    """The model saved at ``path`` by :func:`save_checkpoint`, in eval mode.

    ``ValueError`` for a file that is not an intact checkpoint. Memories are loaded
    without a ledger: attach one with ``mem.ledger = kmem.Ledger(...)``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    config = snapshot.read_config(path, fmt=FORMAT)
    try:
        model = model_class(config["model"])(config["num_classes"], config["input_shape"], **config["config"])
        names = (
            [*model.state_dict()]
            + [f"memory.{i}.{f}" for i in range(len(config["memories"])) for f in _MEMORY_FIELDS]
            + ([_CORE] if config.get("core") else [])
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a valid kmem checkpoint: {err}") from err
    tensors, checked = snapshot.read(path, tuple(names), fmt=FORMAT)
    if checked != config:
        raise ValueError(f"{path} is corrupted: its settings changed while it was read")
    try:
        memories = [_memory(settings, tensors, i) for i, settings in enumerate(config["memories"])]
        model.core_ids = tensors.pop(_CORE, None)  # absent from checkpoints written before exact mode
        model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("memory.")}, strict=True)
        model.use_memories(memories)
        model.dataset = config.get("dataset")  # absent from checkpoints written before it was kept
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path} is not a valid kmem checkpoint: {err}") from err
    return model.eval()


def _memory(settings: dict, tensors: dict[str, torch.Tensor], i: int) -> KeyMemory:
    settings = dict(settings)
    version = settings.pop("version")
    dtype = DTYPES[settings.pop("dtype")]
    ids, keys, values = (tensors[f"memory.{i}.{f}"] for f in _MEMORY_FIELDS)
    mem = KeyMemory(**settings, dtype=dtype, capacity=max(1, len(ids)))
    mem.add(ids, keys, values)
    mem.version = version
    return mem
