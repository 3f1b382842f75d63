"""Ablation studies: arms × sizes × learning-rate multipliers × seeds, run one at a time, then a report.

    python -m moa_jax.study experiments/mixing_variants.py --workdir=runs/mixing
    python -m moa_jax.study experiments/gate_nonlinearity.py --workdir=/tmp/g --study.sizes=debug --study.steps=300 \
        --study.seeds=0,1 --config.train.batch_size=8 --config.train.seq_len=64
    python -m moa_jax.study experiments/lr_sensitivity.py --workdir=runs/lr --report_only --out=reports/lr

The report (WORKDIR/report.md, or --out=DIR) tabulates each arm's final eval loss (mean ± 95% CI over
seeds) and its paired difference from the baseline arm, and draws loss curves, the paired differences,
LR-sensitivity curves, a scaling fit and gate heatmaps as they apply (moa_jax/report.py).

A study file defines `get_study() -> Study`. Each run is `presets.lm_config(size, arm.ffn)` with the
study's overrides, then the arm's, then steps, lr × multiplier and `train.seed = seed`. `train.seed`
drives both the init and the data order, so seed s gives every arm the same batches in the same
order: the report pairs arms seed by seed. Runs live in WORKDIR/runs/<size>-<arm>-lr<m>x-s<seed>/
(ordinary `moa_jax.train` run directories). Rerunning skips finished runs and resumes unfinished ones
from their checkpoints; a run that diverges (NaN loss) is recorded in its failed.json and reported.

The CLI keeps JAX's persistent compilation cache in WORKDIR/jax_cache (--compilation_cache=off to
disable): the seeds of an arm compile the same programs, so only the first compiles.

Flags: `--study.FIELD=VALUE` replaces a Study field (sizes, seeds, steps, tokens_per_param,
lr_multipliers, arms — a subset of arm names —, baseline, name); `--config.PATH=VALUE` overrides a
config field in every run (`--config.data.cache_dir=/tmp/cache`). Lists are comma-separated.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import os
import shlex
import sys
from typing import Any, Mapping

import ml_collections

from moa_jax import checkpoint, presets, report, rundir


# The run shape the quickstart-size studies pin (rather than take from the preset, which may change):
# 2000 steps × 16 × 256 = 8.2M tokens, about one pass over the stdlib corpus; eval on 32 × 16 × 256 =
# 131k held-out tokens.
QUICKSTART_ONE_PASS = {"train.batch_size": 16, "train.seq_len": 256, "data.max_bytes": 0,
                       "train.eval_every": 500, "train.eval_batches": 32, "train.sample_every": 0,
                       "checkpoint.every": 1000}


class StudyError(ValueError):
  """A study that cannot run as written; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: an FFN preset (presets.FFN_PRESETS) and config overrides {"model.ffn.gate": "softmax"}."""
  ffn: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  arms: Mapping[str, Arm | tuple | str]   # arm name -> Arm, (ffn, {path: value}) or ffn
  baseline: str                           # the arm every other arm is compared with, seed by seed
  sizes: tuple[str, ...] = ("quickstart",)  # presets.SIZES; each arm runs at each size
  seeds: tuple[int, ...] = (0, 1, 2)      # train.seed: init and data order
  steps: int = 0                          # optimizer steps per run; 0: the size preset's train.steps
  tokens_per_param: float = 0.0           # > 0: steps = ceil(this × parameters / tokens per step)
  lr_multipliers: tuple[float, ...] = (1.0,)  # each arm at these multiples of its base optim.lr
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # every run (arms' win)
  description: str = ""                   # the report's preamble (default: the file's docstring)

  def __post_init__(self):
    arms = {name: _arm(name, a) for name, a in self.arms.items()}
    object.__setattr__(self, "arms", arms)
    for field in ("sizes", "seeds", "lr_multipliers"):
      object.__setattr__(self, field, tuple(getattr(self, field)))
    if self.baseline not in arms:
      raise StudyError(f"study {self.name!r}: baseline = {self.baseline!r} is not an arm; arms: {', '.join(arms)}")
    for size in self.sizes:
      if size not in presets.SIZES:
        raise StudyError(f"study {self.name!r}: size {size!r}; known: {', '.join(presets.SIZES)}")
    if not self.sizes or not self.seeds or not self.lr_multipliers:
      raise StudyError(f"study {self.name!r}: sizes, seeds and lr_multipliers must each be non-empty")
    if len(set(self.seeds)) < len(self.seeds):
      raise StudyError(f"study {self.name!r}: seeds {self.seeds} repeat a seed")
    if any(m <= 0 for m in self.lr_multipliers):
      raise StudyError(f"study {self.name!r}: lr_multipliers {self.lr_multipliers} must be positive")
    if self.steps and self.tokens_per_param:
      raise StudyError(f"study {self.name!r}: set steps or tokens_per_param, not both")


def _arm(name: str, arm) -> Arm:
  if isinstance(arm, str):
    arm = Arm(arm)
  elif isinstance(arm, tuple):
    arm = Arm(*arm)
  if arm.ffn not in presets.FFN_PRESETS:
    raise StudyError(f"arm {name!r}: ffn = {arm.ffn!r}; known: {', '.join(presets.FFN_PRESETS)}")
  return arm


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Sets dotted paths ("model.ffn.gate") in place; an unknown path is an error, not a new field."""
  for path, value in overrides.items():
    node, keys = config, path.split(".")
    for i, key in enumerate(keys):
      if not isinstance(node, ml_collections.ConfigDict) or key not in node:
        where = ".".join(keys[:i]) or "the config"
        known = ", ".join(node.keys()) if isinstance(node, ml_collections.ConfigDict) else "(not a group)"
        raise StudyError(f"override {path!r}: {where} has no field {key!r}; known: {known}")
      if i < len(keys) - 1:
        node = node[key]
    node[keys[-1]] = tuple(value) if isinstance(value, list) else value


