"""Unlearning metrics: how close a model that forgot is to the retrained oracle.

Every function takes predicted class probabilities (float ``[n, C]``, rows summing to 1)
and int64 labels ``[n]``; none runs a model. Percentages are in ``[0, 100]``.

* UA = 100 - forget-set accuracy, RA = retain accuracy, TA = test accuracy.
* MIA-Efficacy, as in the public SalUn / "Model Sparsity" code (``SVC_MIA``,
  ``confidence`` attack): an RBF SVC (``C=3, gamma="auto"``) learns member (retain) vs
  non-member (test) from the true-class confidence on equally many samples of each; the
  efficacy is the percentage of forget samples it calls non-members. With more retained
  samples than test samples, which retained samples the SVC learns from moves the
  result by several points for one and the same model (its threshold sits where the
  confidences crowd near 1): ``draws`` seeded draws of the members are averaged.
* MIA-AUROC (the MUNKEY paper's forget-set MIA): the AUROC, in %, of the true-class
  confidence separating forget samples from test samples -- 50 when forgotten samples
  look exactly like unseen ones, whatever the model's calibration.
* Avg. Gap: mean over {UA, RA, TA, MIA-Efficacy} of ``|method - oracle|``.
* Prediction gaps to the oracle (SPM paper): hard = percentage of forget samples whose
  predicted class differs from the oracle's, soft = mean ``KL(oracle || method)`` of the
  predicted distributions on the forget set (nats).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

GAP_METRICS = ("ua", "ra", "ta", "mia")


@dataclass(frozen=True)
class Predictions:
    """A model's class probabilities on the three sets of one forget request.

    Attributes:
        forget, retain, test: float ``[n_*, C]`` probabilities.
        forget_labels, retain_labels, test_labels: int64 ``[n_*]``.
    """

    forget: torch.Tensor
    retain: torch.Tensor
    test: torch.Tensor
    forget_labels: torch.Tensor
    retain_labels: torch.Tensor
    test_labels: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("forget", "retain", "test"):
            probs, labels = getattr(self, name), getattr(self, f"{name}_labels")
            _check(probs, labels, name)


@dataclass(frozen=True)
class Scores:
    """The metrics of one method on one request (percentages; seconds of forgetting)."""

    ua: float
    ra: float
    ta: float
    mia: float
    mia_auc: float | None = None
    seconds: float | None = None
    avg_gap: float | None = None
    hard_gap: float | None = None
    soft_gap: float | None = None
    # Offline LiRA (kmem.unlearn.attacks) telling forget from test samples, with shadows.
    lira_auc: float | None = None
    lira_tpr: float | None = None  # % of forget samples caught at 1% FPR

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def _check(probs: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if probs.ndim != 2 or not probs.is_floating_point():
        raise ValueError(
            f"{name}: probabilities must be float [n, C], got {probs.dtype} {tuple(probs.shape)}"
        )
    if labels.dtype != torch.int64 or labels.shape != probs.shape[:1]:
        raise ValueError(
            f"{name}: labels must be int64 [{probs.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
        )


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of rows whose most probable class is the label (ties: the lower class)."""
    _check(probs, labels, "probs")
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set")
    return 100.0 * (probs.argmax(1) == labels).double().mean().item()


