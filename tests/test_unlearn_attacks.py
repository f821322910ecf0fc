"""Offline LiRA and TPR at low FPR, on hand-made and synthetic confidences."""

from __future__ import annotations

import math

import pytest
import torch

from kmem.unlearn.attacks import lira_offline, lira_scores, logit_confidence, tpr_at_fpr


def test_tpr_at_fpr_by_hand():
    nonmembers = torch.arange(100.0)  # 1% FPR: at most one non-member above the threshold (98)
    members = torch.tensor([99.5, 98.5, 98.0, 10.0])
    assert tpr_at_fpr(members, nonmembers, 0.01) == 50.0
    assert tpr_at_fpr(members, nonmembers, 0.5) == 75.0  # threshold 49
    with pytest.raises(ValueError, match="fpr"):
        tpr_at_fpr(members, nonmembers, 0.0)
    with pytest.raises(ValueError, match="non-members"):
        tpr_at_fpr(members, nonmembers[:0])


def test_logit_confidence_is_finite_at_the_ends():
    phi = logit_confidence(torch.tensor([0.0, 0.5, 1.0]))
    assert phi[1] == 0 and torch.isfinite(phi).all()
    assert float(phi[0]) == pytest.approx(-float(phi[2]))


def test_lira_standardises_against_the_shadows():
    shadows = torch.sigmoid(torch.tensor([[0.0, 1.0], [2.0, 3.0]], dtype=torch.float64))  # phi: means 1 and 2
    target = torch.sigmoid(torch.tensor([3.0, 2.0], dtype=torch.float64))
    # Pooled std: deviations +-1 for both samples, 4 / (4 - 2) = 2 -> sqrt(2).
    torch.testing.assert_close(
        lira_offline(target, shadows), torch.tensor([2.0, 0.0], dtype=torch.float64) / math.sqrt(2)
    )
    with pytest.raises(ValueError, match="shadows"):
        lira_offline(target, shadows[:1])


def test_members_stand_out_and_non_members_do_not():
    gen = torch.Generator().manual_seed(0)
    n, s = 20_000, 8
    difficulty = torch.randn(2 * n, generator=gen) * 2  # per-sample: what LiRA calibrates away
    shadows = torch.sigmoid(difficulty + torch.randn(s, 2 * n, generator=gen))
    trained = torch.sigmoid(difficulty[:n] + 2 + torch.randn(n, generator=gen))  # members: +2 logits
    unseen = torch.sigmoid(difficulty[n:] + torch.randn(n, generator=gen))
    auc, tpr = lira_scores(trained, unseen, shadows[:, :n], shadows[:, n:])
    # Standardised gap 2 / sqrt(1 + 1/8 ... ) ~ 2: AUROC ~ Phi(2 / sqrt(2)) = 92%, TPR@1% ~ 37%.
    assert 89 < auc < 95 and 28 < tpr < 46
    auc, tpr = lira_scores(
        unseen[: n // 2], unseen[n // 2 :], shadows[:, n : n + n // 2], shadows[:, n + n // 2 :]
    )
    assert 48 < auc < 52 and tpr < 2.5
