"""The evaluation report: a Markdown file with the metrics tables, PNG plots and the raw JSON.

``write_report`` writes, into one folder, ``report.md`` (a verdict per memory family and
request, a table per request with the metrics far from the oracle explained, the
exactness evidence and what is not guaranteed), ``results.json`` and per request
``<request>-time.png`` (forgetting time vs retraining, log scale) and
``<request>-accuracy.png`` (UA, RA, TA and MIA-Efficacy per method).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from .aggregate import aggregate
from .metrics import GAP_METRICS
from .results import KMEM, ORACLE, ORACLE_SEED, REFERENCES, MethodResult, RequestResult

FAMILY_NAMES = {
    "munkey": "MUNKEY-style",
    "spm": "SPM-style",
    "munkey-exact": "MUNKEY-style, exact mode",
    "spm-exact": "SPM-style, exact mode",
    "baseline": "baseline (parametric)",
}
METRIC_NAMES = {"ua": "UA", "ra": "RA", "ta": "TA", "mia": "MIA-Eff."}

# A memory family forgot a request when its `kmem forget` Avg. Gap to the oracle is at
# most the floor's (two equally valid oracles, seeds apart) plus this many points.
FORGOT_MARGIN = 0.3
CRITERION = (
    f'A memory family forgot a request when its "{KMEM}" row\'s Avg. Gap to its oracle is at most '
    f"the floor's Avg. Gap + {FORGOT_MARGIN} (the floor, \"{ORACLE_SEED}\", is the oracle's recipe retrained "
    "with another seed and scored against the oracle: how far apart two equally valid oracles are). "
    "In exact mode it forgot when the model after forgetting is bit-identical to the model really retrained "
    "without the samples (no floor: no distance between oracles judges that)."
)
# A `kmem forget` metric is explained under its table when it is further from the
# oracle's than FAR_POINTS and than FAR_FLOOR_TIMES the floor's distance on that metric.
FAR_POINTS = 5.0
FAR_FLOOR_TIMES = 3.0
# What a metric of `kmem forget` below (-1) or above (+1) the oracle's means.
MEANINGS = {
    ("ua", -1): (
        "the forgotten samples are still classified right more often than by a model that never saw them: "
        "they are still recognised"
    ),
    ("ua", 1): (
        "the forgotten samples are misclassified more often than by a model that never saw them: "
        "deleting their rows took more than never training on them"
    ),
    ("ra", -1): (
        "the retained samples are classified worse than by the oracle: forgetting cost what it should keep"
    ),
    ("ra", 1): "the retained samples are classified better than by the oracle",
    ("ta", -1): "unseen test samples are classified worse than by the oracle: forgetting cost accuracy",
    ("ta", 1): (
        "unseen test samples are classified better than by the oracle: the model still knows what only "
        "the forgotten samples taught"
    ),
    ("mia", -1): (
        "fewer forgotten samples pass for non-members than with the oracle: they still look like training samples"
    ),
    ("mia", 1): (
        "more forgotten samples pass for non-members than with the oracle: they look less familiar than "
        "unseen samples, which marks them out too"
    ),
}
EXACTNESS_IS_NOT_A_VERDICT = (
    "The exactness checks under each table (the memory after `forget` equals the memory built from the "
    "retained samples alone) are evidence about the memory, not a verdict on forgetting: the trained "
    "weights saw the forgotten samples, and only the gaps to the oracle measure what they kept."
)

NOT_GUARANTEED = """\
**What forgetting guarantees here, and what it does not.** For the memory models
(`kmem forget`), the rows of the forgotten samples are deleted: the memory is then
bit-for-bit the memory the same model builds from the retained samples alone (the
fingerprints above), and no prediction can retrieve a forgotten row. The *trained
weights* are not retrained: they were fitted while the forgotten samples were in the
training set, and whatever they absorbed of them stays. That residual influence is what
the MIA-Efficacy and the gaps to the retrained oracle measure. The post-hoc baselines
change every weight approximately and guarantee nothing exact; the oracle is the
reference all methods are compared with. Copies made outside the model (checkpoints,
logs, predictions computed before the deletion) are out of scope (see kmem's
docs/guarantees.md, "What deletion guarantees")."""


def _family(family: str) -> str:
    return FAMILY_NAMES.get(family, family)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _times(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def speedup(row: MethodResult, result: RequestResult) -> float | None:
    """Retraining seconds of the row's family over the row's forgetting seconds."""
    retrain = result.retrain_seconds.get(row.family)
    if retrain is None or row.scores.seconds is None or row.method in REFERENCES:
        return None
    return retrain / max(row.scores.seconds, 1e-9)


def _interval(result: RequestResult, row: MethodResult, name: str):
    """The 95% interval of ``row``'s metric ``name`` over the seeds (None: not aggregated)."""
    return result.spread.get(f"{row.family}/{row.method}", {}).get(name)