def _steps(study: Study, config) -> int:
  if study.steps:
    return study.steps
  if not study.tokens_per_param:
    return config.train.steps
  params = _params_without_mixing(config.model.to_json_best_effort(sort_keys=True))
  return math.ceil(study.tokens_per_param * params / (config.train.batch_size * config.train.seq_len))


@functools.lru_cache(maxsize=None)
def _params_without_mixing(model_json: str) -> int:
  """All parameters (embeddings included, as in Chinchilla's counts) but the LA/MoA mixing ones, so
  every FFN variant of one size trains on the same number of tokens. Counted abstractly (eval_shape)."""
  from moa_jax import summary
  from moa_jax.transformer import model_spec
  s = summary.summarize(model_spec(ml_collections.ConfigDict(json.loads(model_json))), 8)
  return s["total_params"] - s["mix_params"]


def run_name(size: str, arm: str, lr_multiplier: float, seed: int) -> str:
  return f"{size}-{arm}-lr{lr_multiplier:g}x-s{seed}"


def run_config(study: Study, size: str, arm: str, lr_multiplier: float, seed: int) -> ml_collections.ConfigDict:
  spec = study.arms[arm]
  c = presets.lm_config(size, spec.ffn)
  apply_overrides(c, study.overrides)
  apply_overrides(c, spec.overrides)
  c.name = f"{study.name}/{run_name(size, arm, lr_multiplier, seed)}"
  c.train.steps = _steps(study, c)
  c.optim.lr = c.optim.lr * lr_multiplier
  c.train.seed = seed
  return c


def plan(study: Study, workdir: str) -> list[tuple[report.RunRef, ml_collections.ConfigDict]]:
  """Every run of the study in order (size, arm, lr multiplier, seed), with its config."""
  out = []
  for size in study.sizes:
    for arm in study.arms:
      for m in study.lr_multipliers:
        for seed in study.seeds:
          ref = report.RunRef(size, arm, m, seed, os.path.join(workdir, "runs", run_name(size, arm, m, seed)))
          out.append((ref, run_config(study, size, arm, m, seed)))
  return out


def _check_same_run(ref: report.RunRef, config) -> None:
  """A run directory reused by a changed study would mix two experiments: refuse, listing the changes."""
  if not os.path.exists(os.path.join(ref.workdir, "config.json")):
    return
  saved = rundir.load_config(ref.workdir).to_dict()
  current = json.loads(config.to_json_best_effort())
  for c in (saved, current):
    c.get("data", {}).pop("cache_dir", None)
  diff = checkpoint.config_diff(saved, current, prefix="config")
  if diff:
    raise StudyError(f"{ref.workdir} holds a run of a different config:\n  " + "\n  ".join(diff)
                     + "\nuse a new --workdir for the changed study, or delete that run directory")


def run_study(study: Study, workdir: str, *, out_dir: str | None = None, command: str = "",
              report_only: bool = False) -> str:
  """Trains every unfinished run (one at a time, in this process), then writes the report.

  Returns the report's path (out_dir/report.md; out_dir defaults to workdir).
  """
  from moa_jax import train

  runs = plan(study, workdir)
  for ref, config in runs:
    _check_same_run(ref, config)
  for i, (ref, config) in enumerate([] if report_only else runs):
    name = os.path.basename(ref.workdir)
    if report.is_finished(ref.workdir, config.train.steps):
      print(f"[{i + 1}/{len(runs)}] {name}: finished, skipped", flush=True)
      continue
    if os.path.exists(os.path.join(ref.workdir, report.FAILED)):
      print(f"[{i + 1}/{len(runs)}] {name}: diverged before, skipped (delete its {report.FAILED} to retry)",
            flush=True)
      continue
    print(f"[{i + 1}/{len(runs)}] {name}: training {config.train.steps} steps", flush=True)
    try:
      train.train(config, ref.workdir)
    except train.TrainingError as e:
      if not os.path.exists(os.path.join(ref.workdir, "config.json")):  # refused before it started
        raise StudyError(f"run {name} cannot start: {e}") from e
      print(f"[{i + 1}/{len(runs)}] {name}: stopped: {e}", flush=True)  # a NaN loss: the run diverged
      with open(os.path.join(ref.workdir, report.FAILED), "w") as f:
        json.dump({"error": str(e)}, f)
  path = report.write_report(study, [ref for ref, _ in runs], out_dir or workdir, command)
  print(f"wrote {path}", flush=True)
  return path


