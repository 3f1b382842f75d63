"""What a run checks before it compiles or writes anything: config values no other module owns, and
whether (and how) to resume the checkpoint in its work directory.

Resuming (README, "Training runs", has the table):
- refused: a different model (any `model.*` field that shapes parameters), or a saved train state of a
  different structure (a changed optimizer: `optim.name`, `optim.clip_norm` on/off, ...). Nothing is
  touched; the differing fields are listed.
- free, with a note: `model.remat`, `model.attention_impl`, `model.ffn.impl`, `model.dtype` (compute only),
  `model.moe.path` / `capacity_factor`, `data.*`, `optim.*` values, `train.seed`, `train.batch_size`,
  `train.seq_len` (the `tokens` column counts on from the tokens stored in the checkpoint), `mesh.*`,
  `loss_weights.*`, and `train.steps` (the learning-rate schedule is rebuilt for the new length).
- `train.resume_step=N`: resume from checkpoint N instead of the newest; the newer ones are moved to
  WORKDIR/checkpoints_superseded/ (kept, not deleted). Checkpoints record the resume_step they descend
  from, so rerunning the same command later resumes the newest one rather than rolling back again.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any, Callable

import jax
from absl import logging

from moa_jax import checkpoint, validate

# Fields that change how a step is computed but not the parameters: never a reason to refuse a resume.
COMPUTE_ONLY = ("model.remat", "model.attention_impl", "model.ffn.impl", "model.dtype", "model.moe.path",
                "model.moe.capacity_factor")
# Prefixes of fields worth a note when they change on resume (the rest, e.g. log cadence, pass silently).
NOTED = ("data.", "optim.", "train.seed", "train.batch_size", "train.seq_len", "train.steps", "mesh.",
         "loss_weights.", *COMPUTE_ONLY)
SILENT = ("data.cache_dir",)
# Data fields that make another tokenizer (a BPE is trained on the source's training text): a resume
# under another one would read the embeddings by other ids. The first only, when a tokenizer file is given.
TOKENIZER = ("data.tokenizer", "data.source", "data.text_field", "data.max_bytes", "data.val_percent")
# What a run writes in its directory, and whether it is a directory.
WORKDIR_ENTRIES = {"checkpoints": True, "tb": True, "metrics.jsonl": False, "config.json": False, "lock": False}


class StartupError(RuntimeError):
  """The run must not start; the message names the value and the fix."""


def check_config(config) -> None:
  """Values that would otherwise fail late (a division by zero, a slow compile, an empty loop)."""
  t = config.train
  for name in ("seq_len", "log_every", "eval_batches", "batch_size"):
    if t[name] < 1:
      raise StartupError(f"train.{name} = {t[name]}; must be ≥ 1")
  for name in ("eval_every", "sample_every"):
    if t[name] < 0:
      raise StartupError(f"train.{name} = {t[name]}; must be ≥ 0 (0: never)")
  if config.checkpoint.keep < 1:
    raise StartupError(f"checkpoint.keep = {config.checkpoint.keep}; must be ≥ 1: the newest `keep` checkpoints "
                       "are kept (the final one always)")
  if config.checkpoint.every < 0:
    raise StartupError(f"checkpoint.every = {config.checkpoint.every}; must be ≥ 0 (0: only at the end)")
  if t.get("resume_step", 0) < 0:
    raise StartupError(f"train.resume_step = {t.resume_step}; must be ≥ 0 (0: the newest checkpoint)")
  validate.check_ranges(config)
  platform = jax.devices()[0].platform
  if platform == "cpu" and "float16" in (config.model.dtype, config.model.param_dtype):
    field = "model.dtype" if config.model.dtype == "float16" else "model.param_dtype"
    raise StartupError(f"{field} = 'float16' is not supported on CPU (XLA:CPU has no fast float16 and "
                       "training in it overflows); use float32 or bfloat16")


def check_object_store(**paths: str) -> None:
  """A gs:// path needs gcsfs (etils reads and writes object stores through it): say so before anything runs."""
  remote = [f"{name}={value}" for name, value in paths.items() if str(value or "").startswith("gs://")]
  if remote and importlib.util.find_spec("gcsfs") is None:
    raise StartupError(f"{', '.join(remote)} is on Google Cloud Storage, which needs gcsfs; install it with "
                       f"pip install -e \".[gcs]\" (or \".[tpu]\" on a TPU VM)")


