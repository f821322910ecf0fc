"""Post-hoc unlearning baselines: update a trained model's weights to forget samples.

Each method starts from a copy of a trained ``nn.Module`` that maps inputs ``[B, ...]``
to logits (or log-probabilities) ``[B, C]`` and follows its public definition:

* ``FT``: fine-tune on the retain set (cross-entropy).
* ``GA``: gradient ascent on the forget set (maximise its cross-entropy).
* ``RL``: random labels -- each epoch trains on the forget set relabelled uniformly at
  random, then on the retain set (SalUn's ``RL`` for random forgetting).
* ``SalUn``: ``RL`` restricted to the salient weights -- those whose ``|grad|`` of the
  forget-set loss is in the top ``sparsity`` fraction over the whole model (the SalUn
  paper's hard mask, ``1(|g| >= median)`` at 50%); the other weights stay as trained.
* ``SCRUB``: the original model is a frozen teacher; the student alternates max-steps
  (raise ``KL(teacher || student)`` on the forget set, first ``max_epochs`` epochs) and
  min-steps (``gamma * CE + alpha * KL`` on the retain set), temperature ``T``.

The optimiser is SGD with momentum, as in the SalUn / "Model Sparsity" code. Only the
forgetting is timed: the copy of the model and the data are made before the clock starts.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..choices import METHODS


class Data(Protocol):
    """What a method reads from a set of samples (``kmem.models.Samples`` is one)."""

    inputs: torch.Tensor  # float32 [n, ...]
    labels: torch.Tensor  # int64 [n]


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one method (fields a method does not use are ignored)."""

    epochs: int
    lr: float
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sparsity: float = 0.5  # SalUn: fraction of weights updated
    max_epochs: int = 2  # SCRUB: epochs that start with a max-step
    temperature: float = 4.0  # SCRUB
    gamma: float = 0.99  # SCRUB: weight of the retain cross-entropy
    alpha: float = 0.001  # SCRUB: weight of the retain distillation
    clip_norm: float | None = None  # every method: clip the gradient's global L2 norm
    # GA: stop once the retain probe's accuracy falls below this fraction of its start.
    stop_retain: float | None = None
    probe_size: int = 1024  # GA: retain samples the early stop checks


# Epochs and rates sized for a classifier head on frozen features (the SalUn scripts use
# the same epoch counts on ResNets; their rates are for training from lr 0.1).
RECIPES: dict[str, Recipe] = {
    "FT": Recipe(epochs=5, lr=0.01),
    "GA": Recipe(epochs=5, lr=1e-3),
    "RL": Recipe(epochs=5, lr=0.01),
    "SalUn": Recipe(epochs=5, lr=0.01),
    "SCRUB": Recipe(epochs=5, lr=0.005, max_epochs=2),
}


@dataclass
class Unlearned:
    """A method's result: the updated copy of the model and the seconds the forgetting took."""

    model: nn.Module
    seconds: float


def _batches(
    data: Data, batch_size: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(data.labels), generator=gen)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        yield data.inputs[index], data.labels[index]


