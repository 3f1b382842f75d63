"""A study's runs: where each lives (RunRef), how far it got (is_finished, run_outcome) and what it
finished with (RunResult, read from its run directory), and where an arm's lr search stands (Tuning).
Written by the study runner (moa_jax.study), read by the report (moa_jax.report)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from moa_jax import rundir


@dataclasses.dataclass(frozen=True)
class RunRef:
  """One run of a study: the arm it belongs to and where it lives."""
  size: str
  arm: str
  lr_multiplier: float
  seed: int
  workdir: str


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Where an arm's lr search stands (moa_jax.study_plan.tuning_state)."""
  size: str
  arm: str
  grid: list                 # lr multipliers tried or to try, ascending
  scores: dict               # multiplier -> mean final eval loss over tune seeds (inf: a seed diverged)
  best: float | None         # the chosen multiplier (None until the grid has finished, or if all diverged)
  pending: list              # multipliers whose tuning runs have not all finished
  settled: bool              # the best lies inside the grid


@dataclasses.dataclass
class RunResult:
  ref: RunRef
  status: str                      # finished | diverged | incomplete | pending
  final_eval_loss: float = math.nan
  final_eval_se: float = math.nan  # the standard error of the last eval (over its sequences)
  tokens: int = 0
  tokens_per_sec: float = math.nan
  lr: float = math.nan             # peak lr
  params: int = 0                  # total parameters
  flops_per_token: float = math.nan  # training FLOPs per token, mixing included (moa_jax.summary)
  gates: dict | None = None        # last logged {branch: {activation: [per layer]}}
  gates_std: dict | None = None    # the same: MoA gates' std over tokens
  records: list = dataclasses.field(default_factory=list)
  error: str = ""
  config: Any = None               # the run's ConfigDict (config.json)


FAILED = "failed.json"  # written by the study runner into a run that stopped with a TrainingError


def final_loss(records: list[dict], final_evals: int) -> float:
  """The mean of the last `final_evals` eval losses."""
  evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
  return float(np.mean(evals[-final_evals:])) if evals else math.nan


def _complete(records: list[dict], steps: int) -> bool:
  return bool(records) and records[-1]["step"] == steps and records[-1].get("eval_loss") is not None


def is_finished(workdir: str, steps: int) -> bool:
  """metrics.jsonl reaches `steps` with an eval loss there."""
  return os.path.exists(os.path.join(workdir, "metrics.jsonl")) and _complete(rundir.records(workdir), steps)


def run_outcome(workdir: str, steps: int, final_evals: int = 1) -> tuple[str, float]:
  """(status, final loss) without building the model: finished | diverged | incomplete | pending."""
  if os.path.exists(os.path.join(workdir, FAILED)):
    return "diverged", math.inf
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return "pending", math.nan
  records = rundir.records(workdir)
  return ("finished", final_loss(records, final_evals)) if _complete(records, steps) else ("incomplete", math.nan)


def read_run(ref: RunRef, final_evals: int = 1) -> RunResult:
  if not os.path.exists(os.path.join(ref.workdir, "config.json")):
    return RunResult(ref, "pending")
  from moa_jax import summary
  from moa_jax.transformer import model_spec

  config = rundir.load_config(ref.workdir)
  s = summary.summarize(model_spec(config.model), config.train.seq_len)
  result = RunResult(ref, "incomplete", lr=config.optim.lr, params=s["total_params"],
                     flops_per_token=s["flops_per_token"], config=config)
  if os.path.exists(os.path.join(ref.workdir, "metrics.jsonl")):
    result.records = rundir.records(ref.workdir)
  failed = os.path.join(ref.workdir, FAILED)
  if os.path.exists(failed):
    with open(failed) as f:
      result.status, result.error = "diverged", json.load(f)["error"]
  if not result.records:
    return result
  last = result.records[-1]
  result.tokens = last["tokens"]
  speeds = [r["tokens_per_sec"] for r in result.records if r.get("tokens_per_sec")]
  result.tokens_per_sec = float(np.median(speeds)) if speeds else math.nan
  result.gates = next((r["gates"] for r in reversed(result.records) if "gates" in r), None)
  result.gates_std = next((r["gates_std"] for r in reversed(result.records) if "gates_std" in r), None)
  if result.status != "diverged" and _complete(result.records, config.train.steps):
    result.status = "finished"
    result.final_eval_loss = final_loss(result.records, final_evals)
    result.final_eval_se = last.get("eval_loss_se", math.nan)
  return result
