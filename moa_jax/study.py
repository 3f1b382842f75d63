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
import functools
import importlib.util
import json
import math
import os
import shlex
import sys
from typing import Any, Mapping

import ml_collections

from moa_jax import budget, checkpoint, cli, presets, report, rundir, study_guard


class StudyError(ValueError):
  """A study that cannot run as written; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: an FFN preset (presets.FFN_PRESETS) and config overrides {"model.ffn.gate": "softmax"}.

  match_flops: another FFN preset; this arm's FFN width d_ff is set so that its training FLOPs per
  token equal that preset's at the same size (e.g. a SwiGLU widened to bi-MoA's FLOPs), and it trains
  on that preset's token budget: an equal-compute arm.
  compute_of: another arm's name; this arm trains on that arm's compute (FLOPs, or seconds under a
  wall_clock budget): more steps when it is cheaper (moa_jax.budget), e.g. an equal-compute SwiGLU.
  """
  ffn: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  match_flops: str = ""
  compute_of: str = ""


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  arms: Mapping[str, Arm | tuple | str]   # arm name -> Arm, (ffn, {path: value}) or ffn
  baseline: str                           # the arm every other arm is compared with, seed by seed
  sizes: tuple[str, ...] = ("quickstart",)  # presets.SIZES; each arm runs at each size
  seeds: tuple[int, ...] = (0, 1, 2)      # evaluation seeds (train.seed: init and data order)
  steps: int = 0                          # optimizer steps per run; 0: from the tokens per parameter
  tokens_per_param: float = 0.0           # > 0: steps = ceil(this × parameters / tokens per step);
                                          # 0: the config's train.tokens_per_param (20)
  budgets: tuple[float, ...] = ()         # several tokens-per-parameter budgets: each size runs at each,
                                          # as the size label "SIZE@TPP" (the report shows Δ by budget)
  lr_multipliers: tuple[float, ...] = (1.0,)  # each arm at these multiples of its base optim.lr; with
                                          # tune_seeds, the starting grid of each arm's lr search
  tune_seeds: tuple[int, ...] = ()        # seeds the lr is tuned on, apart from `seeds`; empty: no tuning
  widen: int = 2                          # grid points a tuning search may add beyond an edge optimum
  final_evals: int = 1                    # the final loss: the mean of the run's last this many evals
  primary: tuple[str, ...] = ()           # (arm, other): the comparison the study exists to make
  comparisons: tuple[tuple[str, str], ...] = ()  # (arm, other) pairs; default: every arm vs baseline
  effect: float = 0.01                    # the effect (nats) the power line asks seeds for
  pilot_sd: float = 0.0                   # > 0: a paired SD (nats) from an earlier study, for an a-priori
                                          # power line (what the planned seeds can detect) before any data
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # every run (arms' win)
  budget: str = "tokens"                  # held equal between arms: tokens | flops | wall_clock (budget.py)
  budget_arm: str = ""                    # flops / wall_clock: the arm whose run sets it (default: baseline)
  throughput: Mapping[str, float] = dataclasses.field(default_factory=dict)  # wall_clock: arm -> tokens/s,
                                          # each measured alone on the machine
  equal_grid: bool = True                 # tuned: every arm's lr grid ends with as many points
  margin: float = 0.05                    # the equivalence margin (nats) of the TOST, declared in advance
  document_se: bool = True                # the report re-evaluates each evaluation run's final checkpoint
                                          # per document (moa_jax.heldout): SEs over documents
  description: str = ""                   # the report's preamble (default: the file's docstring)

  def __post_init__(self):
    arms = {name: _arm(name, a) for name, a in self.arms.items()}
    object.__setattr__(self, "arms", arms)
    for field in ("sizes", "seeds", "lr_multipliers", "tune_seeds", "primary", "budgets"):
      object.__setattr__(self, field, tuple(getattr(self, field)))
    if self.budgets:
      if self.steps or self.tokens_per_param:
        raise StudyError(f"study {self.name!r}: budgets sets the tokens per parameter; leave steps and tokens_per_param at 0")
      if any(not b > 0 for b in self.budgets):
        raise StudyError(f"study {self.name!r}: budgets {self.budgets} must be positive tokens per parameter")
      object.__setattr__(self, "sizes", tuple(dict.fromkeys(
          s if "@" in s else f"{s}@{b:g}" for s in self.sizes for b in self.budgets)))
    object.__setattr__(self, "comparisons", tuple(tuple(c) for c in self.comparisons))
    if self.baseline not in arms:
      raise StudyError(f"study {self.name!r}: baseline = {self.baseline!r} is not an arm; arms: {', '.join(arms)}")
    try:
      budget.check(self.budget, arms, self.throughput, self.budget_arm or self.baseline)
    except budget.BudgetError as e:
      raise StudyError(f"study {self.name!r}: {e}") from None
    for size in self.sizes:
      if preset_size(size) not in presets.RUN_SHAPES:
        raise StudyError(f"study {self.name!r}: size {size!r}; known: {', '.join(presets.RUN_SHAPES)}")
    if not self.sizes or not self.seeds or not self.lr_multipliers:
      raise StudyError(f"study {self.name!r}: sizes, seeds and lr_multipliers must each be non-empty")
    if len(set(self.seeds)) < len(self.seeds) or len(set(self.tune_seeds)) < len(self.tune_seeds):
      raise StudyError(f"study {self.name!r}: seeds {self.seeds} / tune_seeds {self.tune_seeds} repeat a seed")
    if set(self.seeds) & set(self.tune_seeds):
      raise StudyError(f"study {self.name!r}: seeds {sorted(set(self.seeds) & set(self.tune_seeds))} are both "
                       f"tuning and evaluation seeds; keep tune_seeds apart (e.g. 100, 101)")
    if any(m <= 0 for m in self.lr_multipliers):
      raise StudyError(f"study {self.name!r}: lr_multipliers {self.lr_multipliers} must be positive")
    if self.steps and self.tokens_per_param:
      raise StudyError(f"study {self.name!r}: set steps or tokens_per_param, not both")
    if self.final_evals < 1 or self.widen < 0:
      raise StudyError(f"study {self.name!r}: final_evals = {self.final_evals} must be ≥ 1, widen = {self.widen} ≥ 0")
    for pair in ((self.primary,) if self.primary else ()) + self.comparisons:
      if len(pair) != 2 or any(a not in arms for a in pair) or pair[0] == pair[1]:
        raise StudyError(f"study {self.name!r}: comparison {pair} must name two different arms of {', '.join(arms)}")

  @property
  def tuned(self) -> bool:
    return bool(self.tune_seeds)

  def declared_comparisons(self) -> list[tuple[str, str]]:
    """The primary comparison first, then the others (default: every arm against the baseline)."""
    pairs = list(self.comparisons) or [(a, self.baseline) for a in self.arms if a != self.baseline]
    if self.primary:
      pairs = [tuple(self.primary)] + [p for p in pairs if p != tuple(self.primary)]
    return [p for p in pairs if p[0] in self.arms and p[1] in self.arms]


