"""Ablation studies under the research protocol (docs/research_protocol.md), run one run at a time,
then a report.

    python -m moa_jax.study experiments/debug_protocol.py --workdir=runs/debug_protocol
    python -m moa_jax.study experiments/mixing_variants.py --workdir=runs/mixing --plan
    python -m moa_jax.study experiments/lr_sensitivity.py --workdir=runs/lr --report_only --out=reports/lr

A study file defines `get_study() -> Study`. Each run is `presets.lm_config(size, arm.ffn)` under the
size's run shape (presets.RUN_SHAPES: batch, sequence length, warmup fraction, evals), then the
study's overrides, then the arm's; its steps come from train.tokens_per_param (20) unless the study
sets steps; then lr × multiplier and `train.seed = seed`. `train.seed` drives both the init and the
data order, so seed s gives every arm the same batches in the same order: the report pairs arms seed
by seed. Runs live in WORKDIR/runs/<size>-<arm>-lr<m>x-s<seed>/ (ordinary `moa_jax.train` run
directories). Rerunning skips finished runs and resumes unfinished ones from their checkpoints; a run
that diverges (NaN loss) is recorded in its failed.json and reported as a failure.

With `tune_seeds`, each arm's learning rate is tuned first: its lr_multipliers grid runs on the tuning
seeds, the grid widens one point at a time while the best multiplier is at an edge (up to `widen`
points), and the evaluation seeds then run at each arm's best, so the report compares best against
best. The report (WORKDIR/report.md, or --out=DIR; moa_jax/report.py) gives the final losses, the
declared comparisons with Holm-adjusted p-values, a power line, the lr search, curves against tokens,
FLOPs and wall-clock time, gates and their spread over tokens, and the provenance. --plan prints the
runs, tokens and FLOPs the study needs, and trains nothing.

The CLI keeps JAX's persistent compilation cache in WORKDIR/jax_cache (--compilation_cache=off to
disable): the seeds of an arm compile the same programs, so only the first compiles.

With data.test_percent > 0 (a three-way split), tuning runs evaluate on the validation split and
evaluation runs on the test split (data.eval_split). `budget` holds tokens, FLOPs or wall-clock time
equal between arms (moa_jax.budget); `budgets` runs each size at several tokens per parameter.

Flags: `--study.FIELD=VALUE` replaces a Study field (sizes, seeds, tune_seeds, steps, tokens_per_param,
budgets, lr_multipliers, widen, equal_grid, final_evals, effect, margin, budget, budget_arm, document_se,
arms — a subset of arm names —, baseline, name);
`--config.PATH=VALUE` overrides a config field in every run (`--config.data.cache_dir=/tmp/cache`).
Lists are comma-separated.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shlex
import sys
from typing import Any

import ml_collections

from moa_jax import checkpoint, cli, presets, report, rundir, study_guard
from moa_jax.study_plan import format_plan, plan, plan_estimate, tuning_states
from moa_jax.study_runs import FAILED, RunRef, is_finished
from moa_jax.study_spec import Arm, Study, StudyError, preset_size

# Study files import Study and Arm from here; tests reach plan through this module too.
__all__ = ["Arm", "Study", "StudyError", "load_study", "main", "plan", "run_study", "with_flags"]


def _common(a: dict, b: dict) -> tuple[dict, dict]:
  """The fields both nested dicts have (a config field added or removed since a run started is a code
  change with its default, not a changed study)."""
  keys = set(a) & set(b)
  pairs = {k: _common(a[k], b[k]) if isinstance(a[k], dict) and isinstance(b[k], dict) else (a[k], b[k]) for k in keys}
  return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}


def _check_same_run(ref: RunRef, config) -> None:
  """A run directory reused by a changed study would mix two experiments: refuse, listing the changes.
  Not changes: the data cache's location, fields only one side has, and a dense model's unused MoE group."""
  if not os.path.exists(os.path.join(ref.workdir, "config.json")):
    return
  saved, current = _common(rundir.load_config(ref.workdir).to_dict(), json.loads(config.to_json_best_effort()))
  for c in (saved, current):
    c.get("data", {}).pop("cache_dir", None)
  if not saved.get("model", {}).get("moe", {}).get("num_experts") and not current.get("model", {}).get("moe", {}).get("num_experts"):
    for c in (saved, current):
      c.get("model", {}).pop("moe", None)
  diff = checkpoint.config_diff(saved, current, prefix="config")
  if diff:
    raise StudyError(f"{ref.workdir} holds a run of a different config:\n  " + "\n  ".join(diff)
                     + "\nuse a new --workdir for the changed study, or delete that run directory")


@study_guard.locked
def run_study(study: Study, workdir: str, *, out_dir: str | None = None, command: str = "",
              report_only: bool = False) -> str:
  """Trains every unfinished run (one at a time, in this process), then writes the report. A tuned
  study runs each arm's lr grid on tune_seeds, widens it while the best lr is at an edge, then runs the
  evaluation seeds at each arm's best.

  Returns the report's path (out_dir/report.md; out_dir defaults to workdir).
  """
  for ref, config in plan(study, workdir):
    _check_same_run(ref, config)
  done: set[str] = set()
  while not report_only:
    runs = plan(study, workdir)
    todo = [(i, ref, config) for i, (ref, config) in enumerate(runs) if ref.workdir not in done]
    if not todo:
      break
    for i, ref, config in todo:
      done.add(ref.workdir)
      _train_one(ref, config, f"[{i + 1}/{len(runs)}{'+' if study.tuned else ''}]")
  runs = plan(study, workdir)
  tuning = {(size, arm): t for size in study.sizes
            for arm, t in tuning_states(study, workdir, size).items()} if study.tuned else {}
  path = report.write_report(study, [ref for ref, _ in runs], out_dir or workdir, command, tuning)
  print(f"wrote {path}", flush=True)
  return path


def _train_one(ref: RunRef, config, counter: str) -> None:
  """Trains one run unless it finished or diverged before; a divergence is recorded in its failed.json."""
  from moa_jax import train

  name = os.path.basename(ref.workdir)
  _check_same_run(ref, config)
  if is_finished(ref.workdir, config.train.steps):
    print(f"{counter} {name}: finished, skipped", flush=True)
    return
  if os.path.exists(os.path.join(ref.workdir, FAILED)):
    print(f"{counter} {name}: diverged before, skipped (delete its {FAILED} to retry)", flush=True)
    return
  print(f"{counter} {name}: training {config.train.steps} steps", flush=True)
  try:
    record = train.train(config, ref.workdir)
  except train.Diverged as e:  # only a divergence is a failure of the arm (moa_jax/study_guard.py)
    print(f"{counter} {name}: stopped: {e}", flush=True)
    with open(os.path.join(ref.workdir, FAILED), "w") as f:
      json.dump({"error": str(e)}, f)
    return
  except train.TrainingError as e:  # refused, or its directory held by another run: not a result
    raise StudyError(f"run {name} cannot go on: {e}") from e
  study_guard.stop_if_interrupted(record, name)


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


# Element types of the Study's list fields (an empty default has no element to copy the type of).
_ELEMENTS = {"sizes": "", "seeds": 0, "tune_seeds": 0, "lr_multipliers": 0.0, "budgets": 0.0}


def _parse(text: str, like: Any, element: Any = ""):
  """Parses a flag value to the type of `like` (the current value); lists are comma-separated."""
  if isinstance(like, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise StudyError(f"{text!r} is not a boolean; use true or false")
    return text.lower() in ("true", "1")
  if isinstance(like, (tuple, list)):
    element = like[0] if like else element
    return tuple(_parse(t, element) for t in text.split(",") if t)
  if isinstance(like, (int, float)):
    try:
      return type(like)(text)
    except ValueError:
      raise StudyError(f"{text!r} is not {'an integer' if isinstance(like, int) else 'a number'}") from None
  return text


_SETTABLE = [f.name for f in dataclasses.fields(Study)
             if f.name not in ("arms", "overrides", "description", "primary", "comparisons", "throughput")]


def with_flags(study: Study, flags: list[str]) -> Study:
  """Applies --study.FIELD=VALUE and --config.PATH=VALUE flags."""
  changes, overrides = {}, dict(study.overrides)
  probe = presets.lm_config(preset_size(study.sizes[0]), study.arms[study.baseline].ffn)
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
      overrides[field] = study_guard.checked_override(key, field, current, _parse(text, current))
    elif field == "arms":
      keep = text.split(",")
      unknown = [a for a in keep if a not in study.arms]
      if unknown:
        raise StudyError(f"--study.arms: {unknown} are not arms of {study.name!r}; arms: {', '.join(study.arms)}")
      changes["arms"] = {a: study.arms[a] for a in keep}
      if study.baseline not in keep and not any(f.startswith("--study.baseline=") for f in flags):
        raise StudyError(f"{flag} leaves out the baseline {study.baseline!r}; add --study.baseline={keep[0]}")
      changes["comparisons"] = tuple(c for c in study.comparisons if set(c) <= set(keep))
      changes["primary"] = study.primary if set(study.primary) <= set(keep) else ()
    elif field in _SETTABLE:
      changes[field] = _parse(text, getattr(study, field), _ELEMENTS.get(field, ""))
    else:
      raise StudyError(f"{key}: Study has no settable field {field!r}; fields: {', '.join(_SETTABLE)}, arms")
  return dataclasses.replace(study, **changes, overrides=overrides)


def _use_compilation_cache(directory: str | None, workdir: str) -> None:
  """Runs that differ only by seed compile the same programs: a persistent cache compiles them once
  (on the debug model, 20 s -> 2 s per run). A process-wide JAX setting, so only the CLI makes it."""
  import jax

  if directory == "off" or (directory is None and jax.config.jax_compilation_cache_dir):
    return
  jax.config.update("jax_compilation_cache_dir", directory or os.path.join(workdir, "jax_cache"))


@cli.command(interrupted="the study stopped; rerun the same command to resume it (finished runs are skipped, "
                         "an interrupted run resumes from its newest checkpoint)")
def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  parser = cli.ArgumentParser(
      prog="python -m moa_jax.study", description="Run a study (experiments/*.py) and write its report.",
      epilog="Also: --study.FIELD=VALUE, --config.PATH=VALUE (see the module docstring).")
  parser.add_argument("study_file", help="experiments/<name>.py defining get_study()")
  parser.add_argument("--workdir", required=True, help="the study directory: runs/ and the report")
  parser.add_argument("--out", default=None, help="where report.md and the PNGs go (default: --workdir)")
  parser.add_argument("--report_only", action="store_true", help="train nothing; report what is there")
  parser.add_argument("--plan", action="store_true", help="print the runs, tokens and FLOPs; train nothing")
  parser.add_argument("--flops_per_sec", type=float, default=0.4 * 989e12,
                      help="throughput for --plan's time estimate (default: an H200 at 40%% MFU)")
  parser.add_argument("--tokens_per_sec", type=float, default=0.0,
                      help="--plan: estimate the time at this many tokens/s instead (e.g. a measured CPU speed)")
  parser.add_argument("--compilation_cache", default=None,
                      help="JAX persistent compilation cache (default: WORKDIR/jax_cache, or "
                           "$JAX_COMPILATION_CACHE_DIR when set; 'off': none)")
  args, rest = parser.parse_known_args(argv)
  study = with_flags(load_study(args.study_file), rest)
  if args.plan:
    print(format_plan(study, plan_estimate(study), args.flops_per_sec, args.tokens_per_sec))
    return
  _use_compilation_cache(args.compilation_cache, args.workdir)
  command = " ".join(["python -m moa_jax.study"] + [shlex.quote(a) for a in argv])
  run_study(study, args.workdir, out_dir=args.out, command=command, report_only=args.report_only)


if __name__ == "__main__":
  # Study files import moa_jax.study, a second copy of this module when it runs as __main__: call that
  # copy's main, so one copy of the module serves the whole run.
  from moa_jax import study as _study

  _study.main()
