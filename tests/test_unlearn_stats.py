"""Mean ± Student-t confidence intervals over seeds, against hand-computed ones."""

from __future__ import annotations

import math

import pytest

from kmem.unlearn.stats import mean_ci


def test_interval_against_a_hand_computed_one():
    # mean 2, s = 1, t_{0.975, 2} = 4.302653 (tables): half-width 4.302653 / sqrt(3).
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert ci.low == pytest.approx(2 - 2.484138, abs=1e-5) and ci.high == pytest.approx(
        2 + 2.484138, abs=1e-5
    )
    assert 4.4 in ci and 4.5 not in ci
    assert str(ci) == "2.00 ± 2.48"


def test_five_seeds_and_other_confidence():
    # [10, 12, 11, 13, 9]: mean 11, s = sqrt(2.5); t_{0.95, 4} = 2.131847 at 90%.
    ci = mean_ci([10, 12, 11, 13, 9], confidence=0.90)
    assert ci.half == pytest.approx(2.131847 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)


def test_one_value_has_no_width_and_bad_input_is_refused():
    ci = mean_ci([0.58])
    assert ci.half is None and ci.low is None and str(ci) == "0.58" and 0.58 in ci
    for bad, match in (([], "empty"), ([1.0, math.nan], "finite")):
        with pytest.raises(ValueError, match=match):
            mean_ci(bad)
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1, 2], confidence=1.0)
