"""Shared fixtures: one prepared debug corpus per test session (a 2 MB slice of the stdlib)."""

import os

import jax
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


@pytest.fixture(autouse=True, scope="session")
def _compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the session's own process: many cases compile the same
  debug-model programs, and a cached executable is the one XLA would build again. Subprocesses keep their
  own settings (the study CLI's cache is under test)."""
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
