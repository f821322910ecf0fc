"""The tuning protocol, declared before any result: which settings of each forgetting
method (post-hoc baselines and the memory families' recipes) are tried, what each run may
cost, and how one setting is chosen -- on a *selection* request whose seed is never an
evaluation seed, so no reported figure chose its own settings.

Protocol (the report quotes :func:`describe`):

1. Grids (:data:`GRIDS`): learning rate 1e-5 ... 1e-2 x epochs {1, 2, 5, 10} for every
   post-hoc method; SalUn also sparsity {0.3, 0.5, 0.7}; SCRUB also its max-step epochs
   {1, 2} and alpha {0.001, 0.01, 0.1}; GA always clips the gradient norm at 1 and stops
   early once a retain probe's accuracy falls below 90% of its start. The memory
   families: their recipe knobs (:data:`FAMILY_GRIDS`).
2. Budget: one run of a post-hoc method may cost at most one retraining, counted in
   per-sample gradient passes (:func:`passes`); grid points over it are dropped before
   anything runs.
3. Selection: every remaining point is scored by its Avg. Gap to the oracle on the
   selection request (seed :data:`SELECTION_SEED`; MIA-Efficacy from one draw of the
   attacker's members, to keep ~100 scorings affordable); a point whose model diverged
   (non-finite outputs) is discarded, never scored; the lowest Avg. Gap wins, ties to
   the earlier grid point. The winner then runs on the evaluation seeds, which
   :func:`evaluation_seeds` guarantees differ from the selection seed.
4. Exact mode (``spm-exact``, ``munkey-exact``): forgetting is bit-identical to
   retraining whatever the recipe, so Avg. Gap cannot rank recipes; accuracy does. Each
   point trains without a validation draw (:data:`VALIDATION_FRACTION` of the
   forgettable samples, drawn with :data:`SELECTION_SEED`) and is scored by its error on
   that draw -- never on the test set.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .posthoc import METHODS

Setting = dict[str, Any]

SELECTION_SEED = 1_000_003  # draws the selection request and seeds its runs; never reported
MAX_EVALUATION_SEEDS = 1_000  # evaluation seeds are 0 .. n-1, far below SELECTION_SEED

LRS = (1e-5, 1e-4, 1e-3, 1e-2)
EPOCHS = (1, 2, 5, 10)


def grid(**axes: Sequence[Any]) -> list[Setting]:
    """Every combination of the axes' values, the first axis slowest."""
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]


def _scrub_grid() -> list[Setting]:
    points = grid(lr=LRS, epochs=EPOCHS, max_epochs=(1, 2), alpha=(0.001, 0.01, 0.1))
    return [p for p in points if p["max_epochs"] <= p["epochs"]]


GRIDS: dict[str, list[Setting]] = {
    "FT": grid(lr=LRS, epochs=EPOCHS),
    "GA": grid(lr=LRS, epochs=EPOCHS, clip_norm=(1.0,), stop_retain=(0.9,)),
    "RL": grid(lr=LRS, epochs=EPOCHS),
    "SalUn": grid(lr=LRS, epochs=EPOCHS, sparsity=(0.3, 0.5, 0.7)),
    "SCRUB": _scrub_grid(),
}

FAMILY_GRIDS: dict[str, list[Setting]] = {
    "spm": grid(epochs=(1, 2, 5), k=(256, 1024)),
    "munkey": grid(
        epochs=(1, 2), pathway_dropout=(0.2, 0.5), token_lr=(0.03, 0.1), retrieve_self=(False, True)
    ),
    # Exact mode fits the dense weights on the small core alone: more epochs cost little
    # and memorise nothing forgettable; k sets how much the memory's rows vote.
    "spm-exact": grid(epochs=(2, 10, 30), k=(16, 256)),
    "munkey-exact": grid(epochs=(2, 6), k=(4, 8)),
}
VALIDATION_FRACTION = 0.1  # of the forgettable samples: exact mode's held-out validation draw


