"""A per-sample membership attack stronger than a threshold on confidence: offline LiRA
(Carlini et al., 2022, "Membership Inference Attacks From First Principles").

Shadow models of the same recipe are trained on data that holds none of the samples
attacked (offline: only "out" models). For each sample, the shadows' logit-scaled
true-class confidences ``phi = log(p / (1 - p))`` give the distribution it has when it
was *not* trained on; the target model's ``phi`` is scored by how far above that
distribution it lies, ``(phi_target - mean_out) / std_out`` -- with the variance shared by
all samples (the paper's advice for few shadows). A forgotten sample that still looks
trained-on scores high. Reported as AUROC (forget vs test samples) and TPR at a low FPR
(the paper's point: an attack matters when it is confident about a few samples).
"""

from __future__ import annotations

import math

import torch

from .metrics import mia_auroc

EPS = 1e-12  # confidences are clamped to [EPS, 1 - EPS] before the logit


def logit_confidence(conf: torch.Tensor) -> torch.Tensor:
    """``log(p / (1 - p))`` of true-class confidences ``p`` (float ``[...]``), float64."""
    p = conf.double().clamp(EPS, 1 - EPS)
    return torch.log(p) - torch.log1p(-p)


def lira_offline(target: torch.Tensor, shadows: torch.Tensor) -> torch.Tensor:
    """Offline LiRA scores ``[n]`` float64 of ``n`` samples from the target's confidences
    ``target [n]`` and ``S >= 2`` out-shadows' ``shadows [S, n]``."""
    if shadows.dim() != 2 or shadows.shape[1] != target.shape[0] or shadows.shape[0] < 2:
        raise ValueError(
            f"shadows must be [S >= 2, {target.shape[0]}] confidences, got {list(shadows.shape)}"
        )
    phi, out = logit_confidence(target), logit_confidence(shadows)
    mean = out.mean(0)
    std = (out - mean).pow(2).sum().div(out.numel() - out.shape[1]).sqrt().clamp(min=EPS)  # pooled
    return (phi - mean) / std


def tpr_at_fpr(members: torch.Tensor, nonmembers: torch.Tensor, fpr: float = 0.01) -> float:
    """% of ``members`` scoring above the threshold that at most a fraction ``fpr`` of
    ``nonmembers`` exceed (strictly): the attack's true-positive rate at that FPR."""
    if not 0 < fpr < 1:
        raise ValueError(f"fpr must be in (0, 1), got {fpr!r}")
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError("TPR at FPR needs members and non-members")
    ranked = nonmembers.double().sort(descending=True).values
    threshold = ranked[min(math.floor(fpr * len(ranked)), len(ranked) - 1)]
    return 100.0 * float((members.double() > threshold).double().mean())


def lira_scores(
    forget: torch.Tensor, test: torch.Tensor, shadow_forget: torch.Tensor, shadow_test: torch.Tensor
) -> tuple[float, float]:
    """``(AUROC %, TPR % at 1% FPR)`` of offline LiRA telling forget samples from test
    samples: the target's confidences ``forget [m]``, ``test [n]``; the shadows'
    ``shadow_forget [S, m]``, ``shadow_test [S, n]`` (shadows trained on neither set)."""
    scores = lira_offline(torch.cat([forget, test]), torch.cat([shadow_forget, shadow_test], dim=1))
    members, nonmembers = scores[: len(forget)], scores[len(forget) :]
    return mia_auroc(members, nonmembers), tpr_at_fpr(members, nonmembers, 0.01)
