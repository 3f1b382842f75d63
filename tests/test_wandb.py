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


def test_training_logs_every_record_and_a_resumed_run_keeps_its_run_id(debug_config, fake_wandb, tmp_path):
  workdir = str(tmp_path / "run")
  c = debug_config
  c.logging.wandb_project = "moa-tests"
  c.logging.wandb_entity = "team"
  c.train.steps = 4
  c.checkpoint.every = 4
  train.train(c, workdir)
  c.train.steps = 6
  train.train(c, workdir)  # resumes from step 4

  inits = fake_wandb.of("init")
  assert len(inits) == 2 and len(fake_wandb.of("finish")) == 2
  run_id = open(os.path.join(workdir, wandb_log.RUN_ID_FILE)).read().strip()
  for _, kwargs in inits:
    assert kwargs["id"] == run_id and kwargs["resume"] == "allow"
    assert kwargs["project"] == "moa-tests" and kwargs["entity"] == "team"
    assert kwargs["config"]["model"]["ffn"]["mix"] == "moa"
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  logs = fake_wandb.of("log")
  assert [step for _, _, step in logs] == [r["step"] for r in records] == [2, 4, 6]
  for (_, data, step), record in zip(logs, records):
    assert data == wandb_log.flatten(record)
    assert data["loss"] == record["loss"] and data["lr"] == record["lr"]
    layer1 = record["gates"]["ffn.mix"]["silu"][1]
    assert data["gates/ffn.mix/layer1/silu"] == layer1
  assert "eval_loss" in logs[-1][1] and "step" not in logs[-1][1]


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
