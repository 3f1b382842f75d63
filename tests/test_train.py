"""The training loop end to end on the debug config: loss, metrics, checkpoints, resume, bad input."""

import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from moa_jax import metrics, rundir, sharding, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def records(workdir):
  return rundir.records(workdir)  # one record per step, the newest winning


def test_loss_falls_and_metrics_and_checkpoints_are_written(debug_config, tmp_path):
  debug_config.train.steps = 40
  debug_config.train.log_every = 10
  debug_config.checkpoint.every = 20
  workdir = str(tmp_path / "run")
  train.train(debug_config, workdir)
  rec = records(workdir)
  assert [r["step"] for r in rec] == [10, 20, 30, 40]
  assert rec[-1]["loss"] < rec[0]["loss"] - 0.5
  for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "param_norm", "update_norm"):
    assert key in rec[0], key
  assert all(np.isfinite(r["loss"]) and r["tokens_per_sec"] > 0 for r in rec)
  assert "eval_loss" in rec[-1] and np.isfinite(rec[-1]["eval_loss"])
  gates = rec[-1]["gates"]
  assert set(gates) == {"ffn.mix", "ffn.mix_u"}
  assert set(gates["ffn.mix"]) == set(debug_config.model.ffn.activations)
  assert all(len(v) == debug_config.model.n_layers for v in gates["ffn.mix"].values())
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "40"]
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tb")))


def _run_in_subprocess(config, workdir, log):
  """Starts `python -m moa_jax.train` on `config` (flags carry the overrides)."""
  flat = {"train.steps": config.train.steps, "train.log_every": config.train.log_every,
          "train.eval_every": config.train.eval_every, "train.eval_batches": config.train.eval_batches,
          "train.sample_every": 0, "checkpoint.every": config.checkpoint.every,
          "data.cache_dir": config.data.cache_dir, "data.max_bytes": config.data.max_bytes}
  args = [sys.executable, "-m", "moa_jax.train", "--config=configs/debug.py", f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in flat.items()]
  return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def test_sigkill_mid_training_then_resume_equals_uninterrupted(debug_config, tmp_path):
  debug_config.train.steps = 60
  debug_config.train.eval_every = 0
  full = str(tmp_path / "full")
  train.train(debug_config, full)

  killed = str(tmp_path / "killed")
  with open(tmp_path / "log.txt", "w") as log:
    proc = _run_in_subprocess(debug_config, killed, log)
    ckpts = os.path.join(killed, "checkpoints")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      if os.path.isdir(ckpts) and any(d.isdigit() and int(d) >= 8 for d in os.listdir(ckpts)):
        break
      time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, (tmp_path / "log.txt").read_text()[-3000:]
  survivors = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert survivors and survivors[-1] < 60

  train.train(debug_config, killed)  # resumes from the newest complete checkpoint
  a = [(r["step"], r["loss"]) for r in records(full)]
  b = [(r["step"], r["loss"]) for r in records(killed)]
  assert b == a  # loss for loss, and no duplicated or lost records


@pytest.mark.slow  # two compiles of the debug step; every training test above runs both variants in the loop
def test_steps_off_the_log_cadence_compute_no_gate_statistics(debug_config):
  """The loop's step for steps it does not log leaves the sown statistics out, so XLA drops their
  reductions; the state it returns is the log step's."""
  run = train.build(debug_config, with_data=False)
  c = debug_config.train
  tokens = jax.random.randint(jax.random.key(0), (c.batch_size, c.seq_len + 1), 0, debug_config.model.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}  # (B, T)
  out, reductions = {}, {}
  with sharding.mesh_context(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    for due in (False, True):
      state = train.init_state(run)
      step = train.jit_train_step(run, with_stats=due).lower(state, batch).compile()
      reductions[due] = step.as_text().count(" reduce(")
      out[due] = jax.device_get(step(state, batch))
  (plain_state, plain), (log_state, logged) = out[False], out[True]
  assert "intermediates" not in plain and reductions[False] < reductions[True]
  assert set(metrics.mix_record(logged["intermediates"], debug_config.model.ffn.activations, "mix_std")) == {
      "ffn.mix", "ffn.mix_u"}
  assert set(plain) == set(logged) - {"intermediates"}
  for k in plain:
    np.testing.assert_allclose(plain[k], logged[k], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(plain_state), jax.tree.leaves(log_state), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
