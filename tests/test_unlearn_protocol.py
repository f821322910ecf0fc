"""The declared tuning protocol: grids, the one-retraining budget, and a selection that
never reads an evaluation seed."""

from __future__ import annotations

import math

import pytest

from kmem.unlearn import METHODS, protocol


def test_grids_cover_every_method_as_declared():
    assert set(protocol.GRIDS) == set(METHODS)
    assert len(protocol.GRIDS["FT"]) == 16 and len(protocol.GRIDS["SalUn"]) == 48
    assert {p["lr"] for p in protocol.GRIDS["RL"]} == {1e-5, 1e-4, 1e-3, 1e-2}
    assert all(p["clip_norm"] == 1.0 and p["stop_retain"] == 0.9 for p in protocol.GRIDS["GA"])
    assert all(p["max_epochs"] <= p["epochs"] for p in protocol.GRIDS["SCRUB"])
    assert protocol.grid(a=(1, 2), b=("x",)) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]


def test_budget_drops_runs_dearer_than_one_retraining():
    # 54,000 retained, 6,000 forgotten, a 5-epoch retraining: 270,000 passes.
    ft = protocol.within_budget("FT", 54_000, 6_000, retrain_epochs=5)
    assert sorted({p["epochs"] for p in ft}) == [1, 2, 5]
    rl = protocol.within_budget("RL", 54_000, 6_000, retrain_epochs=5)
    assert sorted({p["epochs"] for p in rl}) == [1, 2]  # 5 epochs of RL: 300,000 passes
    assert len(protocol.within_budget("GA", 54_000, 6_000, retrain_epochs=5)) == 16
    with pytest.raises(ValueError, match="unknown method"):
        protocol.passes("NegGrad", {"epochs": 1}, 1, 1)


def test_selection_reads_only_the_selection_seed_and_discards_divergence():
    seen = []
    gaps = {1e-5: 3.0, 1e-4: math.nan, 1e-3: 1.0, 1e-2: None}

    def score(setting, seed):
        seen.append(seed)
        return gaps[setting["lr"]]

    points = protocol.grid(lr=(1e-5, 1e-4, 1e-3, 1e-2), epochs=(1,))
    chosen = protocol.select("FT", points, score)
    assert set(seen) == {protocol.SELECTION_SEED}
    assert protocol.SELECTION_SEED not in protocol.evaluation_seeds(protocol.MAX_EVALUATION_SEEDS)
    assert chosen.setting == {"lr": 1e-3, "epochs": 1} and chosen.discarded == 2
    assert chosen.scores == [3.0, None, 1.0, None]


def test_selection_ties_go_to_the_earlier_point_and_failures_are_errors():
    points = protocol.grid(lr=(1e-3, 1e-2))
    assert protocol.select("GA", points, lambda s, seed: 0.5).setting == {"lr": 1e-3}
    with pytest.raises(ValueError, match="every one of 2 grid points diverged"):
        protocol.select("GA", points, lambda s, seed: None)
    with pytest.raises(ValueError, match="no grid point"):
        protocol.select("GA", [], lambda s, seed: 0.0)


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_evaluation_seeds_refuse_bad_counts(bad):
    with pytest.raises(ValueError, match="seeds must be"):
        protocol.evaluation_seeds(bad)


def test_evaluation_seeds_stay_below_the_limit():
    assert protocol.evaluation_seeds(3, first=5) == [5, 6, 7]
    for n, first in ((protocol.MAX_EVALUATION_SEEDS + 1, 0), (2, protocol.MAX_EVALUATION_SEEDS - 1), (1, -1)):
        with pytest.raises(ValueError, match="seed must be"):
            protocol.evaluation_seeds(n, first)


def test_description_names_the_selection_seed():
    assert any(str(protocol.SELECTION_SEED) in line for line in protocol.describe())
