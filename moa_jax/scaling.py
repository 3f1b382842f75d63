"""Scaling fits of a study's ladder: loss L against compute C over sizes, per arm.

    power_law_fit(C, L)                  log L = log a − b·log C (least squares), R² only for > 2 points
    shared_exponent_fit({arm: (C, L)})   one b, one a per arm
    exponent_difference(C_a, L_a, C_b, L_b)   Δb = b_arm − b_base with a Student-t CI over seeds
    irreducible_fit(C, L)                L = E + A·C^(−α) (scipy.optimize.curve_fit), ≥ 4 sizes

The exponent difference is paired by seed: seed s of both arms ran every size with the same data
order, so each seed gives one Δb_s from its own two fits, and the CI is Student t over the seeds'
Δb_s (n − 1 degrees of freedom). A seed bootstrap of the mean curves, with 3 seeds, covers the true
Δb only ~72% of the time at its nominal 95% (tests/test_scaling.py shows the t interval's coverage).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
from scipy import optimize

from moa_jax import stats

IRREDUCIBLE_MIN_SIZES = 4  # an irreducible-loss fit has 3 parameters: fewer sizes leave nothing to test it


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


def exponent_difference(compute_arm: Sequence[float], loss_arm: Mapping[int, Sequence[float]],
                        compute_base: Sequence[float], loss_base: Mapping[int, Sequence[float]]) -> tuple[stats.Estimate, float]:
  """Δb = b(arm) − b(base), paired by seed: loss_*[seed] holds that seed's loss at each size (in the
  order of compute_*). Returns (Δb ± Student-t CI over the seeds both ran, two-sided p of Δb = 0).
  A positive Δb: the arm's loss falls faster with compute."""
  seeds = sorted(set(loss_arm) & set(loss_base))
  deltas = [power_law_fit(compute_arm, loss_arm[s])[1] - power_law_fit(compute_base, loss_base[s])[1] for s in seeds]
  d = stats.mean_ci(deltas)
  return d, stats.paired_p(d)


def irreducible_fit(compute: Sequence[float], loss: Sequence[float]) -> dict[str, float] | None:
  """L = E + A·C^(−α) by nonlinear least squares in log-compute units (C / C_min, so A is the loss above
  E at the smallest run). Returns {E, A, alpha, E_se, A_se, alpha_se} (standard errors from the fit's
  covariance: asymptotic, rough at 4-6 sizes), or None below IRREDUCIBLE_MIN_SIZES sizes or when
  the fit does not converge."""
  c, l = np.asarray(compute, float), np.asarray(loss, float)
  if len(c) < IRREDUCIBLE_MIN_SIZES:
    return None
  x = c / c.min()
  model = lambda x, e, a, alpha: e + a * x ** (-alpha)
  _, b, _ = power_law_fit(c, l)
  start = (0.5 * l.min(), l.max() - 0.5 * l.min(), max(4 * b, 0.05))
  try:
    popt, pcov = optimize.curve_fit(model, x, l, p0=start, bounds=([0.0, 0.0, 0.0], [l.min(), np.inf, 5.0]),
                                    maxfev=20_000)
  except (RuntimeError, ValueError):
    return None
  se = np.sqrt(np.clip(np.diag(pcov), 0, np.inf)) if np.all(np.isfinite(pcov)) else np.full(3, math.nan)
  return {"E": float(popt[0]), "A": float(popt[1]), "alpha": float(popt[2]),
          "E_se": float(se[0]), "A_se": float(se[1]), "alpha_se": float(se[2])}


def report_lines(per_arm: Mapping[str, list[tuple[float, Mapping[int, float]]]], baseline: str) -> list[str]:
  """The report's exponent differences against the baseline and irreducible-loss fits.
  per_arm: arm -> [(compute, {seed: final loss})] over sizes, ascending."""
  lines = []
  base = per_arm.get(baseline)
  rows = []
  for arm, points in per_arm.items():
    if arm == baseline or base is None or len(points) != len(base):
      continue
    by_seed = lambda pts: {s: [d[s] for _, d in pts] for s in set.intersection(*(set(d) for _, d in pts))}
    d, p = exponent_difference([c for c, _ in points], by_seed(points), [c for c, _ in base], by_seed(base))
    if d.n:
      rows.append(f"| `{arm}` − `{baseline}` | {d.n} | {d.format(signed=True)} | {'—' if p != p else f'{p:.2g}'} |")
  if rows:
    lines += ["Exponent difference Δb = b(arm) − b(baseline), paired by seed: each seed's own two fits give "
              "one Δb, and the CI is Student t over the seeds (n − 1 degrees of freedom; its coverage is "
              "checked by simulation in tests/test_scaling.py). Δb > 0: the arm's loss falls faster.", "",
              "| difference | seeds | Δb (95% CI) | p (Δb = 0) |", "|---|---|---|---|"] + rows + [""]
  fits = {arm: irreducible_fit([c for c, _ in p], [float(np.mean(list(d.values()))) for _, d in p])
          for arm, p in per_arm.items()}
  fits = {arm: f for arm, f in fits.items() if f}
  if fits:
    lines += [f"Irreducible-loss fit L = E + A·(C / C_min)^(−α) on the per-size means (≥ {IRREDUCIBLE_MIN_SIZES} "
              "sizes; ± asymptotic standard errors from the fit's covariance, rough at few sizes):", "",
              "| arm | E | A | α |", "|---|---|---|---|"]
    lines += [f"| `{arm}` | {f['E']:.3f} ± {f['E_se']:.3f} | {f['A']:.3f} ± {f['A_se']:.3f} | "
              f"{f['alpha']:.3f} ± {f['alpha_se']:.3f} |" for arm, f in fits.items()] + [""]
  elif per_arm:
    lines += [f"No irreducible-loss fit: it needs ≥ {IRREDUCIBLE_MIN_SIZES} sizes per arm.", ""]
  return lines
