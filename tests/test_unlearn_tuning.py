"""The tuning protocol run at a tiny size: selection on the selection request only,
diverged points discarded, the chosen settings used by the evaluation."""

from __future__ import annotations

import functools
import json

import pytest

import kmem
from kmem.models import samples
from kmem.unlearn import demo, posthoc, protocol, tuning
from kmem.unlearn.evaluate import ORACLE_SEED_OFFSET, Setup
from kmem.unlearn.tuning import tune

GRIDS = {
    "FT": protocol.grid(lr=(1e-3, 1e-2), epochs=(1,)),
    "GA": protocol.grid(lr=(1e-3, 1e38), epochs=(1,)),  # lr 1e38 diverges: discarded, never chosen
    "spm": protocol.grid(epochs=(1, 2)),
}


@pytest.fixture(scope="module")
def digits():
    data = kmem.load_dataset("digits")
    return samples(data.train)[:300], samples(data.test)[:100]


def _spy_seeds(monkeypatch) -> list[int]:
    seen = []
    train, unlearn = Setup.train, posthoc.unlearn

    def spy_train(self, family, data, seed=None, **kwargs):
        seen.append(self.seed if seed is None else seed)
        return train(self, family, data, seed, **kwargs)

    def spy_unlearn(*args, seed=0, **kwargs):
        seen.append(seed)
        return unlearn(*args, seed=seed, **kwargs)

    monkeypatch.setattr(Setup, "train", spy_train)
    monkeypatch.setattr(posthoc, "unlearn", spy_unlearn)
    return seen


def test_selection_reads_no_evaluation_seed_and_discards_divergence(digits, monkeypatch):
    seen = _spy_seeds(monkeypatch)
    train, test = digits
    setup = Setup(num_classes=10, epochs=1, methods=("FT", "GA"), progress=False)
    tuned = tune(train, test, "10%", setup, ("spm", "baseline"), GRIDS)
    s = protocol.SELECTION_SEED
    assert set(seen) <= {s, s + ORACLE_SEED_OFFSET}
    assert set(tuned.recipes) == {"FT", "GA"} and set(tuned.configs) == {"spm"}
    ga = next(sel for sel in tuned.selections if sel.method == "GA")
    assert ga.discarded == 1 and ga.scores[1] is None and tuned.recipes["GA"]["lr"] == 1e-3
    assert tuned.configs["spm"]["epochs"] in (1, 2)
    best = next(sel for sel in tuned.selections if sel.method == "FT")
    assert best.setting == best.points[min(range(2), key=lambda i: (best.scores[i], i))]


def test_the_budget_applies_to_given_grids_too(digits):
    train, test = digits
    setup = Setup(num_classes=10, epochs=1, methods=("FT",), progress=False)
    # 30 epochs of fine-tuning cost more than one 1-epoch retraining: dropped, nothing left.
    with pytest.raises(ValueError, match="no grid point within the budget"):
        tune(train, test, "10%", setup, ("baseline",), {"FT": protocol.grid(lr=(1e-3,), epochs=(30,))})


def test_demo_runs_the_selected_settings_and_reports_them(digits, tmp_path, monkeypatch):
    ran = []
    unlearn = posthoc.unlearn

    def spy(method, *args, **kwargs):
        ran.append((method, kwargs.get("lr"), kwargs.get("seed")))
        return unlearn(method, *args, **kwargs)

    monkeypatch.setattr(posthoc, "unlearn", spy)
    demo.run(
        quick=True, out=tmp_path, families=("baseline",), requests=["10%"], methods=("FT",), limit=300,
        epochs=1, tune="10%", grids={"FT": protocol.grid(lr=(1e-3, 1e-2), epochs=(1,))}, progress=False,
    )  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    chosen = saved["selected"]["FT"]["lr"]
    evaluation = [r for r in ran if r[2] == 0]
    assert evaluation == [("FT", chosen, 0)]  # the evaluation seed ran the selected setting only
    text = (tmp_path / "report.md").read_text()
    assert f"selection request drawn with seed {protocol.SELECTION_SEED}" in text and "selected: FT" in text


