"""Studies: statistics against hand-checked numbers, a two-arm two-seed study end to end on the debug
model (report, plots, skip and resume), paired data order, divergence, scaling and LR reports (from
synthetic runs), flags, and every shipped study file."""

import dataclasses
import glob
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from moa_jax import rundir, scaling, stats, study, study_plan, study_runs, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two-sided 95% critical values of Student's t (printed tables; scipy.stats.t.ppf(0.975, df)).
T975 = {1: 12.706204736174694, 2: 4.302652729749462, 3: 3.1824463052837078, 4: 2.7764451051977934,
        10: 2.228138851986274, 30: 2.0422724563012378, 100: 1.9839715185235518}


def test_t_quantile_matches_tables():
  for df, t in T975.items():
    assert stats.t_quantile(0.975, df) == pytest.approx(t, rel=1e-9), df
  assert stats.t_quantile(0.995, 5) == pytest.approx(4.032142983555228, rel=1e-9)
  assert stats.t_quantile(0.025, 4) == pytest.approx(-T975[4], rel=1e-9)
  assert stats.t_quantile(0.975, math.inf) == pytest.approx(1.959963984540054, rel=1e-12)
  with pytest.raises(ValueError, match="p = 1.5"):
    stats.t_quantile(1.5, 3)


def test_t_quantile_matches_scipy_where_installed():
  scipy_stats = pytest.importorskip("scipy.stats")
  for df in (1, 2, 3, 5, 7, 15, 60, 1000):
    for p in (0.6, 0.9, 0.95, 0.975, 0.995, 0.9995):
      assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9), (p, df)


def test_mean_ci_and_paired_difference_hand_checked():
  # Baseline over seeds 0, 1, 2: 3.0, 3.2, 3.4. Mean 3.2, s = 0.2, half-width t(0.975, 2)·s/√3
  # = 4.302653 × 0.2 / 1.732051 = 0.496828.
  base = {0: 3.0, 1: 3.2, 2: 3.4}
  e = stats.mean_ci(base.values())
  assert (e.mean, e.n) == (pytest.approx(3.2), 3)
  assert e.half_width == pytest.approx(0.496828, abs=1e-6)
  assert e.format() == "3.2000 ± 0.4968"
  # Arm 3.1, 3.0, 3.3 (seed 3 has no baseline run: left out). Differences +0.1, -0.2, -0.1: mean
  # -0.066667, s = √((0.166667² + 0.133333² + 0.033333²) / 2) = 0.152753, half-width
  # 4.302653 × 0.152753 / 1.732051 = 0.379458. An unpaired comparison would see ±0.5 around each mean.
  d = stats.paired_difference({0: 3.1, 1: 3.0, 2: 3.3, 3: 9.9}, base)
  assert (d.mean, d.n) == (pytest.approx(-0.066667, abs=1e-6), 3)
  assert d.half_width == pytest.approx(0.379458, abs=1e-6)
  assert d.format(signed=True) == "-0.0667 ± 0.3795" and not d.excludes_zero
  # A consistent improvement: -0.05, -0.04, -0.06 → mean -0.05, s = 0.01, half-width 0.024841.
  d = stats.paired_difference({0: 2.95, 1: 3.16, 2: 3.34}, base)
  assert d.half_width == pytest.approx(4.302653 * 0.01 / math.sqrt(3), abs=1e-6) and d.excludes_zero
  one = stats.mean_ci([4.0])
  assert one.n == 1 and math.isnan(one.half_width) and one.format() == "4.0000 (n=1)"


def test_power_law_fit_recovers_exponent():
  c = np.array([1e17, 1e18, 1e19, 1e20])
  a, b, r2 = scaling.power_law_fit(c, 7.0 * c ** -0.05)
  assert (a, b, r2) == (pytest.approx(7.0), pytest.approx(0.05), pytest.approx(1.0))


# ------------------------------------------------------------------------------- the tiny study, for real

STUDY_FILE = '''
from moa_jax.study import Study

def get_study():
  return Study(name="tiny", sizes=("debug",), arms={"swiglu": "swiglu", "bimoa": "bimoa"},
               baseline="swiglu", seeds=(0, 1), steps=8,
               overrides={"data.max_bytes": 400_000, "train.log_every": 2, "train.eval_every": 4,
                          "train.batch_size": 8, "train.seq_len": 64,
                          "train.eval_batches": 2, "train.sample_every": 0, "checkpoint.every": 4})
'''


