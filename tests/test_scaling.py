"""moa_jax.scaling: fits recover known exponents, and the exponent difference's interval covers the
true Δb at its stated rate with a ladder's 3 seeds (a simulation)."""

import numpy as np
import pytest

from moa_jax import scaling

COMPUTE = np.array([1e15, 4e15, 1.6e16, 6.4e16])


def test_power_law_and_shared_exponent_fits_recover_known_values():
  a, b, r2 = scaling.power_law_fit(COMPUTE, 7.0 * COMPUTE ** -0.05)
  assert (a, b, r2) == (pytest.approx(7.0), pytest.approx(0.05), pytest.approx(1.0))
  prefactors, b = scaling.shared_exponent_fit({"x": (COMPUTE, 7.0 * COMPUTE ** -0.05),
                                               "y": (COMPUTE, 6.3 * COMPUTE ** -0.05)})
  assert b == pytest.approx(0.05) and prefactors["y"] / prefactors["x"] == pytest.approx(0.9)


def _ladder(rng, seeds, b_arm, b_base, sd=0.01, shared=0.01):
  """Per-seed losses at each size: log L = log a − b log C + seed-and-size noise shared by the arms
  (same data order) + each run's own noise."""
  common = rng.normal(0, shared, (seeds, len(COMPUTE)))
  arm = {s: 8.0 * COMPUTE ** -b_arm * np.exp(common[s] + rng.normal(0, sd, len(COMPUTE))) for s in range(seeds)}
  base = {s: 8.0 * COMPUTE ** -b_base * np.exp(common[s] + rng.normal(0, sd, len(COMPUTE))) for s in range(seeds)}
  return arm, base


def test_exponent_difference_interval_covers_at_its_stated_rate_with_three_seeds():
  rng = np.random.default_rng(0)
  true = 0.004
  hits, rejections = [], []
  for _ in range(2000):
    arm, base = _ladder(rng, 3, 0.05 + true, 0.05)
    d, p = scaling.exponent_difference(COMPUTE, arm, COMPUTE, base)
    hits.append(abs(d.mean - true) <= d.half_width)
    rejections.append(p < 0.05)
  assert np.mean(hits) == pytest.approx(0.95, abs=0.015)  # 2000 draws: SE of the rate ≈ 0.005
  # And under Δb = 0 the test rejects at its level.
  null = []
  for _ in range(2000):
    arm, base = _ladder(rng, 3, 0.05, 0.05)
    null.append(scaling.exponent_difference(COMPUTE, arm, COMPUTE, base)[1] < 0.05)
  assert np.mean(null) == pytest.approx(0.05, abs=0.015)


def test_irreducible_fit_recovers_the_floor_and_needs_four_sizes():
  compute = np.geomspace(1e15, 1e18, 6)
  loss = 1.7 + 3.0 * (compute / compute[0]) ** -0.3
  fit = scaling.irreducible_fit(compute, loss)
  assert fit["E"] == pytest.approx(1.7, rel=1e-3) and fit["alpha"] == pytest.approx(0.3, rel=1e-3)
  assert scaling.irreducible_fit(compute[:3], loss[:3]) is None
