"""Statistics over seeds: the t quantile against known values, the 95 % CI by hand, and when a curve reaches a value."""

from __future__ import annotations

import math

import pytest

from flowgrove.evaluation.seeds import first_reach, summarize, t975


def test_t_quantile_against_known_values():
    # textbook two-sided 95 % critical values of Student's t
    for df, value in [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042), (60, 2.000),
                      (120, 1.980)]:
        assert t975(df) == pytest.approx(value, abs=5e-4), df
    assert t975(10**6) == pytest.approx(1.95996, abs=1e-5)  # the normal quantile in the limit
    with pytest.raises(ValueError, match="df >= 1"):
        t975(0)


def test_t_quantile_matches_scipy_on_both_sides_of_the_table():
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 40), 50, 100, 500]:
        assert t975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=1e-6), df


def test_ci_by_hand():
    # [1, 2, 3]: mean 2, s = 1, half-width t_{0.975,2} * 1 / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    s = summarize([1.0, 2.0, 3.0])
    assert s.mean == 2.0 and s.n == 3
    assert s.ci95 == pytest.approx(2.484138, abs=1e-6)
    assert (s.low, s.high) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-6)
    # [0.1, 0.3]: mean 0.2, s = sqrt(0.02) = 0.141421, half-width 12.706205 * 0.141421 / sqrt(2) = 1.2706205
    assert summarize([0.1, 0.3]).ci95 == pytest.approx(1.2706205, abs=1e-6)
    assert summarize([5.0, 5.0, 5.0]).ci95 == 0.0


def test_one_value_has_no_ci_and_none_has_no_mean():
    one, none = summarize([0.7]), summarize([])
    assert one.mean == 0.7 and math.isnan(one.ci95) and one.n == 1
    assert one.as_dict() == {"mean": 0.7, "ci95": None, "n": 1}  # JSON has no NaN
    assert math.isnan(none.mean) and none.as_dict() == {"mean": None, "ci95": None, "n": 0}


def test_first_reach_interpolates_between_the_points_around_the_target():
    xs, ys = [0.0, 10.0, 20.0, 30.0], [0.5, 0.6, 0.9, 0.8]
    # 0.75 lies halfway between 0.6 (10 s) and 0.9 (20 s): 15 s
    assert first_reach(xs, ys, 0.75) == pytest.approx(15.0)
    assert first_reach(xs, ys, 0.9) == 20.0  # reached exactly at a point
    assert first_reach(xs, ys, 0.8) == pytest.approx(10 + 10 * 0.2 / 0.3)  # the first crossing, not the last point
    assert first_reach(xs, ys, 0.4) == 0.0  # already there before training
    assert first_reach(xs, ys, 0.95) is None  # never reached
