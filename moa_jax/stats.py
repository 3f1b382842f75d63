"""The study protocol's statistics: which test, which interval, which correction. The arithmetic is
scipy's (scipy.stats.t, nct, chi2); tests compare every function with scipy and statsmodels.

    mean_ci(values)                  mean ± t_{0.975, n-1}·s/√n
    paired_difference(arm, base)     the same over d_s = arm[s] − base[s], seeds both have
    paired_p(d)                      two-sided paired t-test p-value (scipy.stats.ttest_rel's)
    holm(p_values)                   Holm–Bonferroni adjusted p-values (family-wise error)
    tost(d, margin)                  two one-sided tests: is the difference within ±margin?
    sd_interval(sd, n)               the paired SD's CI (χ², n − 1 degrees of freedom)
    power(effect, sd, n)             power of the two-sided paired t-test (noncentral t, exact)
    min_detectable_effect(sd, n)     the effect found with 80% power at n seeds
    seeds_needed(effect, sd)         the fewest seeds that find `effect` with 80% power
    permutation_floor(n)             the smallest p an exact sign-flip permutation test can give
    percentile_interval(samples)     a bootstrap percentile interval
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import optimize
from scipy import stats as sps

ALPHA = 0.05    # the level of every test and two-sided CI
TARGET = 0.8    # the power a seed count is sized for


def t_quantile(p: float, df: float) -> float:
  """The t with P(T ≤ t) = p; df = inf gives the normal quantile."""
  if not 0.0 < p < 1.0:
    raise ValueError(f"p = {p}; must be in (0, 1)")
  return float(sps.norm.ppf(p) if math.isinf(df) else sps.t.ppf(p, df))


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A mean over n values and the half-width of its confidence interval (nan when n < 2)."""
  mean: float
  half_width: float
  n: int
  sd: float = math.nan  # sample standard deviation of the values

  @property
  def excludes_zero(self) -> bool:
    return math.isfinite(self.half_width) and abs(self.mean) > self.half_width

  def format(self, digits: int = 4, signed: bool = False) -> str:
    if self.n == 0:
      return "—"
    mean = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
    if not math.isfinite(self.half_width):
      return f"{mean} (n={self.n})"
    return f"{mean} ± {self.half_width:.{digits}f}"


def mean_ci(values: Iterable[float], level: float = 1 - ALPHA) -> Estimate:
  """Mean ± t_{(1+level)/2, n-1} · s / √n (s: sample standard deviation)."""
  v = np.asarray([float(x) for x in values])
  if not len(v):
    return Estimate(math.nan, math.nan, 0)
  if len(v) == 1:
    return Estimate(float(v[0]), math.nan, 1)
  sd = float(np.std(v, ddof=1))
  return Estimate(float(v.mean()), t_quantile((1 + level) / 2, len(v) - 1) * sd / math.sqrt(len(v)), len(v), sd)


def paired_difference(arm: Mapping[int, float], baseline: Mapping[int, float], level: float = 1 - ALPHA) -> Estimate:
  """mean ± CI of arm[s] − baseline[s] over the seeds s both have."""
  return mean_ci([arm[s] - baseline[s] for s in sorted(set(arm) & set(baseline))], level)


