"""The whole evaluation, tiny: digits features, a few hundred samples, one epoch."""

from __future__ import annotations

import re

import pytest
import torch

import kmem
from kmem.models import samples
from kmem.unlearn import random_request, stream_request
from kmem.unlearn.evaluate import Setup, evaluate, weights_that_saw
from kmem.unlearn.results import KMEM, ORACLE, ORIGINAL


@pytest.fixture(scope="module")
def digits():
    data = kmem.load_dataset("digits")
    return samples(data.train)[:300], samples(data.test)[:100]


@pytest.fixture(scope="module")
def results(digits):
    train, test = digits
    setup = Setup(
        num_classes=10, epochs=1, methods=("FT", "SalUn"), recipes={"FT": {"epochs": 1}}, progress=False
    )
    request = random_request(train.ids, 0.1, seed=0)
    return evaluate("digits", train, test, [request], setup, families=("munkey", "spm", "baseline"))


def test_rows_and_oracles(results):
    (r,) = results
    assert (r.forgotten, r.retained, r.test) == (30, 270, 100)
    methods = [(row.family, row.method) for row in r.rows]
    assert methods == [
        ("munkey", ORIGINAL), ("munkey", ORACLE), ("munkey", KMEM),
        ("spm", ORIGINAL), ("spm", ORACLE), ("spm", KMEM),
        ("baseline", ORIGINAL), ("baseline", ORACLE), ("baseline", "FT"), ("baseline", "SalUn"),
    ]  # fmt: skip
    for family in ("munkey", "spm", "baseline"):
        oracle = r.row(family, ORACLE).scores
        assert (oracle.avg_gap, oracle.hard_gap, oracle.soft_gap) == (0.0, 0.0, 0.0)
        assert r.retrain_seconds[family] > 0
    for row in r.rows:
        s = row.scores
        assert all(0 <= v <= 100 for v in (s.ua, s.ra, s.ta, s.mia, s.hard_gap))
        assert (s.seconds is None) == (row.method in (ORIGINAL, ORACLE))


def test_memory_models_forget_exactly(results):
    (r,) = results
    assert [e.family for e in r.exactness] == ["munkey", "spm"]
    for e in r.exactness:
        assert e.ok and e.fingerprints_equal and e.predictions_equal and e.forgotten_ids_left == 0
        assert e.tables_equal and e.tables == (e.family == "munkey")
        assert e.forgotten_rows == 30 and len(e.fingerprint) == 64
        assert "unchanged by forget" in e.weights_that_saw


def test_weights_that_saw_names_the_dense_weights(digits):
    train, _ = digits
    model, _ = kmem.models.train("baseline", train[:50], num_classes=10, epochs=0, progress=False)
    text = weights_that_saw(model)
    for name in ("encoder", "head"):
        count = sum(p.numel() for p in getattr(model, name).parameters())
        assert f"{name} ({count:,} parameters)" in text
    assert text.startswith("all dense weights -- ") and "per-sample tables" not in text


@pytest.mark.parametrize("own", [True, False])
def test_weights_that_saw_says_what_trained_the_rows(digits, own):
    train, _ = digits
    model, _ = kmem.models.train(
        "munkey", train[:50], num_classes=10, epochs=0, progress=False, retrieve_self=own
    )
    text = weights_that_saw(model)
    assert "tokens" not in text  # the per-sample table is deleted from, not left as it was
    assert ("may still carry their influence" in text) is own  # nothing stronger than is proven
    assert ("forgotten ones included" in text) is not own


def test_request_outside_the_training_set(digits):
    train, test = digits
    bad = random_request(torch.arange(1000, 2000), 0.1)
    with pytest.raises(ValueError, match="not in the training set"):
        evaluate("digits", train, test, [bad], Setup(num_classes=10, epochs=0, progress=False), ("spm",))
    with pytest.raises(ValueError, match="unknown model famil"):
        evaluate("digits", train, test, [bad], Setup(num_classes=10), ("resnet",))


def test_a_diverged_method_is_scored_not_fatal(digits):
    train, test = digits
    setup = Setup(
        num_classes=10, epochs=1, methods=("GA",), recipes={"GA": {"lr": 1e6, "epochs": 3}}, progress=False
    )
    (r,) = evaluate("digits", train, test, [random_request(train.ids, 0.1)], setup, families=("baseline",))
    ga = r.row("baseline", "GA").scores
    assert any("baseline GA" in note and "not finite" in note for note in r.notes)
    assert ga.ta == pytest.approx(
        100 * float((test.labels == 0).float().mean())
    )  # uniform: argmax is class 0


def test_setup_epochs_override_the_family_settings(digits):
    train, _ = digits
    setup = Setup(num_classes=10, configs={"baseline": {"epochs": 0, "dropout": 0.3}}, progress=False)
    assert setup.train("baseline", train[:50])[0].config["epochs"] == 0
    setup.epochs = 1
    model, _ = setup.train("baseline", train[:50])
    assert model.config["epochs"] == 1 and model.config["dropout"] == 0.3


@pytest.mark.parametrize("progress", [None, False])
def test_progress_lines_off_a_terminal(digits, capsys, progress):
    train, test = digits
    setup = Setup(
        num_classes=10, epochs=1, methods=("GA",), recipes={"GA": {"epochs": 1}}, progress=progress, shadows=2
    )
    request = random_request(train.ids, 0.1, seed=0)
    evaluate("digits", train, test, [request], setup, families=("baseline",))
    lines = capsys.readouterr().err.splitlines()  # captured: not a terminal, so no bars
    if progress is False:
        assert lines == []
        return
    steps = [
        "baseline: train on all 300 samples",
        "random-10%: LiRA shadow 1/2",
        "random-10%: LiRA shadow 2/2",
        "random-10%: baseline: retrain",
        "random-10%: baseline: GA",
    ]
    assert len(lines) == len(steps)
    for i, (line, step) in enumerate(zip(lines, steps, strict=True), 1):
        assert re.fullmatch(rf"\[{i}/5\] {re.escape(step)}.* \(\d+\.\d s\)", line), line


def test_a_stream_of_requests_is_forgotten_in_order_exactly(digits):
    train, test = digits
    setup = Setup(num_classes=10, epochs=1, methods=("FT",), recipes={"FT": {"epochs": 1}}, progress=False)
    stream = stream_request(train.ids, steps=3, fraction=0.02, seed=1)
    (r,) = evaluate("digits", train, test, [stream], setup, families=("munkey", "spm", "baseline"))
    assert (r.forgotten, r.retained) == (18, 282)
    for family in ("munkey", "spm"):
        assert len(r.step_seconds[family]) == 3 and all(t > 0 for t in r.step_seconds[family])
        assert r.row(family, KMEM).scores.seconds == pytest.approx(sum(r.step_seconds[family]))
        note = next(n for n in r.notes if n.startswith(f"{family}: 3 requests"))
        assert "3 ledger receipts, chain intact" in note and "after every request: yes" in note
    assert all(e.ok and e.forgotten_rows == 18 for e in r.exactness)
    assert r.row("baseline", "FT").scores.seconds > 0


def test_lira_scores_every_row_and_shadow_counts_are_checked(results):
    (r,) = results
    for row in r.rows:
        assert 0 <= row.scores.lira_auc <= 100 and 0 <= row.scores.lira_tpr <= 100
    with pytest.raises(ValueError, match="shadows must be 0"):
        Setup(num_classes=10, shadows=1)