def check_workdir(workdir: str) -> None:
  """A work directory whose files a run could not use (a file where a directory belongs, or the other
  way round; a metrics.jsonl that is not text) is refused before anything in it is written."""
  if "://" in workdir or not os.path.exists(workdir):
    return
  if not os.path.isdir(workdir):
    raise StartupError(f"--workdir={workdir} is a file, not a directory; give a directory (new or a run's)")
  for name, is_dir in WORKDIR_ENTRIES.items():
    path = os.path.join(workdir, name)
    if os.path.exists(path) and os.path.isdir(path) != is_dir:
      found, wanted = ("a directory", "file") if os.path.isdir(path) else ("a file", "directory")
      raise StartupError(f"{path} is {found} where the run keeps its {name} {wanted}; move it aside (nothing "
                         "else in the work directory was changed)")
  metrics = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics):
    try:
      with open(metrics, encoding="utf-8") as f:
        for _ in f:
          pass
    except UnicodeDecodeError as e:
      raise StartupError(f"{metrics} is not text (a byte at offset {e.start} is not UTF-8): not a record this code "
                         "wrote; move it aside, then rerun (a new metrics.jsonl is started)") from None


def _flat(config: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in config.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """(field, saved value, current value) for every field that differs (JSON-normalised)."""
  a, b = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(current)))
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _fmt(change) -> str:
  field, a, b = change
  return f"{field}: {a!r} in the checkpoint, {b!r} now"


def _is_model(field: str) -> bool:
  return field.startswith("model.") and field not in COMPUTE_ONLY


@dataclasses.dataclass
class Resumed:
  state: Any                      # the train state to start from
  step: int                       # its step (0: a fresh start)
  meta: dict | None               # the checkpoint's metadata (None: fresh)
  notes: list[str]                # one line each, for the user
  supersede: list[int]            # newer checkpoints to move aside once the run really starts


def resume(run, ckpt: checkpoint.Checkpoints, data_iter, init_state: Callable) -> Resumed:
  """Restores the checkpoint to resume from, or inits; raises StartupError for a refused resume, in which
  case nothing in the work directory has been changed. Unreadable checkpoints (truncated, bit-flipped)
  are set aside to WORKDIR/checkpoints_unreadable/ with a warning and an older one is tried."""
  config = run.config
  current = json.loads(config.to_json_best_effort())
  wanted = config.train.get("resume_step", 0)
  steps = ckpt.all_steps()
  candidates, supersede = steps, []
  if wanted and not steps:
    raise StartupError(f"train.resume_step = {wanted}, but {ckpt.directory} holds no checkpoint; "
                       "drop --config.train.resume_step to start afresh")
  if wanted and wanted != steps[0]:
    newest_meta = _meta_or_none(ckpt, steps[0])
    if not (newest_meta and newest_meta.get("resume_step") == wanted):  # not already rolled back to it
      if wanted not in steps:
        raise StartupError(f"train.resume_step = {wanted}: no checkpoint at that step in {ckpt.directory}; "
                           f"saved steps: {sorted(steps)}")
      candidates, supersede = [wanted], [s for s in steps if s > wanted]
  expected = checkpoint.structure(run.abstract_state)
  for step in candidates:
    try:
      meta = ckpt.read_meta(step)
    except Exception as e:  # a truncated or corrupted checkpoint: fall back to an older one
      _set_aside(ckpt, step, e)
      continue
    diff = changes(meta["config"], current)
    known = _flat(json.loads(json.dumps(meta["config"])))  # fields added to the code since are not refused
    model = [d for d in diff if _is_model(d[0]) and d[0] in known]
    if model:
      raise StartupError(f"{ckpt.directory} holds a checkpoint (step {step}) of a different model:\n  "
                         + "\n  ".join(map(_fmt, model)) + "\nuse a new --workdir, or the checkpoint's model config")
    _check_tokenizer(diff, known, config, ckpt, step)
    if meta.get("structure", expected) != expected:
      optim = [d for d in diff if d[0].startswith("optim.")] or diff
      raise StartupError(f"{ckpt.directory} holds a checkpoint (step {step}) whose optimizer state has another "
                         "structure than this config's:\n  " + "\n  ".join(map(_fmt, optim))
                         + "\nuse a new --workdir, or the checkpoint's optimizer config")
    try:
      state, data_state = ckpt.restore(step, run.abstract_state, meta.get("checksums"))
    except Exception as e:
      optim = [d for d in diff if d[0].startswith("optim.")]
      if "structure" not in meta and optim:  # an older checkpoint: a changed optimizer is the likely cause
        raise StartupError(f"{ckpt.directory} (step {step}) cannot be restored under the changed optimizer "
                           "config:\n  " + "\n  ".join(map(_fmt, optim))
                           + "\nuse a new --workdir, or the checkpoint's optimizer config") from e
      _set_aside(ckpt, step, e)
      continue
    data_iter.set_state(data_state)
    notes = _notes(diff, meta, config, step)
    return Resumed(state, step, meta, notes, supersede)
  if supersede:  # the asked-for checkpoint was unreadable: do not start afresh under newer ones
    raise StartupError(f"train.resume_step = {wanted}: that checkpoint is unreadable (moved to "
                       f"checkpoints_unreadable/); choose another of {sorted(supersede)}")
  return Resumed(init_state(run), 0, None, [], [])