def _arm(name: str, arm) -> Arm:
  if isinstance(arm, str):
    arm = Arm(arm)
  elif isinstance(arm, tuple):
    arm = Arm(*arm)
  for ffn in (arm.ffn, arm.match_flops or arm.ffn):
    if ffn not in presets.FFN_PRESETS:
      raise StudyError(f"arm {name!r}: ffn = {ffn!r}; known: {', '.join(presets.FFN_PRESETS)}")
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


def preset_size(size: str) -> str:
  """"debug@20" (a size at a token budget, Study.budgets) -> "debug"."""
  return size.partition("@")[0]


def _steps(study: Study, config, size: str = "") -> int:
  if study.steps:
    return study.steps
  budget_tpp = float(size.partition("@")[2] or 0)
  per_param = budget_tpp or study.tokens_per_param or config.train.get("tokens_per_param", 0.0)
  if not per_param:
    return config.train.steps
  params = _params_without_mixing(config.model.to_json_best_effort(sort_keys=True))
  return math.ceil(per_param * params / (config.train.batch_size * config.train.seq_len))


@functools.lru_cache(maxsize=None)
def _summary(model_json: str, seq_len: int = 8) -> dict:
  from moa_jax import summary
  from moa_jax.transformer import model_spec
  return summary.summarize(model_spec(ml_collections.ConfigDict(json.loads(model_json))), seq_len)


def _params_without_mixing(model_json: str) -> int:
  """All parameters (embeddings included, as in Chinchilla's counts) but the LA/MoA mixing ones, so
  every FFN variant of one size trains on the same number of tokens. Counted abstractly (eval_shape)."""
  s = _summary(model_json)
  return s["total_params"] - s["mix_params"]


