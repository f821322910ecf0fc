"""Several independent seeds: each seed's own requests and initialisations, means with
95% intervals in the report, and results.json rows by request, seed, family and method."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from test_unlearn_report import _result

from kmem.models import samples, train
from kmem.unlearn import demo
from kmem.unlearn.aggregate import aggregate
from kmem.unlearn.evaluate import ORACLE_SEED_OFFSET, Setup
from kmem.unlearn.report import table, verdicts, write_report
from kmem.unlearn.results import KMEM, ORACLE, ORACLE_SEED, MethodResult
from kmem.unlearn.stats import mean_ci


def _seeded(seed: int, gap: float) -> object:
    r = _result()
    r.seed = seed
    r.rows[2] = replace(r.rows[2], scores=replace(r.rows[2].scores, avg_gap=gap))
    return r


def test_aggregate_means_and_intervals():
    gaps = [0.4, 0.7, 1.0]
    (mean,) = aggregate([_seeded(s, g) for s, g in enumerate(gaps)])
    want = mean_ci(gaps)
    assert mean.seeds == [0, 1, 2] and mean.seed is None
    assert mean.row("munkey", KMEM).scores.avg_gap == pytest.approx(want.mean)
    assert mean.spread[f"munkey/{KMEM}"]["avg_gap"].half == pytest.approx(want.half)
    assert f"| {want.mean:.2f} ± {want.half:.2f} |" in table(mean).splitlines()[4]
    other = _seeded(3, 0.1)
    other.rows.pop()
    with pytest.raises(ValueError, match="different methods"):
        aggregate([_seeded(0, 0.4), other])


def test_results_json_has_a_row_per_request_seed_family_method(tmp_path):
    write_report([_seeded(0, 0.4), _seeded(1, 0.6)], tmp_path, selected={"FT": {"lr": 1e-3, "epochs": 2}})
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["rows"]) == 12 and {r["seed"] for r in saved["rows"]} == {0, 1}
    row = saved["rows"][2]
    assert (row["request"], row["family"], row["method"]) == ("random-10%", "munkey", KMEM)
    assert row["scores"]["avg_gap"] == 0.4 and saved["selected"]["FT"]["lr"] == 1e-3
    oracle = next(r for r in saved["rows"] if (r["family"], r["method"]) == ("munkey", ORACLE))
    assert oracle["scores"]["seconds"] == 40.0  # its retraining time
    assert saved["aggregate"][0]["rows"][2]["scores"]["avg_gap"] == pytest.approx(0.5)
    assert "0.50 ± " in (tmp_path / "report.md").read_text()


def test_seeds_draw_their_own_requests_and_initialisations(tmp_path, monkeypatch):
    trained = []
    real = Setup.train

    def spy(self, family, data, seed=None, **kwargs):
        trained.append((family, self.seed if seed is None else seed))
        return real(self, family, data, seed, **kwargs)

    monkeypatch.setattr(Setup, "train", spy)
    result = demo.run(
        quick=True, out=tmp_path, families=("spm",), requests=["10%"], methods=(), seeds=2, limit=300,
        floor=True, progress=False, epochs=1,
    )  # fmt: skip
    assert [t for t in trained if t[0] == "spm"] == [
        ("spm", 0), ("spm", ORACLE_SEED_OFFSET), ("spm", 2 * ORACLE_SEED_OFFSET),
        ("spm", 1), ("spm", 1 + ORACLE_SEED_OFFSET), ("spm", 1 + 2 * ORACLE_SEED_OFFSET),
    ]  # fmt: skip
    shadows = [seed for family, seed in trained if family == "baseline"]  # LiRA's, 4 per seed
    assert len(shadows) == 8 and len(set(shadows)) == 8 and min(shadows) >= 3 * ORACLE_SEED_OFFSET
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in saved["requests"]] == [0, 1]
    assert {r["method"] for r in saved["rows"]} >= {KMEM, ORACLE_SEED}
    assert result.exact
    # Different seeds start from different weights (0 epochs: the initialisation itself).
    data = samples(demo.load_dataset("digits").train)[:50]
    first, _ = train("spm", data, num_classes=10, seed=0, epochs=0)
    oracle, _ = train("spm", data, num_classes=10, seed=ORACLE_SEED_OFFSET, epochs=0)
    weights = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (first, oracle)]
    assert not torch.equal(*weights)


def test_verdict_says_whether_mia_is_inside_the_floor_interval():
    group = []
    for seed, (mia, floor_mia) in enumerate([(11.0, 12.0), (11.5, 12.4), (12.0, 11.6)]):
        r = _seeded(seed, 0.4)
        r.rows[2] = replace(r.rows[2], scores=replace(r.rows[2].scores, mia=mia))
        r.rows.insert(
            2, MethodResult("munkey", ORACLE_SEED, replace(r.rows[1].scores, mia=floor_mia, avg_gap=0.5))
        )
        group.append(r)
    (mean,) = aggregate(group)
    ci = mean_ci([12.0, 12.4, 11.6])
    (line,) = [v for v in verdicts([mean]) if v.startswith("MUNKEY")]
    assert f"MIA-Eff. 11.50 inside the floor's 95% interval [{ci.low:.2f}, {ci.high:.2f}]" in line
    assert "forgot" in line