def _check_tokenizer(diff, known: dict, config, ckpt, step: int) -> None:
  """Refuses a resume under another tokenizer unless train.allow_new_tokenizer says so."""
  given = known.get("data.tokenizer") and config.data.get("tokenizer")  # a tokenizer file, then and now
  fields = TOKENIZER[:1] if given else TOKENIZER
  changed = [d for d in diff if d[0] in fields and d[0] in known]
  if changed and not config.train.get("allow_new_tokenizer", False):
    raise StartupError(f"{ckpt.directory} holds a checkpoint (step {step}) trained with another tokenizer:\n  "
                       + "\n  ".join(map(_fmt, changed)) + "\nits embeddings belong to that tokenizer's ids; use "
                       "the checkpoint's data config, a new --workdir, or --config.train.allow_new_tokenizer=true "
                       "to go on under the new one")


def _meta_or_none(ckpt, step):
  try:
    return ckpt.read_meta(step)
  except Exception:
    return None


def _set_aside(ckpt: checkpoint.Checkpoints, step: int, error: Exception) -> None:
  where = ckpt.set_aside(step)
  logging.warning("checkpoint step %d in %s is unreadable (%s: %s); moved it to %s and trying an older one",
                  step, ckpt.directory, type(error).__name__, str(error)[:200], where)


def tokens_at(meta: dict | None, step: int) -> int:
  """Tokens consumed up to `step` of a checkpoint (stored since tokens were; else step × its shape)."""
  if meta is None:
    return 0
  if "tokens" in meta:
    return int(meta["tokens"])
  t = meta["config"]["train"]
  return step * t["batch_size"] * t["seq_len"]


def _notes(diff, meta: dict, config, step: int) -> list[str]:
  known = _flat(json.loads(json.dumps(meta["config"])))
  noted = [d for d in diff if (d[0].startswith(NOTED) or d[0] not in known) and d[0] not in SILENT]
  notes = []
  shape = [d for d in noted if d[0] in ("train.batch_size", "train.seq_len")]
  if shape:
    notes.append(f"note: {', '.join(f'{f} {a} -> {b}' for f, a, b in shape)} since the checkpoint: tokens count "
                 f"on from the {tokens_at(meta, step):,} consumed by step {step}, "
                 f"{config.train.batch_size * config.train.seq_len:,} per step from now on")
  steps = [d for d in noted if d[0] == "train.steps"]
  if steps and steps[0][2] > step:
    notes.append(f"note: train.steps {steps[0][1]} -> {steps[0][2]}: the learning-rate schedule is rebuilt for "
                 f"{steps[0][2]} steps, so the learning rate from step {step} on follows the new schedule")
  rest = [d for d in noted if d[0] not in ("train.batch_size", "train.seq_len", "train.steps")]
  if rest:
    notes.append("note: resuming with changed settings: " + "; ".join(f"{f} {a!r} -> {b!r}" for f, a, b in rest))
  return notes
