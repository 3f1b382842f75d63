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
import sys

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
  if not os.path.isfile(path):
    raise RunDirError(f"{path} is not a file; move it aside (a run directory holds metrics.jsonl as a file)")
  with open(path, errors="replace") as f:  # a damaged line is skipped, not a decoding error
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

  Without `step`, the newest checkpoint that restores: one that is truncated, corrupted, or deleted
  underneath by a live run's `checkpoint.keep` is passed over (with a note) for the next newest, as
  training does; nothing is moved (the run may be live). With `step`, that one or an error.

  Returns (run, params, step): run is `train.Run` (.model, .data.tokenizer, ...).
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    state = "is not a directory" if os.path.exists(directory) else "does not exist"
    raise RunDirError(f"{directory} {state}; is {workdir!r} a run directory (python -m moa_jax.train "
                      f"--workdir=...)?")
  ckpt = checkpoint.Checkpoints(workdir, 0, 1)
  try:
    saved = ckpt.all_steps()  # complete ones only, newest first
    if not saved:
      raise RunDirError(f"{ckpt.directory} holds no checkpoint; train first (python -m moa_jax.train ...)")
    if step is not None and step not in saved:
      raise RunDirError(f"no checkpoint at step {step} in {ckpt.directory}; saved steps: {sorted(saved)}")
    run, run_config, failures = None, None, []
    for candidate in [step] if step is not None else saved:
      try:
        meta = ckpt.read_meta(candidate)
      except Exception as e:  # truncated, or deleted underneath by a live run
        failures.append(_failure(candidate, e))
        continue
      if meta["config"] != run_config:
        run_config = meta["config"]
        config = ml_collections.ConfigDict(_tuples(run_config))
        config.mesh.update(data=-1, fsdp=1, tensor=1, expert=1)
        run = train.build(config)
      try:
        state, _ = ckpt.restore(candidate, run.abstract_state, meta.get("checksums"))
      except Exception as e:  # truncated, corrupted, or deleted underneath by a live run
        failures.append(_failure(candidate, e))
        continue
      if failures:
        print(f"note: passed over unreadable checkpoints in {ckpt.directory} ({'; '.join(failures)}); using "
              f"step {candidate} (--step chooses one)", file=sys.stderr)
      return run, state.params, candidate
    raise RunDirError(f"no readable checkpoint in {ckpt.directory} ({'; '.join(failures)}); "
                      + (f"try another --step of {sorted(saved)}" if step is not None else
                         "train again, or restore a copy"))
  finally:
    ckpt.close()


def _failure(step: int, error: Exception) -> str:
  text = str(error).splitlines()[0][:160] if str(error) else ""
  return f"step {step}: {type(error).__name__}{': ' + text if text else ''}"
