"""The protocol's decisions for a study (docs/research_protocol.md): each run's config (the size's run
shape, the overrides, steps from the token or compute budget, lr × multiplier, seed), where each arm's
lr search stands, and the plan: every run known so far, and what the whole study costs."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping

import ml_collections

from moa_jax import budget, presets
from moa_jax.study_runs import RunRef, Tuning, run_outcome
from moa_jax.study_spec import Study, apply_overrides, preset_size


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


def _ref(study: Study, workdir: str, size: str, arm: str, m: float, seed: int) -> RunRef:
  return RunRef(size, arm, m, seed, os.path.join(workdir, "runs", run_name(size, arm, m, seed)))


def _runs(study, workdir, size, arm, multipliers, seeds):
  return [(_ref(study, workdir, size, arm, m, s), run_config(study, size, arm, m, s)) for m in multipliers for s in seeds]


# ------------------------------------------------------------------------------------- lr tuning

def tuning_state(study: Study, workdir: str, size: str, arm: str, min_points: int = 0) -> Tuning:
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
      outcomes = [run_outcome(ref.workdir, config.train.steps, study.final_evals)
                  for ref, config in _runs(study, workdir, size, arm, [m], study.tune_seeds)]
      if any(status == "diverged" for status, _ in outcomes):
        scores[m] = math.inf
      elif all(status == "finished" for status, _ in outcomes):
        scores[m] = sum(loss for _, loss in outcomes) / len(outcomes)
      else:
        pending.append(m)
    if pending:
      return Tuning(size, arm, grid, scores, None, pending, False)
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
      return Tuning(size, arm, grid, scores, best, [], True)
    if len(grid) - len(study.lr_multipliers) + len(new) > study.widen:
      return Tuning(size, arm, grid, scores, best, [], False)
    grid = sorted(grid + [float(f"{m:.4g}") for m in new])


def tuning_states(study: Study, workdir: str, size: str) -> dict[str, Tuning]:
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


def plan(study: Study, workdir: str) -> list[tuple[RunRef, ml_collections.ConfigDict]]:
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
