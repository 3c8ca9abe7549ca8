"""Aggregates over seeds: mean, standard deviation, Student-t intervals, paired differences.

A group's values are one number per seed. Its interval for the mean is the Student-t interval
mean +- t(0.975, n - 1) * sd / sqrt(n), sd the sample standard deviation (n - 1 in the
denominator): exact for normal per-seed values and, unlike a bootstrap, not too narrow at the 2-5
seeds a sweep affords. A paired difference subtracts, seed by seed, the baseline's value of the
same seed (same data order, same initial weights), and the same interval on those differences is
the one of a paired t-test (scipy.stats.ttest_rel): it excludes zero exactly when that test's
two-sided p-value is below 1 - level.
"""

import bisect
import dataclasses
import math
from typing import Any, Hashable, Iterable, Mapping, Sequence

from scipy import stats as scipy_stats

LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Estimate:
  """n values: their mean, sample sd and interval for the mean (None where n is too small)."""
  n: int
  mean: float | None = None
  sd: float | None = None
  low: float | None = None
  high: float | None = None

  @property
  def significant(self) -> bool:
    """Returns True when there is an interval and it excludes zero."""
    return self.low is not None and (self.low > 0 or self.high < 0)


def is_number(value: Any) -> bool:
  """Returns True for a finite int or float (not a bool, None or NaN)."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def t_quantile(df: int, level: float = LEVEL) -> float:
  """Returns q with P(-q <= T <= q) = level for Student's t with df degrees of freedom."""
  return float(scipy_stats.t.ppf(0.5 + level / 2, df))


def estimate(values: Iterable[Any], level: float = LEVEL) -> Estimate:
  """Returns the Estimate of the finite numbers among values (others are left out)."""
  xs = [float(v) for v in values if is_number(v)]
  n = len(xs)
  if n == 0:
    return Estimate(0)
  mean = math.fsum(xs) / n
  if n == 1:
    return Estimate(1, mean)
  sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
  half = t_quantile(n - 1, level) * sd / math.sqrt(n)
  return Estimate(n, mean, sd, mean - half, mean + half)


def differences(values: Mapping[Hashable, Any], baseline: Mapping[Hashable, Any]
                ) -> dict[Hashable, float]:
  """Returns {seed: value - baseline value} over the seeds with a finite number on both sides."""
  return {s: float(v) - float(baseline[s]) for s, v in values.items()
          if is_number(v) and s in baseline and is_number(baseline[s])}


def paired(values: Mapping[Hashable, Any], baseline: Mapping[Hashable, Any],
           level: float = LEVEL) -> Estimate:
  """Returns the Estimate of the per-seed differences values - baseline (n: the common seeds)."""
  return estimate(differences(values, baseline).values(), level)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
  """Returns y at x, linear between the points (xs ascending); None outside [xs[0], xs[-1]]."""
  if not xs or not xs[0] <= x <= xs[-1]:
    return None
  i = bisect.bisect_left(xs, x)
  if xs[i] == x:
    return float(ys[i])
  x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
  return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def band(curves: Sequence[tuple[Sequence[float], Sequence[float]]], level: float = LEVEL
         ) -> tuple[list[float], list[Estimate]]:
  """Returns (grid, Estimate at each grid x) of curves [(xs, ys), ...] over their common range.

  The grid is every curve's x inside the range all curves cover; each curve is interpolated there.
  """
  curves = [(list(xs), list(ys)) for xs, ys in curves if len(xs)]
  if not curves:
    return [], []
  lo, hi = max(xs[0] for xs, _ in curves), min(xs[-1] for xs, _ in curves)
  grid = sorted({x for xs, _ in curves for x in xs if lo <= x <= hi})
  return grid, [estimate((interpolate(xs, ys, x) for xs, ys in curves), level) for x in grid]