def _row(text: str, arm: str) -> list[str]:
  line = next(l for l in text.splitlines() if l.startswith(f"| `{arm}` |"))
  return [c.strip() for c in line.strip("|").split("|")]


def test_tiny_study_end_to_end(data_cache, tmp_path, monkeypatch):
  """`python -m moa_jax.study` on a two-arm two-seed study of the debug model, then a rerun."""
  (tmp_path / "tiny.py").write_text(STUDY_FILE)
  workdir = str(tmp_path / "study")
  args = [sys.executable, "-m", "moa_jax.study", str(tmp_path / "tiny.py"), f"--workdir={workdir}",
          f"--config.data.cache_dir={data_cache}"]
  out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  text = open(os.path.join(workdir, "report.md")).read()
  assert "python -m moa_jax.study" in text and "Evaluation runs: 4 of 4 finished" in text
  for png in ("loss.png", "eval_loss.png", "loss_difference.png", "compute.png", "gates.png", "gates_std.png"):
    with open(os.path.join(workdir, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(os.path.join(workdir, png)) > 10_000, png
    assert f"]({png})" in text
  assert os.listdir(os.path.join(workdir, "jax_cache"))  # seed 1 of each arm reused seed 0's programs

  # The table's numbers are the statistics of the runs' own final eval losses.
  final = {(arm, seed): rundir.records(os.path.join(workdir, "runs", f"debug-{arm}-lr1x-s{seed}"))[-1]
           for arm in ("swiglu", "bimoa") for seed in (0, 1)}
  assert all(r["step"] == 8 and "eval_loss" in r for r in final.values())
  # The eval: the whole (small) validation split, not 2^20 tokens, the same for every run, with its
  # standard error over sequences.
  assert len({r["eval_tokens"] for r in final.values()}) == 1
  assert all(r["eval_tokens"] % (8 * 64) == 0 and r["eval_tokens"] < 1 << 20 for r in final.values())
  assert all(0 < r["eval_loss_se"] < 0.1 for r in final.values())
  # MoA's per-token gate spread: gates_std has the shape of gates; U = 0 at init, so it starts at 0
  # and grows as the gates learn to depend on the token.
  gated = final["bimoa", 0]
  assert {b: {a: len(v) for a, v in acts.items()} for b, acts in gated["gates_std"].items()} == \
      {b: {a: len(v) for a, v in acts.items()} for b, acts in gated["gates"].items()}
  spread = np.array([v for acts in gated["gates_std"].values() for v in acts.values()])
  assert (spread >= 0).all() and spread.max() > 0
  assert "gates_std" not in final["swiglu", 0]
  loss = {k: r["eval_loss"] for k, r in final.items()}
  swiglu, bimoa = _row(text, "swiglu"), _row(text, "bimoa")
  assert swiglu[1] == stats.mean_ci([loss["swiglu", 0], loss["swiglu", 1]]).format()
  assert swiglu[2] == "2/2" and swiglu[3] == "4.1k"  # 8 steps × 8 × 64 tokens
  assert bimoa[1] == stats.mean_ci([loss["bimoa", 0], loss["bimoa", 1]]).format()
  diff = (loss["bimoa", 0] - loss["swiglu", 0] + loss["bimoa", 1] - loss["swiglu", 1]) / 2
  comparison = next(l for l in text.splitlines() if l.startswith("| `bimoa` − `swiglu` |"))
  assert f"| {diff:+.4f} ± " in comparison
  assert float(swiglu[4][:-1]) < float(bimoa[4][:-1])  # params, in k: bi-MoA adds its gates
  assert "## Provenance" in text and "- commit: `" in text and "jax " in text and "- data: " in text
  assert f"| bimoa | {loss['bimoa', 0]:.4f} | {loss['bimoa', 1]:.4f} |" in text  # the per-seed table
  assert "Each `debug` run: 8 steps × 8 sequences × 64 tokens = 4.1k tokens" in text

  # A rerun trains nothing (here in-process, with train.train replaced by a tripwire).
  study_py = str(tmp_path / "tiny.py")
  s = study.with_flags(study.load_study(study_py), [f"--config.data.cache_dir={data_cache}"])
  monkeypatch.setattr(train, "train", lambda *a: pytest.fail("a finished run was trained again"))
  study.run_study(s, workdir)


def test_unfinished_runs_are_trained_again_and_finished_ones_skipped(tmp_path, monkeypatch, capsys):
  s = study.Study(name="t", sizes=("debug",), arms={"a": "swiglu", "b": "bimoa"}, baseline="a", seeds=(0,),
                  steps=6, overrides={"train.log_every": 2})
  monkeypatch.setattr(train, "train", _fake_train(lambda config: 4.0))
  study.run_study(s, str(tmp_path))
  cut = str(tmp_path / "runs" / "debug-b-lr1x-s0")
  with open(os.path.join(cut, "metrics.jsonl")) as f:
    lines = f.readlines()
  with open(os.path.join(cut, "metrics.jsonl"), "w") as f:
    f.writelines(lines[:2])  # killed after step 4: train.train resumes it from its checkpoint
  capsys.readouterr()
  trained = []
  monkeypatch.setattr(train, "train", lambda config, workdir: trained.append(workdir))
  study.run_study(s, str(tmp_path))
  assert trained == [cut]
  assert "[1/2] debug-a-lr1x-s0: finished, skipped" in capsys.readouterr().out


def test_arms_of_one_seed_see_the_same_batches(data_cache):
  s = study.with_flags(study.load_study(os.path.join(ROOT, "experiments", "tiny_mixing.py")),
                       ["--study.seeds=0,1", f"--config.data.cache_dir={data_cache}",
                        "--config.data.max_bytes=400000"])
  first = {}
  for ref, config in study.plan(s, "/unused"):
    first[ref.arm, ref.seed] = next(train.build(config).data.train_iter())["inputs"]
  for seed in (0, 1):
    assert np.array_equal(first["swiglu", seed], first["la", seed])
    assert np.array_equal(first["swiglu", seed], first["bimoa", seed])
  assert not np.array_equal(first["swiglu", 0], first["swiglu", 1])


def test_changed_study_in_the_same_workdir_is_refused(tmp_path):
  s = study.Study(name="t", sizes=("debug",), arms={"swiglu": "swiglu"}, baseline="swiglu", seeds=(0,), steps=5)
  ref, config = study.plan(s, str(tmp_path))[0]
  os.makedirs(ref.workdir)
  with open(os.path.join(ref.workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  study._check_same_run(ref, config)  # the same config: fine
  saved = json.loads(config.to_json_best_effort())
  saved["train"]["field_removed_since"] = 1  # code changes, not study changes: a field only one side
  saved["model"]["moe"]["capacity_factor"] = 9.0  # has, and a dense model's unused MoE group
  with open(os.path.join(ref.workdir, "config.json"), "w") as f:
    json.dump(saved, f)
  study._check_same_run(ref, config)
  with pytest.raises(study.StudyError, match=r"config.train.steps: 5 in the checkpoint, 7 now"):
    study.run_study(dataclasses.replace(s, steps=7), str(tmp_path))


# ------------------------------------------------------------------ report paths, from synthetic runs

def _fake_train(final_loss):
  """A stand-in for train.train writing what it writes (config.json, metrics.jsonl), with a chosen
  final eval loss: final_loss(config) -> float, or raise train.TrainingError."""
  def fake(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort())
    end = final_loss(config)
    c = config.train
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      for step in sorted({*range(c.log_every, c.steps + 1, c.log_every), c.steps}):
        rec = {"step": step, "tokens": step * c.batch_size * c.seq_len, "loss": end + 1.0 / step,
               "tokens_per_sec": 1000.0}
        if config.model.ffn.mix != "fixed":
          rec["gates"] = {"ffn.mix": {a: [0.5] * config.model.n_layers for a in config.model.ffn.activations}}
        if step == c.steps:
          rec["eval_loss"] = end
        f.write(json.dumps(rec) + "\n")
  return fake


def test_lr_sweep_with_divergence_and_scaling_fit(tmp_path, monkeypatch):
  s = study.Study(name="synthetic", sizes=("debug", "quickstart"), arms={"swiglu": "swiglu", "moa": "moa"},
                  baseline="swiglu", seeds=(0, 1, 2), tokens_per_param=0.5, lr_multipliers=(1.0, 2.0),
                  overrides={"train.log_every": 100})

  def final_loss(config):
    size_loss = 5.0 if config.model.d_model == 64 else 4.0
    moa = config.model.ffn.mix == "moa"
    if moa and config.optim.lr > 0.005 and config.train.seed == 2:  # debug at 2× lr, seed 2
      raise train.Diverged("loss is nan at step 7; stopped without saving")
    return size_loss - (0.01 * (config.train.seed + 3) if moa else 0.0) + 0.001 * config.train.seed

  monkeypatch.setattr(train, "train", _fake_train(final_loss))
  path = study.run_study(s, str(tmp_path))
  text = open(path).read()
  for png in ("loss.png", "eval_loss.png", "loss_difference.png", "compute.png", "lr_sensitivity.png",
              "scaling.png", "gates.png"):
    assert os.path.getsize(tmp_path / png) > 10_000, png
  assert "23 of 24 finished" in text
  rows = [[c.strip() for c in l.strip("|").split("|")] for l in text.splitlines() if l.startswith("| `moa` |")]
  assert len(rows) == 4  # 2 sizes × 2 lrs
  debug_2x = next(r for r in rows if r[1] == "debug" and "(2×)" in r[2])
  assert debug_2x[4] == "2/3 (**1 diverged**)"
  # Finished seeds 0, 1: differences -0.03, -0.04 → mean -0.035, s = 0.0070711, t(0.975, 1)·s/√2 = 0.063531;
  # the diverged seed makes the comparison a failure (p = 1), it is not dropped silently.
  assert ("| `moa` − `swiglu` @ debug (lr 2×) | 2 | 4.9655 | 5.0005 | -0.0350 ± 0.0635 — `moa` diverged on "
          "seed 2 (a failure: p = 1) | 1 | 1 |") in text
  # -0.03, -0.04, -0.05: s = 0.01, half-width 0.024841; t = -0.04/(0.01/√3) = -6.928 on 2 df, where the
  # two-sided p is 1 - |t|/√(t² + 2) = 0.0202; Holm over 4 comparisons (the others 0.0202, 0.0202, 1):
  # 4 × 0.0202 = 0.081, so no star although the unadjusted CI excludes 0.
  assert "| `moa` − `swiglu` @ debug (lr 1×) | 3 | 4.9610 | 5.0010 | -0.0400 ± 0.0248 | 0.02 | 0.081 |" in text
  assert "## Scaling fit" in text and "| `swiglu lr 1×` | 2 | 3 |" in text and "— (≤ 2 points)" in text
  assert "## Power" in text
  assert "debug-moa-lr2x-s2`: diverged: loss is nan at step 7" in text
  assert "| moa debug lr 2× | 4.9700 | 4.9610 | diverged |" in text  # per seed: 5 - 0.03, 5 - 0.04 + 0.001
  assert os.path.exists(tmp_path / "runs" / "debug-moa-lr2x-s2" / study_runs.FAILED)

  # The diverged run is not retried on the next call.
  monkeypatch.setattr(train, "train", lambda *a: pytest.fail("trained again"))
  study.run_study(s, str(tmp_path))


def test_a_run_refused_before_training_stops_the_study(tmp_path):
  s = study.Study(name="t", sizes=("debug",), arms={"a": "swiglu"}, baseline="a", seeds=(0,), steps=5,
                  overrides={"train.batch_size": 3, "mesh.data": 2})
  with pytest.raises(study.StudyError, match="run debug-a-lr1x-s0 cannot go on: .*mesh"):
    study.run_study(s, str(tmp_path))


# -------------------------------------------------------------------------------- flags and validation

def test_flags_override_study_fields_and_configs():
  s = study.load_study(os.path.join(ROOT, "experiments", "mixing_variants.py"))
  s = study.with_flags(s, ["--study.sizes=debug", "--study.seeds=4,5", "--study.steps=50",
                           "--study.arms=swiglu,bimoa", "--study.lr_multipliers=1,1.5", "--study.tune_seeds=",
                           "--config.model.ffn.gate=softmax", "--config.train.eval_every=10"])
  assert (s.sizes, s.seeds, s.steps, tuple(s.arms), s.lr_multipliers, s.tune_seeds) == (
      ("debug",), (4, 5), 50, ("swiglu", "bimoa"), (1.0, 1.5), ())
  assert s.primary == ("bimoa", "swiglu") and s.comparisons == ()  # the others name arms left out
  runs = study.plan(s, "/w")
  assert len(runs) == 2 * 2 * 2
  ref, c = runs[-1]
  assert (ref.arm, ref.lr_multiplier, ref.seed) == ("bimoa", 1.5, 5)
  assert ref.workdir == "/w/runs/debug-bimoa-lr1.5x-s5"
  assert (c.model.ffn.gate, c.train.eval_every, c.train.steps, c.train.seed) == ("softmax", 10, 50, 5)
  assert c.optim.lr == pytest.approx(1.5 * 3e-3)
  assert s.description.startswith("Fixed vs LA vs MoA")

  for flag, message in [("--study.nope=1", "no settable field 'nope'"),
                        ("--config.model.nope=1", "no field 'model.nope'"),
                        ("--study.arms=swiglu,gelu", r"\['gelu'\] are not arms"),
                        ("--study.seeds=a", "'a' is not an integer"),
                        ("--bogus=1", "unknown flag"),
                        ("--study.sizes=huge", "size 'huge'; known: debug")]:
    with pytest.raises(study.StudyError, match=message):
      study.with_flags(s, [flag])


def test_bad_studies_name_the_problem():
  with pytest.raises(study.StudyError, match="baseline = 'gelu' is not an arm"):
    study.Study(name="x", arms={"swiglu": "swiglu"}, baseline="gelu")
  with pytest.raises(study.StudyError, match="ffn = 'swiglu2'; known: gelu_mlp"):
    study.Study(name="x", arms={"a": "swiglu2"}, baseline="a")
  with pytest.raises(study.StudyError, match="steps or tokens_per_param"):
    study.Study(name="x", arms={"a": "swiglu"}, baseline="a", steps=5, tokens_per_param=20)
  s = study.Study(name="x", sizes=("debug",), arms={"a": ("swiglu", {"model.ffn.gat": "tanh"})}, baseline="a")
  with pytest.raises(study.StudyError, match="model.ffn has no field 'gat'; known: activations, d_ff, gate,"):
    study.plan(s, "/w")
  with pytest.raises(study.StudyError, match="defines no get_study"):
    study.load_study(os.path.join(ROOT, "configs", "debug.py"))


STUDY_FILES = sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                     if "def get_study(" in open(p).read())  # the others: benchmarks and analysis scripts


@pytest.mark.parametrize("path", STUDY_FILES, ids=os.path.basename)
def test_shipped_study_files_load_and_plan(path):
  s = study.load_study(path)
  module_doc = open(path).read().split('"""')[1]
  assert f"python -m moa_jax.study experiments/{os.path.basename(path)}" in module_doc
  runs = study.plan(s, "/w")  # nothing has run: a tuned study plans its first lr grid only
  seeds = s.tune_seeds if s.tuned else s.seeds
  assert len(runs) == len(s.sizes) * len(s.arms) * len(s.lr_multipliers) * len(seeds)
  assert all(c.train.steps > 0 for _, c in runs)


# ------------------------------------------------------------------------ the protocol (docs/research_protocol.md)

def test_holm_and_power_hand_checked():
  # Holm: sorted p 0.01, 0.03, 0.04 of m = 3 -> 3·0.01, max(0.03, 2·0.03), max(0.06, 1·0.04); nan is no test.
  assert stats.holm([0.01, 0.04, 0.03, math.nan])[:3] == pytest.approx([0.03, 0.06, 0.06])
  assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
  # Paired t-test on 2 df has a closed form: p = 1 − |t|/√(t² + 2).
  d = stats.paired_difference({0: 1.03, 1: 1.04, 2: 1.05}, {0: 1.0, 1: 1.0, 2: 1.0})
  t = d.mean / (d.sd / math.sqrt(3))
  assert stats.paired_p(d) == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), rel=1e-9)
  # The numbers: paired SD 0.023 (the committed tiny result): 3 seeds find 0.075 nats with
  # 80% power, and 0.01 nats needs 44 seeds.
  assert stats.min_detectable_effect(0.023, 3) == pytest.approx(0.0751, abs=5e-4)
  assert stats.seeds_needed(0.01, 0.023) == 44
  assert stats.power(0.0, 0.023, 5) == pytest.approx(0.05, abs=1e-3)  # no effect: the test's level


def test_power_matches_scipy_noncentral_t_where_installed():
  scipy_stats = pytest.importorskip("scipy.stats")
  for n, effect, sd in ((3, 0.05, 0.023), (10, 0.01, 0.02), (44, 0.01, 0.023)):
    df, nc = n - 1, effect * math.sqrt(n) / sd
    crit = scipy_stats.t.ppf(0.975, df)
    exact = scipy_stats.nct.sf(crit, df, nc) + scipy_stats.nct.cdf(-crit, df, nc)
    assert stats.power(effect, sd, n) == pytest.approx(exact, abs=2e-4), n


def test_fits_report_no_r2_for_two_points_and_share_an_exponent():
  a, b, r2 = scaling.power_law_fit([1e17, 1e18], [4.0, 3.5])
  assert math.isnan(r2) and b == pytest.approx(math.log(4.0 / 3.5) / math.log(10))
  c = np.array([1e17, 1e18, 1e19])
  prefactors, b = scaling.shared_exponent_fit({"x": (c, 7.0 * c ** -0.05), "y": (c, 6.3 * c ** -0.05)})
  assert b == pytest.approx(0.05) and prefactors["y"] / prefactors["x"] == pytest.approx(0.9)


def test_run_shape_sets_steps_warmup_and_evals_from_tokens_per_param():
  s = study.Study(name="t", sizes=("debug",), arms={"swiglu": "swiglu", "bimoa": "bimoa",
                                                     "wide": study.Arm("swiglu", match_flops="bimoa")},
                  baseline="swiglu", seeds=(0,))
  configs = {ref.arm: c for ref, c in study.plan(s, "/w")}
  c = configs["swiglu"]
  params = 131_392  # the debug SwiGLU: 20 tokens per parameter at 16 × 128 tokens per step
  assert (c.train.batch_size, c.train.seq_len) == (16, 128)
  assert c.train.steps == math.ceil(20 * params / (16 * 128)) == configs["bimoa"].train.steps
  assert c.optim.warmup_steps == round(0.05 * c.train.steps)
  assert c.train.eval_every % c.train.log_every == 0 and 9 <= c.train.steps // c.train.eval_every <= 11
  assert c.train.eval_tokens == 1 << 20 and c.data.max_bytes == 8_000_000 and c.train.sample_every == 0
  # The equal-FLOPs arm: a SwiGLU widened to bi-MoA's FLOPs per token, on bi-MoA's token budget.
  flops = {arm: study_plan._flops(configs[arm]) for arm in configs}
  per_unit = study_plan._flops(configs["swiglu"]) / 1  # any width step costs far less than this
  assert configs["wide"].model.ffn.d_ff > configs["swiglu"].model.ffn.d_ff
  assert abs(flops["wide"] - flops["bimoa"]) < (flops["bimoa"] - flops["swiglu"]) / 10 < per_unit
  assert configs["wide"].train.steps == configs["bimoa"].train.steps


def test_tuned_study_widens_the_grid_and_compares_best_against_best(tmp_path, monkeypatch):
  s = study.Study(name="tuned", sizes=("debug",), arms={"a": "swiglu", "b": "bimoa"}, baseline="a",
                  seeds=(0, 1, 2), tune_seeds=(100,), lr_multipliers=(0.5, 1.0, 2.0), widen=2, steps=20,
                  primary=("b", "a"), pilot_sd=0.023, overrides={"train.log_every": 10})
  best = {"swiglu": 4.0, "bimoa": 16.0}  # a: inside after one widening; b: beyond the widening limit

  def final_loss(config):
    m = config.optim.lr / 3e-3
    return 4.0 + 0.05 * math.log(m / best[config.model.ffn.mix == "moa" and "bimoa" or "swiglu"]) ** 2 \
        + 0.001 * config.train.seed

  monkeypatch.setattr(train, "train", _fake_train(final_loss))
  text = open(study.run_study(s, str(tmp_path))).read()
  runs = sorted(os.listdir(tmp_path / "runs"))
  assert [r for r in runs if r.startswith("debug-a-") and r.endswith("s100")] == [
      f"debug-a-lr{m}x-s100" for m in ("0.5", "1", "2", "4", "8")]  # 4× and 8× added: 4× is inside
  assert [r for r in runs if r.startswith("debug-a-") and not r.endswith("s100")] == [
      f"debug-a-lr4x-s{seed}" for seed in (0, 1, 2)]  # evaluation seeds at the arm's best
  assert "debug-b-lr8x-s0" in runs  # b's best is the widened edge: evaluated there, flagged
  assert "| `a` | 0.5×: " in text and "4× = 0.012 | inside the grid |" in text
  assert "8× = 0.024 | **at the grid's edge** (widening limit reached) |" in text
  assert "`b` − `a` **(primary)** | 3 |" in text and "## Power" in text
  assert "| a priori, every comparison (the study file's pilot SD) | 0.0230 | 3 (planned) | 0.0751 | 44 | — |" in text
  assert os.path.getsize(tmp_path / "lr_sensitivity.png") > 10_000


def test_shared_weights_are_identical_across_the_arms_of_a_seed():
  s = study.load_study(os.path.join(ROOT, "experiments", "tiny_mixing.py"))
  params = {}
  for ref, config in study.plan(s, "/unused"):
    if ref.seed in (0, 1):
      run = train.build(config, with_data=False)
      flat = jax.tree_util.tree_leaves_with_path(jax.device_get(train.init_state(run).params))
      params[ref.arm, ref.seed] = {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}
  shared = set.intersection(*(set(p) for p in params.values()))
  assert any("w1" in k for k in shared) and any("embedding" in k for k in shared)
  assert not any("gate" in k or "coef" in k for k in shared)  # the mixing parameters are not shared
  for seed in (0, 1):
    for arm in ("la", "bimoa"):
      for k in shared:
        assert np.array_equal(params["swiglu", seed][k], params[arm, seed][k]), (arm, seed, k)
  assert not np.array_equal(params["swiglu", 0][min(shared)], params["swiglu", 1][min(shared)])


def test_eval_subset_is_fixed_shuffled_and_capped_at_the_split(data_cache):
  s = study.with_flags(study.load_study(os.path.join(ROOT, "experiments", "tiny_mixing.py")),
                       [f"--config.data.cache_dir={data_cache}", "--config.data.max_bytes=400000"])
  data = {seed: train.build(c).data for ref, c in study.plan(s, "/unused") if ref.arm == "swiglu"
          for seed in [ref.seed] if seed in (0, 1)}
  rows = lambda batches: [tuple(r) for b in batches for r in b["inputs"]]
  first = rows(data[0].eval_subset(3))
  assert first == rows(data[0].eval_subset(3)) == rows(data[1].eval_subset(3))  # the same for every seed
  assert first != rows(data[0].eval_batches(3))  # not the split's first windows in order
  whole = data[0].eval_subset_batches
  assert len(rows(data[0].eval_subset(whole + 50))) == whole * 8  # capped at the whole split


def test_single_point_and_units_in_plots():
  from moa_jax import plot

  one = {"a": [(np.array([1000.0]), np.array([4.2]))]}
  fig = plot.loss_curves(one, metric="eval_loss", smooth=0.0)
  full = fig.axes[0]
  assert full.get_xlim()[0] < 1000 < full.get_xlim()[1] and full.get_xlim()[0] > 0
  assert full.get_ylabel() == "eval loss (nats/token)"
  fig = plot.loss_curves({"a": [(np.array([1.0, 2.0]), np.array([3.0, 2.0]))]}, metric="grad_norm", smooth=0.0)
  assert fig.axes[0].get_ylabel() == "gradient norm (global L2 norm)"
  # Paired band: 95% t-interval of the mean difference, not the min–max of the seeds.
  curves = [(np.array([1.0]), np.array([d])) for d in (-0.03, -0.04, -0.05)]
  x, mean, lo, hi = plot._seed_band(curves, 0.0)
  assert mean[0] == pytest.approx(-0.04) and hi[0] - mean[0] == pytest.approx(0.024841, abs=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--study.arms=bila"], "--study.arms=bila leaves out the baseline 'swiglu'; add --study.baseline=bila"),
    (["--study.arms=bila", "--study.baseline=swiglu"], "baseline = 'swiglu' is not an arm"),
])
def test_cli_errors_raised_by_the_study_file_are_one_line(tmp_path, flags, message):
  """The study file imports moa_jax.study, not __main__: its StudyError must still be one line."""
  args = [sys.executable, "-m", "moa_jax.study", os.path.join(ROOT, "experiments", "debug_protocol.py"),
          f"--workdir={tmp_path}", "--plan", *flags]
  out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
  assert not os.listdir(tmp_path)
