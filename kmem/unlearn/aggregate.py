"""Results over independent seeds: one :class:`RequestResult` per request whose rows hold
each metric's mean over the seeds, with its Student-t 95% interval in ``spread``.

The report reads an aggregate like a single-seed result (means in the table, the
verdicts on the means) and shows ``mean ± half-width`` where there are several seeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace

from .metrics import Scores
from .results import Exactness, MethodResult, RequestResult
from .stats import mean_ci

SCORE_FIELDS = tuple(f.name for f in fields(Scores))


def aggregate(results: Sequence[RequestResult]) -> list[RequestResult]:
    """Group ``results`` (one per request and seed) by request, in first-seen order, and
    average each group. ``ValueError`` if a group's seeds ran different rows."""
    groups: dict[str, list[RequestResult]] = {}
    for r in results:
        groups.setdefault(r.request, []).append(r)
    return [_mean(group) for group in groups.values()]


def _mean(group: list[RequestResult]) -> RequestResult:
    first = group[0]
    keys = [(r.family, r.method) for r in first.rows]
    for r in group[1:]:
        if [(row.family, row.method) for row in r.rows] != keys:
            raise ValueError(f"request {first.request!r}: the seeds ran different methods")
    rows, spread = [], {}
    for i, (family, method) in enumerate(keys):
        per_seed = [r.rows[i].scores for r in group]
        means, intervals = {}, {}
        for name in SCORE_FIELDS:
            values = [getattr(s, name) for s in per_seed]
            if any(v is None for v in values):
                means[name] = None
                continue
            ci = mean_ci(values)
            means[name], intervals[name] = ci.mean, ci
        rows.append(MethodResult(family, method, Scores(**means)))
        spread[f"{family}/{method}"] = intervals
    return RequestResult(
        dataset=first.dataset,
        request=first.request,
        forgotten=round(sum(r.forgotten for r in group) / len(group)),
        retained=round(sum(r.retained for r in group) / len(group)),
        test=first.test,
        rows=rows,
        retrain_seconds={
            f: sum(r.retrain_seconds[f] for r in group) / len(group) for f in first.retrain_seconds
        },
        exactness=[_all_exact([r.exactness[i] for r in group]) for i in range(len(first.exactness))],
        notes=[note if len(group) == 1 else f"seed {r.seed}: {note}" for r in group for note in r.notes],
        step_seconds={
            f: [sum(ts) / len(group) for ts in zip(*(r.step_seconds[f] for r in group), strict=True)]
            for f in first.step_seconds
        },
        seed=None,
        seeds=[r.seed for r in group],
        spread=spread,
    )


def _all_exact(per_seed: list[Exactness]) -> Exactness:
    """One record for every seed: each check must hold on every seed."""
    first = per_seed[0]
    return replace(
        first,
        forgotten_rows=round(sum(e.forgotten_rows for e in per_seed) / len(per_seed)),
        fingerprints_equal=all(e.fingerprints_equal for e in per_seed),
        tables_equal=all(e.tables_equal for e in per_seed),
        forgotten_ids_left=sum(e.forgotten_ids_left for e in per_seed),
        predictions_equal=all(e.predictions_equal for e in per_seed),
        retrained_equal=None if first.retrained_equal is None else all(e.retrained_equal for e in per_seed),
        compact_seconds=sum(e.compact_seconds for e in per_seed) / len(per_seed),
    )
