"""The report's tables: final losses, paired comparisons (Holm), power, the lr search and seeds.

Each function takes the study, its evaluation runs grouped by variant (Variants) and returns markdown
lines; moa_jax.report puts them together. Statistics: moa_jax/stats.py.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from moa_jax import stats
from moa_jax.study_runs import RunResult

ALPHA = 0.05  # the level of every test, CI and star


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
