"""Evidence that a model forgot: forget requests, metrics against a retrained oracle, post-hoc baselines."""

from .metrics import Predictions, Scores, avg_gap, mia_auroc, mia_efficacy, prediction_gaps, score
from .posthoc import METHODS, RECIPES, Recipe, Unlearned, saliency_mask, unlearn
from .requests import (
    ForgetRequest,
    class_request,
    parse_request,
    random_request,
    standard_requests,
    stream_request,
)

__all__ = [
    "METHODS",
    "RECIPES",
    "ForgetRequest",
    "Predictions",
    "Recipe",
    "Scores",
    "Unlearned",
    "avg_gap",
    "class_request",
    "mia_auroc",
    "mia_efficacy",
    "parse_request",
    "prediction_gaps",
    "random_request",
    "saliency_mask",
    "score",
    "standard_requests",
    "stream_request",
    "unlearn",
]
