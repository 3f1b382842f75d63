"""Profiler traces, the step-time breakdown and device memory in metrics.jsonl (moa_jax/profiling.py).

Two debug runs share the work: one plain, one with a 2-step trace and an input pipeline slowed by a
sleep in every `next()`; neither the trace nor the sleep may change a loss.
"""

import glob
import gzip
import json
import os
import time

import jax.numpy as jnp
import pytest

from moa_jax import presets, profiling, train
from moa_jax.data import pipeline

DELAY = 0.3  # seconds the slowed pipeline sleeps per batch


def _config(data_cache):
  c = presets.lm_config(size="debug", ffn="bimoa")
  c.data.cache_dir = data_cache
  c.data.max_bytes = 400_000
  c.train.steps = 8
  c.train.log_every = 4
  c.train.eval_every = 0
  c.train.eval_batches = 1
  c.train.sample_every = 0
  c.checkpoint.every = 4
  return c


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


class _SlowIterator:
  """The real iterator (and its checkpointable state), sleeping before every batch."""

  def __init__(self, inner):
    self._inner = inner

  def __iter__(self):
    return self

  def __next__(self):
    time.sleep(DELAY)
    return next(self._inner)

  def __getattr__(self, name):
    return getattr(self._inner, name)


@pytest.fixture(scope="module")
def runs(data_cache, tmp_path_factory):
  """{'plain': records, 'traced': records, 'traced_dir': workdir, 'said': printed lines}."""
  root = tmp_path_factory.mktemp("profiling")
  plain = str(root / "plain")
  train.train(_config(data_cache), plain)

  traced = str(root / "traced")
  config = _config(data_cache)
  config.train.profile_steps = (2, 2)
  said = []
  real_iter = pipeline.Data.train_iter
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(pipeline.Data, "train_iter", lambda self: _SlowIterator(real_iter(self)))
    mp.setattr(train.MetricsWriter, "print", lambda self, text: said.append(text))
    train.train(config, traced)
  return {"plain": _records(plain), "traced": _records(traced), "traced_dir": traced, "said": said}


def test_profile_of_two_steps_writes_a_trace_and_says_where(runs):
  traces = glob.glob(os.path.join(runs["traced_dir"], "profile", "plugins", "profile", "*", "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  with gzip.open(os.path.join(os.path.dirname(traces[0]), "perfetto_trace.json.gz")) as f:
    events = json.load(f)["traceEvents"]
  steps = [e["args"]["step_num"] for e in events if e.get("name") == "train"]  # StepTraceAnnotation
  assert steps == ["2", "3"]
  line = [s for s in runs["said"] if s.startswith("profile of steps")]
  assert line == [line[0]] and "steps 2-3" in line[0] and os.path.dirname(traces[0]) in line[0]
  assert f"xprof --logdir {os.path.join(runs['traced_dir'], 'profile')}" in line[0]


def test_breakdown_and_memory_keys_are_present_and_non_negative(runs):
  for rec in runs["plain"]:
    for key in ("data_wait_sec", "step_sec", "checkpoint_sec"):
      assert rec[key] >= 0, (key, rec)
    assert rec["checkpoint_sec"] > 0  # checkpoint.every = log_every: each window saved once
    for key in ("memory_in_use_gib", "memory_peak_gib"):  # null where the backend keeps no statistics
      assert key in rec and (rec[key] is None or rec[key] > 0), (key, rec)
  first, *rest = runs["plain"]
  assert first["memory_estimate_gib"] > 0 and all("memory_estimate_gib" not in r for r in rest)


def test_data_wait_rises_when_the_pipeline_is_slow(runs):
  for plain, slow in zip(runs["plain"], runs["traced"]):
    assert slow["data_wait_sec"] >= DELAY > plain["data_wait_sec"] + DELAY / 2, (plain, slow)


def test_profiling_and_a_slow_pipeline_do_not_change_losses(runs):
  assert [(r["step"], r["loss"]) for r in runs["traced"]] == [(r["step"], r["loss"]) for r in runs["plain"]]


def test_step_timer_splits_a_window_into_data_step_and_checkpoint_time():
  begin = time.perf_counter()
  timer = profiling.StepTimer()
  slow_step = lambda state, batch: (time.sleep(0.05), (state + 1, batch))[1]
  state = jnp.zeros(())
  for timed in (False, True):
    with timer.data():
      time.sleep(0.1)
    state, _ = timer.step(slow_step, state, jnp.ones(()), timed=timed)
  with timer.checkpoint():
    time.sleep(0.1)
  rec, train_sec = timer.record(), timer.train_sec()
  assert rec["data_wait_sec"] == pytest.approx(0.1, abs=0.05)  # per step: 2 × 0.1 s over 2 steps
  assert 0.05 <= rec["step_sec"] < 0.05 + 0.1  # the timed step alone, not its data wait
  assert rec["checkpoint_sec"] >= 0.1 and train_sec <= time.perf_counter() - begin - 0.1
  timer.restart()
  assert timer.record() == {"data_wait_sec": 0.0, "step_sec": None, "checkpoint_sec": 0.0}


@pytest.mark.slow  # a second compile: ~40 s on 2 busy cores
def test_compile_only_states_the_first_records_memory_estimate(data_cache, runs):
  mem = train.compile_only(_config(data_cache))
  assert mem["total"] / profiling.GIB == pytest.approx(runs["plain"][0]["memory_estimate_gib"], rel=1e-6)
  assert "memory_estimate_gib" in train.format_memory(_config(data_cache), mem)


@pytest.mark.parametrize("field, value, fragment", [
    ("profile_steps", (3,), "must be (start, count)"),
    ("profile_steps", (0, 2), "must be (start, count)"),
    ("profile_steps", (7, 5), "traces past train.steps = 8"),
    ("profile_processes", (1,), "process indices in [0, 1)"),
])
def test_bad_profile_fields_stop_before_anything_is_built(data_cache, tmp_path, field, value, fragment):
  config = _config(data_cache)
  config.train[field] = value
  with pytest.raises(train.TrainingError) as err:
    train.train(config, str(tmp_path / "run"))
  assert fragment in str(err.value) and "\n" not in str(err.value)
  assert not os.path.exists(tmp_path / "run")
