"""The tuning protocol of :mod:`kmem.unlearn.protocol`, run: every forgetting method's
grid scored on the selection request, the setting with the lowest Avg. Gap kept (exact
mode: the lowest error on a validation draw of forgettable training samples).

The selection request and the validation draw are drawn with
:data:`~kmem.unlearn.protocol.SELECTION_SEED`, and every model of the selection
(originals, oracles, post-hoc runs) trains with that seed or its oracle offsets: nothing
here reads an evaluation seed or the test set's labels for exact mode, so the settings
chosen here are never chosen by the figures later reported.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..models import choose_core, model_class, predict_proba
from ..models.base import Classifier
from ..models.samples import Samples
from . import posthoc, protocol
from .evaluate import Setup, _lines, _memory_family, _no_bar, _oracle, _Sets, _stepper, is_exact
from .metrics import accuracy
from .protocol import SELECTION_SEED, VALIDATION_FRACTION, Selection, Setting
from .requests import ForgetRequest, parse_request
from .results import KMEM

Score = Callable[[Setting, int], float | None]


@dataclass
class Tuned:
    """What selection chose: per post-hoc method its recipe overrides, per memory family
    its settings, and every :class:`~kmem.unlearn.protocol.Selection` made."""

    recipes: dict[str, Setting]
    configs: dict[str, Setting]
    selections: list[Selection]

    def selected(self) -> dict[str, Setting]:
        """Every method's and family's chosen setting, by name (for ``results.json``)."""
        return {**self.recipes, **self.configs}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Tuned:
        return cls(dict(data["recipes"]), dict(data["configs"]), [Selection(**s) for s in data["selections"]])

    @classmethod
    def merge(cls, parts: Sequence[Tuned]) -> Tuned:
        """One record of several selections made apart (e.g. one per family)."""
        return cls(
            {k: v for t in parts for k, v in t.recipes.items()},
            {k: v for t in parts for k, v in t.configs.items()},
            [s for t in parts for s in t.selections],
        )


def tune(
    train: Samples,
    test: Samples,
    request: str,
    setup: Setup,
    families: Sequence[str],
    grids: Mapping[str, Sequence[Setting]] | None = None,
) -> Tuned:
    """Select every method's setting on the ``request`` spec drawn with the selection seed.

    ``families`` as in :func:`~kmem.unlearn.evaluate.evaluate`: ``"baseline"`` tunes the
    post-hoc methods of ``setup.methods``, a memory family its recipe (an exact family's
    on the validation draw, :func:`validation_split`). ``grids`` replaces
    the declared grids by name (for tests at a tiny size); the budget still applies.
    """
    grids = dict(grids or {})
    chosen, asked, sets = _selection(train, test, request, setup)
    memory = [f for f in families if f != "baseline"]
    points = {f: recipe_points(f, grids) for f in memory}
    if "baseline" in families:
        epochs = chosen.epochs or int(model_class("baseline").defaults["epochs"])
        for method in setup.methods:
            points[method] = protocol.within_budget(
                method, len(sets.retain), len(sets.forget), epochs, grids.get(method)
            )
    total = sum(len(p) for p in points.values()) + 2 * ("baseline" in families) + 1
    selections, recipes, configs = [], {}, {}
    with (
        tempfile.TemporaryDirectory(prefix="kmem-tune-") as tmp,
        tqdm(total=total, desc="selection", unit="run", disable=_no_bar(setup.progress)) as bar,
    ):
        step = _stepper(bar, _lines(setup.progress))
        for family in memory:
            score = (
                _exact_scorer(family, train, chosen, step)
                if is_exact(family)
                else _family_scorer(family, train, sets, asked, chosen, step, Path(tmp))
            )
            selections.append(protocol.select(family, points[family], score))
            configs[family] = selections[-1].setting
        if "baseline" in families:
            step("baseline: train the original")
            original, _ = chosen.train("baseline", train)
            against = _oracle("baseline", sets, chosen, step).against
            for method in setup.methods:
                score = _posthoc_scorer(method, original, sets, chosen, against, step)
                selections.append(protocol.select(method, points[method], score))
                recipes[method] = selections[-1].setting
        step("done")
    return Tuned(recipes, configs, selections)


def method_grids(methods: Sequence[str], grids: Mapping[str, Sequence[Setting]] | None = None) -> dict:
    """Each post-hoc method's grid before the budget (``grids`` replaces one by name)."""
    return {m: [dict(p) for p in (grids or {}).get(m, protocol.GRIDS[m])] for m in methods}


def recipe_points(family: str, grids: Mapping[str, Sequence[Setting]] | None = None) -> list[Setting]:
    """The recipe grid of memory family ``family`` (``grids`` replaces it by name)."""
    return [dict(p) for p in (grids or {}).get(family, protocol.FAMILY_GRIDS[family])]


