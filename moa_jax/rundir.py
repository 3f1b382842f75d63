"""Opening a run directory written by `moa_jax.train`: its metric records, its config, its checkpoints.

    records(workdir)          -> [{step, tokens, loss, ..., eval_loss?, gates?}, ...]  (metrics.jsonl)
    load_config(workdir)      -> the run's ml_collections.ConfigDict                    (config.json)
    restore(workdir, step)    -> (train.Run, params, step)       newest checkpoint unless `step` is given

`records` gives one record per step, in step order, the newest winning (a run restarted over an earlier
one's records appends a restart marker: metrics.parse_records). `restore` builds the model from the
config stored in the checkpoint itself, not config.json, so it restores what was saved.
"""

from __future__ import annotations

import json
import os

import ml_collections

from moa_jax import checkpoint, train
from moa_jax.metrics import parse_records


class RunDirError(RuntimeError):
  """A run directory that lacks what was asked of it; the message names the file and the fix."""


def records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise RunDirError(f"{path} does not exist; is {workdir!r} a run directory (python -m moa_jax.train "
                      f"--workdir=...)?")
  with open(path) as f:
    return parse_records(f)


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
  """Builds the run from the config saved in the checkpoint and restores its parameters (verified
  against the checksums saved with them). The mesh is reset to data parallelism over this machine's
  devices: the checkpoint may come from a larger one.

  Returns (run, params, step): run is `train.Run` (.model, .data.tokenizer, ...).
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise RunDirError(f"{directory} does not exist; is {workdir!r} a run directory (python -m moa_jax.train "
                      f"--workdir=...)?")
  ckpt = checkpoint.Checkpoints(workdir, 0, 1)
  try:
    saved = sorted(ckpt.all_steps())  # complete ones only
    if not saved:
      raise RunDirError(f"{ckpt.directory} holds no checkpoint; train first (python -m moa_jax.train ...)")
    if step is None:
      step = saved[-1]
    elif step not in saved:
      raise RunDirError(f"no checkpoint at step {step} in {ckpt.directory}; saved steps: {saved}")
    try:
      meta = ckpt.read_meta(step)
    except Exception as e:
      raise RunDirError(f"{ckpt.directory}/{step} is unreadable ({type(e).__name__}); try another --step "
                        f"of {saved}") from None
    config = ml_collections.ConfigDict(_tuples(meta["config"]))
    config.mesh.update(data=-1, fsdp=1, tensor=1, expert=1)
    run = train.build(config)
    try:
      state, _ = ckpt.restore(step, run.abstract_state, meta.get("checksums"))
    except checkpoint.CorruptCheckpoint as e:
      raise RunDirError(f"{ckpt.directory}/{step} is corrupted ({e}); try another --step of {saved}") from None
  finally:
    ckpt.close()
  return run, state.params, step
