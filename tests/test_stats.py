"""Aggregates over seeds against numpy and scipy: mean, sd, t-intervals, paired differences."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mlmjax import stats


@pytest.mark.parametrize('n', [2, 3, 5, 10])
def test_estimate_matches_numpy_and_scipy_t_interval(n):
  values = np.random.default_rng(n).normal(0.3, 0.05, size=n)
  e = stats.estimate(list(values))
  assert e.n == n
  assert e.mean == pytest.approx(np.mean(values), rel=1e-12)
  assert e.sd == pytest.approx(np.std(values, ddof=1), rel=1e-12)
  low, high = scipy_stats.t.interval(0.95, n - 1, loc=np.mean(values),
                                     scale=scipy_stats.sem(values))
  assert (e.low, e.high) == (pytest.approx(low, rel=1e-12), pytest.approx(high, rel=1e-12))
  assert stats.t_quantile(n - 1) == pytest.approx(scipy_stats.t.ppf(0.975, n - 1))
  e90 = stats.estimate(values, level=0.9)
  assert e90.high - e90.low < e.high - e.low


def test_estimate_of_few_or_missing_values():
  assert stats.estimate([]) == stats.Estimate(0)
  assert stats.estimate([None, math.nan, True]) == stats.Estimate(0)  # none is a number
  one = stats.estimate([0.25, None, math.inf])
  assert one == stats.Estimate(1, 0.25) and one.sd is None and not one.significant
  same = stats.estimate([2, 2, 2])  # no spread: the interval is the point
  assert (same.sd, same.low, same.high) == (0.0, 2.0, 2.0) and same.significant


def test_paired_differences_match_ttest_rel():
  rng = np.random.default_rng(0)
  base = rng.normal(0.1, 0.02, size=5)
  for shift, significant in ((0.03, True), (0.0, False)):
    other = base + shift + rng.normal(0, 0.005, size=5)
    d = stats.paired(dict(enumerate(other)), dict(enumerate(base)))
    test = scipy_stats.ttest_rel(other, base)
    ci = test.confidence_interval(0.95)
    assert d.n == 5 and d.mean == pytest.approx(np.mean(other - base), rel=1e-12)
    assert (d.low, d.high) == (pytest.approx(ci.low, rel=1e-10), pytest.approx(ci.high, rel=1e-10))
    assert d.significant == significant == (test.pvalue < 0.05)
  # Only the seeds both sides have count, and a missing value on either side drops its seed.
  assert stats.differences({0: 1.0, 1: 2.0, 2: 3.0, 3: None}, {1: 1.5, 2: 2.0, 3: 1.0, 4: 0.0}) == {
      1: 0.5, 2: 1.0}
  assert stats.paired({5: 1.0}, {0: 1.0}) == stats.Estimate(0)


def test_interpolate_and_band():
  xs, ys = [0.0, 10.0, 20.0], [1.0, 3.0, 2.0]
  assert stats.interpolate(xs, ys, 10.0) == 3.0
  assert stats.interpolate(xs, ys, 5.0) == pytest.approx(2.0)
  assert stats.interpolate(xs, ys, 15.0) == pytest.approx(2.5)
  assert stats.interpolate(xs, ys, 20.5) is None and stats.interpolate([], [], 0.0) is None
  assert stats.interpolate(xs, ys, 0.0) == 1.0
  # Two curves over [0, 20] and [5, 30]: the band covers [5, 20] on both curves' points.
  grid, ests = stats.band([(xs, ys), ([5.0, 30.0], [2.0, 2.0])])
  assert grid == [5.0, 10.0, 20.0]
  assert [e.n for e in ests] == [2, 2, 2]
  assert [e.mean for e in ests] == pytest.approx([2.0, 2.5, 2.0])
  assert ests[0].sd == 0.0 and ests[1].low < 2.5 < ests[1].high
  assert stats.band([]) == ([], [])
