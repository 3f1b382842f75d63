"""Statistics of a study: Student-t intervals and tests, Holm's correction, power, and power-law fits.

Written against the definitions (no scipy at run time); tests check them against scipy where it is
installed and against printed tables where it is not.

    mean_ci(values)                  mean ± t_{0.975, n-1}·s/√n
    paired_difference(arm, base)     the same over d_s = arm[s] − base[s], seeds both have
    paired_p(arm, base)              two-sided paired t-test p-value
    holm(p_values)                   Holm–Bonferroni adjusted p-values (family-wise error)
    power(effect, sd, n)             power of the two-sided paired t-test (noncentral t, by quadrature)
    min_detectable_effect(sd, n)     the effect found with 80% power at n seeds
    seeds_needed(effect, sd)         the fewest seeds that find `effect` with 80% power
    power_law_fit(C, L)              log L = log a − b·log C, R² only for > 2 points
    shared_exponent_fit({arm: (C, L)})  one b, one a per arm
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Iterable, Mapping, Sequence

import numpy as np


def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
  tiny = 1e-300
  c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 500):
    for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
               -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1.0 + aa * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + aa / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < 1e-15:
      break
  return h


def betainc(a: float, b: float, x: float) -> float:
  """Regularised incomplete beta function I_x(a, b)."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
               + a * math.log(x) + b * math.log1p(-x))
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(log_front) * _betacf(a, b, x) / a
  return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
  """P(T ≤ t) for Student's t with df degrees of freedom."""
  tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
  return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
  """The t with P(T ≤ t) = p (bisection on t_cdf); df = inf gives the normal quantile."""
  if not 0.0 < p < 1.0:
    raise ValueError(f"p = {p}; must be in (0, 1)")
  if math.isinf(df):
    return statistics.NormalDist().inv_cdf(p)
  if p < 0.5:
    return -t_quantile(1.0 - p, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < p:
    lo, hi = hi, 2.0 * hi
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    if hi - lo < 1e-12 * hi:
      break
  return 0.5 * (lo + hi)


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


def mean_ci(values: Iterable[float], level: float = 0.95) -> Estimate:
  """Mean ± t_{(1+level)/2, n-1} · s / √n (s: sample standard deviation)."""
  v = [float(x) for x in values]
  if not v:
    return Estimate(math.nan, math.nan, 0)
  if len(v) == 1:
    return Estimate(v[0], math.nan, 1)
  sd = statistics.stdev(v)
  return Estimate(statistics.fmean(v), t_quantile((1 + level) / 2, len(v) - 1) * sd / math.sqrt(len(v)), len(v), sd)


def paired_difference(arm: Mapping[int, float], baseline: Mapping[int, float], level: float = 0.95) -> Estimate:
  """mean ± CI of arm[s] − baseline[s] over the seeds s both have."""
  return mean_ci([arm[s] - baseline[s] for s in sorted(set(arm) & set(baseline))], level)


def paired_p(d: Estimate) -> float:
  """Two-sided p-value of the paired t-test of mean difference 0 (nan below 2 seeds; 0 when every
  seed moved by exactly the same amount)."""
  if d.n < 2 or not math.isfinite(d.sd):
    return math.nan
  if d.sd == 0.0:
    return 0.0 if d.mean != 0.0 else 1.0
  t = d.mean / (d.sd / math.sqrt(d.n))
  return 2.0 * (1.0 - t_cdf(abs(t), d.n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm–Bonferroni adjusted p-values: the i-th smallest of m gets max over j ≤ i of (m − j + 1)·p_(j),
  capped at 1. Rejecting where adjusted p < α keeps the family-wise error rate at α. nan stays nan and
  does not count towards m."""
  order = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
  m, out, running = len(order), [math.nan] * len(p_values), 0.0
  for rank, (p, i) in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p))
    out[i] = running
  return out


# ------------------------------------------------------------------------------------------- power

def _chi2_grid(df: int, points: int = 4000) -> tuple[np.ndarray, np.ndarray]:
  """Quadrature nodes and weights for E[f(V)], V ~ χ²(df): the midpoint rule on the density."""
  top = df + 40.0 * math.sqrt(2.0 * df) + 40.0
  v = (np.arange(points) + 0.5) * (top / points)
  log_pdf = (df / 2 - 1) * np.log(v) - v / 2 - (df / 2) * math.log(2.0) - math.lgamma(df / 2)
  w = np.exp(log_pdf) * (top / points)
  return v, w / w.sum()


def power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
  """Power of the two-sided paired t-test at n seeds when the true mean difference is `effect` and
  the paired SD is `sd`: P(|T'| > t_{1-α/2, n-1}), T' noncentral t with λ = effect·√n / sd."""
  if n < 2 or sd <= 0:
    return math.nan
  df, lam = n - 1, abs(effect) * math.sqrt(n) / sd
  crit = t_quantile(1 - alpha / 2, df)
  v, w = _chi2_grid(df)
  scale = crit * np.sqrt(v / df)  # T' > c  <=>  Z > c·√(V/df) − λ
  normal = np.vectorize(statistics.NormalDist().cdf)
  return float(np.sum(w * ((1 - normal(scale - lam)) + normal(-scale - lam))))


def min_detectable_effect(sd: float, n: int, target: float = 0.8, alpha: float = 0.05) -> float:
  """The smallest true paired difference the test finds with probability `target` at n seeds."""
  if n < 2 or not sd > 0:
    return math.nan
  lo, hi = 0.0, sd
  while power(hi, sd, n, alpha) < target:
    lo, hi = hi, 2 * hi
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if power(mid, sd, n, alpha) < target else (lo, mid)
  return hi


def seeds_needed(effect: float, sd: float, target: float = 0.8, alpha: float = 0.05, limit: int = 100_000) -> int:
  """The fewest seeds at which a true difference `effect` is found with probability `target`."""
  if not sd > 0 or effect == 0:
    return 0 if sd == 0 else -1
  z = statistics.NormalDist().inv_cdf
  n = max(2, int((z(1 - alpha / 2) + z(target)) ** 2 * (sd / effect) ** 2))  # the normal answer, a floor
  while power(effect, sd, n, alpha) < target:
    n += 1
    if n > limit:
      return -1
  while n > 2 and power(effect, sd, n - 1, alpha) >= target:
    n -= 1
  return n


# -------------------------------------------------------------------------------------------- fits

def power_law_fit(compute: Sequence[float], loss: Sequence[float]) -> tuple[float, float, float]:
  """Least squares of log L = log a − b log C. Returns (a, b, R² of the log-log fit); R² is nan for
  2 points or fewer, where a line passes through every point and R² = 1 says nothing."""
  x, y = np.log(np.asarray(compute, float)), np.log(np.asarray(loss, float))
  slope, intercept = np.polyfit(x, y, 1)
  if len(x) <= 2:
    return math.exp(intercept), -float(slope), math.nan
  residual = y - (intercept + slope * x)
  total = float(((y - y.mean()) ** 2).sum())
  r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else math.nan
  return math.exp(intercept), -float(slope), r2


def shared_exponent_fit(points: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> tuple[dict[str, float], float]:
  """One exponent for every arm: least squares of log L = log a_arm − b·log C over all points.
  Returns ({arm: a_arm}, b). With b shared, a_arm / a_other is the arms' loss ratio at any compute."""
  arms = list(points)
  rows, ys = [], []
  for i, arm in enumerate(arms):
    for c, l in zip(*points[arm]):
      rows.append([1.0 if j == i else 0.0 for j in range(len(arms))] + [-math.log(c)])
      ys.append(math.log(l))
  coef, *_ = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)
  return {arm: math.exp(coef[i]) for i, arm in enumerate(arms)}, float(coef[-1])


def percentile_interval(samples: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  s = np.asarray([x for x in samples if math.isfinite(x)], float)
  if not len(s):
    return math.nan, math.nan
  return float(np.quantile(s, (1 - level) / 2)), float(np.quantile(s, (1 + level) / 2))
