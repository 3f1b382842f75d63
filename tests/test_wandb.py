"""Weights & Biases logging (moa_jax.wandb_log) against a fake `wandb` module: no network, no wandb needed."""

import json
import os
import sys
import types

import pytest

from moa_jax import metrics, presets, train, wandb_log


class FakeWandb(types.ModuleType):
  """Records init / log / finish calls as wandb.init(...) and its run's .log / .finish would receive them."""

  def __init__(self):
    super().__init__("wandb")
    self.calls = []

  def init(self, **kwargs):
    self.calls.append(("init", kwargs))
    fake = self

    class Run:
      def log(self, data, step=None):
        fake.calls.append(("log", data, step))

      def finish(self):
        fake.calls.append(("finish",))
    return Run()

  def of(self, kind):
    return [c for c in self.calls if c[0] == kind]


@pytest.fixture
def fake_wandb(monkeypatch):
  fake = FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  return fake


def train_with_wandb(config, fake, workdir, steps):
  """Trains (or resumes) to `steps` with W&B on; returns (init kwargs, [(data, step)], metrics.jsonl records)."""
  config.logging.wandb_project = "moa-tests"
  config.logging.wandb_entity = "team"
  config.train.steps = steps
  config.checkpoint.every = 4
  train.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [c[1] for c in fake.of("init")], [(c[1], c[2]) for c in fake.of("log")], records


def test_training_logs_every_record_to_wandb(debug_config, fake_wandb, tmp_path):
  workdir = str(tmp_path / "run")
  inits, logs, records = train_with_wandb(debug_config, fake_wandb, workdir, 4)
  assert len(inits) == 1 and len(fake_wandb.of("finish")) == 1
  run_id = open(os.path.join(workdir, wandb_log.RUN_ID_FILE)).read().strip()
  assert inits[0]["id"] == run_id and inits[0]["resume"] == "allow"
  assert inits[0]["project"] == "moa-tests" and inits[0]["entity"] == "team"
  assert inits[0]["config"]["model"]["ffn"]["mix"] == "moa"
  assert [step for _, step in logs] == [r["step"] for r in records] == [2, 4]
  for (data, step), record in zip(logs, records):
    assert data == wandb_log.flatten(record)
    assert data["loss"] == record["loss"] and data["lr"] == record["lr"]
    assert data["gates/ffn.mix/layer1/silu"] == record["gates"]["ffn.mix"]["silu"][1]
  assert "eval_loss" in logs[-1][0] and "step" not in logs[-1][0]


@pytest.mark.slow
def test_a_resumed_training_run_continues_its_wandb_run(debug_config, fake_wandb, tmp_path):
  workdir = str(tmp_path / "run")
  train_with_wandb(debug_config, fake_wandb, workdir, 4)
  inits, logs, records = train_with_wandb(debug_config, fake_wandb, workdir, 6)  # resumes from step 4
  assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"]
  assert [step for _, step in logs] == [r["step"] for r in records] == [2, 4, 6]
  assert [data for data, _ in logs] == [wandb_log.flatten(r) for r in records]


def test_resuming_a_workdir_resumes_its_wandb_run_id(fake_wandb, tmp_path):
  c = presets.lm_config("debug", "swiglu")
  c.logging.wandb_project = "moa-tests"
  for _ in range(2):
    metrics.MetricsWriter(str(tmp_path / "run"), 10, 0, True, c).close()
  metrics.MetricsWriter(str(tmp_path / "other"), 10, 0, True, c).close()
  ids = [c[1]["id"] for c in fake_wandb.of("init")]
  assert ids[0] == ids[1] != ids[2]
  assert open(tmp_path / "run" / wandb_log.RUN_ID_FILE).read().strip() == ids[0]


def test_missing_wandb_is_one_line_before_anything_is_written(debug_config, monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  debug_config.logging.wandb_project = "moa-tests"
  with pytest.raises(train.TrainingError, match="logging.wandb_project = 'moa-tests' but the wandb package"):
    train.train(debug_config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_off_by_default_and_only_on_the_main_process(fake_wandb, tmp_path):
  c = presets.lm_config("debug", "swiglu")
  assert c.logging.wandb_project == ""
  record = {"step": 1, "loss": 2.0, "expert_load_max": [0.5, 0.25], "mfu": None}
  w = metrics.MetricsWriter(str(tmp_path / "off"), 10, 0, True, c)
  w.write(record)
  w.close()
  c.logging.wandb_project = "moa-tests"
  w = metrics.MetricsWriter(str(tmp_path / "other_process"), 10, 0, False, c)
  w.write(record)
  w.close()
  assert fake_wandb.calls == []
  w = metrics.MetricsWriter(str(tmp_path / "on"), 10, 0, True, c)
  w.write(record)
  w.close()
  assert fake_wandb.of("log") == [("log", {"loss": 2.0, "expert_load_max/layer0": 0.5,
                                           "expert_load_max/layer1": 0.25}, 1)]