def confidence(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 ``[n]``: the probability each row gives its true class."""
    _check(probs, labels, "probs")
    return probs.double().gather(1, labels[:, None])[:, 0]


def mia_efficacy(
    retain_conf: torch.Tensor,
    test_conf: torch.Tensor,
    forget_conf: torch.Tensor,
    draws: int = 1,
    seed: int = 0,
) -> float:
    """Percentage of forget samples an SVC calls non-members (SalUn's ``SVC_MIA`` confidence
    attack), averaged over ``draws`` draws of the members.

    Each SVC (RBF, ``C=3``, ``gamma="auto"``) is trained on ``n`` retain confidences
    (members, label 1) and the first ``n`` test confidences (non-members, label 0),
    ``n = min(len(retain), len(test))``. Draw 0 takes the first ``n`` retain confidences
    (SalUn's choice); draws ``1, 2, ...`` the first ``n`` of successive random
    permutations from a generator seeded by ``seed``. All arguments are float ``[m]``.
    """
    from sklearn.svm import SVC  # here: importing kmem should not pull in scikit-learn's SVMs

    n = min(len(retain_conf), len(test_conf))
    if n == 0 or len(forget_conf) == 0:
        raise ValueError("MIA needs retain, test and forget samples")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    y = np.concatenate([np.ones(n), np.zeros(n)])
    generator = torch.Generator().manual_seed(seed)
    efficacies = []
    for i in range(draws):
        pick = torch.randperm(len(retain_conf), generator=generator)[:n] if i else torch.arange(n)
        x = torch.cat([retain_conf[pick], test_conf[:n]]).double().numpy().reshape(-1, 1)
        clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
        member = clf.predict(forget_conf.double().numpy().reshape(-1, 1))
        efficacies.append(100.0 * float(1.0 - member.mean()))
    return float(np.mean(efficacies))


def mia_auroc(forget_conf: torch.Tensor, test_conf: torch.Tensor) -> float:
    """AUROC in % of the confidence as a score for "forget sample, not test sample": the
    probability that a random forget sample is more confident than a random test sample
    (ties count one half). 50: indistinguishable; 100: every forget sample more confident."""
    if len(forget_conf) == 0 or len(test_conf) == 0:
        raise ValueError("MIA-AUROC needs forget and test samples")
    both = torch.cat([forget_conf, test_conf]).double()
    # Mid-ranks (ties share their mean rank) give the Mann-Whitney U statistic.
    _, inverse, counts = torch.unique(both, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mid = (ends - (counts.double() - 1) / 2)[inverse]
    m, n = len(forget_conf), len(test_conf)
    u = mid[:m].sum().item() - m * (m + 1) / 2
    return 100.0 * u / (m * n)


def prediction_gaps(probs: torch.Tensor, oracle: torch.Tensor) -> tuple[float, float]:
    """``(hard, soft)``: % of rows whose argmax differs from the oracle's, and mean KL(oracle || probs)."""
    if probs.shape != oracle.shape or probs.ndim != 2:
        raise ValueError(f"probs {tuple(probs.shape)} and oracle {tuple(oracle.shape)} must both be [n, C]")
    if len(probs) == 0:
        raise ValueError("prediction gap of an empty set")
    hard = 100.0 * (probs.argmax(1) != oracle.argmax(1)).double().mean().item()
    p, q = oracle.double(), probs.double()
    # 0 * log(0 / q) = 0; a class the oracle gives mass but the method gives none costs inf
    # -- clamp q so the gap stays finite and comparable (log(1e-12) ~ -27.6 nats).
    kl = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-12).log()), 0.0).sum(1)
    return hard, kl.clamp_min(0.0).mean().item()  # >= 0: only rounding makes a row's sum negative


def avg_gap(scores: Scores, oracle: Scores) -> float:
    """Mean over {UA, RA, TA, MIA-Efficacy} of ``|scores - oracle|`` (percentage points)."""
    return float(np.mean([abs(getattr(scores, m) - getattr(oracle, m)) for m in GAP_METRICS]))


def score(
    pred: Predictions,
    *,
    oracle: Predictions | None = None,
    oracle_scores: Scores | None = None,
    seconds: float | None = None,
    mia_draws: int = 1,
    shadows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Scores:
    """All metrics of one method's predictions; the gaps need the oracle's predictions.

    ``shadows``: true-class confidences ``(forget [S, m], test [S, n])`` of ``S >= 2``
    shadow models trained on neither set; with them the scores include offline LiRA.

    ``oracle_scores`` saves recomputing the oracle's own metrics (and its SVC fits);
    ``mia_draws``: draws of the members averaged in MIA-Efficacy (the same seeded draws
    for every method, so methods are compared on the same attackers' training sets).
    """
    conf = {
        n: confidence(getattr(pred, n), getattr(pred, f"{n}_labels")) for n in ("forget", "retain", "test")
    }
    base = Scores(
        ua=100.0 - accuracy(pred.forget, pred.forget_labels),
        ra=accuracy(pred.retain, pred.retain_labels),
        ta=accuracy(pred.test, pred.test_labels),
        mia=mia_efficacy(conf["retain"], conf["test"], conf["forget"], draws=mia_draws),
        mia_auc=mia_auroc(conf["forget"], conf["test"]),
        seconds=seconds,
    )
    if shadows is not None:
        from .attacks import lira_scores  # attacks imports this module

        auc, tpr = lira_scores(conf["forget"], conf["test"], *shadows)
        base = Scores(**{**base.as_dict(), "lira_auc": auc, "lira_tpr": tpr})
    if oracle is None:
        return base
    ref = oracle_scores if oracle_scores is not None else score(oracle, mia_draws=mia_draws, shadows=shadows)
    hard, soft = prediction_gaps(pred.forget, oracle.forget)
    return Scores(**{**base.as_dict(), "avg_gap": avg_gap(base, ref), "hard_gap": hard, "soft_gap": soft})
