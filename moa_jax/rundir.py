"""Opening a run directory written by `moa_jax.train`: its metric records, its config, its checkpoints.

    records(workdir)          -> [{step, tokens, loss, ..., eval_loss?, gates?}, ...]  (metrics.jsonl)
    load_config(workdir)      -> the run's ml_collections.ConfigDict                    (config.json)
    restore(workdir, step)    -> (train.Run, params, step)       newest checkpoint unless `step` is given
"""

from __future__ import annotations

import json
import os

import ml_collections


class RunDirError(RuntimeError):
  """A run directory that lacks what was asked of it; the message names the file and the fix."""


def records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise RunDirError(f"{path} does not exist; is {workdir!r} a run directory (python -m moa_jax.train "
                      f"--workdir=...)?")
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:  # a line cut short by a crash mid-write
        continue
  return out


def _tuples(value):
  """JSON has no tuples: config fields saved as tuples (ffn.activations) come back as lists."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise RunDirError(f"{path} does not exist; is {workdir!r} a run directory (python -m moa_jax.train "
                      f"--workdir=...)?")
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def restore(workdir: str, step: int | None = None):
  """Builds the run from its config and restores a checkpoint's parameters.

  Returns (run, params, step): run is `train.Run` (.model, .data.tokenizer, ...).
  """
  from moa_jax import checkpoint, train  # train imports sample, whose CLI imports this module

  config = load_config(workdir)
  run = train.build(config)
  ckpt = checkpoint.Checkpoints(workdir, config.checkpoint.every, config.checkpoint.keep)
  try:
    latest = ckpt.latest_step()
    if latest is None:
      raise RunDirError(f"{ckpt.directory} holds no checkpoint; train first (python -m moa_jax.train ...)")
    saved = sorted(int(d) for d in os.listdir(ckpt.directory) if d.isdigit())  # complete ones only
    if step is None:
      step = latest
    elif step not in saved:
      raise RunDirError(f"no checkpoint at step {step} in {ckpt.directory}; saved steps: {saved}")
    state, _ = ckpt.restore(step, run.abstract_state)
  finally:
    ckpt.close()
  return run, state.params, step
