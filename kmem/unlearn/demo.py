"""The main job: prove forgetting on a dataset and write the evidence as a report.

``run`` trains the MUNKEY-style and SPM-style memory models and the parametric baseline
on a dataset's frozen-encoder features, then for each forget request: the memory models
forget by deleting rows (exactness checked against the memory of the retained samples),
the baseline gets the post-hoc methods (FT, GA, RL, SalUn, SCRUB), every family is
retrained without the forget set (the oracle), and every method is scored against its
family's oracle. The report (Markdown + PNG plots + JSON) goes to ``out``.
"""

from __future__ import annotations

import functools
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .. import __version__
from ..datasets.splits import load_dataset
from ..models.samples import Samples, samples
from . import posthoc, protocol, tuning
from .evaluate import EXACT, MEMORY_FAMILIES, ORACLE_SEED_OFFSET, Setup, evaluate, is_exact
from .parts import Parts, Unit, digest
from .protocol import SELECTION_SEED, Setting, evaluation_seeds
from .report import summary, write_report
from .requests import ForgetRequest, parse_request
from .results import RequestResult

FAMILIES = (*MEMORY_FAMILIES, "baseline")
# Per dataset, family settings the full mode trains with (``--epochs`` overrides them).
# Digits is 40x smaller than Fashion-MNIST: SPM's 2 default epochs are 12 optimiser
# steps there, too few to learn (56% test accuracy; 89% at 20 epochs).
DATASET_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {"digits": {"spm": {"epochs": 20}}}
REQUESTS = ("1%", "10%", "class:0")  # random 1% and 10% of the training set, and all of class 0


@dataclass(frozen=True)
class Mode:
    """What ``--quick`` changes: fewer epochs, fewer requests, a cap on scored retained samples."""

    epochs: int | None
    requests: tuple[str, ...]
    max_retain: int | None
    recipe_epochs: int | None  # post-hoc methods' epochs (None: their recipes')


FULL = Mode(epochs=None, requests=REQUESTS, max_retain=20_000, recipe_epochs=None)
QUICK = Mode(epochs=2, requests=("10%",), max_retain=2_000, recipe_epochs=2)


@dataclass
class DemoResult:
    """The evaluation's results, the report's path and the terminal summary."""

    results: list[RequestResult]
    report: Path
    summary: str

    @property
    def exact(self) -> bool:
        """Every memory model's forgetting passed the exactness checks."""
        return all(e.ok for r in self.results for e in r.exactness)


def run(
    data: str = "digits",
    *,
    quick: bool = False,
    out: str | Path = "kmem-report",
    families: Sequence[str] = FAMILIES,
    requests: Sequence[str] | None = None,
    methods: Sequence[str] = posthoc.METHODS,
    seed: int = 0,
    seeds: int = 1,
    epochs: int | None = None,
    limit: int | None = None,
    floor: bool = False,
    tune: str | None = None,
    grids: Mapping[str, Sequence[Setting]] | None = None,
    core_fraction: float | None = None,
    progress: bool | None = None,
    command: str | None = None,
) -> DemoResult:
    """Evaluate forgetting on dataset ``data`` and write the report into ``out``.

    ``requests`` are spelled as on the command line (``"10%"``, ``"random:0.01"``,
    ``"class:3"``, ``"stream:10x1%"``; default: the mode's). ``seeds`` independent runs
    (seeds ``seed .. seed + seeds - 1``) each draw their own requests, initialisations,
    models, oracles and post-hoc runs; the report gives means with 95% intervals. ``epochs`` overrides the mode's training epochs;
    ``limit`` keeps only the first ``limit`` training samples (for tests); ``floor`` adds
    each oracle retrained with another seed, scored against the oracle. ``tune`` (a
    request spec, e.g. ``"10%"``) first runs the declared tuning protocol
    (:mod:`kmem.unlearn.protocol`) on that request drawn with the selection seed, and
    every method then runs with its selected setting; ``grids`` replaces declared grids
    by name (tests). ``core_fraction`` (in (0, 1)) adds each memory family in exact mode
    (``spm-exact``, ...): dense weights fitted on that fraction of the training samples,
    the others memory rows alone (:func:`kmem.models.train`'s ``core``), checked bit for
    bit against real retraining. ``command`` is the command line printed in the report
    (default: this process's).
    """
    if core_fraction is not None:
        if not 0 < core_fraction < 1:  # NaN fails too
            raise ValueError(f"--core-fraction must be in (0, 1), got {core_fraction}")
        families = [*families, *(f + EXACT for f in families if f in MEMORY_FAMILIES)]
    mode = QUICK if quick else FULL
    runs = evaluation_seeds(seeds, first=seed)
    dataset = load_dataset(data)
    train, test = samples(dataset.train), samples(dataset.test)
    if limit is not None:
        train = train[:limit]
    specs = requests or mode.requests
    asked = {
        s: [parse_request(spec, train.ids, train.labels, s) for spec in specs] for s in runs
    }  # checked first
    setup = Setup(
        num_classes=dataset.num_classes,
        seed=seed,
        epochs=epochs if epochs is not None else mode.epochs,
        methods=tuple(methods),
        recipes={m: {"epochs": mode.recipe_epochs} for m in methods} if mode.recipe_epochs else {},
        configs=DATASET_CONFIGS.get(data, {}),
        max_retain=mode.max_retain,
        floor=floor,
        core_fraction=core_fraction or Setup.core_fraction,
        progress=progress,
    )
    if tune is not None:
        parse_request(tune, train.ids, train.labels, SELECTION_SEED)  # a bad spec fails before any training
    done = Parts(Path(out) / "parts", log=None if progress is False else sys.stderr).run(
        _units(data, train, test, specs, asked, setup, families, tune, grids, Path(out) / "originals")
    )
    tuned = tuning.Tuned.merge(
        [tuning.Tuned.from_json(done[name]) for name in done if name.startswith("select-")]
    )
    results = []
    for s in runs:
        per_family = [[RequestResult.from_json(r) for r in _results_of(done, s, f, specs)] for f in families]
        results += [functools.reduce(RequestResult.merged, same) for same in zip(*per_family, strict=True)]
    lines = _setup_lines(data, train, test, setup, families, mode, runs)
    if tune is not None:
        lines += [f"tuning protocol, on request {tune}: {line}" for line in protocol.describe()]
        lines += [f"selected: {name} {setting}" for name, setting in tuned.selected().items()]
    shown = command or "kmem " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = write_report(
        results,
        out,
        title=f"kmem: proof of forgetting on {data}",
        command=shown,
        setup=lines,
        selected=tuned.selected() if tune is not None else None,
    )
    return DemoResult(results, report, summary(results))


