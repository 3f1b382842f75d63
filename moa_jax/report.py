"""The markdown report of a study, its tables and its figures (statistics: moa_jax/stats.py).

Per arm, the final eval loss (the mean of a run's last `final_evals` evaluations) is summarised as
mean ± 95% CI over evaluation seeds (Student t, n − 1 degrees of freedom). Comparisons are paired:
seed s of every arm shares its init seed and data order, so d_s = loss(arm, s) − loss(other, s), and
the report gives mean(d) ± its CI, the paired t-test's p-value, Holm's adjustment over the study's
declared comparisons, and a power line (observed paired SD, the effect found with 80% power at the
seeds run, and the seeds a stated effect needs). A diverged seed is a failure of its arm: the
comparison counts it, with p = 1 (nothing can be claimed), instead of dropping the seed.
In a tuned study each arm runs at its own best learning rate (chosen on tuning seeds), so the
comparisons are best against best.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from moa_jax import heldout, plot, rundir, scaling, stats

ALPHA = 0.05  # the level of every test, CI and star


# ------------------------------------------------------------------------------------------ run state

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
  """Where an arm's lr search stands (moa_jax.study.tuning_state)."""
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


# ---------------------------------------------------------------------------------------- the report

def _si(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.3g}"


def _multiplier(m: float) -> str:
  return f"{m:g}×"


class _Variants:
  """The study's evaluation runs grouped by variant (size, arm, lr multiplier) and seed, in study
  order. In a tuned study each (size, arm) has one variant: its best multiplier."""

  def __init__(self, results: list[RunResult], tuned: bool):
    self.results, self.tuned = results, tuned
    self.keys = list(dict.fromkeys((r.ref.size, r.ref.arm, r.ref.lr_multiplier) for r in results))
    self.runs = {k: [r for r in results if (r.ref.size, r.ref.arm, r.ref.lr_multiplier) == k] for k in self.keys}

  def key(self, size: str, arm: str, m: float):
    """The variant of `arm` that (size, ·, m) is compared with: the same multiplier, or (tuned) its best."""
    if not self.tuned:
      return (size, arm, m)
    return next((k for k in self.keys if k[:2] == (size, arm)), None)

  def final(self, key) -> dict[int, float]:
    return {r.ref.seed: r.final_eval_loss for r in self.runs.get(key, []) if r.status == "finished"}

  def diverged(self, key) -> set[int]:
    return {r.ref.seed for r in self.runs.get(key, []) if r.status == "diverged"}

  def finished(self, key) -> list[RunResult]:
    return [r for r in self.runs.get(key, []) if r.status == "finished"]


def _label(key, sizes: int, lrs: int) -> str:
  size, arm, m = key
  return " ".join([arm] + ([size] if sizes > 1 else []) + ([f"lr {_multiplier(m)}"] if lrs > 1 else []))


