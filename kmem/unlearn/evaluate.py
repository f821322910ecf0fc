"""Evaluate forgetting against the retrained oracle: one forget request, every method.

For a memory family (``munkey``, ``spm``) the original model forgets by deleting rows
(``Classifier.forget``, timed), its memory is checked against the memory the same model
builds from the retained samples alone, and the oracle is the same recipe trained from
scratch on the retained samples -- weights retrained *and* memory rebuilt. For the
parametric ``baseline`` the post-hoc methods (:mod:`kmem.unlearn.posthoc`) update copies
of the trained model, and its oracle is the baseline retrained without the forget set.
Every method is scored against its own family's oracle (:mod:`kmem.unlearn.metrics`).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import torch
from tqdm.auto import tqdm

from ..ledger import Ledger
from ..memory import KeyMemory
from ..models import choose_core, load_checkpoint, predict_proba, save_checkpoint
from ..models import train as train_model
from ..models.base import Classifier
from ..models.checkpoint import checkpoint_tensors
from ..models.samples import Samples
from . import posthoc
from .metrics import Predictions, Scores, confidence, score
from .protocol import MAX_EVALUATION_SEEDS
from .requests import ForgetRequest
from .results import KMEM, ORACLE, ORACLE_SEED, ORIGINAL, Exactness, MethodResult, RequestResult

MEMORY_FAMILIES = ("munkey", "spm")
# A memory family in exact mode (kmem.models.train(..., core=)): "spm-exact", "munkey-exact".
EXACT = "-exact"
EXACT_FAMILIES = tuple(f + EXACT for f in MEMORY_FAMILIES)
# Oracles train with the evaluation seed plus this (floors: twice this): never a seed an
# original model of another evaluation seed uses (those stay below MAX_EVALUATION_SEEDS).
ORACLE_SEED_OFFSET = MAX_EVALUATION_SEEDS


def base_family(family: str) -> str:
    """The model family of ``family``: ``"spm"`` for ``"spm-exact"``."""
    return family.removesuffix(EXACT)


def is_exact(family: str) -> bool:
    return family in EXACT_FAMILIES


@dataclass
class Setup:
    """How models are trained and methods run: the same for the original and the oracle.

    Attributes:
        num_classes: classes of the dataset.
        seed: seeds the original model's training and the post-hoc methods. The oracle
            trains with :attr:`oracle_seed` and the floor's oracle with :attr:`floor_seed`:
            models trained with one seed start from the same weights whatever their
            data, so an oracle sharing the original's would look closer than retraining is.
        epochs: overrides each family's default number of epochs (None: the default).
        configs: per family, extra settings passed to ``kmem.models.train``.
        methods: the post-hoc methods applied to the baseline.
        recipes: per method, overrides of its :class:`~kmem.unlearn.posthoc.Recipe`.
        tuned: per family, the settings selection chose (:mod:`kmem.unlearn.tuning`):
            applied last, over ``configs`` and ``epochs``.
        max_retain: score RA and the MIA on at most this many retained samples (a seeded
            draw; None: all) -- predicting every retained sample is the costliest part
            of the evaluation for memory models on large datasets.
        floor: also retrain each oracle with :attr:`floor_seed` and score it against the
            oracle: the gap between two equally valid oracles, below which no method's
            gap means anything. Exact families skip it: their forgetting is checked bit
            for bit against their oracle, which no distance between oracles could judge.
        mia_draws: draws of the MIA's members averaged (see
            :func:`~kmem.unlearn.metrics.mia_efficacy`); they differ only where more
            retained samples are scored than there are test samples.
        core_fraction: the core of the exact-mode families (``*-exact``): this fraction
            of the training samples, one fixed draw (:func:`~kmem.models.choose_core`).
        shadows: shadow models for offline LiRA (:mod:`kmem.unlearn.attacks`): the baseline's
            recipe trained on random halves of the retained samples, so that neither a
            forget nor a test sample is in any (0: no LiRA; 1 is refused: it needs 2).
        progress: progress bars (None: when stderr is a terminal; when it is not, one plain
            line per finished step there instead, so a log shows how far the run is).
    """

    num_classes: int
    seed: int = 0
    epochs: int | None = None
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: Sequence[str] = posthoc.METHODS
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_retain: int | None = None
    mia_draws: int = 5
    floor: bool = False
    shadows: int = 4
    core_fraction: float = 0.1
    progress: bool | None = None

    def __post_init__(self) -> None:
        if self.shadows == 1 or self.shadows < 0:
            raise ValueError(f"shadows must be 0 (no LiRA) or >= 2, got {self.shadows}")

    @property
    def oracle_seed(self) -> int:
        return self.seed + ORACLE_SEED_OFFSET

    @property
    def floor_seed(self) -> int:
        return self.seed + 2 * ORACLE_SEED_OFFSET

    def train(
        self, family: str, data: Samples, seed: int | None = None, core: Samples | None = None
    ) -> tuple[Classifier, float]:
        """A model of ``family`` trained on ``data`` (with ``seed``, default the setup's;
        an exact family's dense weights on ``core`` alone), and the wall time it took.
        An exact family takes its base family's dataset settings and its own selection
        (``tuned["spm-exact"]``), never what selection chose for its base family."""
        config = dict(self.configs.get(base_family(family), {}))
        if self.epochs is not None:
            config["epochs"] = self.epochs
        config.update(self.tuned.get(family, {}))
        start = time.perf_counter()
        model, _ = train_model(
            base_family(family),
            data,
            num_classes=self.num_classes,
            core=core,
            seed=self.seed if seed is None else seed,
            progress=self.progress,
            **config,
        )
        return model, time.perf_counter() - start


@dataclass(frozen=True)
class _Sets:
    retain: Samples  # every retained training sample (what the oracle trains on)
    forget: Samples
    test: Samples
    retain_eval: Samples  # the retained samples that are scored
    train: Samples  # the whole training set
    # LiRA's shadow confidences (forget [S, m], test [S, n]); None: no LiRA.
    shadows: tuple[torch.Tensor, torch.Tensor] | None = None

    def stages(self, request: ForgetRequest) -> Iterator[tuple[torch.Tensor, Samples, Samples]]:
        """``(ids, retain, forget)`` per request in the order they arrive: the ids forgotten
        at that stage, the training samples left after it and the samples it forgets.
        One stage for a one-shot request, one per request of a stream."""
        if not request.steps:
            yield request.ids, self.retain, self.forget
            return
        forgotten = torch.empty(0, dtype=torch.int64)
        for ids in request.steps:
            forgotten = torch.cat([forgotten, ids])
            yield (
                ids,
                self.train[~torch.isin(self.train.ids, forgotten)],
                self.train[torch.isin(self.train.ids, ids)],
            )

    @classmethod
    def split(cls, train: Samples, test: Samples, request: ForgetRequest, setup: Setup) -> _Sets:
        missing = ~torch.isin(request.ids, train.ids)
        if missing.any():
            raise ValueError(
                f"request {request.name!r} names {int(missing.sum())} id(s) not in the training set"
            )
        gone = request.mask(train.ids)
        retain = train[~gone]
        scored = retain
        if setup.max_retain is not None and len(retain) > setup.max_retain:
            pick = torch.randperm(len(retain), generator=torch.Generator().manual_seed(setup.seed))
            scored = retain[torch.sort(pick[: setup.max_retain]).values]
        return cls(retain, train[gone], test, scored, train)

    def predict(self, model: Classifier, notes: list[str] | None = None, label: str = "") -> Predictions:
        """Probabilities on the three sets; rows that are not finite (a diverged method) are
        scored as uniform predictions and said in ``notes`` -- one diverged method must not
        sink the whole evaluation."""
        probs = {}
        for name, data in (("forget", self.forget), ("retain", self.retain_eval), ("test", self.test)):
            p = predict_proba(model, data.inputs)
            bad = ~torch.isfinite(p).all(1)
            if bad.any():
                p[bad] = 1.0 / p.shape[1]
                if notes is not None:
                    notes.append(
                        f"{label}: {int(bad.sum()):,} of {len(p):,} {name} predictions were not finite "
                        "(the method diverged); they are scored as uniform predictions."
                    )
            probs[name] = p
        return Predictions(
            **probs,
            forget_labels=self.forget.labels,
            retain_labels=self.retain_eval.labels,
            test_labels=self.test.labels,
        )


def weights_that_saw(model: Classifier) -> str:
    """Plain words for the trained weights of ``model`` that ``forget`` leaves as they are.

    Every dense weight was fitted with the whole training set, forgotten samples included
    -- or, in exact mode, with the core alone. Per-row tables (``row_tables``: one trained row per sample, e.g. MUNKEY's exemplar
    tokens) are not counted: ``forget`` deletes the forgotten samples' rows from them.
    """
    tables = {id(t) for t in model.row_tables()}
    exact = model.core_ids is not None
    parts = [
        f"{name} ({sum(p.numel() for p in child.parameters()):,} parameters)"
        for name, child in model.named_children()
        if id(child) not in tables and any(True for _ in child.parameters())
    ]
    parts += [f"{name} ({p.numel():,})" for name, p in model.named_parameters(recurse=False)]
    text = "all dense weights -- " + ", ".join(parts)
    if exact:
        return text + (
            f" -- were fitted on the core of {len(model.core_ids):,} samples alone, none of which can be "
            "forgotten; every other sample entered only as its own memory row"
            + (" and token, fitted from that sample against the frozen weights" if tables else "")
            + ", so forget leaves the model a retraining without the samples would give"
        )
    text += " -- were fitted with the forgotten samples in the training set and are unchanged by forget"
    if tables and model.rows_fit_own_sample_only():
        text += (
            " (each row of the per-sample tables got gradient from its own sample's loss only, and the "
            "forgotten samples' rows are deleted with their memory rows; but that loss was computed with the "
            "retrieved neighbours' rows in the same forward pass, forgotten neighbours included, so a retained "
            "row may still carry their influence)"
        )
    elif tables:
        text += (
            " (the forgotten samples' own rows of the per-sample tables are deleted with their memory rows; "
            "the retained rows were also fitted to the losses of the samples that retrieved them, "
            "forgotten ones included)"
        )
    return text


Scorer = Callable[[Predictions, float | None], Scores]


class _Oracle(NamedTuple):
    against: Scorer  # scores predictions against the oracle's
    rows: list[MethodResult]  # itself and, with ``setup.floor``, an oracle of another seed
    seconds: float  # the retraining's wall time
    model: Classifier
    predictions: Predictions


def _oracle(family: str, sets: _Sets, setup: Setup, step, core: Samples | None = None) -> _Oracle:
    """Retrain ``family`` without the forget set. An exact family's oracle is the very
    retraining its ``forget`` must equal: same core, same seed as the original."""
    step(f"{family}: retrain without the forget set (oracle)")
    seed = setup.seed if core is not None else setup.oracle_seed
    oracle, seconds = setup.train(family, sets.retain, seed=seed, core=core)
    truth = sets.predict(oracle)
    ref = score(truth, mia_draws=setup.mia_draws, shadows=sets.shadows)

    def against(pred: Predictions, seconds: float | None = None) -> Scores:
        return score(
            pred,
            oracle=truth,
            oracle_scores=ref,
            seconds=seconds,
            mia_draws=setup.mia_draws,
            shadows=sets.shadows,
        )

    # The oracle against itself: its own metrics, no gap (scoring it again would refit the SVCs).
    rows = [MethodResult(family, ORACLE, replace(ref, avg_gap=0.0, hard_gap=0.0, soft_gap=0.0))]
    if setup.floor and core is None:
        step(f"{family}: retrain with another seed (floor)")
        other, _ = setup.train(family, sets.retain, seed=setup.floor_seed)
        rows.append(MethodResult(family, ORACLE_SEED, against(sets.predict(other))))
    return _Oracle(against, rows, seconds, oracle, truth)


def _shadows(sets: _Sets, setup: Setup, step) -> tuple[torch.Tensor, torch.Tensor]:
    """True-class confidences ``(forget [S, m], test [S, n])`` of ``setup.shadows`` baselines,
    each trained on its own random half of the retained samples (seeds apart from every
    evaluation model's)."""
    confs = []
    for i in range(setup.shadows):
        step(f"LiRA shadow {i + 1}/{setup.shadows}")
        seed = setup.seed + (3 + i) * ORACLE_SEED_OFFSET
        half = torch.randperm(len(sets.retain), generator=torch.Generator().manual_seed(seed))
        shadow, _ = setup.train("baseline", sets.retain[torch.sort(half[: len(half) // 2]).values], seed=seed)
        confs.append(
            [confidence(predict_proba(shadow, s.inputs), s.labels) for s in (sets.forget, sets.test)]
        )
    return torch.stack([c[0] for c in confs]), torch.stack([c[1] for c in confs])


def _copy(model: Classifier, folder: Path) -> Classifier:
    """An independent copy (weights and memories) through a checkpoint, which round-trips exactly."""
    path = folder / f"{model.name}.kmem"
    if not path.exists():
        save_checkpoint(model, path)
    return load_checkpoint(path)


def _memory_family(
    family: str,
    original: Classifier,
    sets: _Sets,
    request: ForgetRequest,
    setup: Setup,
    folder: Path,
    step,
    notes: list[str],
    core: Samples | None = None,
) -> tuple[list[MethodResult], float, Exactness, list[float]]:
    oracle = _oracle(family, sets, setup, step, core)
    against = oracle.against

    step(f"{family}: forget {len(request):,} samples by deleting their rows")
    model = _copy(original, folder)
    tables_before = [t.fingerprint(only=sets.retain.ids) for t in model.row_tables()]
    if request.steps:  # a stream: each request is a deletion with its own receipt
        model.memories()[0].ledger = Ledger(folder / f"{family}-ledger.db")
    seconds, deleted, steps_exact = [], 0, True
    for ids, retain, _ in sets.stages(request):
        start = time.perf_counter()
        deleted += model.forget(ids)
        seconds.append(time.perf_counter() - start)
        if request.steps:  # exact after every request, not only after the last
            steps_exact &= _memories_equal(model.memories(), model.memory_for(_in_memory_order(retain, core)))
    if request.steps:
        ledger = model.memories()[0].ledger
        check = ledger.verify()
        notes.append(
            f"{family}: {len(request.steps)} requests one after another, "
            f"{len(ledger.receipts())} ledger receipts, chain {'intact' if check.ok else 'BROKEN'}; forget "
            f"time per request: {', '.join(f'{1e3 * t:.2f}' for t in seconds)} ms; memory equal to the "
            f"retained samples' after every request: {'yes' if steps_exact else 'NO'}."
        )
        ledger.close()
    start = time.perf_counter()
    for mem in model.memories():
        mem.compact()
    compact_seconds = time.perf_counter() - start
    for table in model.row_tables():
        table.compact()
    rebuilt = model.memory_for(_in_memory_order(sets.retain, core))
    held = model.memories()
    never = model.with_memories(rebuilt)
    after = sets.predict(model)
    same_predictions = all(
        torch.equal(getattr(after, s), predict_proba(never, getattr(sets, s).inputs))
        for s in ("forget", "test")
    )
    exact = Exactness(
        family=family,
        forgotten_rows=deleted,
        fingerprints_equal=steps_exact and _memories_equal(held, rebuilt),
        forgotten_ids_left=sum(int(torch.isin(m.ids(), request.ids).sum()) for m in held),
        predictions_equal=same_predictions,
        fingerprint=held[0].fingerprint() if held else "",
        compact_seconds=compact_seconds,
        weights_that_saw=weights_that_saw(model),
        tables_equal=[t.fingerprint() for t in model.row_tables()] == tables_before,
        tables=len(tables_before),
        retrained_equal=None if core is None else _same_model(model, after, oracle),
    )

    step(f"{family}: score")
    rows = [
        MethodResult(family, ORIGINAL, against(sets.predict(original))),
        *oracle.rows,
        MethodResult(family, KMEM, against(after, sum(seconds))),
    ]
    return rows, oracle.seconds, exact, seconds


def _in_memory_order(samples: Samples, core: Samples | None) -> Samples:
    """``samples`` in the order a model trained on them holds their rows: as given, or in
    exact mode the core's first, then the others (``kmem.models.train`` admits them last)."""
    if core is None:
        return samples
    rest = samples.without(core.ids)
    return Samples(
        torch.cat([core.inputs, rest.inputs]),
        torch.cat([core.labels, rest.labels]),
        torch.cat([core.ids, rest.ids]),
    )


def _same_model(model: Classifier, predictions: Predictions, oracle: _Oracle) -> bool:
    """Whether ``model`` (predicting ``predictions``) and the oracle hold the same
    checkpoint tensors (weights, rows, core) and predict the forget, retained and test
    samples the same, bit for bit."""
    mine, theirs = checkpoint_tensors(model)[0], checkpoint_tensors(oracle.model)[0]
    same = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    return same and all(
        torch.equal(getattr(predictions, s), getattr(oracle.predictions, s))
        for s in ("forget", "retain", "test")
    )


def _memories_equal(held: Sequence[KeyMemory], rebuilt: Sequence[KeyMemory]) -> bool:
    """Fingerprint for fingerprint, the memories equal those rebuilt from the retained samples."""
    return len(held) == len(rebuilt) and all(
        a.fingerprint() == b.fingerprint() for a, b in zip(held, rebuilt, strict=True)
    )


def _baseline(
    original: Classifier, sets: _Sets, request: ForgetRequest, setup: Setup, step, notes: list[str]
) -> tuple[list[MethodResult], float]:
    oracle = _oracle("baseline", sets, setup, step)
    against, retrain_seconds = oracle.against, oracle.seconds
    rows = [MethodResult("baseline", ORIGINAL, against(sets.predict(original))), *oracle.rows]
    for method in setup.methods:
        step(f"baseline: {method}")
        model, seconds = original, 0.0
        for _, retain, forget in sets.stages(request):  # a stream: the method once per request, in order
            out = posthoc.unlearn(
                method,
                model,
                retain,
                forget,
                num_classes=setup.num_classes,
                seed=setup.seed,
                progress=setup.progress,
                **setup.recipes.get(method, {}),
            )
            model, seconds = out.model, seconds + out.seconds
        rows.append(
            MethodResult(
                "baseline", method, against(sets.predict(model, notes, f"baseline {method}"), seconds)
            )
        )
    return rows, retrain_seconds


def evaluate(
    dataset: str,
    train: Samples,
    test: Samples,
    requests: Sequence[ForgetRequest],
    setup: Setup,
    families: Sequence[str] = (*MEMORY_FAMILIES, "baseline"),
    originals: Callable[[str], Path] | None = None,
) -> list[RequestResult]:
    """Run every request against every family; returns one :class:`RequestResult` per request.

    Each family's original model is trained once on ``train`` and copied for each
    request, so requests do not see each other. ``originals`` maps a family to a
    checkpoint file that holds its original model: read when it is there (training is
    deterministic, so it is the model this call would train), else written after training
    -- how evaluations of one request at a time share one training.
    """
    known = [*MEMORY_FAMILIES, *EXACT_FAMILIES, "baseline"]
    unknown = sorted(set(families) - set(known))
    if unknown:
        raise ValueError(f"unknown model famil(ies) {unknown}; choose from {known}")
    core = choose_core(train, fraction=setup.core_fraction) if any(map(is_exact, families)) else None
    trained: dict[str, Classifier] = {}
    memory = [f for f in families if f != "baseline"]
    per_request = (
        3 * len(memory)
        + ("baseline" in families) * (1 + len(setup.methods))
        + setup.floor * sum(not is_exact(f) for f in families)
        + setup.shadows
    )
    total = len(families) + len(requests) * per_request
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="kmem-eval-") as tmp,
        tqdm(total=total, desc="evaluation", unit="step", disable=_no_bar(setup.progress)) as bar,
    ):
        step = _stepper(bar, _lines(setup.progress))
        for family in families:
            step(f"{family}: train on all {len(train):,} samples")
            trained[family] = _original(family, train, setup, core if is_exact(family) else None, originals)
        for request in requests:
            sets = _Sets.split(train, test, request, setup)
            within = _named(step, request.name)
            if setup.shadows:
                sets = replace(sets, shadows=_shadows(sets, setup, within))
            result = RequestResult(
                dataset=dataset,
                request=request.name,
                forgotten=len(sets.forget),
                retained=len(sets.retain),
                test=len(test),
                seed=setup.seed,
            )
            if len(sets.retain_eval) < len(sets.retain):
                result.notes.append(
                    f"RA and MIA-Efficacy use {len(sets.retain_eval):,} retained samples drawn with seed "
                    f"{setup.seed} (of {len(sets.retain):,})."
                )
            folder = Path(tmp) / request.name
            folder.mkdir()
            for family in families:
                if family == "baseline":
                    rows, seconds = _baseline(trained[family], sets, request, setup, within, result.notes)
                else:
                    asked, scored = request, sets
                    if is_exact(family):
                        asked, scored = _outside_core(request, sets, core, train, test, setup)
                        result.notes.append(_core_note(family, core, request, asked))
                    rows, seconds, exact, forget_seconds = _memory_family(
                        family, trained[family], scored, asked, setup, folder, within, result.notes,
                        core if is_exact(family) else None,
                    )  # fmt: skip
                    result.exactness.append(exact)
                    if request.steps:
                        result.step_seconds[family] = forget_seconds
                result.rows += rows
                result.retrain_seconds[family] = seconds
            results.append(result)
        step("done")
    return results


def _original(
    family: str, train: Samples, setup: Setup, core: Samples | None, cache: Callable[[str], Path] | None
) -> Classifier:
    """``family`` trained on all of ``train`` -- or read from its checkpoint in ``cache``."""
    path = cache(family) if cache is not None else None
    if path is not None and path.is_file():
        return load_checkpoint(path)
    model, _ = setup.train(family, train, core=core)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(model, path)  # atomic: a concurrent reader sees all of it or nothing
    return model


def _outside_core(
    request: ForgetRequest, sets: _Sets, core: Samples, train: Samples, test: Samples, setup: Setup
) -> tuple[ForgetRequest, _Sets]:
    """An exact family's request and sets: the core cannot be forgotten, so its ids stay
    retained; LiRA's shadows (trained on retained samples) are kept for the others."""
    asked = request.outside(core.ids)
    scored = _Sets.split(train, test, asked, setup)
    if sets.shadows is not None:
        keep = ~torch.isin(sets.forget.ids, core.ids)
        scored = replace(scored, shadows=(sets.shadows[0][:, keep], sets.shadows[1]))
    return asked, scored


def _core_note(family: str, core: Samples, request: ForgetRequest, asked: ForgetRequest) -> str:
    kept = len(request) - len(asked)
    return (
        f"{family}: exact mode, dense weights fitted on a core of {len(core):,} training samples (a fixed draw, "
        f"never forgettable); it forgets the {len(asked):,} ids of the request outside the core"
        + (f" ({kept:,} are in the core and stay)" if kept else "")
        + "; its oracle is the same recipe really retrained without them, with the same core and seed."
    )


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # tqdm: None = off unless a terminal


def _lines(progress: bool | None) -> TextIO | None:
    """stderr when progress was left to the default and stderr is not a terminal: tqdm's bar
    is off there, and a log must not go silent for minutes."""
    return sys.stderr if progress is None and not sys.stderr.isatty() else None


def _stepper(bar: tqdm, lines: TextIO | None) -> Callable[[str], None]:
    """Advance ``bar`` by one step, showing what runs next; to ``lines`` (if given), write one
    line per finished step with its wall time, flushed."""
    done, running, started = 0, None, 0.0

    def step(what: str) -> None:
        nonlocal done, running, started
        now = time.perf_counter()
        if running is not None:
            bar.update()
            done += 1
            if lines is not None:
                count = f"{done:>{len(str(bar.total))}}/{bar.total}"
                print(f"[{count}] {running} ({now - started:.1f} s)", file=lines, flush=True)
        running, started = what, now
        bar.set_postfix_str(what)

    return step


def _named(step: Callable[[str], None], request: str) -> Callable[[str], None]:
    """``step`` with each step's name led by the request it works on."""
    return lambda what: step(f"{request}: {what}")