def _cell(result: RequestResult, row: MethodResult, name: str, digits: int = 2) -> str:
    """A metric's mean, ``± half-width`` of its 95% interval when several seeds ran."""
    ci = _interval(result, row, name)
    value = _fmt(getattr(row.scores, name), digits)
    return value if ci is None or ci.half is None else f"{value} ± {ci.half:.{digits}f}"


def table(result: RequestResult) -> str:
    """The Markdown metrics table of one request: one line per (family, method); over
    several seeds each metric is ``mean ± half-width of its 95% interval``."""
    head = (
        "| model | method | UA | RA | TA | MIA-Eff. | MIA AUROC | Avg. Gap ↓ | hard gap % ↓ | soft gap (KL) ↓ "
        "| LiRA AUROC | LiRA TPR@1% | time | x faster than retraining |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [head]
    for r in result.rows:
        s, up = r.scores, speedup(r, result)
        time = result.retrain_seconds.get(r.family) if r.method == ORACLE else s.seconds
        cells = [_cell(result, r, m) for m in ("ua", "ra", "ta", "mia", "mia_auc", "avg_gap", "hard_gap")]
        lines.append(
            f"| {_family(r.family)} | {r.method} | {' | '.join(cells)} | {_cell(result, r, 'soft_gap', 4)} "
            f"| {_cell(result, r, 'lira_auc')} | {_cell(result, r, 'lira_tpr')} | {_seconds(time)} | {_times(up)} |"
        )
    return "\n".join(lines)


def _plot_times(result: RequestResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, colors = [], [], []
    palette = {"munkey": "tab:blue", "spm": "tab:green", "baseline": "tab:orange"}
    for family, seconds in result.retrain_seconds.items():
        labels.append(f"{family}: {ORACLE}")
        values.append(seconds)
        colors.append("tab:gray")
        for r in result.rows:
            if r.family == family and r.method not in REFERENCES and r.scores.seconds is not None:
                labels.append(f"{family}: {r.method}")
                values.append(max(r.scores.seconds, 1e-7))
                colors.append(palette.get(family, "tab:purple"))
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(labels) + 1.2))
    ax.barh(range(len(labels)), values, color=colors)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("wall time of forgetting (s, log scale)")
    ax.set_title(f"{result.dataset}, {result.request}: forgetting vs retraining")
    for i, v in enumerate(values):
        ax.text(v, i, f" {_seconds(v)}", va="center", fontsize=8)
    ax.set_xlim(min(values) / 3, max(values) * 30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_accuracy(result: RequestResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("ua", "UA"), ("ra", "RA"), ("ta", "TA"), ("mia", "MIA-Eff."))
    names = [f"{r.family}: {r.method}" for r in result.rows]
    width = 0.8 / len(metrics)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(names) + 1), 4))
    for j, (key, label) in enumerate(metrics):
        xs = [i + (j - 1.5) * width for i in range(len(names))]
        halves = [_interval(result, r, key) for r in result.rows]
        errors = [0.0 if ci is None or ci.half is None else ci.half for ci in halves]
        ax.bar(xs, [getattr(r.scores, key) for r in result.rows], width, label=label, yerr=errors, capsize=2)
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"{result.dataset}, {result.request}", pad=24)
    ax.legend(ncol=4, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _exactness_lines(result: RequestResult) -> list[str]:
    lines = []
    for e in result.exactness:
        verdict = "**yes**" if e.ok else "**NO**"
        lines.append(
            f"- {_family(e.family)}: `forget` deleted {e.forgotten_rows:,} rows; after "
            f"compaction ({_seconds(e.compact_seconds)}) the memory equals the memory built from the retained "
            f"ids alone (fingerprint `{e.fingerprint[:16]}…`): {verdict}; predictions on the forget and test "
            f"sets identical to those from that memory: {'yes' if e.predictions_equal else 'NO'}; forgotten "
            f"ids left in memory: {e.forgotten_ids_left}; {_tables(e)}{_retrained(e)}. Weights that did see "
            f"the forgotten samples: {e.weights_that_saw}."
        )
    return lines


def _retrained(e) -> str:
    if e.retrained_equal is None:
        return ""
    return (
        "; every checkpoint tensor and every prediction (forget, retained, test) bit-identical to the model "
        f"really retrained without the samples (same core and seed): {'**yes**' if e.retrained_equal else '**NO**'}"
    )


def _tables(e) -> str:
    if not e.tables:
        return "no per-sample table besides the memory"
    return (
        f"its {e.tables} per-sample table(s) (rows with their optimiser state) hold exactly their retained rows, "
        f"byte for byte: {'yes' if e.tables_equal else 'NO'}"
    )


def _floor(result: RequestResult, family: str) -> MethodResult | None:
    """The family's floor row (``ORACLE_SEED``), when it was computed."""
    return next((r for r in result.rows if (r.family, r.method) == (family, ORACLE_SEED)), None)


def _best_posthoc(result: RequestResult) -> MethodResult | None:
    """The post-hoc baseline method with the smallest Avg. Gap, when the baseline ran."""
    posthoc = [r for r in result.rows if r.family == "baseline" and r.method not in REFERENCES]
    return min(posthoc, key=lambda r: r.scores.avg_gap or math.inf, default=None)


def forgot(row: MethodResult, floor: MethodResult) -> bool:
    """Whether ``row``'s Avg. Gap is within the floor's plus ``FORGOT_MARGIN``."""
    return row.scores.avg_gap <= floor.scores.avg_gap + FORGOT_MARGIN


def verdict(result: RequestResult, row: MethodResult) -> str:
    """One plain line: did the memory family of ``row`` (its ``kmem forget`` row) forget?"""
    gap, floor = _fmt(row.scores.avg_gap), _floor(result, row.family)
    exact = next((e.retrained_equal for e in result.exactness if e.family == row.family), None)
    if exact is not None:  # exact mode: judged bit for bit against its real retraining
        parts = [
            "forgot exactly -- bit-identical to the model really retrained without the samples"
            if exact
            else f"did NOT forget exactly -- not bit-identical to its real retraining (Avg. Gap {gap})"
        ]
    elif floor is None:
        parts = [f"cannot judge -- no floor was computed (rerun with --floor); Avg. Gap {gap} to its oracle"]
    else:
        met = forgot(row, floor)
        parts = [
            f"{'forgot' if met else 'did not forget'} -- Avg. Gap {gap} to its oracle, "
            f"{'within' if met else 'above'} the floor's {_fmt(floor.scores.avg_gap)} + {FORGOT_MARGIN}"
        ]
    mia = _mia_verdict(result, row, floor)
    if mia:
        parts.append(mia)
    best = _best_posthoc(result)
    if best is not None:
        beats = "beats" if row.scores.avg_gap < best.scores.avg_gap else "does not beat"
        parts.append(f"{beats} the best post-hoc baseline ({best.method}, {_fmt(best.scores.avg_gap)})")
    up = speedup(row, result)
    if up is not None:
        parts.append(f"{_times(up)} faster than retraining")
    return f"{_family(row.family)} on {result.request}: " + "; ".join(parts)


def _mia_verdict(result: RequestResult, row: MethodResult, floor: MethodResult | None) -> str | None:
    """Over several seeds: is the mean MIA-Efficacy inside the floor's 95% interval (the
    MIA-Efficacy an independently retrained oracle scores)?"""
    ci = None if floor is None else _interval(result, floor, "mia")
    if ci is None or ci.half is None:
        return None
    inside = "inside" if row.scores.mia in ci else "outside"
    return (
        f"MIA-Eff. {_fmt(row.scores.mia)} {inside} the floor's 95% interval [{_fmt(ci.low)}, {_fmt(ci.high)}]"
    )


def verdicts(results: Sequence[RequestResult]) -> list[str]:
    """The verdict of every memory family on every request."""
    return [verdict(result, r) for result in results for r in result.rows if r.method == KMEM]


def _far(row: MethodResult, oracle: MethodResult, floor: MethodResult | None) -> list[str]:
    """The metrics of ``row`` far from the oracle's, each as a sentence of what it means."""
    sentences = []
    for metric in GAP_METRICS:
        value, truth = getattr(row.scores, metric), getattr(oracle.scores, metric)
        spread = 0.0 if floor is None else abs(getattr(floor.scores, metric) - truth)
        if abs(value - truth) > max(FAR_POINTS, FAR_FLOOR_TIMES * spread):
            meaning = MEANINGS[metric, 1 if value > truth else -1]
            sentences.append(
                f"{METRIC_NAMES[metric]} {_fmt(value)} against the oracle's {_fmt(truth)} -- {meaning}."
            )
    return sentences


def explanations(result: RequestResult) -> list[str]:
    """Per memory family with a ``kmem forget`` metric far from its oracle's, what it means."""
    saw = {e.family: e.weights_that_saw for e in result.exactness}
    lines = []
    for r in (r for r in result.rows if r.method == KMEM):
        far = _far(r, result.row(r.family, ORACLE), _floor(result, r.family))
        if far:
            cause = (
                [f"Deleting the rows leaves the trained weights as they were: {saw[r.family]}."]
                if r.family in saw
                else []
            )
            lines.append(f"{_family(r.family)} on {result.request}: " + " ".join(far + cause))
    return lines


def _headline(result: RequestResult) -> list[str]:
    """One line per memory family: its Avg. Gap against the best post-hoc baseline's, and the speed-up."""
    best = _best_posthoc(result)
    lines = []
    for r in (r for r in result.rows if r.method == KMEM):
        oracle, up, floor = result.row(r.family, ORACLE).scores, speedup(r, result), _floor(result, r.family)
        lines.append(
            f"{_family(r.family)}: Avg. Gap {_fmt(r.scores.avg_gap)}"
            + (f" (best post-hoc: {best.method} {_fmt(best.scores.avg_gap)})" if best else "")
            + (f" (two oracles' seeds apart: {_fmt(floor.scores.avg_gap)})" if floor else "")
            + f"; MIA-Eff. {_fmt(r.scores.mia)} vs the oracle's {_fmt(oracle.mia)}"
            + f"; `forget` ran in {_seconds(r.scores.seconds)}"
            + ("" if up is None else f", {_times(up)} faster than retraining")
        )
    return lines


def summary(results: Sequence[RequestResult]) -> str:
    """The verdicts, then a few lines per request: what the report's tables say, for the
    terminal; ``results`` as in :func:`write_report` (one per request and seed)."""
    results = aggregate(results)
    judged = verdicts(results)
    out = [f"Verdict. {CRITERION}", *(f"  {line}" for line in judged)] if judged else []
    for result in results:
        out.append(
            f"{result.dataset}, {result.request} ({result.forgotten:,} forgotten, {result.retained:,} kept):"
        )
        out += [f"  {line}" for line in _headline(result)]
        out += [
            f"  {e.family}: memory after forget == memory of the retained ids alone: {'yes' if e.ok else 'NO'}"
            + (
                " (evidence about the memory, not a verdict on forgetting)"
                if e.retrained_equal is None
                else f"; model == the model retrained without them, bit for bit: {'yes' if e.retrained_equal else 'NO'}"
            )
            for e in result.exactness
        ]
    return "\n".join(out)


def write_report(
    results: Sequence[RequestResult],
    out_dir: str | Path,
    *,
    title: str = "kmem unlearning report",
    command: str | None = None,
    setup: Sequence[str] = (),
    selected: dict[str, dict] | None = None,
) -> Path:
    """Write ``report.md``, ``results.json`` and the plots into ``out_dir``; returns the Markdown's path.

    ``results`` holds one result per request and seed; the report shows each request's
    mean over its seeds with 95% intervals. ``command`` is the command line that
    reproduces the report; ``setup`` lines describe the run (models, epochs, seeds) and
    go under the title; ``selected`` is the setting each method ran with, by method.
    """
    per_seed, results = results, aggregate(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]
    if command:
        md += [f"Reproduce with: `{command}`", ""]
    judged = verdicts(results)
    if judged:
        md += [
            "## Verdict",
            "",
            CRITERION,
            "",
            *(f"- {line}" for line in judged),
            "",
            EXACTNESS_IS_NOT_A_VERDICT,
            "",
        ]
    md += [f"- {line}" for line in setup] + ([""] if setup else [])
    md += [
        "UA = 100 - forget accuracy, RA = retain accuracy, TA = test accuracy, MIA-Eff. = % of forget samples "
        "an SVC on true-class confidence calls non-members (SalUn's definition), MIA AUROC = how well the "
        "true-class confidence tells forget samples from test samples (MUNKEY's forget-set MIA, %; 50: "
        "forgotten samples look exactly like unseen ones), Avg. Gap = mean |method - oracle| over UA, RA, TA "
        "and MIA-Eff.; hard / soft gap = % of forget samples whose prediction differs from the "
        "oracle's / mean KL(oracle || method) on them. LiRA = offline LiRA (Carlini et al. 2022), a per-sample "
        "attack calibrated by shadow models of the baseline trained on halves of the retained samples: its "
        "AUROC telling forget from test samples, and the % of forget samples it catches at 1% false positives "
        "(oracle: about 1). Each model family is compared with its own oracle; "
        "time is the wall time of the forgetting itself (the oracle's: retraining).",
        "",
    ]
    if any(r.method == ORACLE_SEED for result in results for r in result.rows):
        md += [
            f"`{ORACLE_SEED}`: the oracle's recipe with another seed, scored against the oracle -- how far "
            "apart two equally valid oracles are; a method's gap below it is as close as retraining gets.",
            "",
        ]
    md += [
        f"Far from the oracle (explained under a table): a `{KMEM}` metric among UA, RA, TA and MIA-Eff. more "
        f"than max({FAR_POINTS:g} points, {FAR_FLOOR_TIMES:g}x the floor's distance to the oracle on that "
        "metric) from the oracle's.",
        "",
    ]
    for result in results:
        slug = _slug(f"{result.dataset}-{result.request}")
        _plot_times(result, out / f"{slug}-time.png")
        _plot_accuracy(result, out / f"{slug}-accuracy.png")
        md += [
            f"## {result.dataset}: {result.request}",
            "",
            f"{result.forgotten:,} training samples forgotten, {result.retained:,} retained, "
            f"{result.test:,} test samples.",
            "",
            table(result),
            "",
            *_headline(result),
            "",
        ]
        far = explanations(result)
        if far:
            md += ["**Far from the oracle:**", "", *(f"- {line}" for line in far), ""]
        if result.exactness:
            md += [
                "**Exactness of the memory (evidence about the memory, not a verdict on forgetting):**",
                "",
                *_exactness_lines(result),
                "",
            ]
        md += [f"_{note}_" for note in result.notes] + ([""] if result.notes else [])
        md += [
            f"![forgetting time vs retraining]({slug}-time.png)",
            f"![accuracies]({slug}-accuracy.png)",
            "",
        ]
    md += [NOT_GUARANTEED, ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    (out / "results.json").write_text(json.dumps(results_json(per_seed, results, selected), indent=1))
    return path


def _json_scores(result: RequestResult, row: MethodResult) -> dict:
    """A row's scores; the oracle's ``seconds`` is its retraining time."""
    scores = row.scores.as_dict()
    if row.method == ORACLE:
        scores["seconds"] = result.retrain_seconds.get(row.family)
    return scores


def results_json(
    per_seed: Sequence[RequestResult], means: Sequence[RequestResult], selected: dict[str, dict] | None
) -> dict:
    """``rows``: one per request, seed, family and method with its ``scores``; ``requests``:
    each seed's run of a request without its rows; ``aggregate``: the means and intervals
    the report shows; ``selected``: the setting each method ran with."""
    return {
        "rows": [
            {
                "request": r.request,
                "seed": r.seed,
                "family": row.family,
                "method": row.method,
                "scores": _json_scores(r, row),
            }
            for r in per_seed
            for row in r.rows
        ],
        "requests": [{k: v for k, v in r.to_json().items() if k != "rows"} for r in per_seed],
        "aggregate": [r.to_json() for r in means],
        "selected": selected or {},
    }