def write_report(study, runs: list[RunRef], out_dir: str, command: str = "",
                 tuning: dict | None = None) -> str:
  """Writes out_dir/report.md and its PNGs; returns the report's path.

  study: moa_jax.study.Study (or any object with its fields). runs: every run of the study, tuning
  runs (seeds in study.tune_seeds) included. tuning: (size, arm) -> Tuning, for a tuned study.
  """
  os.makedirs(out_dir, exist_ok=True)
  tuning = tuning or {}
  tune_seeds = set(getattr(study, "tune_seeds", ()))
  final_evals = getattr(study, "final_evals", 1)
  results = [read_run(r, final_evals) for r in runs]
  v = _Variants([r for r in results if r.ref.seed not in tune_seeds], bool(tune_seeds))
  tuning_runs = [r for r in results if r.ref.seed in tune_seeds]
  n_lrs = 1 if tune_seeds else len(study.lr_multipliers)
  label = lambda key: _label(key, len(study.sizes), n_lrs)
  lines = [f"# Study `{study.name}`", ""]
  summary, _, details = study.description.strip().partition("\n\n")
  if summary:
    lines += [summary, ""]
  if command:
    lines += ["Produced by:", "", "```bash", command, "```", ""]
  done = sum(r.status == "finished" for r in v.results)
  planned = len(study.seeds) * len(study.arms) * len(study.sizes) if tune_seeds else len(v.results)
  if tune_seeds and len(v.results) < planned:
    lines += [f"**Incomplete:** {planned - len(v.results)} of the {planned} evaluation runs have not started: "
              "an arm's evaluation seeds start once its lr search has finished (see the lr table).", ""]
  lines += [f"Evaluation runs: {done} of {planned} finished; seeds {', '.join(map(str, study.seeds))} "
            f"(seed s: the same init seed and data order in every arm). Baseline arm: `{study.baseline}`."
            + (f" Learning rates tuned per arm on seeds {', '.join(map(str, sorted(tune_seeds)))} "
               f"({sum(r.status == 'finished' for r in tuning_runs)} of {len(tuning_runs)} tuning runs finished)."
               if tune_seeds else ""), ""]
  lines += _run_shapes(study, results)
  if details:
    lines += ["<details><summary>The study file's notes</summary>", "", "```text", details, "```", "",
              "</details>", ""]
  comparisons = _comparisons(study, v)
  lines += _table(study, v, label, tuning)
  lines += _comparison_table(study, comparisons)
  lines += _power_table(study, comparisons)
  if tuning:
    lines += _tuning_table(study, tuning, tuning_runs)
  lines += _per_seed(study, v, label)
  if getattr(study, "document_se", False):
    pairs = [(c, v.key(c.size, c.arm, c.m), v.key(c.size, c.other, c.m)) for c in comparisons]
    lines += heldout.report_lines({k: v.finished(k) for k in v.keys}, pairs, lambda c: _name(c, study), label)
  scaling_lines, scaling_points, fits = _scaling(study, v)
  lines += scaling_lines
  figures = _figures(study, v, label, tuning_runs, tuning, comparisons, scaling_points, fits, out_dir)
  for title, name, note in figures:
    lines += [f"## {title}", "", f"![{title}]({name})", ""] + ([note, ""] if note else [])
  problems = [r for r in results if r.status != "finished"]
  if problems:
    lines += ["## Runs not finished", ""]
    for r in problems:
      why = f": {r.error.splitlines()[0]}" if r.error else ""
      lines.append(f"- `{os.path.basename(r.ref.workdir)}`: {r.status}{why}")
    lines.append("")
  lines += provenance(results, command)[:-1] + [f"- written to: `{out_dir}` (a report moved elsewhere says so here)", ""]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def _run_shapes(study, results: list[RunResult]) -> list[str]:
  lines = []
  for size in study.sizes:
    r = next((r for r in results if r.ref.size == size and r.config is not None), None)
    if r is None:
      continue
    t, o = r.config.train, r.config.optim
    evals = getattr(study, "final_evals", 1)
    eval_tokens = next((x["eval_tokens"] for x in r.records if x.get("eval_tokens")), None)
    lines += [f"Each `{size}` run: {t.steps:,} steps × {t.batch_size} sequences × {t.seq_len} tokens "
              f"= {_si(t.steps * t.batch_size * t.seq_len)} tokens "
              f"({t.steps * t.batch_size * t.seq_len / max(r.params, 1):.1f} per parameter), base peak lr "
              f"{o.lr / r.ref.lr_multiplier:.3g} × the arm's multiplier ({o.schedule}, {o.warmup_steps} warmup steps), "
              f"{o.name}, {r.config.model.dtype} compute. Eval every {t.eval_every} steps"
              + (f" on a fixed shuffled subset of {_si(eval_tokens)} held-out tokens" if eval_tokens else "")
              + _splits_used(study, results)
              + (f"; the final loss is the mean of the last {evals} evals" if evals > 1 else "") + ".", ""]
  return lines


def _split_of(r: RunResult) -> str:
  return r.config.data.get("eval_split", "val") if r.config is not None else "val"


def _splits_used(study, results: list[RunResult]) -> str:
  """Which split the tuning and the evaluation runs' evals read."""
  tune = set(getattr(study, "tune_seeds", ()))
  used = {("tuning" if r.ref.seed in tune else "evaluation", _split_of(r)) for r in results if r.config is not None}
  parts = [f"{kind} runs on the `{split}` split" for kind, split in sorted(used)]
  return f" ({'; '.join(parts)})" if parts else ""