def score_recipe(
    train: Samples, test: Samples, request: str, setup: Setup, family: str, setting: Setting
) -> float | None:
    """One point of a memory family's selection on its own: the Avg. Gap of ``family``
    with recipe ``setting`` on the selection request (an exact family: its validation
    error, the request unused) -- a piece a long run keeps apart
    (:mod:`kmem.unlearn.parts`), so it resumes point by point and shares the grid out."""
    if is_exact(family):
        score = _exact_scorer(family, train, _selection_setup(setup), lambda _: None)
        return score(dict(setting), SELECTION_SEED)
    chosen, asked, sets = _selection(train, test, request, setup)
    with tempfile.TemporaryDirectory(prefix="kmem-tune-") as tmp:
        score = _family_scorer(family, train, sets, asked, chosen, lambda _: None, Path(tmp))
        return score(dict(setting), SELECTION_SEED)


def chosen_recipe(family: str, points: Sequence[Setting], scores: Sequence[float | None]) -> Tuned:
    """The selection of memory family ``family`` from its ``points`` already scored (by
    :func:`score_recipe`), as :func:`tune` would make it."""
    by_point = {json.dumps(p, sort_keys=True): s for p, s in zip(points, scores, strict=True)}
    selection = protocol.select(
        family, points, lambda setting, _: by_point[json.dumps(setting, sort_keys=True)]
    )
    return Tuned({}, {family: selection.setting}, [selection])


def _selection(
    train: Samples, test: Samples, request: str, setup: Setup
) -> tuple[Setup, ForgetRequest, _Sets]:
    """The setup, request and sets every selection run uses: the request spec drawn with
    the selection seed, one MIA draw and no LiRA shadows (settings are ranked by Avg.
    Gap, cheaply)."""
    chosen = _selection_setup(setup)
    asked = parse_request(request, train.ids, train.labels, SELECTION_SEED)
    return chosen, asked, _Sets.split(train, test, asked, chosen)


def _selection_setup(setup: Setup) -> Setup:
    return replace(setup, seed=SELECTION_SEED, floor=False, mia_draws=1, shadows=0)


def validation_split(train: Samples, core_fraction: float) -> tuple[Samples, Samples, Samples]:
    """Exact mode's selection data: ``(fit, held, core)``, where ``core`` is the core of
    ``core_fraction`` (:func:`~kmem.models.choose_core`), ``held`` a draw of
    :data:`~kmem.unlearn.protocol.VALIDATION_FRACTION` of the other samples (seed
    :data:`~kmem.unlearn.protocol.SELECTION_SEED`, order kept) and ``fit`` the training
    samples without ``held``."""
    core = choose_core(train, fraction=core_fraction)
    rest = train.without(core.ids)
    n = round(VALIDATION_FRACTION * len(rest))
    if n < 1:
        raise ValueError(f"exact-mode selection: no validation sample among {len(rest)} outside the core")
    pick = torch.randperm(len(rest), generator=torch.Generator().manual_seed(SELECTION_SEED))[:n]
    held = rest[pick.sort().values]
    return train.without(held.ids), held, core


def _posthoc_scorer(
    method: str, original: Classifier, sets: _Sets, setup: Setup, against, step: Callable[[str], None]
) -> Score:
    def score(setting: Setting, seed: int) -> float | None:
        step(f"baseline: {method} {setting}")
        out = posthoc.unlearn(
            method, original, sets.retain, sets.forget,
            num_classes=setup.num_classes, seed=seed, progress=False, **setting,
        )  # fmt: skip
        diverged: list[str] = []
        scores = against(sets.predict(out.model, diverged, method), out.seconds)
        return None if diverged else scores.avg_gap

    return score


def _exact_scorer(family: str, train: Samples, setup: Setup, step: Callable[[str], None]) -> Score:
    fit, held, core = validation_split(train, setup.core_fraction)

    def score(setting: Setting, seed: int) -> float | None:
        step(f"{family}: {setting}")
        point = replace(setup, seed=seed, tuned={**setup.tuned, family: setting})
        model, _ = point.train(family, fit, core=core)
        probs = predict_proba(model, held.inputs)
        return 100.0 - accuracy(probs, held.labels) if torch.isfinite(probs).all() else None

    return score


def _family_scorer(
    family: str,
    train: Samples,
    sets: _Sets,
    request: ForgetRequest,
    setup: Setup,
    step: Callable[[str], None],
    tmp: Path,
) -> Score:
    def score(setting: Setting, seed: int) -> float | None:
        step(f"{family}: {setting}")
        point = replace(setup, seed=seed, tuned={**setup.tuned, family: setting})
        original, _ = point.train(family, train)
        folder = Path(tempfile.mkdtemp(dir=tmp))
        rows, *_ = _memory_family(family, original, sets, request, point, folder, lambda what: None, [])
        return next(r.scores.avg_gap for r in rows if r.method == KMEM)

    return score
