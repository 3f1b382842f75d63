"""The training loop's periodic actions, each on its own (the whole loop: tests/test_train.py, test_faults.py)."""

import ml_collections
import numpy as np
import pytest

from moa_jax import actions, profiling
from moa_jax.errors import TrainingError
from moa_jax.health import Health


class FakeCheckpoints:
  directory = "/runs/x/checkpoints"

  def __init__(self, latest=None, every=4):
    self.latest, self.every, self.saved = latest, every, []

  def latest_step(self):
    return self.latest

  def due(self, step):
    return step % self.every == 0

  def save(self, step, state, data_state, meta):
    self.saved.append((step, meta))


class FakeIterator:
  def get_state(self):
    return {"position": 3}


CONFIG = ml_collections.ConfigDict({"name": "fake", "train": {"steps": 10, "resume_step": 0}})


def metrics(loss, norm=1.0):
  return {"loss": np.float32(loss), "param_norm": np.float32(norm), "intermediates": {}}


@pytest.mark.parametrize("n, step, last, due", [(5, 10, 20, True), (5, 11, 20, False), (0, 7, 20, False),
                                                (0, 20, 20, True), (3, 20, 20, True)])
def test_every(n, step, last, due):
  assert actions.every(n, step, last) is due


def test_window_flags_a_spike_then_clears_it():
  said = []
  window = actions.Window(Health(), FakeCheckpoints(latest=4), said.append)
  for loss in (3.0, 3.0, 3.0, 3.0, 9.0):
    window.add(metrics(loss))
  fetched, _ = window.flush(step=9)
  assert [float(m["loss"]) for m in fetched] == [3.0, 3.0, 3.0, 3.0, 9.0]
  assert window.spike == (9, window.spike[1]) and "warning: step 9" in said[0]
  assert not window.fit_to_save(9, final=False)
  with pytest.raises(TrainingError, match="step 9 is not fit to save.*step 4 in /runs/x/checkpoints"):
    window.fit_to_save(9, final=True)
  window.add(metrics(3.1))
  window.flush(step=10)
  assert window.spike is None and window.fit_to_save(10, final=True)


def test_window_stops_on_a_non_finite_loss_naming_the_last_good_checkpoint():
  window = actions.Window(Health(), FakeCheckpoints(latest=None), print)
  window.add(metrics(2.0))
  window.add(metrics(float("nan")))
  with pytest.raises(TrainingError, match="loss is nan at step 6.*none in /runs/x/checkpoints"):
    window.flush(step=6)


def test_saver_saves_when_due_and_fit_and_moves_the_last_good_step():
  ckpt = FakeCheckpoints(latest=None, every=4)
  window = actions.Window(Health(), ckpt, print)
  save = actions.Saver(ckpt, FakeIterator(), CONFIG, profiling.StepTimer(), window)
  assert [s for s in range(1, 11) if save.due(s)] == [4, 8, 10]
  state = {"w": np.ones(3, np.float32)}
  save(4, state, tokens=400, final=False)
  step, meta = ckpt.saved[0]
  assert step == 4 and meta["tokens"] == 400 and meta["config"]["name"] == "fake" and window.last_good == 4
  window.spike = (6, "loss exploded")
  save(8, state, tokens=800, final=False)  # held back, not an error
  assert len(ckpt.saved) == 1 and window.last_good == 4


def test_sampler_cadence():
  class Run:
    class config:
      class train:
        sample_every = 50
  sampler = actions.Sampler(Run, profiling.StepTimer(), print)
  assert [s for s in range(1, 201) if sampler.due(s)] == [50, 100, 150, 200]
  Run.config.train.sample_every = 0
  assert not any(sampler.due(s) for s in range(1, 201))