def _table(study, v: _Variants, label, tuning: dict) -> list[str]:
  header = ["arm", "final eval loss (mean ± 95% CI)", "seeds", "tokens", "params", "FLOPs/token", "tokens/s"]
  if tuning or len(study.lr_multipliers) > 1:
    header.insert(1, "peak lr")
  if len(study.sizes) > 1:
    header.insert(1, "size")
  rows = []
  for key in v.keys:
    size, arm, m = key
    finished = v.finished(key)
    estimate = stats.mean_ci([r.final_eval_loss for r in finished])
    diverged = len(v.diverged(key))
    seeds = f"{len(finished)}/{len(v.runs[key])}" + (f" (**{diverged} diverged**)" if diverged else "")
    any_run = next((r for r in v.runs[key] if r.params), None)
    tokens = max((r.tokens for r in finished), default=0)
    speed = np.median([r.tokens_per_sec for r in finished]) if finished else math.nan
    row = [f"`{arm}`", estimate.format(), seeds, _si(tokens) if tokens else "—",
           _si(any_run.params) if any_run else "—", _si(any_run.flops_per_token) if any_run else "—",
           f"{speed:,.0f}" if math.isfinite(speed) else "—"]
    if tuning or len(study.lr_multipliers) > 1:
      row.insert(1, f"{any_run.lr:.3g} ({_multiplier(m)})" if any_run else _multiplier(m))
    if len(study.sizes) > 1:
      row.insert(1, size)
    rows.append(row)
  splits = sorted({_split_of(r) for r in v.results if r.config is not None})
  where = f" on the `{'`, `'.join(splits)}` split" if splits else ""
  out = [f"## Final eval loss{where}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  out += ["", "Eval loss: mean next-token cross-entropy (nats/token) on the fixed held-out subset. "
          "CI: Student t over the finished seeds; with one seed there is none. FLOPs/token: training "
          "(forward + backward) FLOPs, activation mixing included (moa_jax.summary). Tokens/s: median over "
          "the run's logged intervals (compilation excluded), then over seeds; on a shared CPU it is noise."
          + (" Peak lr: each arm's best on the tuning seeds." if tuning else ""), ""]
  return out


@dataclasses.dataclass
class Comparison:
  size: str
  m: float
  arm: str
  other: str
  primary: bool
  seeds: list          # the evaluation seeds both arms ran (finished or diverged)
  failed: dict         # arm -> seeds it diverged on
  d: stats.Estimate    # paired difference over the seeds both finished
  mean_arm: float
  mean_other: float
  p: float = math.nan
  p_holm: float = math.nan


def _comparisons(study, v: _Variants) -> list[Comparison]:
  pairs = study.declared_comparisons() if hasattr(study, "declared_comparisons") else [
      (a, study.baseline) for a in study.arms if a != study.baseline]
  primary = tuple(getattr(study, "primary", ()) or ())
  out = []
  multipliers = [None] if v.tuned else list(study.lr_multipliers)
  for size in study.sizes:
    for m in multipliers:
      for arm, other in pairs:
        ka, kb = v.key(size, arm, m), v.key(size, other, m)
        if ka is None or kb is None or ka not in v.runs or kb not in v.runs:
          continue
        a, b = v.final(ka), v.final(kb)
        failed = {arm: sorted(v.diverged(ka)), other: sorted(v.diverged(kb))}
        both = sorted(set(a) & set(b))
        c = Comparison(size, ka[2], arm, other, (arm, other) == primary, both, failed,
                       stats.paired_difference(a, b), float(np.mean([a[s] for s in both])) if both else math.nan,
                       float(np.mean([b[s] for s in both])) if both else math.nan)
        c.p = 1.0 if any(failed.values()) else stats.paired_p(c.d)
        out.append(c)
  adjusted = stats.holm([c.p for c in out])
  for c, p in zip(out, adjusted):
    c.p_holm = p
  return out


def _name(c: Comparison, study) -> str:
  lr = f" (lr {_multiplier(c.m)})" if len(study.lr_multipliers) > 1 and not getattr(study, "tune_seeds", ()) else ""
  size = f" @ {c.size}" if len(study.sizes) > 1 else ""
  return f"`{c.arm}` − `{c.other}`{size}{lr}" + (" **(primary)**" if c.primary else "")