def paired_p(d: Estimate) -> float:
  """Two-sided p-value of the paired t-test of mean difference 0 (nan below 2 seeds; 0 when every
  seed moved by exactly the same amount)."""
  if d.n < 2 or not math.isfinite(d.sd):
    return math.nan
  if d.sd == 0.0:
    return 0.0 if d.mean != 0.0 else 1.0
  return float(2 * sps.t.sf(abs(d.mean) / (d.sd / math.sqrt(d.n)), d.n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm–Bonferroni adjusted p-values: the i-th smallest of m gets max over j ≤ i of (m − j + 1)·p_(j),
  capped at 1 (statsmodels' multipletests(method='holm')). nan stays nan and does not count towards m."""
  order = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
  m, out, running = len(order), [math.nan] * len(p_values), 0.0
  for rank, (p, i) in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p))
    out[i] = running
  return out


def tost(d: Estimate, margin: float) -> float:
  """p-value of the two one-sided paired t-tests of H0: |true difference| ≥ margin. Below α the
  difference is within ±margin (equivalently, the 1 − 2α CI lies inside it): "no difference larger
  than the margin", which a non-significant t-test cannot say."""
  if d.n < 2 or not math.isfinite(d.sd) or margin <= 0:
    return math.nan
  if d.sd == 0.0:
    return 0.0 if abs(d.mean) < margin else 1.0
  se = d.sd / math.sqrt(d.n)
  return float(max(sps.t.sf((d.mean + margin) / se, d.n - 1), sps.t.cdf((d.mean - margin) / se, d.n - 1)))


def sd_interval(sd: float, n: int, level: float = 1 - ALPHA) -> tuple[float, float]:
  """CI of a normal population's SD from a sample SD over n values: s·√((n−1)/χ²) at the χ²(n − 1)
  quantiles. At n = 3 it spans 0.52 s to 6.3 s."""
  if n < 2 or not math.isfinite(sd):
    return math.nan, math.nan
  df = n - 1
  return (sd * math.sqrt(df / sps.chi2.ppf((1 + level) / 2, df)),
          sd * math.sqrt(df / sps.chi2.ppf((1 - level) / 2, df)))


def power(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
  """Power of the two-sided paired t-test at n seeds when the true mean difference is `effect` and
  the paired SD is `sd`: P(|T'| > t_{1-α/2, n-1}), T' noncentral t with λ = effect·√n / sd."""
  if n < 2 or not sd > 0:
    return math.nan
  df, nc = n - 1, abs(effect) * math.sqrt(n) / sd
  crit = sps.t.ppf(1 - alpha / 2, df)
  # P(T'(λ) < −c) = P(T'(−λ) > c): scipy's nct.cdf is nan deep in the lower tail at df = 1, its sf is not.
  return float(sps.nct.sf(crit, df, nc) + sps.nct.sf(crit, df, -nc))


def min_detectable_effect(sd: float, n: int, target: float = TARGET, alpha: float = ALPHA) -> float:
  """The smallest true paired difference the test finds with probability `target` at n seeds."""
  if n < 2 or not sd > 0:
    return math.nan
  hi = sd
  while power(hi, sd, n, alpha) < target:
    hi *= 2
  return float(optimize.brentq(lambda e: power(e, sd, n, alpha) - target, 0.0, hi, xtol=1e-12 * sd))


def seeds_needed(effect: float, sd: float, target: float = TARGET, alpha: float = ALPHA, limit: int = 100_000) -> int:
  """The fewest seeds at which a true difference `effect` is found with probability `target`
  (-1 beyond `limit`; 0 when sd = 0)."""
  if not sd > 0 or effect == 0:
    return 0 if sd == 0 else -1
  z = (sps.norm.ppf(1 - alpha / 2) + sps.norm.ppf(target)) * sd / abs(effect)
  n = max(2, int(z * z))  # the normal answer, a floor: the t-test needs at least as many
  while power(effect, sd, n, alpha) < target:
    n += 1
    if n > limit:
      return -1
  return n


def permutation_floor(n: int) -> float:
  """The smallest two-sided p an exact sign-flip permutation test of n paired differences can give:
  2 / 2^n (0.25 at n = 3, 0.0625 at n = 5), whatever the data."""
  return min(1.0, 2.0 / 2 ** n)


def percentile_interval(samples: Sequence[float], level: float = 1 - ALPHA) -> tuple[float, float]:
  s = np.asarray([x for x in samples if math.isfinite(x)], float)
  if not len(s):
    return math.nan, math.nan
  return float(np.quantile(s, (1 - level) / 2)), float(np.quantile(s, (1 + level) / 2))