def _distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(teacher || student)`` of the tempered distributions, times ``T^2`` (Hinton et al.)."""
    log_s = F.log_softmax(student / temperature, dim=1)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


class _Step:
    """One SGD update, optionally confined to the weights a mask selects."""

    def __init__(self, model: nn.Module, recipe: Recipe, mask: dict[str, torch.Tensor] | None = None):
        self.model, self.mask, self.clip_norm = model, mask, recipe.clip_norm
        self.params = dict(model.named_parameters())
        self.opt = torch.optim.SGD(
            model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
        # Weight decay and momentum would still move masked-out weights: put them back.
        self.frozen = {n: p.detach().clone() for n, p in self.params.items()} if mask else None

    def __call__(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_norm is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        self.opt.step()
        if self.mask is not None and self.frozen is not None:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(torch.where(self.mask[name], param, self.frozen[name]))


def _fine_tune(model, retain, forget, recipe, gen, num_classes, bar) -> None:
    step = _Step(model, recipe)
    for _ in bar(range(recipe.epochs)):
        for x, y in _batches(retain, recipe.batch_size, gen):
            step(F.cross_entropy(model(x), y))


def _gradient_ascent(model, retain, forget, recipe, gen, num_classes, bar) -> None:
    step = _Step(model, recipe)
    probe = _RetainProbe(model, retain, recipe)
    for _ in bar(range(recipe.epochs)):
        for x, y in _batches(forget, recipe.batch_size, gen):
            step(-F.cross_entropy(model(x), y))
            if probe.collapsed():
                return


class _RetainProbe:
    """GA's early stop: the accuracy on the first ``probe_size`` retain samples, checked
    after every step against ``stop_retain`` times its value before the first step
    (gradient ascent has no other sign that it has started destroying the model)."""

    def __init__(self, model: nn.Module, retain: Data, recipe: Recipe) -> None:
        self.model, self.fraction = model, recipe.stop_retain
        self.x, self.y = retain.inputs[: recipe.probe_size], retain.labels[: recipe.probe_size]
        self.floor = None if self.fraction is None else self.fraction * self._accuracy()

    def _accuracy(self) -> float:
        training = self.model.training
        with torch.no_grad():
            correct = self.model.eval()(self.x).argmax(1) == self.y
        self.model.train(training)
        return float(correct.float().mean())

    def collapsed(self) -> bool:
        return self.floor is not None and self._accuracy() < self.floor


def _random_labels(model, retain, forget, recipe, gen, num_classes, bar, mask=None) -> None:
    step = _Step(model, recipe, mask)
    for _ in bar(range(recipe.epochs)):
        for x, _y in _batches(forget, recipe.batch_size, gen):
            step(F.cross_entropy(model(x), torch.randint(0, num_classes, (len(x),), generator=gen)))
        for x, y in _batches(retain, recipe.batch_size, gen):
            step(F.cross_entropy(model(x), y))


def saliency_mask(
    model: nn.Module, forget: Data, sparsity: float, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """bool masks by parameter name: the ``sparsity`` fraction of weights with the largest ``|grad|``.

    The gradient is that of the forget-set cross-entropy summed over batches (SalUn);
    ranking is global over every parameter of the model, ties broken by position.
    """
    if not 0.0 < sparsity <= 1.0:
        raise ValueError(f"sparsity must be in (0, 1], got {sparsity}")
    params = dict(model.named_parameters())
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, len(forget.labels), batch_size):
        x, y = forget.inputs[start : start + batch_size], forget.labels[start : start + batch_size]
        loss = F.cross_entropy(model(x), y)
        for name, g in zip(
            params, torch.autograd.grad(loss, list(params.values()), allow_unused=True), strict=True
        ):
            if g is not None:
                grads[name] += g
    flat = torch.cat([g.abs().flatten() for g in grads.values()])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat, descending=True, stable=True)[: round(sparsity * len(flat))]] = True
    masks, start = {}, 0
    for name, g in grads.items():
        masks[name] = keep[start : start + g.numel()].view_as(g)
        start += g.numel()
    return masks


def _salun(model, retain, forget, recipe, gen, num_classes, bar) -> None:
    mask = saliency_mask(model, forget, recipe.sparsity, recipe.batch_size)
    _random_labels(model, retain, forget, recipe, gen, num_classes, bar, mask)


def _scrub(model, retain, forget, recipe, gen, num_classes, bar) -> None:
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    step, t = _Step(model, recipe), recipe.temperature
    for epoch in bar(range(recipe.epochs)):
        if epoch < recipe.max_epochs:
            for x, _y in _batches(forget, recipe.batch_size, gen):
                step(-_distill_kl(model(x), teacher(x), t))
        for x, y in _batches(retain, recipe.batch_size, gen):
            out = model(x)
            step(recipe.gamma * F.cross_entropy(out, y) + recipe.alpha * _distill_kl(out, teacher(x), t))


_RUN: dict[str, Callable[..., None]] = {
    "FT": _fine_tune,
    "GA": _gradient_ascent,
    "RL": _random_labels,
    "SalUn": _salun,
    "SCRUB": _scrub,
}


def unlearn(
    method: str,
    model: nn.Module,
    retain: Data,
    forget: Data,
    *,
    num_classes: int,
    seed: int = 0,
    progress: bool | None = None,
    **overrides: float,
) -> Unlearned:
    """Apply ``method`` to a copy of ``model`` (left unchanged); ``overrides`` replace recipe fields.

    Returns the copy (in eval mode) and the wall time of the forgetting itself.
    """
    if method not in _RUN:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    for name, data in (("retain", retain), ("forget", forget)):
        if len(data.labels) == 0:
            raise ValueError(f"{name} set is empty")
    recipe = replace(RECIPES[method], **overrides)
    student = copy.deepcopy(model).train()
    gen = torch.Generator().manual_seed(seed)
    show = sys.stderr.isatty() if progress is None else progress

    def bar(it):
        return tqdm(it, desc=method, unit="epoch", leave=False, disable=not show)

    with torch.random.fork_rng(), torch.enable_grad():
        torch.manual_seed(seed)  # dropout and the like: the same run for the same seed
        start = time.perf_counter()
        _RUN[method](student, retain, forget, recipe, gen, num_classes, bar)
        seconds = time.perf_counter() - start
    return Unlearned(student.eval(), seconds)
