"""Forget requests: which training samples a model is asked to forget, by sample id.

A request is seeded and names its samples by their stable ids (:mod:`kmem.datasets.splits`), so the
same request can be replayed against the original model, the retrained oracle and every
post-hoc baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class ForgetRequest:
    """A set of training samples to forget.

    Attributes:
        name: short label used in reports, e.g. ``"random-10%"`` or ``"class-3"``.
        ids: int64 ``[m]`` sorted, distinct sample ids to forget.
        kind: ``"random"``, ``"class"`` or ``"stream"``.
        seed: the seed that drew a random or stream request (``None`` for a class request).
        steps: a stream's requests in the order they arrive, each int64 ``[m_i]`` sorted,
            disjoint, their union ``ids``; ``()`` for a one-shot request.
    """

    name: str
    ids: torch.Tensor
    kind: str
    seed: int | None = None
    steps: tuple[torch.Tensor, ...] = ()

    def __post_init__(self) -> None:
        if self.ids.dtype != torch.int64 or self.ids.ndim != 1:
            raise TypeError(f"ids must be int64 [m], got {self.ids.dtype} {tuple(self.ids.shape)}")
        if len(self.ids) == 0:
            raise ValueError(f"request {self.name!r} forgets no sample")

    def __len__(self) -> int:
        return len(self.ids)

    def mask(self, ids: torch.Tensor) -> torch.Tensor:
        """bool ``[n]``: which of ``ids`` this request forgets."""
        return torch.isin(ids, self.ids)

    def outside(self, ids: torch.Tensor) -> ForgetRequest:
        """This request without ``ids`` (int64; e.g. an exact-mode core, which cannot be
        forgotten), each step of a stream too; ``ValueError`` if nothing is left."""
        steps = tuple(step[~torch.isin(step, ids)] for step in self.steps)
        return replace(self, ids=self.ids[~torch.isin(self.ids, ids)], steps=steps)


def _check_ids(ids: torch.Tensor) -> None:
    if ids.dtype != torch.int64 or ids.ndim != 1:
        raise TypeError(f"ids must be int64 [n], got {ids.dtype} {tuple(ids.shape)}")
    if len(torch.unique(ids)) != len(ids):
        raise ValueError("ids must be distinct")


def random_request(ids: torch.Tensor, fraction: float, seed: int = 0) -> ForgetRequest:
    """Forget ``round(fraction * n)`` samples drawn uniformly (without replacement) from ``ids``.

    The draw depends only on ``seed`` and the order of ``ids``.
    """
    _check_ids(ids)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    count = max(1, round(fraction * len(ids)))
    if count >= len(ids):
        raise ValueError(f"forgetting {count} of {len(ids)} samples would leave nothing to retain")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    chosen = torch.sort(ids[order[:count]]).values
    return ForgetRequest(f"random-{100 * fraction:g}%", chosen, "random", seed)


def stream_request(
    ids: torch.Tensor, steps: int = 10, fraction: float = 0.01, seed: int = 0
) -> ForgetRequest:
    """``steps`` requests of ``round(fraction * n)`` samples each, applied one after another
    to the same model: disjoint uniform draws from ``ids`` (one permutation, cut in order)."""
    _check_ids(ids)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    count = max(1, round(fraction * len(ids)))
    if steps * count >= len(ids):
        raise ValueError(
            f"{steps} requests of {count} samples forget {steps * count} of {len(ids)}: nothing would be retained"
        )
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    parts = tuple(torch.sort(ids[order[i * count : (i + 1) * count]]).values for i in range(steps))
    name = f"stream-{steps}x{100 * fraction:g}%"
    return ForgetRequest(name, torch.sort(torch.cat(parts)).values, "stream", seed, parts)


def class_request(ids: torch.Tensor, labels: torch.Tensor, label: int) -> ForgetRequest:
    """Forget every sample of class ``label``."""
    _check_ids(ids)
    if labels.shape != ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match ids {tuple(ids.shape)}")
    chosen = torch.sort(ids[labels == label]).values
    if len(chosen) == 0:
        raise ValueError(f"no sample has label {label}")
    if len(chosen) == len(ids):
        raise ValueError(f"every sample has label {label}: nothing would be retained")
    return ForgetRequest(f"class-{label}", chosen, "class")


def standard_requests(
    ids: torch.Tensor, labels: torch.Tensor, seed: int = 0, label: int = 0
) -> list[ForgetRequest]:
    """The evaluation's requests: random 1%, random 10% and the whole class ``label``."""
    return [
        random_request(ids, 0.01, seed),
        random_request(ids, 0.10, seed),
        class_request(ids, labels, label),
    ]


def parse_request(spec: str, ids: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> ForgetRequest:
    """A request from its command-line spelling: ``"random:0.1"`` (or ``"10%"``),
    ``"class:3"``, or ``"stream"`` / ``"stream:10x1%"`` (10 requests of 1% one after another)."""
    kind, _, arg = spec.partition(":")
    if kind.endswith("%") and not arg:
        kind, arg = "random", kind
    try:
        if kind == "random":
            return random_request(ids, _fraction(arg), seed)
        if kind == "class":
            return class_request(ids, labels, int(arg))
        if kind == "stream":
            steps, _, fraction = (arg or "10x1%").partition("x")
            return stream_request(ids, int(steps), _fraction(fraction), seed)
    except ValueError as err:
        if "could not convert" not in str(err) and "invalid literal" not in str(err):
            raise ValueError(f"request {spec!r}: {err}") from None
    raise ValueError(f"request must look like 'random:0.1', '10%', 'class:3' or 'stream:10x1%', got {spec!r}")


def _fraction(text: str) -> float:
    """``"0.1"`` or ``"10%"`` as 0.1."""
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)
