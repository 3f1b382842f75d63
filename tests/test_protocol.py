"""The second research protocol (issue 22): the three-way split, the sigmoid-LA control, budgets, equal lr
grids, the document-level SE, and the study that uses them."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax import heldout, optim, presets, study, study_plan, train
from moa_jax.data import corpus, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _corpus(tmp_path):
  """300 small files and 5 big ones."""
  for i in range(300):
    (tmp_path / f"small{i:03d}.txt").write_text(f"document {i} " * 40)
  for i in range(5):
    (tmp_path / f"big{i}.txt").write_text(f"big {i} " * 20_000)
  return f"glob:{tmp_path}/*.txt"


def test_split_rule_is_three_way_by_document_and_caps_held_out_documents(tmp_path):
  spec = _corpus(tmp_path)
  rule = corpus.SplitRule(10.0, 10.0, heldout_max_bytes=5_000)
  splits = {s: list(corpus.documents(spec, s, val_percent=10.0, rule=rule)) for s in corpus.SPLITS}
  keys = {s: {d.key for d in docs} for s, docs in splits.items()}
  assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
  assert sum(map(len, keys.values())) == 305
  assert 15 <= len(keys["val"]) <= 45 and 15 <= len(keys["test"]) <= 45
  assert {f"big{i}.txt" for i in range(5)} <= keys["train"]  # long documents always train
  # Adding a test split leaves the validation split as it was.
  assert keys["val"] == {d.key for d in corpus.documents(spec, "val", val_percent=10.0)} - \
      {f"big{i}.txt" for i in range(5)}
  with pytest.raises(ValueError, match="together below 100"):
    corpus.SplitRule(60.0, 50.0).check()


def test_prepared_set_has_a_test_split_with_its_sizes_and_evals_read_it(tmp_path):
  (tmp_path / "src").mkdir()
  spec = _corpus(tmp_path / "src")
  p = prepare.prepare(spec, 300, str(tmp_path / "cache"), val_percent=10.0, test_percent=10.0, heldout_max_bytes=5_000)
  splits = p.meta["splits"]
  assert set(splits) == {"train", "val", "test"} and p.meta["key"]["test_percent"] == 10.0
  for s in ("val", "test"):
    assert splits[s]["n_docs"] >= 15 and splits[s]["max_doc_tokens"] / splits[s]["n_tokens"] < 0.1
  # A set prepared without a test split keeps the key it had before there was one.
  old = prepare.prepare(spec, 300, str(tmp_path / "cache"), val_percent=10.0)
  assert "test_percent" not in old.meta["key"] and not old.meta["splits"]["test"]["n_tokens"]
  from moa_jax.data import pipeline
  c = presets.lm_config("debug", "swiglu").data
  c.update(source=spec, cache_dir=str(tmp_path / "cache"), val_percent=10.0, test_percent=10.0,
           heldout_max_bytes=5_000, eval_split="test")
  data = pipeline.make_datasets(c, vocab_size=300, seq_len=16, global_batch_size=2, seed=0)
  assert data.val_tokens == splits["test"]["n_tokens"]
  c.update(test_percent=0.0, heldout_max_bytes=0)
  with pytest.raises(ValueError, match="data.eval_split = 'test'.*test_percent > 0"):
    pipeline.make_datasets(c, vocab_size=300, seq_len=16, global_batch_size=2, seed=0)


def test_sigmoid_la_freezes_u_and_the_gate_multiplier_scales_gate_updates():
  params = {"layers": {"ffn": {"mix": {"gate_kernel": jnp.zeros((4, 2, 3)), "gate_bias": jnp.ones((2, 3))},
                               "w1": jnp.ones((4, 8))}}}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)

  def updates(**fields):
    c = presets.lm_config("debug", "bimoa").optim
    c.update(clip_norm=0.0, **fields)
    tx = optim.make_optimizer(c, 10, params, None)
    u, _ = tx.update(grads, tx.init(params), params)
    return u["layers"]["ffn"]

  plain, frozen, fast = updates(), updates(gate_kernel_trainable=False), updates(gate_lr_multiplier=3.0)
  assert float(jnp.abs(frozen["mix"]["gate_kernel"]).max()) == 0.0  # U stays at zero: gates σ(b) per layer
  np.testing.assert_allclose(frozen["mix"]["gate_bias"], plain["mix"]["gate_bias"])
  np.testing.assert_allclose(frozen["w1"], plain["w1"])
  np.testing.assert_allclose(fast["mix"]["gate_kernel"], 3 * plain["mix"]["gate_kernel"], rtol=1e-6)
  np.testing.assert_allclose(fast["mix"]["gate_bias"], 3 * plain["mix"]["gate_bias"], rtol=1e-6)
  assert optim.gate_scale(params, presets.lm_config("debug", "bimoa").optim) is None  # the default adds nothing


def test_budgets_give_cheaper_arms_more_steps():
  arms = {"swiglu": "swiglu", "bimoa": "bimoa", "eq": study.Arm("swiglu", compute_of="bimoa")}
  tokens = study.Study(name="t", sizes=("debug",), arms=arms, baseline="swiglu", seeds=(0,), tokens_per_param=2)
  c = {ref.arm: cfg for ref, cfg in study.plan(tokens, "/w")}
  assert c["swiglu"].train.steps == c["bimoa"].train.steps
  ratio = study_plan._flops(c["bimoa"]) / study_plan._flops(c["swiglu"])
  assert c["eq"].train.steps == round(c["bimoa"].train.steps * ratio) > c["bimoa"].train.steps
  flops = study.Study(name="t", sizes=("debug",), arms=arms, baseline="swiglu", seeds=(0,), tokens_per_param=2,
                      budget="flops", budget_arm="bimoa")
  c = {ref.arm: cfg for ref, cfg in study.plan(flops, "/w")}
  spent = {a: cfg.train.steps * study_plan._flops(cfg) for a, cfg in c.items()}
  assert spent["swiglu"] == pytest.approx(spent["bimoa"], rel=0.01) and spent["eq"] == pytest.approx(spent["bimoa"], rel=0.01)
  with pytest.raises(study.StudyError, match="wall_clock.*throughput.*'swiglu'"):
    study.Study(name="t", arms=arms, baseline="swiglu", budget="wall_clock")
  wall = study.Study(name="t", sizes=("debug",), arms={"swiglu": "swiglu", "bimoa": "bimoa"}, baseline="swiglu",
                     seeds=(0,), tokens_per_param=2, budget="wall_clock", budget_arm="bimoa",
                     throughput={"swiglu": 10_000.0, "bimoa": 8_570.0})
  c = {ref.arm: cfg for ref, cfg in study.plan(wall, "/w")}
  assert c["swiglu"].train.steps == round(c["bimoa"].train.steps / 0.857)
  with pytest.raises(study.StudyError, match="budget = 'gpu_hours'; known: tokens, flops, wall_clock"):
    study.Study(name="t", arms=arms, baseline="swiglu", budget="gpu_hours")


def _fake_train(best):
  def fake(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort())
    m = config.optim.lr / 3e-3
    arm = "sigla" if not config.optim.gate_kernel_trainable else config.model.ffn.mix
    end = 4.0 + 0.05 * math.log(m / best[arm]) ** 2 + 0.001 * config.train.seed
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": config.train.steps, "tokens": 1, "loss": end, "eval_loss": end}) + "\n")
  return fake


def test_equal_grids_and_splits_per_seed(tmp_path, monkeypatch):
  s = study.Study(name="eq", sizes=("debug",), arms={"a": "swiglu", "b": "bimoa"}, baseline="a", seeds=(0, 1),
                  tune_seeds=(100, 101), lr_multipliers=(0.707, 1.0, 1.414), widen=2, steps=10,
                  overrides={"train.log_every": 10, "data.test_percent": 4.0}, document_se=False)
  monkeypatch.setattr(train, "train", _fake_train({"fixed": 1.0, "moa": 2.0}))
  text = open(study.run_study(s, str(tmp_path))).read()
  runs = sorted(os.listdir(tmp_path / "runs"))
  grid = lambda arm: sorted({r.split("-lr")[1].split("x-")[0] for r in runs if f"-{arm}-" in r and r.endswith(("s100", "s101"))})
  assert len(grid("a")) == len(grid("b")) == 5  # b widened twice (its best, 2×, inside); a grew to as many
  configs = {ref.workdir.rsplit("/", 1)[1]: c for ref, c in study.plan(s, str(tmp_path))}
  assert {c.data.eval_split for n, c in configs.items() if n.endswith(("s100", "s101"))} == {"val"}
  assert {c.data.eval_split for n, c in configs.items() if n.endswith(("s0", "s1"))} == {"test"}
  assert "## Final eval loss on the `test` split" in text and "split. (sd" in text
  assert "within ±0.05 (TOST p)" in text


def test_ratio_se_counts_documents_and_matches_a_bootstrap():
  scipy_stats = pytest.importorskip("scipy.stats")
  rng = np.random.default_rng(0)
  tokens = rng.integers(50, 2000, 40)
  doc_mean = 3.0 + rng.normal(0, 0.3, 40)  # documents differ: their windows are not independent
  sums = doc_mean * tokens
  mean, se = heldout.ratio_se(sums, tokens)
  assert mean == pytest.approx(sums.sum() / tokens.sum())
  boot = scipy_stats.bootstrap((np.arange(40),), lambda i, axis=-1: sums[i].sum(axis) / tokens[i].sum(axis),
                               n_resamples=4000, random_state=1, vectorized=True)
  assert se == pytest.approx(boot.standard_error, rel=0.1)
  a, b = {"doc_loss": list(sums), "doc_tokens": list(tokens)}, {"doc_loss": list(sums - 0.01 * tokens), "doc_tokens": list(tokens)}
  assert heldout.paired_ratio_se(a, b) == (pytest.approx(0.01), pytest.approx(0.0, abs=1e-12))


def test_debug_protocol_v2_plans_four_arms_with_the_control():
  s = study.load_study(os.path.join(ROOT, "experiments", "debug_protocol_v2.py"))
  assert s.arms["sigla"].overrides == {"optim.gate_kernel_trainable": False} and s.arms["sigla"].ffn == "bimoa"
  assert len(s.tune_seeds) >= 2 and len(s.seeds) >= 5 and s.margin > 0