def _p(p: float) -> str:
  return "—" if not math.isfinite(p) else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def _comparison_table(study, comparisons: list[Comparison]) -> list[str]:
  if not comparisons:
    return []
  margin = getattr(study, "margin", 0.0)
  out = ["## Comparisons", "", "| comparison | paired seeds | mean (arm) | mean (other) | Δ (paired, 95% CI) "
         "| p | p (Holm) |" + (f" within ±{margin:g} (TOST p) |" if margin else ""),
         "|---|---|---|---|---|---|---|" + ("---|" if margin else "")]
  for c in comparisons:
    fails = "; ".join(f"`{a}` diverged on seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}"
                      for a, s in c.failed.items() if s)
    delta = c.d.format(signed=True) + (" *" if c.p_holm < ALPHA else "")
    out.append(f"| {_name(c, study)} | {len(c.seeds)} | {c.mean_arm:.4f} | {c.mean_other:.4f} | {delta}"
               f"{' — ' + fails + ' (a failure: p = 1)' if fails else ''} | {_p(c.p)} | {_p(c.p_holm)} |"
               + (f" {_equivalence(c, margin)} |" if margin else ""))
  out += ["", f"Δ < 0: the first arm has the lower loss. Means and Δ use the same seeds (those both arms "
          f"finished). p: two-sided paired t-test; Holm: adjusted over the {len(comparisons)} comparisons "
          f"above (family-wise error ≤ {ALPHA:g}); `*`: Holm-adjusted p < {ALPHA:g}. A seed that diverged "
          "counts as a failure of its arm: the comparison gets p = 1 rather than losing the seed."
          + (f" TOST: two one-sided paired t-tests at the margin ±{margin:g} nats declared in the study file; "
             f"p < {ALPHA:g} says the difference lies within the margin (unadjusted), which a non-significant "
             "t-test cannot say." if margin else "")
          + (f" An exact permutation (sign-flip) test could not go below p = {stats.permutation_floor(n):.3g} "
             f"with {n} seeds, whatever the data." if (n := min((c.d.n for c in comparisons if c.d.n), default=0))
             and 2 <= n <= 5 else ""), ""]
  return out


def _equivalence(c: Comparison, margin: float) -> str:
  p = 1.0 if any(c.failed.values()) else stats.tost(c.d, margin)
  return "—" if not math.isfinite(p) else f"{'**yes**' if p < ALPHA else 'not shown'} ({_p(p)})"


def _power_table(study, comparisons: list[Comparison]) -> list[str]:
  effect = getattr(study, "effect", 0.01)
  rows = [c for c in comparisons if c.d.n >= 2]
  pilot = getattr(study, "pilot_sd", 0.0)
  if not rows and not pilot:
    return []
  out = ["## Power", "", f"| comparison | paired SD (95% CI) | seeds | effect found with 80% power | seeds for "
         f"|Δ| = {effect:g} (at the SD's CI) | seeds for the observed |Δ| |", "|---|---|---|---|---|---|"]
  if pilot:
    n = len(study.seeds)
    out.append(f"| a priori, every comparison (the study file's pilot SD) | {pilot:.4f} | {n} (planned) | "
               f"{stats.min_detectable_effect(pilot, n, alpha=ALPHA):.4f} | "
               f"{stats.seeds_needed(effect, pilot, alpha=ALPHA):,} | — |")
  for c in rows:
    mde = stats.min_detectable_effect(c.d.sd, c.d.n, alpha=ALPHA)
    need = stats.seeds_needed(effect, c.d.sd, alpha=ALPHA)
    observed = stats.seeds_needed(abs(c.d.mean), c.d.sd, alpha=ALPHA) if c.d.mean else -1
    fmt = lambda n: "—" if n < 0 else (f"> {100_000:,}" if n > 100_000 else f"{n:,}")
    lo, hi = stats.sd_interval(c.d.sd, c.d.n)
    mde_lo, mde_hi = (stats.min_detectable_effect(sd, c.d.n, alpha=ALPHA) for sd in (lo, hi))
    few, many = (stats.seeds_needed(effect, sd, alpha=ALPHA) for sd in (lo, hi))
    out.append(f"| {_name(c, study)} | {c.d.sd:.4f} ({lo:.4f}–{hi:.4f}) | {c.d.n} | {mde:.4f} ({mde_lo:.4f}–{mde_hi:.4f}) "
               f"| {fmt(need)} ({fmt(few)}–{fmt(many)}) | {fmt(observed)} |")
  out += ["", f"Power of the two-sided paired t-test at α = {ALPHA:g} (unadjusted), from the noncentral t "
          "distribution with the observed paired SD taken as the truth. An effect below the third column "
          "would usually be missed at these seeds. The paired SD is itself estimated from few seeds: its 95% CI "
          "(χ², n − 1 degrees of freedom) is carried into the effect and seed counts in brackets.", ""]
  return out