def _units(
    data: str,
    train: Samples,
    test: Samples,
    specs: Sequence[str],
    asked: Mapping[int, Sequence[ForgetRequest]],
    setup: Setup,
    families: Sequence[str],
    tune: str | None,
    grids: Mapping[str, Sequence[Setting]] | None,
    originals: Path,
) -> list[Unit]:
    """The run's pieces (:mod:`kmem.unlearn.parts`): with ``tune``, one per grid point of
    each memory family's selection (exact families' too) and one selection made from them, and one selection
    of the baseline's post-hoc methods; then one evaluation per seed and family, which
    reads its family's selection -- for an exact family one per seed, family and request
    (MUNKEY-exact's pieces would otherwise run for hours), whose original model trained
    once is kept as a checkpoint in ``originals``."""
    common = {
        "kmem": __version__,
        "data": data,
        "train": len(train),
        "test": len(test),
        # The core concerns the exact families only: their units add it to their keys.
        "setup": {k: v for k, v in asdict(setup).items() if k not in ("seed", "progress", "core_fraction")},
    }
    units = []
    if tune is not None:
        for family in families:
            select = {**common, "tune": tune, "family": family, "grids": grids, **_core_key(setup, family)}
            if family == "baseline":  # its methods share one original and one oracle: one piece
                units.append(
                    Unit(
                        "select-baseline",
                        # The grids themselves, not only their override: a changed declared
                        # grid must not reuse a selection made from the old one.
                        key=lambda _, k=select: {**k, "grid": tuning.method_grids(setup.methods, grids)},
                        compute=lambda _: tuning.tune(
                            train, test, tune, setup, ["baseline"], grids
                        ).to_json(),
                    )
                )
                continue
            # A memory family's points are independent runs: one piece each, so a long
            # selection resumes point by point and two processes share its grid.
            points = tuning.recipe_points(family, grids)
            names = [f"point-{family}-{i}" for i in range(len(points))]
            for name, point in zip(names, points, strict=True):
                units.append(
                    Unit(
                        name,
                        # A point depends on its setting, not on the grid around it ("grids":
                        # None keeps the keys of points scored before this rule).
                        key=lambda _, k=select, p=point: {**k, "grids": None, "setting": p},
                        compute=lambda _, f=family, p=point: tuning.score_recipe(
                            train, test, tune, setup, f, p
                        ),
                    )
                )
            units.append(
                Unit(
                    f"select-{family}",
                    key=lambda _, k=select, p=points: {**k, "grid": p},
                    compute=lambda got, f=family, p=points, n=names: tuning.chosen_recipe(
                        f, p, [got[name] for name in n]
                    ).to_json(),
                    needs=names,
                )
            )
    for s in asked:
        for family in families:
            needs = (f"select-{family}",) if tune is not None else ()
            exact = _core_key(setup, family)

            def key(got, s=s, f=family, x=exact, r=tuple(specs)) -> dict:
                return {**common, "seed": s, "family": f, "requests": list(r), "selected": got, **x}

            if not is_exact(family):
                units.append(
                    Unit(
                        f"eval-seed{s}-{family}",
                        key=key,
                        compute=lambda got, s=s, f=family: [
                            r.to_json()
                            for r in evaluate(data, train, test, asked[s], _with(setup, got, seed=s), [f])
                        ],
                        needs=needs,
                    )
                )
                continue
            for i, spec in enumerate(specs):
                units.append(
                    Unit(
                        _piece(s, family, spec),
                        key=lambda got, k=key, r=spec: k(got, r=(r,)),
                        compute=lambda got, s=s, f=family, i=i, k=key: _evaluate_one(
                            data,
                            train,
                            test,
                            asked[s][i],
                            _with(setup, got, seed=s),
                            f,
                            originals / f"{f}-{digest(k(got, r=()))}.kmem",
                        ),
                        needs=needs,
                    )
                )
    return units