def test_a_memory_family_scored_point_by_point_selects_what_tune_selects(digits):
    train, test = digits
    setup = Setup(num_classes=10, epochs=1, methods=(), progress=False)
    points = tuning.recipe_points("spm", GRIDS)
    scores = [tuning.score_recipe(train, test, "10%", setup, "spm", p) for p in points]
    assert (
        tuning.chosen_recipe("spm", points, scores).to_json()
        == tune(train, test, "10%", setup, ("spm",), GRIDS).to_json()
    )


def test_demo_keeps_each_recipe_point_as_its_own_piece(digits, tmp_path):
    demo.run(
        quick=True, out=tmp_path, families=("spm",), requests=["10%"], limit=300, epochs=1,
        tune="10%", grids={"spm": GRIDS["spm"]}, progress=False, floor=False,
    )  # fmt: skip
    parts = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "parts").glob("*.json"))
    assert parts == ["eval-seed0-spm", "point-spm-0", "point-spm-1", "select-spm"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["selected"]["spm"]["epochs"] in (1, 2)


def test_exact_mode_selects_on_a_validation_draw_outside_the_core_never_the_test_set(digits):
    train, test = digits
    fit, held, core = tuning.validation_split(train, 0.2)
    assert len(held) == round(protocol.VALIDATION_FRACTION * (len(train) - len(core)))
    assert not set(held.ids.tolist()) & set(core.ids.tolist())
    assert set(fit.ids.tolist()) == set(train.ids.tolist()) - set(held.ids.tolist())
    again = tuning.validation_split(train, 0.2)[1]
    assert held.ids.tolist() == again.ids.tolist()  # one fixed draw, seeded by SELECTION_SEED

    setup = Setup(num_classes=10, epochs=1, methods=(), core_fraction=0.2, progress=False)
    other = type(test)(test.inputs.flip(0), test.labels.roll(1), test.ids)
    scores = [tuning.score_recipe(train, t, "10%", setup, "spm-exact", {"k": 8}) for t in (test, other)]
    assert scores[0] == scores[1] and 0 <= scores[0] <= 100  # the test set plays no part


def test_demo_selects_exact_recipes_point_by_point_and_runs_the_chosen_one(digits, tmp_path, monkeypatch):
    trained = []
    train = Setup.train

    def spy(self, family, data, seed=None, core=None):
        trained.append((family, self.tuned.get(family), self.seed if seed is None else seed))
        return train(self, family, data, seed, core)

    monkeypatch.setattr(Setup, "train", spy)
    demo.run(
        quick=True, out=tmp_path, families=("spm",), requests=["10%"], limit=300, epochs=1, tune="10%",
        grids={"spm": GRIDS["spm"], "spm-exact": protocol.grid(k=(1, 8))}, core_fraction=0.2,
        progress=False, floor=False,
    )  # fmt: skip
    parts = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "parts").glob("*.json"))
    # An exact family's evaluation is one piece per request ("10%" becomes "10-" in a file name).
    assert [p for p in parts if "exact" in p] == [
        "eval-seed0-spm-exact-10-", "point-spm-exact-0", "point-spm-exact-1", "select-spm-exact"
    ]  # fmt: skip
    chosen = json.loads((tmp_path / "results.json").read_text())["selected"]["spm-exact"]
    assert chosen["k"] in (1, 8)
    assert {t[1]["k"] for t in trained if t[0] == "spm-exact" and t[2] == 0} == {chosen["k"]}


def test_a_changed_grid_is_a_new_selection_while_unchanged_points_are_kept(tmp_path):
    """A selection's file is keyed by the grid it chose from: points already scored are
    reused, the selection is made again."""
    run = functools.partial(
        demo.run, quick=True, out=tmp_path, families=("spm",), requests=["10%"], limit=300, epochs=1,
        tune="10%", progress=False, floor=False,
    )  # fmt: skip
    run(grids={"spm": protocol.grid(epochs=(1,))})
    before = {p.name for p in (tmp_path / "parts").glob("*.json")}
    run(grids={"spm": protocol.grid(epochs=(1, 2))})
    after = {p.name for p in (tmp_path / "parts").glob("*.json")}
    new = sorted(n.rsplit("-", 1)[0] for n in after - before)
    assert new == ["eval-seed0-spm", "point-spm-1", "select-spm"]  # point 0 was reused