def _tuning_table(study, tuning: dict, tuning_runs: list[RunResult]) -> list[str]:
  out = ["## Learning-rate tuning", "",
         f"Each arm's lr multiplier chosen by the mean final eval loss over tuning seeds "
         f"{', '.join(map(str, study.tune_seeds))} (never used for the comparisons); the grid starts at "
         f"{', '.join(_multiplier(m) for m in sorted(study.lr_multipliers))} and widens by one point while the "
         f"best is at an edge (at most {study.widen} points)"
         + (", and every arm's grid grows to as many points as the largest" if getattr(study, "equal_grid", False) else "")
         + f". Evals of the tuning runs read the `{'`, `'.join(sorted({_split_of(r) for r in tuning_runs if r.config}) or ['val'])}` "
         "split. (sd …): the SD of the final loss over the tuning seeds, the noise the choice is made against. "
         "✗: a tuning seed diverged.", "",
         "| arm | " + ("size | " if len(study.sizes) > 1 else "") + "loss by lr multiplier | best | verdict |",
         "|---|" + ("---|" if len(study.sizes) > 1 else "") + "---|---|---|"]
  base_lr = {}
  for r in tuning_runs:
    if r.config is not None:
      base_lr[(r.ref.size, r.ref.arm)] = r.lr / r.ref.lr_multiplier
  for (size, arm), t in tuning.items():
    cells = []
    for m in t.grid:
      score = t.scores.get(m)
      sd = stats.mean_ci(r.final_eval_loss for r in tuning_runs if (r.ref.size, r.ref.arm, r.ref.lr_multiplier)
                         == (size, arm, m) and r.status == "finished").sd
      noise = f" (sd {sd:.4f})" if math.isfinite(sd) else ""
      cells.append(f"{_multiplier(m)}: " + ("pending" if score is None else "✗" if not math.isfinite(score)
                                            else (f"**{score:.4f}**" if m == t.best else f"{score:.4f}") + noise))
    lr = base_lr.get((size, arm))
    best = "—" if t.best is None else _multiplier(t.best) + (f" = {lr * t.best:.3g}" if lr else "")
    verdict = ("still running" if t.pending else "inside the grid" if t.settled else
               "every lr diverged" if t.best is None else "**at the grid's edge** (widening limit reached)")
    out.append(f"| `{arm}` | " + (f"{size} | " if len(study.sizes) > 1 else "") + ", ".join(cells)
               + f" | {best} | {verdict} |")
  return out + [""]


