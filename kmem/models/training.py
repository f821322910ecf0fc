"""Training and prediction for every model family: one seeded loop."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .base import Classifier
from .registry import model_class
from .samples import Samples


@dataclass(frozen=True)
class TrainReport:
    """What :func:`train` did: wall-clock ``seconds``, mean training loss per epoch, the
    model's full ``config`` (defaults filled in) and its ``batches_per_epoch``."""

    seconds: float
    losses: list[float]
    config: dict[str, Any]
    batches_per_epoch: int

    @property
    def steps(self) -> int:
        """Optimiser steps taken: epochs x batches per epoch."""
        return int(self.config["epochs"]) * self.batches_per_epoch


def train(
    name: str,
    train: Samples,
    *,
    num_classes: int,
    core: Samples | None = None,
    seed: int = 0,
    epochs: int | None = None,
    progress: bool | None = None,
    **config: Any,
) -> tuple[Classifier, TrainReport]:
    """Build model ``name`` (``"munkey"``, ``"spm"`` or ``"baseline"``) and train it on ``train``.

    AdamW on the dense weights (``lr``, ``weight_decay``) with a cosine learning-rate
    decay over ``epochs`` epochs of shuffled batches of ``batch_size``; per-row tables
    (MUNKEY's exemplar tokens) take their own sparse step with the same decay. The
    same ``seed`` gives the same model, bit for bit; the caller's global RNG is left as
    it was. ``epochs`` overrides the family's default; ``**config`` sets any other
    setting of the family. Returns the model in eval mode and a :class:`TrainReport`.

    Exact mode, with ``core`` (a memory family only): every dense weight is fitted on
    ``core`` alone -- samples never to be forgotten -- and the samples of ``train`` not
    in it then enter only as memory rows (:meth:`~kmem.models.Classifier.admit`), each
    a function of its own sample and the frozen weights. Forgetting such a sample then
    gives, bit for bit, the model ``train(name, train.without(ids), core=core,
    seed=seed)`` gives; the core's ids cannot be forgotten.
    """
    cls = model_class(name)
    if epochs is not None:
        config["epochs"] = epochs
    _check_samples("train", train, num_classes)
    fit_on = train
    if core is not None:
        if cls.admit is Classifier.admit:
            raise TypeError(f"core: exact mode needs a memory family, and {name} keeps no per-sample memory")
        train = _forgettable(train, _check_samples("core", core, num_classes))
        fit_on = core
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initialisation and dropout
        generator = torch.Generator().manual_seed(seed)  # batches, supports, permutations
        model = cls(num_classes, tuple(fit_on.inputs.shape[1:]), **config)
        losses = _fit(model, fit_on, generator, progress)
        if core is not None:
            model.admit(train)
            model.core_ids = core.ids.sort().values
    batches = _batches_per_epoch(len(fit_on), model.config)
    return model, TrainReport(time.perf_counter() - start, losses, dict(model.config), batches)


def _check_samples(name: str, samples: Samples, num_classes: int) -> Samples:
    if not isinstance(samples, Samples):
        raise TypeError(f"{name} must be kmem.models.Samples, got {type(samples).__name__}")
    if not len(samples):
        raise ValueError(f"{name} holds no samples")
    if int(samples.labels.min()) < 0 or int(samples.labels.max()) >= num_classes:
        raise ValueError(f"{name}.labels must be in [0, {num_classes})")
    return samples


def _forgettable(train: Samples, core: Samples) -> Samples:
    """The samples of ``train`` outside ``core``; a sample in both must be the same
    sample (label and input), else ``ValueError`` naming the ids."""
    if train.inputs.shape[1:] != core.inputs.shape[1:]:
        raise ValueError(
            f"core inputs are {list(core.inputs.shape[1:])} per sample, train's {list(train.inputs.shape[1:])}"
        )
    both = torch.isin(train.ids, core.ids)
    if bool(both.any()):
        shared = train[both]
        at = torch.argsort(core.ids)
        twin = core[at[torch.searchsorted(core.ids[at], shared.ids)]]
        differ = (shared.labels != twin.labels) | (shared.inputs != twin.inputs).flatten(1).any(1)
        if bool(differ.any()):
            raise ValueError(
                f"core and train hold different samples under the same id(s), e.g. "
                f"{shared.ids[differ][:5].tolist()}: a core sample must be the training sample of its id"
            )
    return train[~both]


def _batches_per_epoch(samples: int, config: dict[str, Any]) -> int:
    return math.ceil(samples / int(config["batch_size"]))


def _fit(model: Classifier, train: Samples, generator: torch.Generator, progress: bool | None) -> list[float]:
    c = model.config
    epochs, batch_size = int(c["epochs"]), int(c["batch_size"])
    if epochs < 0 or batch_size < 1:
        raise ValueError(f"epochs must be >= 0 and batch_size >= 1, got {epochs} and {batch_size}")
    model.train()
    model.begin_training(train, generator)
    tables = model.row_tables()
    sparse = {id(t.weight) for t in tables}
    dense = [p for p in model.parameters() if id(p) not in sparse]
    optimizer = torch.optim.AdamW(dense, lr=c["lr"], weight_decay=c["weight_decay"])
    steps = _batches_per_epoch(len(train), c)
    total = max(1, epochs * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    losses = []
    bar = tqdm(
        total=epochs * steps,
        desc=f"training {model.name}",
        disable=None if progress is None else not progress,
    )
    with bar:
        for _ in range(epochs):
            order = torch.randperm(len(train), generator=generator)
            running = 0.0
            for i in range(steps):
                batch = train[order[i * batch_size : (i + 1) * batch_size]]
                loss = model.loss(batch, generator)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                factor = schedule.get_last_lr()[0] / c["lr"]
                optimizer.step()
                for table in tables:
                    table.step(factor)
                schedule.step()
                running += float(loss.detach())
                bar.update()
                bar.set_postfix(loss=f"{running / (i + 1):.4f}", refresh=False)
            losses.append(running / steps)
    model.end_training(train)
    model.eval()
    return losses


def predict_proba(model: Classifier, inputs: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Class probabilities float32 ``[n, num_classes]`` in eval mode without gradients
    (the model's mode is restored afterwards)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = [
                torch.softmax(model(inputs[i : i + batch_size]).float(), dim=-1)
                for i in range(0, inputs.shape[0], batch_size)
            ]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, model.num_classes)


def accuracy(model: Classifier, data: Samples, batch_size: int = 1024) -> float:
    """Fraction of ``data`` whose most probable class is its label."""
    return float((predict_proba(model, data.inputs, batch_size).argmax(1) == data.labels).float().mean())