def _flops(config) -> float:
  return _summary(config.model.to_json_best_effort(sort_keys=True), config.train.seq_len)["flops_per_token"]


def _match_width(config, target) -> int:
  """The d_ff at which `config`'s FLOPs per token come nearest `target`'s (FLOPs are linear in d_ff)."""
  f0 = _flops(config)
  config.model.ffn.d_ff += 1
  slope = _flops(config) - f0
  config.model.ffn.d_ff -= 1
  return max(1, config.model.ffn.d_ff + round((_flops(target) - f0) / slope))


def run_name(size: str, arm: str, lr_multiplier: float, seed: int) -> str:
  return f"{size}-{arm}-lr{lr_multiplier:g}x-s{seed}"


def _base_config(study: Study, size: str, ffn: str, arm_overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The size's preset under its run shape (presets.RUN_SHAPES), then the study's and the arm's overrides."""
  c = presets.lm_config(preset_size(size), ffn)
  shape = presets.RUN_SHAPES[preset_size(size)]
  apply_overrides(c, {"train.batch_size": shape["batch_size"], "train.seq_len": shape["seq_len"],
                      "train.eval_tokens": 1 << 20, "train.sample_every": 0, **shape["overrides"]})
  apply_overrides(c, study.overrides)
  apply_overrides(c, arm_overrides)
  return c


def run_config(study: Study, size: str, arm: str, lr_multiplier: float, seed: int) -> ml_collections.ConfigDict:
  """presets.lm_config(size, ffn) under the size's run shape, the study's and arm's overrides; then the
  steps (tokens per parameter), the warmup and eval spacing the run shape implies (unless overridden),
  lr × multiplier and train.seed = seed."""
  spec = study.arms[arm]
  c = _base_config(study, size, spec.ffn, spec.overrides)
  base = c
  if spec.match_flops:
    base = _base_config(study, size, spec.match_flops, spec.overrides)
    c.model.ffn.d_ff = _match_width(c, base)
  c.name = f"{study.name}/{run_name(size, arm, lr_multiplier, seed)}"
  c.train.steps = budget.steps(
      study.budget, arm, spec.compute_of, study.budget_arm or study.baseline, study.throughput,
      (_steps(study, base, size), _flops(c)), lambda other: _token_steps_and_flops(study, size, other))
  shape, given = presets.RUN_SHAPES[preset_size(size)], {**study.overrides, **spec.overrides}
  if "optim.warmup_steps" not in given:
    c.optim.warmup_steps = max(1, round(shape["warmup_fraction"] * c.train.steps))
  if "train.eval_every" not in given:
    every = c.train.steps / shape["evals"]
    c.train.eval_every = max(c.train.log_every, c.train.log_every * round(every / c.train.log_every))
  if "checkpoint.every" not in given:
    c.checkpoint.every = max(c.train.eval_every, c.train.steps // 4)
  if "data.eval_split" not in given and c.data.get("test_percent", 0):
    c.data.eval_split = "val" if seed in study.tune_seeds else "test"  # choices on val, comparisons on test
  c.optim.lr = c.optim.lr * lr_multiplier
  c.train.seed = seed
  return c


def _token_steps_and_flops(study: Study, size: str, arm: str) -> tuple[int, float]:
  """An arm's steps on its own token budget and its FLOPs per token (the reference of a budget)."""
  spec = study.arms[arm]
  c = _base_config(study, size, spec.ffn, spec.overrides)
  base = _base_config(study, size, spec.match_flops, spec.overrides) if spec.match_flops else c
  if spec.match_flops:
    c.model.ffn.d_ff = _match_width(c, base)
  return _steps(study, base, size), _flops(c)


def _ref(study: Study, workdir: str, size: str, arm: str, m: float, seed: int) -> report.RunRef:
  return report.RunRef(size, arm, m, seed, os.path.join(workdir, "runs", run_name(size, arm, m, seed)))


def _runs(study, workdir, size, arm, multipliers, seeds):
  return [(_ref(study, workdir, size, arm, m, s), run_config(study, size, arm, m, s)) for m in multipliers for s in seeds]


# ------------------------------------------------------------------------------------- lr tuning

def tuning_state(study: Study, workdir: str, size: str, arm: str, min_points: int = 0) -> report.Tuning:
  """Where the arm's lr search stands, read from its tuning runs: the grid so far (the study's
  lr_multipliers, widened one point at a time beyond an edge optimum, up to `widen` points), each
  multiplier's mean final eval loss over tune_seeds (a diverged seed makes it inf: a failure), the
  multipliers still to run, and the best one once every point of the grid has finished. With
  min_points, a settled grid grows on the side of the best with fewer points until it has that many
  (so every arm is searched as finely: Study.equal_grid)."""
  grid = sorted(study.lr_multipliers)
  while True:
    scores, pending = {}, []
    for m in grid:
      outcomes = [report.run_outcome(ref.workdir, config.train.steps, study.final_evals)
                  for ref, config in _runs(study, workdir, size, arm, [m], study.tune_seeds)]
      if any(status == "diverged" for status, _ in outcomes):
        scores[m] = math.inf
      elif all(status == "finished" for status, _ in outcomes):
        scores[m] = sum(loss for _, loss in outcomes) / len(outcomes)
      else:
        pending.append(m)
    if pending:
      return report.Tuning(size, arm, grid, scores, None, pending, False)
    best = min(grid, key=lambda m: (scores[m], m))
    if not math.isfinite(scores[best]):  # every lr diverged: search downwards
      best, new = None, [grid[0] / (grid[1] / grid[0] if len(grid) > 1 else 2.0)]
    elif len(grid) == 1:
      new = [grid[0] / 2, grid[0] * 2]
    elif best == grid[0]:
      new = [grid[0] * grid[0] / grid[1]]
    elif best == grid[-1]:
      new = [grid[-1] * grid[-1] / grid[-2]]
    elif len(grid) < min_points:  # inside, but coarser than another arm's search
      below, above = grid.index(best), len(grid) - 1 - grid.index(best)
      new = [grid[0] * grid[0] / grid[1]] if below < above else [grid[-1] * grid[-1] / grid[-2]]
      grid = sorted(grid + [float(f"{m:.4g}") for m in new])
      continue
    else:  # inside the grid
      return report.Tuning(size, arm, grid, scores, best, [], True)
    if len(grid) - len(study.lr_multipliers) + len(new) > study.widen:
      return report.Tuning(size, arm, grid, scores, best, [], False)
    grid = sorted(grid + [float(f"{m:.4g}") for m in new])


def tuning_states(study: Study, workdir: str, size: str) -> dict[str, report.Tuning]:
  """Every arm's lr search; with equal_grid, a settled arm's grid grows to the largest grid of any arm
  (evaluation seeds wait until every arm has settled, so none starts on a choice that may move)."""
  states = {arm: tuning_state(study, workdir, size, arm) for arm in study.arms}
  while study.equal_grid:
    points = max(len(t.grid) for t in states.values())
    grown = {arm: tuning_state(study, workdir, size, arm, points) for arm in study.arms}
    if all(len(grown[a].grid) == len(states[a].grid) for a in states):
      break
    states = grown
  if study.equal_grid and any(t.pending or len(t.grid) < max(len(u.grid) for u in states.values())
                              for t in states.values()):
    states = {a: dataclasses.replace(t, best=None) if not t.pending else t for a, t in states.items()}
  return states


def plan(study: Study, workdir: str) -> list[tuple[report.RunRef, ml_collections.ConfigDict]]:
  """Every run of the study known so far, with its config: without tune_seeds, size × arm × lr
  multiplier × seed; with them, each arm's tuning runs (the grid so far × tune_seeds), then the
  evaluation seeds of every arm whose lr search has settled on a multiplier (seed-major, so a study
  stopped early holds whole seeds of every arm)."""
  out = []
  for size in study.sizes:
    if not study.tuned:
      for arm in study.arms:
        out += _runs(study, workdir, size, arm, study.lr_multipliers, study.seeds)
      continue
    states = tuning_states(study, workdir, size)
    for arm, t in states.items():
      out += _runs(study, workdir, size, arm, t.grid, study.tune_seeds)
    for seed in study.seeds:
      for arm, t in states.items():
        if t.best is not None and not t.pending:
          out += _runs(study, workdir, size, arm, [t.best], [seed])
  return out


def _common(a: dict, b: dict) -> tuple[dict, dict]:
  """The fields both nested dicts have (a config field added or removed since a run started is a code
  change with its default, not a changed study)."""
  keys = set(a) & set(b)
  pairs = {k: _common(a[k], b[k]) if isinstance(a[k], dict) and isinstance(b[k], dict) else (a[k], b[k]) for k in keys}
  return {k: v[0] for k, v in pairs.items()}, {k: v[1] for k, v in pairs.items()}


def _check_same_run(ref: report.RunRef, config) -> None:
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


def _train_one(ref: report.RunRef, config, counter: str) -> None:
  """Trains one run unless it finished or diverged before; a divergence is recorded in its failed.json."""
  from moa_jax import train

  name = os.path.basename(ref.workdir)
  _check_same_run(ref, config)
  if report.is_finished(ref.workdir, config.train.steps):
    print(f"{counter} {name}: finished, skipped", flush=True)
    return
  if os.path.exists(os.path.join(ref.workdir, report.FAILED)):
    print(f"{counter} {name}: diverged before, skipped (delete its {report.FAILED} to retry)", flush=True)
    return
  print(f"{counter} {name}: training {config.train.steps} steps", flush=True)
  try:
    record = train.train(config, ref.workdir)
  except train.Diverged as e:  # only a divergence is a failure of the arm (moa_jax/study_guard.py)
    print(f"{counter} {name}: stopped: {e}", flush=True)
    with open(os.path.join(ref.workdir, report.FAILED), "w") as f:
      json.dump({"error": str(e)}, f)
    return
  except train.TrainingError as e:  # refused, or its directory held by another run: not a result
    raise StudyError(f"run {name} cannot go on: {e}") from e
  study_guard.stop_if_interrupted(record, name)


def plan_estimate(study: Study) -> dict:
  """What the study costs before it runs: {runs, runs_max, rows: [(size, arm, steps, tokens per run,
  FLOPs per token)], tokens, flops, flops_max}. A tuned study runs its grid on tune_seeds (runs) and,
  if every arm's search widens to its limit, `widen` more points each (runs_max)."""
  rows, runs, runs_max, tokens, flops, flops_max = [], 0, 0, 0, 0.0, 0.0
  for size in study.sizes:
    for arm in study.arms:
      c = run_config(study, size, arm, 1.0, study.seeds[0])
      per_run = c.train.steps * c.train.batch_size * c.train.seq_len
      n = len(study.lr_multipliers) * (len(study.tune_seeds) if study.tuned else len(study.seeds))
      n += len(study.seeds) if study.tuned else 0
      extra = study.widen * len(study.tune_seeds)
      rows.append((size, arm, c.train.steps, per_run, _flops(c)))
      runs, runs_max = runs + n, runs_max + n + extra
      tokens += n * per_run
      flops += n * per_run * _flops(c)
      flops_max += (n + extra) * per_run * _flops(c)
  return {"runs": runs, "runs_max": runs_max, "rows": rows, "tokens": tokens, "flops": flops, "flops_max": flops_max}


def format_plan(study: Study, estimate: dict, flops_per_sec: float, tokens_per_sec: float = 0.0) -> str:
  """The plan as a table, and its time at flops_per_sec (or, when given, tokens_per_sec)."""
  lines = [f"study {study.name}: {estimate['runs']} runs" + (f" (up to {estimate['runs_max']} if every lr "
           f"search widens {study.widen} times)" if estimate["runs_max"] > estimate["runs"] else ""),
           f"  {'size':<18}{'arm':<14}{'steps':>8}{'tokens/run':>13}{'FLOPs/token':>13}"]
  for size, arm, steps, tokens, flops in estimate["rows"]:
    lines.append(f"  {size:<18}{arm:<14}{steps:>8,}{tokens:>13.3g}{flops:>13.3g}")
  if tokens_per_sec:
    hours, rate = lambda f: f / estimate["flops"] * estimate["tokens"] / tokens_per_sec / 3600, f"{tokens_per_sec:,.0f} tokens/s"
  else:
    hours, rate = lambda f: f / flops_per_sec / 3600, f"{flops_per_sec:.3g} FLOP/s"
  lines.append(f"  total: {estimate['tokens']:.3g} training tokens, {estimate['flops']:.3g} training FLOPs: "
               f"{hours(estimate['flops']):.3g} h at {rate}"
               + (f" ({hours(estimate['flops_max']):.3g} h at most)" if estimate["flops_max"] > estimate["flops"] else "")
               + " (training only: evals, compilation and checkpoints come on top)")
  return "\n".join(lines)


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
  # copy's main, so the StudyError its Study raises is the class main catches.
  from moa_jax import study as _study

  _study.main()