def _per_seed(study, v: _Variants, label) -> list[str]:
  seeds = list(study.seeds)
  out = ["<details><summary>Final eval loss per seed</summary>", "",
         "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
  for key in v.keys:
    by_seed = {r.ref.seed: r for r in v.runs[key]}
    cells = [f"{by_seed[s].final_eval_loss:.4f}" if s in by_seed and by_seed[s].status == "finished"
             else (by_seed[s].status if s in by_seed else "—") for s in seeds]
    out.append(f"| {label(key)} | " + " | ".join(cells) + " |")
  se = [r.final_eval_se for r in v.results if math.isfinite(r.final_eval_se)]
  out += ["", "</details>", ""]
  if se:
    out += [f"Eval noise: the last evaluation's standard error over held-out sequences is {min(se):.4f}–"
            f"{max(se):.4f} nats (the subset is the same for every run, so it shifts every arm alike; "
            "the seed-to-seed spread above is what the CIs measure).", ""]
  return out


# ------------------------------------------------------------------------------------------- scaling

def _scaling(study, v: _Variants, bootstrap: int = 1000):
  """Per arm over sizes: final loss vs compute C = FLOPs/token × tokens. Free fits per arm and one
  shared-exponent fit, each with a seed bootstrap (seeds resampled within each size, the same resample
  for every arm, keeping the pairing)."""
  if len(study.sizes) < 2:
    return [], {}, {}
  per_arm: dict[str, list[tuple[float, dict[int, float]]]] = {}
  for size, arm, m in v.keys:
    finished = v.finished((size, arm, m))
    if finished:
      name = arm if v.tuned or len(study.lr_multipliers) == 1 else f"{arm} lr {_multiplier(m)}"
      compute = finished[0].flops_per_token * finished[0].tokens
      per_arm.setdefault(name, []).append((compute, {r.ref.seed: r.final_eval_loss for r in finished}))
  per_arm = {k: sorted(p) for k, p in per_arm.items() if len(p) >= 2}
  if not per_arm:
    return [], {}, {}
  rng = np.random.default_rng(0)
  mean = lambda d, seeds: (lambda v: float(np.mean(v)) if v else math.nan)([d[s] for s in seeds if s in d])
  seeds = list(study.seeds)

  def fit_all(sample):
    if any(math.isnan(mean(d, sample)) for p in per_arm.values() for _, d in p):
      return None  # a resample holding none of a variant's finished seeds
    free = {k: scaling.power_law_fit([c for c, _ in p], [mean(d, sample) for _, d in p]) for k, p in per_arm.items()}
    shared = scaling.shared_exponent_fit({k: ([c for c, _ in p], [mean(d, sample) for _, d in p])
                                        for k, p in per_arm.items()}) if len(per_arm) > 1 else None
    return free, shared

  free, shared = fit_all(seeds)
  draws = [fit_all(list(rng.choice(seeds, len(seeds)))) for _ in range(bootstrap if len(seeds) > 1 else 0)]
  draws = [d for d in draws if d is not None]
  ci = lambda xs: stats.percentile_interval(xs)
  fmt_ci = lambda xs, f: (lambda lo, hi: f" [{lo:{f}}, {hi:{f}}]" if math.isfinite(lo) else "")(*ci(xs))
  lines = ["## Scaling fit", "", "Final eval loss L against training compute C (FLOPs = FLOPs/token × tokens), "
           "least squares of log L = log a − b·log C on the per-size means; [95% CI] from "
           f"{len(draws)} bootstrap resamples of the seeds. R² only for fits of more than 2 points.", "",
           "| arm | sizes | seeds per size | a | b | R² (log-log) |", "|---|---|---|---|---|---|"]
  for k, p in per_arm.items():
    a, b, r2 = free[k]
    lines.append(f"| `{k}` | {len(p)} | {min(len(d) for _, d in p)} | {a:.4g}{fmt_ci([d[0][k][0] for d in draws], '.4g')} | "
                 f"{b:.4f}{fmt_ci([d[0][k][1] for d in draws], '.4f')} | "
                 f"{f'{r2:.3f}' if math.isfinite(r2) else '— (≤ 2 points)'} |")
  if shared:
    prefactors, b = shared
    base = study.baseline if study.baseline in prefactors else next(iter(prefactors))
    lines += ["", f"Shared exponent (one b for every arm, so prefactors compare at any compute): "
              f"b = {b:.4f}{fmt_ci([d[1][1] for d in draws], '.4f')}.", "",
              f"| arm | a | a / a(`{base}`): loss ratio at equal compute |", "|---|---|---|"]
    for k, a in prefactors.items():
      ratio = [d[1][0][k] / d[1][0][base] for d in draws]
      lines.append(f"| `{k}` | {a:.4g} | {a / prefactors[base]:.4f}{fmt_ci(ratio, '.4f')} |")
  lines.append("")
  lines += scaling.report_lines(per_arm, study.baseline)
  points = {k: [(c, mean(d, seeds)) for c, d in p] for k, p in per_arm.items()}
  return lines, points, {k: free[k][:2] for k in per_arm}


# ------------------------------------------------------------------------------------------- figures

def _figures(study, v: _Variants, label, tuning_runs, tuning, comparisons, scaling_points, fits,
             out_dir: str) -> list[tuple[str, str, str]]:
  figures = []
  reference = min(study.lr_multipliers, key=lambda m: abs(math.log(m)))
  curve_keys = [k for k in v.keys if (v.tuned or k[2] == reference) and v.finished(k)]
  lr_note = f" at lr {_multiplier(reference)}" if len(study.lr_multipliers) > 1 and not v.tuned else ""
  if curve_keys:
    series = {label(k): [plot.run_curve(r.records, "loss") for r in v.finished(k)] for k in curve_keys}
    fig = plot.loss_curves(series, metric="loss", title=f"{study.name}: training loss{lr_note}")
    figures.append(("Training loss", _save(fig, out_dir, "loss.png"), ""))
    series = {label(k): [plot.run_curve(r.records, "eval_loss") for r in v.finished(k)] for k in curve_keys}
    fig = plot.loss_curves(series, metric="eval_loss", smooth=0.0, title=f"{study.name}: eval loss{lr_note}")
    figures.append(("Eval loss", _save(fig, out_dir, "eval_loss.png"),
                    "Bands: each arm's own 95% CI over seeds (unpaired). Overlapping bands do not mean no "
                    "difference: the arms share seeds, and the paired differences below are what the tests use."))
    differences = {}
    for c in comparisons:
      if (v.tuned or c.m == reference) and c.d.n:
        ka, kb = v.key(c.size, c.arm, c.m), v.key(c.size, c.other, c.m)
        other = {r.ref.seed: r for r in v.finished(kb)}
        name = f"{c.arm} − {c.other}" + (f" @ {c.size}" if len(study.sizes) > 1 else "")
        differences[name] = [_difference(r.records, other[r.ref.seed].records)
                             for r in v.finished(ka) if r.ref.seed in other]
    if differences:
      fig = plot.difference_curves(differences, metric="eval_loss",
                                   title=f"{study.name}: paired eval-loss differences, seed by seed{lr_note}")
      figures.append(("Paired differences", _save(fig, out_dir, "loss_difference.png"), ""))
    compute = {label(k): [(r.records, r.flops_per_token) for r in v.finished(k)] for k in curve_keys}
    figures.append(("Loss against compute and wall-clock time", _save(plot.loss_vs_compute(compute), out_dir,
                                                                      "compute.png"),
                    "Training FLOPs count the mixing (moa_jax.summary). Wall-clock: the sum of the logged "
                    "intervals (compilation and evaluation excluded), on whatever machine ran it. Read the right "
                    "panel only for arms that ran one at a time on an otherwise idle machine; arms run side by "
                    "side, or on a shared CPU, measure contention there, not the arms' cost. A wall-clock "
                    "budget takes each arm's tokens/s measured alone (Study.throughput)."))
  lr_runs = tuning_runs if tuning else ([r for r in v.results] if len(study.lr_multipliers) > 1 else [])
  if lr_runs:
    points = {}
    for size, arm in dict.fromkeys((r.ref.size, r.ref.arm) for r in lr_runs):
      name = arm if len(study.sizes) == 1 else f"{arm} {size}"
      for m in sorted({r.ref.lr_multiplier for r in lr_runs if (r.ref.size, r.ref.arm) == (size, arm)}):
        runs = [r for r in lr_runs if (r.ref.size, r.ref.arm, r.ref.lr_multiplier) == (size, arm, m)]
        if not any(r.params for r in runs):
          continue
        e = stats.mean_ci(r.final_eval_loss for r in runs if r.status == "finished")
        lr = next(r.lr for r in runs if r.params)
        points.setdefault(name, []).append((lr, e.mean, e.half_width, sum(r.status == "diverged" for r in runs)))
    chosen = {(arm if len(study.sizes) == 1 else f"{arm} {size}"): t.best for (size, arm), t in tuning.items()}
    base = {(r.ref.arm if len(study.sizes) == 1 else f"{r.ref.arm} {r.ref.size}"): r.lr / r.ref.lr_multiplier
            for r in lr_runs if r.params}
    best = {k: base[k] * m for k, m in chosen.items() if m is not None and k in base}
    if points:
      title = "lr tuning: final eval loss on the tuning seeds (○ chosen)" if tuning else ""
      evals = getattr(study, "final_evals", 1)
      ylabel = "final eval loss (nats/token)" + (f": mean of the last {evals} evals" if evals > 1 else ": last eval")
      figures.append(("Learning rate", _save(plot.lr_sensitivity(points, best=best, title=title, ylabel=ylabel),
                                             out_dir, "lr_sensitivity.png"), ""))
  if fits:
    figures.append(("Scaling", _save(plot.scaling(scaling_points, fits), out_dir, "scaling.png"), ""))
  for field, name, what in (("gates", "gates.png", "mean gate / coefficient"),
                            ("gates_std", "gates_std.png", "gate std over tokens")):
    panels = []
    for key in curve_keys:
      gated = [getattr(r, field) for r in v.finished(key) if getattr(r, field)]
      for branch in (gated[0] if gated else {}):
        mean = {act: np.mean([g[branch][act] for g in gated], axis=0).tolist() for act in gated[0][branch]}
        panels.append((f"{label(key)}: {BRANCHES.get(branch, branch)}", mean))
    if panels:
      title = ("mean gate per layer × activation" if field == "gates" else
               "per-token spread of MoA gates: std over the batch's tokens")
      note = ("" if field == "gates" else "0 everywhere would mean MoA's gates do not depend on the token "
              "(MoA reduced to LA); LA coefficients have no spread and are not drawn.")
      fig = plot.gate_heatmaps(panels, colour_label=what, title=f"{title} (last logged step, mean over seeds)")
      figures.append(("Gates" if field == "gates" else "Gate spread over tokens", _save(fig, out_dir, name), note))
  return figures


# Gate branches as metrics.jsonl names them -> what they mix.
BRANCHES = {"ffn.mix": "σ(W1x) branch (ffn.mix)", "ffn.mix_u": "W2x branch (ffn.mix_u)"}


def _difference(records: list[dict], other: list[dict], metric: str = "eval_loss") -> plot.SeedCurve:
  """(tokens, metric − the other run's) at the steps both runs logged it."""
  base = {r["step"]: r[metric] for r in other if r.get(metric) is not None}
  kept = [r for r in records if r.get(metric) is not None and r["step"] in base]
  return (np.array([r["tokens"] for r in kept], float),
          np.array([r[metric] - base[r["step"]] for r in kept], float))


def _save(fig, out_dir: str, name: str) -> str:
  plot.save(fig, os.path.join(out_dir, name))
  return name


# ---------------------------------------------------------------------------------------- provenance

def provenance(results: list[RunResult], command: str = "") -> list[str]:
  """Commit, library versions, devices, data sets and command: what a reader needs to rerun it."""
  import importlib.metadata
  import platform
  import subprocess

  import jax

  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10).stdout.strip()
    commit = (commit or "unknown") + (" (with uncommitted changes)" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    commit = "unknown (no git)"
  versions = []
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy"):
    try:
      versions.append(f"{package} {importlib.metadata.version(package)}")
    except importlib.metadata.PackageNotFoundError:
      continue
  devices = jax.devices()
  lines = ["## Provenance", "", f"- commit: `{commit}`", f"- Python {platform.python_version()}; "
           + ", ".join(versions),
           f"- devices (the process that wrote this report, which trained the runs when it was "
           f"`python -m moa_jax.study`): {len(devices)} × {devices[0].device_kind} ({devices[0].platform}), "
           f"{os.cpu_count()} host CPUs"]
  data_lines = [f"- data: {_data_key(json.loads(data), results)}"  # runs differing only in eval_split share a set
                for data in dict.fromkeys(r.config.data.to_json_best_effort(sort_keys=True) for r in results if r.config)]
  lines += list(dict.fromkeys(data_lines))
  if command:
    lines.append(f"- command: `{command}`")
  return lines + [""]


def _data_key(data: dict, results: list[RunResult]) -> str:
  """The prepared set (its cache directory, named by its key's hash) that matches the run's data
  config, found among the cache's meta.json files; nothing is prepared here."""
  import glob

  from moa_jax.data.prepare import default_cache_root

  config = next(r.config for r in results if r.config and json.loads(r.config.data.to_json_best_effort()) == data)
  tokenizer = data["tokenizer"] or f"bpe{config.model.vocab_size}"
  fields = (f"source {data['source']}, tokenizer {tokenizer}, max_bytes {data['max_bytes']:,}, "
            f"val_percent {data['val_percent']}")
  for meta_path in sorted(glob.glob(os.path.join(data["cache_dir"] or default_cache_root(), "*", "meta.json"))):
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      key = meta["key"]
    except (OSError, ValueError, KeyError):
      continue
    name = os.path.basename(os.path.dirname(meta_path))
    if (name.startswith(data["source"].split(":")[0] + "-") and key.get("max_bytes") == data["max_bytes"]
        and key.get("val_percent") == data["val_percent"] and (data["tokenizer"] or key.get("tokenizer") == tokenizer)):
      splits = meta.get("splits", {})
      sizes = ", ".join(f"{k} {_si(v['n_tokens'])} tokens in {v.get('n_docs', '?'):,} documents"
                        + (f" (largest {v['max_doc_tokens'] / v['n_tokens']:.0%})" if v.get("max_doc_tokens") and k != "train" else "")
                        for k, v in splits.items() if v.get("n_tokens"))
      return f"prepared set `{name}` (key {json.dumps(key, sort_keys=True)}; {sizes})"
  return f"{fields} (its prepared set is not in this machine's cache)"