def passes(method: str, setting: Mapping[str, Any], retain: int, forget: int) -> int:
    """Per-sample gradient passes one run of ``method`` with ``setting`` makes, for
    ``retain`` and ``forget`` samples (GA's probe checks are forward passes: not counted)."""
    epochs = int(setting["epochs"])
    if method == "FT":
        return epochs * retain
    if method == "GA":
        return epochs * forget
    if method in ("RL", "SalUn"):
        return epochs * (retain + forget) + (forget if method == "SalUn" else 0)  # + the saliency pass
    if method == "SCRUB":
        return epochs * retain + min(int(setting["max_epochs"]), epochs) * forget
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def within_budget(
    method: str, retain: int, forget: int, retrain_epochs: int, points: Sequence[Setting] | None = None
) -> list[Setting]:
    """``points`` (default ``GRIDS[method]``) without those that cost more than one
    retraining (``retrain_epochs`` epochs over the ``retain`` samples)."""
    budget = retrain_epochs * retain
    return [
        p
        for p in (GRIDS[method] if points is None else points)
        if passes(method, p, retain, forget) <= budget
    ]


def evaluation_seeds(n: int, first: int = 0) -> list[int]:
    """The seeds ``first .. first + n - 1`` that draw the reported requests and models;
    all below :data:`MAX_EVALUATION_SEEDS`, so never :data:`SELECTION_SEED`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"seeds must be an int >= 1, got {n!r}")
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first <= MAX_EVALUATION_SEEDS - n:
        raise ValueError(
            f"seed must be an int in [0, {MAX_EVALUATION_SEEDS - n}] for {n} seed(s), got {first!r}"
        )
    return list(range(first, first + n))


@dataclass
class Selection:
    """What selection tried and chose: ``scores`` by grid index (None: diverged)."""

    method: str
    setting: Setting
    points: list[Setting]
    scores: list[float | None] = field(default_factory=list)

    @property
    def discarded(self) -> int:
        return sum(s is None for s in self.scores)


def select(
    method: str, points: Sequence[Setting], score: Callable[[Setting, int], float | None]
) -> Selection:
    """Run ``score(setting, SELECTION_SEED)`` -- the Avg. Gap on the selection request, or
    None when the run diverged -- for every point, and keep the lowest. ``ValueError``
    when there are no points or every one diverged."""
    if not points:
        raise ValueError(f"{method}: no grid point within the budget")
    scores = []
    for point in points:
        got = score(dict(point), SELECTION_SEED)
        scores.append(None if got is None or not math.isfinite(got) else float(got))
    valid = [i for i, s in enumerate(scores) if s is not None]
    if not valid:
        raise ValueError(
            f"{method}: every one of {len(points)} grid points diverged on the selection request"
        )
    best = min(valid, key=lambda i: (scores[i], i))
    return Selection(method, dict(points[best]), [dict(p) for p in points], scores)


def describe() -> list[str]:
    """The protocol in a few lines, for the report (written before any result is known)."""
    sizes = ", ".join(f"{m} {len(g)}" for m, g in GRIDS.items())
    families = ", ".join(f"{f} {len(g)}" for f, g in FAMILY_GRIDS.items())
    return [
        f"Post-hoc grids (points before the budget): {sizes}; lr in {LRS} x epochs in {EPOCHS}, SalUn sparsity "
        "{0.3, 0.5, 0.7}, SCRUB max-step epochs {1, 2} x alpha {0.001, 0.01, 0.1}, GA with gradient-norm "
        "clipping at 1 and an early stop below 90% of its start retain-probe accuracy.",
        f"Memory-family recipe grids: {families}.",
        "Budget: one run costs at most one retraining, in per-sample gradient passes.",
        f"Selection: lowest Avg. Gap (MIA-Efficacy from one draw) on a selection request drawn with seed "
        f"{SELECTION_SEED} (never reported); diverged points discarded; the winner runs on the evaluation seeds.",
        f"Exact mode (forgetting bit-identical to retraining for every recipe): lowest error on a validation draw "
        f"of {VALIDATION_FRACTION:.0%} of the forgettable training samples (seed {SELECTION_SEED}), trained "
        "without them; never the test set.",
    ]
