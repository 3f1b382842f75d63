"""moa_jax.stats against scipy and statsmodels (each computed there from the raw values), and the
statements the protocol makes about small n."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from moa_jax import stats

RNG = np.random.default_rng(7)
SAMPLES = [RNG.normal(0.01, 0.02, n) for n in (2, 3, 5, 8)]


def test_paired_difference_and_p_match_scipy_ttest_rel():
  for d in SAMPLES:
    base = RNG.normal(3.0, 0.1, len(d))
    arm = base + d
    e = stats.paired_difference(dict(enumerate(arm)), dict(enumerate(base)))
    ref = sps.ttest_rel(arm, base)
    assert stats.paired_p(e) == pytest.approx(ref.pvalue, rel=1e-10)
    lo, hi = ref.confidence_interval(0.95)
    assert (e.mean - e.half_width, e.mean + e.half_width) == (pytest.approx(lo, rel=1e-10), pytest.approx(hi, rel=1e-10))


def test_t_quantile_is_scipys_and_refuses_bad_p():
  assert stats.t_quantile(0.975, 2) == pytest.approx(4.302652729749462, rel=1e-12)
  assert stats.t_quantile(0.975, math.inf) == pytest.approx(1.959963984540054, rel=1e-12)
  with pytest.raises(ValueError, match="p = 1.5"):
    stats.t_quantile(1.5, 3)


def test_holm_matches_statsmodels():
  multitest = pytest.importorskip("statsmodels.stats.multitest", reason="statsmodels (pip install statsmodels)")
  for p in ([0.01, 0.04, 0.03], [0.2, 0.001, 0.5, 0.04], [0.9, 0.8]):
    assert stats.holm(p) == pytest.approx(list(multitest.multipletests(p, method="holm")[1]), rel=1e-12)
  assert math.isnan(stats.holm([0.01, math.nan])[1]) and stats.holm([0.01, math.nan])[0] == 0.01


def test_power_matches_statsmodels_and_is_exact_at_two_seeds():
  power_mod = pytest.importorskip("statsmodels.stats.power", reason="statsmodels (pip install statsmodels)")
  for effect, sd, n in ((0.01, 0.02, 2), (0.01, 0.02, 3), (0.03, 0.02, 5), (0.005, 0.01, 40)):
    ref = power_mod.TTestPower().power(effect_size=effect / sd, nobs=n, alpha=0.05, alternative="two-sided")
    assert stats.power(effect, sd, n) == pytest.approx(ref, rel=1e-6), (effect, sd, n)
  # The review's case: n = 2, effect = 6.95 sd. The old quadrature gave 0.542 (the df = 1 χ density is
  # singular at 0); the noncentral t gives 0.559 (statsmodels returns nan here: scipy's nct.cdf).
  assert stats.power(6.95, 1.0, 2) == pytest.approx(0.5594, abs=1e-4)
  assert all(math.isfinite(stats.power(r, 1.0, 2)) for r in np.arange(0.5, 20, 0.25))


def test_min_detectable_effect_and_seeds_needed_invert_power():
  sd = 0.02
  for n in (3, 5, 10):
    e = stats.min_detectable_effect(sd, n)
    assert stats.power(e, sd, n) == pytest.approx(0.8, abs=1e-9)
  n = stats.seeds_needed(0.01, sd)
  assert stats.power(0.01, sd, n) >= 0.8 > stats.power(0.01, sd, n - 1)
  power_mod = pytest.importorskip("statsmodels.stats.power", reason="statsmodels (pip install statsmodels)")
  assert n == math.ceil(power_mod.TTestPower().solve_power(effect_size=0.5, alpha=0.05, power=0.8))


def test_sd_interval_matches_chi_square_and_widens_the_seed_count():
  lo, hi = stats.sd_interval(1.0, 3)
  assert lo == pytest.approx(math.sqrt(2 / sps.chi2.ppf(0.975, 2)), rel=1e-12)
  assert hi == pytest.approx(math.sqrt(2 / sps.chi2.ppf(0.025, 2)), rel=1e-12)
  assert (lo, hi) == (pytest.approx(0.5207, abs=1e-4), pytest.approx(6.2847, abs=1e-4))
  # Coverage: the interval holds the true SD at its stated rate.
  draws = RNG.normal(0.0, 0.03, (4000, 3)).std(axis=1, ddof=1)
  covered = np.mean((lo * draws <= 0.03) & (0.03 <= hi * draws))  # the bounds scale with s
  assert covered == pytest.approx(0.95, abs=0.015)
  # "0.01 nats needs 37 seeds" at an SD of 0.029 and n = 3 is really a range.
  few, many = (stats.seeds_needed(0.01, s) for s in stats.sd_interval(0.029, 3))
  assert few < stats.seeds_needed(0.01, 0.029) < many and few >= 10 and many > 1000


def test_tost_matches_statsmodels_and_the_ci_rule():
  weightstats = pytest.importorskip("statsmodels.stats.weightstats", reason="statsmodels (pip install statsmodels)")
  for d in SAMPLES[1:]:
    base = RNG.normal(3.0, 0.1, len(d))
    e = stats.paired_difference(dict(enumerate(base + d)), dict(enumerate(base)))
    ref = weightstats.ttost_paired(base + d, base, -0.05, 0.05)[0]
    assert stats.tost(e, 0.05) == pytest.approx(ref, rel=1e-8)
    ci90 = stats.paired_difference(dict(enumerate(base + d)), dict(enumerate(base)), level=0.9)
    inside = abs(ci90.mean) + ci90.half_width < 0.05
    assert (stats.tost(e, 0.05) < 0.05) == inside


def test_permutation_floor():
  assert stats.permutation_floor(3) == 0.25 and stats.permutation_floor(5) == 0.0625
  # Every sign flip of 3 differences: the most extreme observed sum is matched by its mirror image.
  d = np.array([0.01, 0.02, 0.03])
  flips = np.array(np.meshgrid(*[[-1, 1]] * 3)).reshape(3, -1).T
  sums = np.abs(flips @ d)
  assert np.mean(sums >= abs(d.sum())) == stats.permutation_floor(3)
