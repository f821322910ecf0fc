"""Unlearning metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from kmem.unlearn import metrics
from kmem.unlearn.metrics import Predictions, Scores


def _probs(true_conf: list[float], labels: list[int], num_classes: int = 2) -> torch.Tensor:
    """Rows that give ``true_conf`` to the label and the rest to the next class."""
    p = torch.zeros(len(labels), num_classes, dtype=torch.float64)
    for i, (c, y) in enumerate(zip(true_conf, labels, strict=True)):
        p[i, y] = c
        p[i, (y + 1) % num_classes] += 1 - c
    return p


def test_accuracy_and_confidence_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 0])
    assert metrics.accuracy(probs, labels) == pytest.approx(200 / 3)
    assert metrics.confidence(probs, labels).tolist() == pytest.approx([0.9, 0.2, 0.6])


def test_known_svc_split():
    # Members sit at confidence ~0.95, non-members at ~0.2: any RBF SVC splits them
    # between, so a forget sample is called a non-member exactly when its confidence is low.
    retain = torch.linspace(0.9, 1.0, 20)
    test = torch.linspace(0.1, 0.3, 20)
    forget = torch.tensor([0.95, 0.2, 0.97, 0.15, 0.12, 0.99, 0.25, 0.92])
    assert metrics.mia_efficacy(retain, test, forget) == 50.0
    assert metrics.mia_efficacy(retain, test, torch.tensor([0.1, 0.2])) == 100.0
    assert metrics.mia_efficacy(retain, test, torch.tensor([0.93])) == 0.0


def test_mia_uses_equal_counts_of_members_and_non_members():
    # 100 extra retain rows at confidence 0.2 would make "member" the SVC's answer there;
    # only the first len(test) retain rows are used, so they are ignored.
    retain = torch.cat([torch.linspace(0.9, 1.0, 20), torch.full((100,), 0.2)])
    test = torch.linspace(0.1, 0.3, 20)
    assert metrics.mia_efficacy(retain, test, torch.tensor([0.2])) == 100.0


def test_mia_draws_average_seeded_draws_of_the_members():
    # Members overlap the non-members: which 20 of the 60 members a draw holds moves the
    # SVC's boundary across the forget samples, so draws differ; the mean is theirs.
    retain = torch.linspace(0.3, 1.0, 60, dtype=torch.float64)
    test = torch.linspace(0.0, 0.6, 20, dtype=torch.float64)
    forget = torch.linspace(0.3, 0.7, 41, dtype=torch.float64)
    generator = torch.Generator().manual_seed(3)
    picks = [torch.arange(20)] + [torch.randperm(60, generator=generator)[:20] for _ in range(5)]
    draws = [metrics.mia_efficacy(retain[p], test, forget) for p in picks]  # one SVC each
    assert len(set(draws)) > 1
    assert metrics.mia_efficacy(retain, test, forget) == draws[0]  # one draw: the first n
    assert metrics.mia_efficacy(retain, test, forget, draws=6, seed=3) == pytest.approx(sum(draws) / 6)
    with pytest.raises(ValueError, match="draws"):
        metrics.mia_efficacy(retain, test, forget, draws=0)


def test_mia_auroc_by_hand():
    # Pairs (forget > test): 0.9 beats both, 0.8 beats 0.7 and ties 0.8 -> 3.5 of 4.
    assert metrics.mia_auroc(torch.tensor([0.9, 0.8]), torch.tensor([0.7, 0.8])) == pytest.approx(87.5)
    assert metrics.mia_auroc(torch.tensor([0.1, 0.2]), torch.tensor([0.7, 0.8])) == 0.0
    same = torch.rand(500, dtype=torch.float64)
    assert metrics.mia_auroc(same, same.flip(0)) == pytest.approx(50.0)  # indistinguishable
    with pytest.raises(ValueError, match="AUROC needs"):
        metrics.mia_auroc(torch.rand(0), torch.rand(3))


def test_prediction_gaps_by_hand():
    oracle = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64)
    method = torch.tensor([[0.25, 0.75], [0.9, 0.1]], dtype=torch.float64)
    hard, soft = metrics.prediction_gaps(method, oracle)
    assert hard == 50.0  # row 0: argmax 0 (tie -> lower class) vs 1
    assert soft == pytest.approx((0.5 * math.log(2) + 0.5 * math.log(2 / 3)) / 2)
    assert metrics.prediction_gaps(oracle, oracle) == (0.0, 0.0)


def _predictions(forget_conf, forget_labels) -> Predictions:
    retain_labels = [0, 1] * 10
    test_labels = [1, 0] * 10
    return Predictions(
        forget=_probs(forget_conf, forget_labels),
        retain=_probs([0.98] * 20, retain_labels),
        test=_probs([0.7] * 16 + [0.3] * 4, test_labels),  # 80% test accuracy
        forget_labels=torch.tensor(forget_labels),
        retain_labels=torch.tensor(retain_labels),
        test_labels=torch.tensor(test_labels),
    )


def test_perfect_forgetter_has_zero_gaps():
    oracle = _predictions([0.7, 0.3, 0.7, 0.7, 0.3], [0, 1, 1, 0, 0])
    s = metrics.score(oracle, oracle=oracle, seconds=0.5)
    assert (s.avg_gap, s.hard_gap, s.soft_gap, s.seconds) == (0.0, 0.0, 0.0, 0.5)
    assert s.ua == pytest.approx(40.0) and s.ra == 100.0 and s.ta == pytest.approx(80.0)
    # The forget confidences (0.7, 0.3) are the test set's: every one is called a non-member.
    assert s.mia == 100.0
    # AUROC: a forget 0.7 (3 of 5) beats the test 0.3s (4 of 20) and ties the 0.7s; a
    # forget 0.3 ties the test 0.3s -> 0.6 * (0.2 + 0.8 / 2) + 0.4 * (0.2 / 2) = 0.40.
    assert s.mia_auc == pytest.approx(40.0)


def test_model_that_did_not_forget():
    labels = [0, 1, 1, 0, 0]
    oracle = _predictions([0.7, 0.3, 0.7, 0.7, 0.3], labels)  # UA 40, MIA 100
    kept = _predictions([0.98] * 5, labels)  # still remembers: UA 0, MIA 0
    s = metrics.score(kept, oracle=oracle)
    assert (s.ua, s.ra, s.ta, s.mia) == (0.0, 100.0, pytest.approx(80.0), 0.0)
    assert s.mia_auc == 100.0  # every forget sample more confident than every test sample
    assert s.avg_gap == pytest.approx((40 + 0 + 0 + 100) / 4)
    assert s.hard_gap == pytest.approx(40.0)  # the two rows the oracle gets wrong
    kl_right = 0.7 * math.log(0.7 / 0.98) + 0.3 * math.log(0.3 / 0.02)
    kl_wrong = 0.3 * math.log(0.3 / 0.98) + 0.7 * math.log(0.7 / 0.02)
    assert s.soft_gap == pytest.approx((3 * kl_right + 2 * kl_wrong) / 5)


def test_avg_gap_by_hand():
    a, b = Scores(ua=10, ra=90, ta=80, mia=20), Scores(ua=12, ra=91, ta=77, mia=30)
    assert metrics.avg_gap(a, b) == pytest.approx((2 + 1 + 3 + 10) / 4)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="labels must be int64"):
        metrics.accuracy(torch.rand(3, 2), torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"float \[n, C\]"):
        metrics.accuracy(torch.rand(3), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy(torch.rand(0, 2), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="MIA needs"):
        metrics.mia_efficacy(torch.rand(4), torch.rand(0), torch.rand(2))
    with pytest.raises(ValueError, match="must both be"):
        metrics.prediction_gaps(torch.rand(3, 2), torch.rand(4, 2))
    with pytest.raises(ValueError, match="retain: labels"):
        Predictions(torch.rand(2, 2), torch.rand(2, 2), torch.rand(2, 2), *(torch.zeros(2, dtype=torch.int64),) * 1,
                    torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))  # fmt: skip