def _evaluate_one(
    data: str,
    train: Samples,
    test: Samples,
    request: ForgetRequest,
    setup: Setup,
    family: str,
    original: Path,
) -> list:
    """``request`` against ``family`` (RequestResult JSON), its original model kept at --
    or read from -- the checkpoint ``original`` (keyed like the pieces, less the request)."""
    results = evaluate(data, train, test, [request], setup, [family], originals=lambda _: original)
    return [r.to_json() for r in results]


def _piece(seed: int, family: str, spec: str) -> str:
    """The name of an exact family's evaluation piece of one request."""
    return f"eval-seed{seed}-{family}-{spec}"


def _results_of(done: Mapping[str, Any], seed: int, family: str, specs: Sequence[str]) -> list:
    """The evaluation pieces' results (RequestResult JSON) of ``family`` at ``seed``, in
    the requests' order."""
    if not is_exact(family):
        return done[f"eval-seed{seed}-{family}"]
    return [done[_piece(seed, family, spec)][0] for spec in specs]


def _core_key(setup: Setup, family: str) -> dict[str, float]:
    """What an exact family's pieces add to their keys: the core (the others ignore it)."""
    return {"core_fraction": setup.core_fraction} if is_exact(family) else {}


def _with(setup: Setup, selections: Mapping[str, Any], seed: int) -> Setup:
    """``setup`` for ``seed`` running with the settings the ``selections`` (Tuned JSON) chose."""
    tuned = tuning.Tuned.merge([tuning.Tuned.from_json(t) for t in selections.values()])
    return replace(
        setup,
        seed=seed,
        tuned={**setup.tuned, **tuned.configs},
        recipes={m: {**setup.recipes.get(m, {}), **r} for m, r in tuned.recipes.items()} or setup.recipes,
    )


def _setup_lines(
    data: str,
    train: Samples,
    test: Samples,
    setup: Setup,
    families: Sequence[str],
    mode: Mode,
    runs: Sequence[int],
) -> list[str]:
    epochs = "each family's default epochs" if setup.epochs is None else f"{setup.epochs} training epoch(s)"
    if setup.epochs is None and setup.configs:
        epochs += " except " + ", ".join(f"{f}: {c}" for f, c in setup.configs.items())
    lines = [
        f"data: {data}, {len(train):,} training and {len(test):,} test samples, frozen EfficientNet-Lite0 "
        f"features ({train.inputs.shape[1]}-d)",
        f"models: {', '.join(families)}; {epochs}; {_seeds_line(runs)}",
    ]
    if "baseline" in families:
        each = f" ({mode.recipe_epochs} epochs each)" if mode.recipe_epochs else ""
        lines.append(f"post-hoc methods on the baseline: {', '.join(setup.methods)}{each}")
    lines.append(
        f"MIA-Efficacy: the mean over {setup.mia_draws} seeded draws of the SVC's member (retained) samples"
    )
    quick = "--quick (fewer epochs and requests: a smoke run, not the full-size figures)"
    lines.append(f"mode: {quick if mode is QUICK else 'full'}")
    return lines


def _seeds_line(runs: Sequence[int]) -> str:
    seeds = (
        f"seed {runs[0]}"
        if len(runs) == 1
        else f"{len(runs)} independent seeds ({runs[0]}..{runs[-1]}; means ± 95% intervals)"
    )
    return (
        f"{seeds}; each seed s draws its own random requests and trains the original with seed s, its oracle "
        f"with s + {ORACLE_SEED_OFFSET} and the floor's oracle with s + {2 * ORACLE_SEED_OFFSET}: no two "
        "models start from the same weights"
    )
