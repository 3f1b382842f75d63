"""Shared fixtures: one prepared debug corpus per test session (a 2 MB slice of the stdlib)."""

import os

import pytest

from moa_jax import presets


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("moa_cache"))


@pytest.fixture
def debug_config(data_cache):
  """configs/debug.py, shortened: a few steps, frequent logs and checkpoints, shared data cache."""
  c = presets.lm_config(size="debug", ffn="bimoa")
  c.data.cache_dir = data_cache
  c.data.max_bytes = 400_000
  c.train.steps = 12
  c.train.log_every = 2
  c.train.eval_every = 6
  c.train.eval_batches = 2
  c.train.sample_every = 0
  c.checkpoint.every = 4
  return c


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