# ----------------------------------------------------------------------------------------------- CLI

def load_study(path: str) -> Study:
  """Imports a study file and calls its get_study(); the file's docstring becomes the description."""
  if not os.path.exists(path):
    raise StudyError(f"study file {path!r} does not exist; studies live in experiments/*.py")
  spec = importlib.util.spec_from_file_location(f"study_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_study"):
    raise StudyError(f"{path} defines no get_study(); a study file returns a moa_jax.study.Study from it")
  study = module.get_study()
  if not study.description and module.__doc__:
    study = dataclasses.replace(study, description=module.__doc__.strip())
  return study


def _parse(text: str, like: Any):
  """Parses a flag value to the type of `like` (the current value); lists are comma-separated."""
  if isinstance(like, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise StudyError(f"{text!r} is not a boolean; use true or false")
    return text.lower() in ("true", "1")
  if isinstance(like, (tuple, list)):
    element = like[0] if like else ""
    return tuple(_parse(t, element) for t in text.split(",") if t)
  if isinstance(like, (int, float)):
    try:
      return type(like)(text)
    except ValueError:
      raise StudyError(f"{text!r} is not {'an integer' if isinstance(like, int) else 'a number'}") from None
  return text


def with_flags(study: Study, flags: list[str]) -> Study:
  """Applies --study.FIELD=VALUE and --config.PATH=VALUE flags."""
  changes, overrides = {}, dict(study.overrides)
  probe = presets.lm_config(study.sizes[0], study.arms[study.baseline].ffn)
  for flag in flags:
    key, sep, text = flag.partition("=")
    if not sep or not key.startswith(("--study.", "--config.")):
      raise StudyError(f"unknown flag {flag!r}; expected --study.FIELD=VALUE or --config.PATH=VALUE")
    group, _, field = key[2:].partition(".")
    if group == "config":
      current = probe
      for part in field.split("."):
        if not isinstance(current, ml_collections.ConfigDict) or part not in current:
          raise StudyError(f"{key}: the config has no field {field!r}")
        current = current[part]
      overrides[field] = _parse(text, current)
    elif field == "arms":
      keep = text.split(",")
      unknown = [a for a in keep if a not in study.arms]
      if unknown:
        raise StudyError(f"--study.arms: {unknown} are not arms of {study.name!r}; arms: {', '.join(study.arms)}")
      changes["arms"] = {a: study.arms[a] for a in keep}
    elif field in {f.name for f in dataclasses.fields(Study)} - {"arms", "overrides", "description"}:
      changes[field] = _parse(text, getattr(study, field))
    else:
      raise StudyError(f"{key}: Study has no settable field {field!r}; fields: sizes, seeds, steps, "
                       f"tokens_per_param, lr_multipliers, arms, baseline, name")
  return dataclasses.replace(study, **changes, overrides=overrides)


def _use_compilation_cache(directory: str | None, workdir: str) -> None:
  """Runs that differ only by seed compile the same programs: a persistent cache compiles them once
  (on the debug model, 20 s -> 2 s per run). A process-wide JAX setting, so only the CLI makes it."""
  import jax

  if directory == "off" or (directory is None and jax.config.jax_compilation_cache_dir):
    return
  jax.config.update("jax_compilation_cache_dir", directory or os.path.join(workdir, "jax_cache"))


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(
      prog="python -m moa_jax.study", description="Run a study (experiments/*.py) and write its report.",
      epilog="Also: --study.FIELD=VALUE, --config.PATH=VALUE (see the module docstring).")
  parser.add_argument("study_file", help="experiments/<name>.py defining get_study()")
  parser.add_argument("--workdir", required=True, help="the study directory: runs/ and the report")
  parser.add_argument("--out", default=None, help="where report.md and the PNGs go (default: --workdir)")
  parser.add_argument("--report_only", action="store_true", help="train nothing; report what is there")
  parser.add_argument("--compilation_cache", default=None,
                      help="JAX persistent compilation cache (default: WORKDIR/jax_cache, or "
                           "$JAX_COMPILATION_CACHE_DIR when set; 'off': none)")
  args, rest = parser.parse_known_args(argv)
  _use_compilation_cache(args.compilation_cache, args.workdir)
  try:
    study = with_flags(load_study(args.study_file), rest)
    command = " ".join(["python -m moa_jax.study"] + [shlex.quote(a) for a in argv])
    run_study(study, args.workdir, out_dir=args.out, command=command, report_only=args.report_only)
  except StudyError as e:
    raise SystemExit(f"error: {e}")


if __name__ == "__main__":
  main()
