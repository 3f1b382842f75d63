"""Statistics over seeds, and the markdown report of a study with its figures.

Per arm, the final eval loss is summarised as mean ± 95% CI over seeds (Student t with n − 1 degrees
of freedom). Against the baseline arm, the comparison is paired: seed s of every arm shares its init
seed and data order, so d_s = loss(arm, s) − loss(baseline, s), and the report gives mean(d) ± its CI —
much tighter than comparing two unpaired means when seeds move both arms together.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Any, Iterable, Sequence

import numpy as np

from moa_jax import plot, rundir


# ---------------------------------------------------------------------------------------- statistics

def _betacf(a: float, b: float, x: float) -> float:
  """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
  tiny = 1e-300
  c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 500):
    for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
               -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1.0 + aa * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + aa / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < 1e-15:
      break
  return h


def betainc(a: float, b: float, x: float) -> float:
  """Regularised incomplete beta function I_x(a, b)."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
               + a * math.log(x) + b * math.log1p(-x))
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(log_front) * _betacf(a, b, x) / a
  return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
  """P(T ≤ t) for Student's t with df degrees of freedom."""
  tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
  return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
  """The t with P(T ≤ t) = p (bisection on t_cdf); df = inf gives the normal quantile."""
  if not 0.0 < p < 1.0:
    raise ValueError(f"p = {p}; must be in (0, 1)")
  if math.isinf(df):
    return statistics.NormalDist().inv_cdf(p)
  if p < 0.5:
    return -t_quantile(1.0 - p, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < p:
    lo, hi = hi, 2.0 * hi
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    if hi - lo < 1e-12 * hi:
      break
  return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A mean over n values and the half-width of its confidence interval (nan when n < 2)."""
  mean: float
  half_width: float
  n: int

  @property
  def excludes_zero(self) -> bool:
    return math.isfinite(self.half_width) and abs(self.mean) > self.half_width

  def format(self, digits: int = 4, signed: bool = False) -> str:
    if self.n == 0:
      return "—"
    mean = f"{self.mean:+.{digits}f}" if signed else f"{self.mean:.{digits}f}"
    if not math.isfinite(self.half_width):
      return f"{mean} (n={self.n})"
    return f"{mean} ± {self.half_width:.{digits}f}"


def mean_ci(values: Iterable[float], level: float = 0.95) -> Estimate:
  """Mean ± t_{(1+level)/2, n-1} · s / √n (s: sample standard deviation)."""
  v = [float(x) for x in values]
  if not v:
    return Estimate(math.nan, math.nan, 0)
  if len(v) == 1:
    return Estimate(v[0], math.nan, 1)
  sem = statistics.stdev(v) / math.sqrt(len(v))
  return Estimate(statistics.fmean(v), t_quantile((1 + level) / 2, len(v) - 1) * sem, len(v))


def paired_difference(arm: dict[int, float], baseline: dict[int, float], level: float = 0.95) -> Estimate:
  """mean ± CI of arm[s] − baseline[s] over the seeds s both have."""
  return mean_ci([arm[s] - baseline[s] for s in sorted(set(arm) & set(baseline))], level)


def power_law_fit(compute: Sequence[float], loss: Sequence[float]) -> tuple[float, float, float]:
  """Least squares of log L = log a − b log C. Returns (a, b, R² of the log-log fit)."""
  x, y = np.log(np.asarray(compute, float)), np.log(np.asarray(loss, float))
  slope, intercept = np.polyfit(x, y, 1)
  residual = y - (intercept + slope * x)
  total = float(((y - y.mean()) ** 2).sum())
  r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else 1.0
  return math.exp(intercept), -float(slope), r2


# ------------------------------------------------------------------------------------------ run state

@dataclasses.dataclass(frozen=True)
class RunRef:
  """One run of a study: the arm it belongs to and where it lives."""
  size: str
  arm: str
  lr_multiplier: float
  seed: int
  workdir: str


@dataclasses.dataclass
class RunResult:
  ref: RunRef
  status: str                      # finished | diverged | incomplete | pending
  final_eval_loss: float = math.nan
  tokens: int = 0
  tokens_per_sec: float = math.nan
  lr: float = math.nan             # peak lr
  params: int = 0                  # total parameters
  flops_per_token: float = math.nan
  gates: dict | None = None        # last logged {branch: {activation: [per layer]}}
  records: list = dataclasses.field(default_factory=list)
  error: str = ""
  config: Any = None               # the run's ConfigDict (config.json)


FAILED = "failed.json"  # written by the study runner into a run that stopped with a TrainingError


def read_run(ref: RunRef) -> RunResult:
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
  if result.status != "diverged" and _complete(result.records, config.train.steps):
    result.status, result.final_eval_loss = "finished", last["eval_loss"]
  return result


def _complete(records: list[dict], steps: int) -> bool:
  return bool(records) and records[-1]["step"] == steps and records[-1].get("eval_loss") is not None


def is_finished(workdir: str, steps: int) -> bool:
  """metrics.jsonl reaches `steps` with an eval loss there."""
  return os.path.exists(os.path.join(workdir, "metrics.jsonl")) and _complete(rundir.records(workdir), steps)


# ---------------------------------------------------------------------------------------- the report

def _si(n: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.3g}"


def _multiplier(m: float) -> str:
  return f"{m:g}×"


class _Variants:
  """The study's runs grouped by variant (size, arm, lr multiplier) and seed, in study order."""

  def __init__(self, results: list[RunResult]):
    self.results = results
    self.keys = list(dict.fromkeys((r.ref.size, r.ref.arm, r.ref.lr_multiplier) for r in results))
    self.runs = {k: [r for r in results if (r.ref.size, r.ref.arm, r.ref.lr_multiplier) == k] for k in self.keys}

  def final(self, key) -> dict[int, float]:
    return {r.ref.seed: r.final_eval_loss for r in self.runs.get(key, []) if r.status == "finished"}

  def finished(self, key) -> list[RunResult]:
    return [r for r in self.runs[key] if r.status == "finished"]


def _label(key, sizes: int, lrs: int) -> str:
  size, arm, m = key
  return " ".join([arm] + ([size] if sizes > 1 else []) + ([f"lr {_multiplier(m)}"] if lrs > 1 else []))


def write_report(study, runs: list[RunRef], out_dir: str, command: str = "") -> str:
  """Writes out_dir/report.md and its PNGs; returns the report's path.

  study: any object with .name, .description, .baseline, .sizes, .seeds, .lr_multipliers (moa_jax.study.Study).
  """
  os.makedirs(out_dir, exist_ok=True)
  v = _Variants([read_run(r) for r in runs])
  n_sizes, n_lrs = len(study.sizes), len(study.lr_multipliers)
  label = lambda key: _label(key, n_sizes, n_lrs)
  lines = [f"# Study `{study.name}`", ""]
  summary, _, details = study.description.strip().partition("\n\n")
  if summary:
    lines += [summary, ""]
  if command:
    lines += ["Produced by:", "", "```bash", command, "```", ""]
  done = sum(r.status == "finished" for r in v.results)
  lines += [f"Runs: {done} of {len(v.results)} finished; seeds {', '.join(map(str, study.seeds))} "
            f"(seed s: the same init seed and data order in every arm). Baseline arm: `{study.baseline}`.", ""]
  for size in study.sizes:
    r = next((r for r in v.results if r.ref.size == size and r.config is not None), None)
    if r is not None:
      t, o = r.config.train, r.config.optim
      lines += [f"Each `{size}` run: {t.steps:,} steps × {t.batch_size} sequences × {t.seq_len} tokens "
                f"= {_si(t.steps * t.batch_size * t.seq_len)} tokens, peak lr {o.lr / r.ref.lr_multiplier:.3g}"
                f"{' × the multiplier' if len(study.lr_multipliers) > 1 else ''} ({o.schedule}, "
                f"{o.warmup_steps} warmup steps), {o.name}, {r.config.model.dtype} compute.", ""]
  if details:
    lines += ["<details><summary>The study file's notes</summary>", "", "```text", details, "```", "",
              "</details>", ""]
  lines += _table(study, v, label)
  lines += _per_seed(study, v, label)
  scaling_lines, scaling_points, fits = _scaling(study, v)
  lines += scaling_lines
  figures = _figures(study, v, label, scaling_points, fits, out_dir)
  for title, name in figures:
    lines += [f"## {title}", "", f"![{title}]({name})", ""]
  problems = [r for r in v.results if r.status != "finished"]
  if problems:
    lines += ["## Runs not finished", ""]
    for r in problems:
      why = f": {r.error.splitlines()[0]}" if r.error else ""
      lines.append(f"- `{os.path.basename(r.ref.workdir)}`: {r.status}{why}")
    lines.append("")
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def _per_seed(study, v: _Variants, label) -> list[str]:
  seeds = list(study.seeds)
  out = ["<details><summary>Final eval loss per seed</summary>", "",
         "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
  for key in v.keys:
    by_seed = {r.ref.seed: r for r in v.runs[key]}
    cells = [f"{by_seed[s].final_eval_loss:.4f}" if s in by_seed and by_seed[s].status == "finished"
             else (by_seed[s].status if s in by_seed else "—") for s in seeds]
    out.append(f"| {label(key)} | " + " | ".join(cells) + " |")
  return out + ["", "</details>", ""]


def _table(study, v: _Variants, label) -> list[str]:
  header = ["arm", "final eval loss (mean ± 95% CI)", f"Δ vs `{study.baseline}` (paired, 95% CI)",
            "seeds", "tokens", "params", "tokens/s"]
  if len(study.lr_multipliers) > 1:
    header.insert(1, "peak lr")
  if len(study.sizes) > 1:
    header.insert(1, "size")
  rows = []
  any_significant = False
  for key in v.keys:
    size, arm, m = key
    finished = v.finished(key)
    estimate = mean_ci([r.final_eval_loss for r in finished])
    base = (size, study.baseline, m)
    if arm == study.baseline:
      delta = "—"
    else:
      d = paired_difference(v.final(key), v.final(base))
      delta = d.format(signed=True) + (" *" if d.excludes_zero else "")
      any_significant |= d.excludes_zero
    diverged = sum(r.status == "diverged" for r in v.runs[key])
    seeds = f"{len(finished)}/{len(v.runs[key])}" + (f" ({diverged} diverged)" if diverged else "")
    any_run = next((r for r in v.runs[key] if r.params), None)
    tokens = max((r.tokens for r in finished), default=0)
    speed = np.median([r.tokens_per_sec for r in finished]) if finished else math.nan
    row = [f"`{arm}`", estimate.format(), delta, seeds, _si(tokens) if tokens else "—",
           _si(any_run.params) if any_run else "—", f"{speed:,.0f}" if math.isfinite(speed) else "—"]
    if len(study.lr_multipliers) > 1:
      row.insert(1, f"{any_run.lr:.3g} ({_multiplier(m)})" if any_run else _multiplier(m))
    if len(study.sizes) > 1:
      row.insert(1, size)
    rows.append(row)
  out = ["## Final eval loss", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  out += ["", "Eval loss: mean next-token cross-entropy (nats) on held-out batches at the last step. "
          "Δ < 0: the arm beats the baseline. CI: Student t over seeds; with one seed there is none. "
          "Tokens/s: median over the run's logged intervals (compilation excluded), then over seeds."]
  if any_significant:
    out.append("`*`: the paired 95% CI excludes 0.")
  out.append("")
  return out


def _scaling(study, v: _Variants):
  """Per arm and lr multiplier over sizes: mean final loss vs compute C = FLOPs/token × tokens, fitted."""
  if len(study.sizes) < 2:
    return [], {}, {}
  points: dict[str, list[tuple[float, float]]] = {}
  for size, arm, m in v.keys:
    finished = v.finished((size, arm, m))
    if finished:
      name = arm if len(study.lr_multipliers) == 1 else f"{arm} lr {_multiplier(m)}"
      compute = finished[0].flops_per_token * finished[0].tokens
      points.setdefault(name, []).append((compute, mean_ci(r.final_eval_loss for r in finished).mean))
  lines = ["## Scaling fit", "", "Final eval loss L against training compute C (FLOPs = FLOPs/token × tokens), "
           "least squares of log L = log a − b·log C.", "",
           "| arm | sizes | a | b | R² (log-log) |", "|---|---|---|---|---|"]
  fits = {}
  for name, pts in points.items():
    if len(pts) < 2:
      continue
    a, b, r2 = power_law_fit(*zip(*pts))
    fits[name] = (a, b)
    lines.append(f"| `{name}` | {len(pts)} | {a:.4g} | {b:.4f} | {r2:.3f} |")
  lines.append("")
  return (lines, points, fits) if fits else ([], {}, {})


def _figures(study, v: _Variants, label, scaling_points, fits, out_dir: str) -> list[tuple[str, str]]:
  figures = []
  reference = min(study.lr_multipliers, key=lambda m: abs(math.log(m)))
  curve_keys = [k for k in v.keys if k[2] == reference and v.finished(k)]
  if curve_keys:
    series = {label(k): [plot.run_curve(r.records, "loss") for r in v.finished(k)] for k in curve_keys}
    lr_note = f" at lr {_multiplier(reference)}" if len(study.lr_multipliers) > 1 else ""
    fig = plot.loss_curves(series, metric="training loss", title=f"{study.name}: training loss{lr_note}")
    figures.append(("Training loss", _save(fig, out_dir, "loss.png")))
    series = {label(k): [plot.run_curve(r.records, "eval_loss") for r in v.finished(k)] for k in curve_keys}
    fig = plot.loss_curves(series, metric="eval loss", smooth=0.0, title=f"{study.name}: eval loss{lr_note}")
    figures.append(("Eval loss", _save(fig, out_dir, "eval_loss.png")))
    differences = {}
    for key in curve_keys:
      base = {r.ref.seed: r for r in v.finished((key[0], study.baseline, key[2]))}
      if key[1] != study.baseline and base:
        differences[label(key)] = [_difference(r.records, base[r.ref.seed].records)
                                   for r in v.finished(key) if r.ref.seed in base]
    if differences:
      fig = plot.difference_curves(differences, baseline=study.baseline, metric="training loss",
                                   title=f"{study.name}: training loss minus {study.baseline}'s, seed by seed{lr_note}")
      figures.append((f"Paired difference from {study.baseline}", _save(fig, out_dir, "loss_difference.png")))
  if len(study.lr_multipliers) > 1:
    points = {}
    for size, arm, m in v.keys:
      runs = v.runs[(size, arm, m)]
      if not runs or not any(r.params for r in runs):
        continue
      e = mean_ci(r.final_eval_loss for r in v.finished((size, arm, m)))
      lr = next(r.lr for r in runs if r.params)
      name = arm if len(study.sizes) == 1 else f"{arm} {size}"
      points.setdefault(name, []).append((lr, e.mean, e.half_width, sum(r.status == "diverged" for r in runs)))
    if points:
      figures.append(("Learning-rate sensitivity", _save(plot.lr_sensitivity(points), out_dir, "lr_sensitivity.png")))
  if fits:
    figures.append(("Scaling", _save(plot.scaling(scaling_points, fits), out_dir, "scaling.png")))
  panels = []
  for key in v.keys:
    if key[2] != reference:
      continue
    gated = [r.gates for r in v.finished(key) if r.gates]
    for branch in (gated[0] if gated else {}):
      mean = {act: np.mean([g[branch][act] for g in gated], axis=0).tolist() for act in gated[0][branch]}
      panels.append((f"{label(key)}: {BRANCHES.get(branch, branch)}", mean))
  if panels:
    figures.append(("Gates", _save(plot.gate_heatmaps(panels), out_dir, "gates.png")))
  return figures


# Gate branches as metrics.jsonl names them -> what they mix.
BRANCHES = {"ffn.mix": "σ(W1x) branch (ffn.mix)", "ffn.mix_u": "W2x branch (ffn.mix_u)"}


def _difference(records: list[dict], baseline: list[dict]) -> plot.SeedCurve:
  """(tokens, loss − baseline loss) at the steps both runs logged."""
  base = {r["step"]: r["loss"] for r in baseline if r.get("loss") is not None}
  kept = [r for r in records if r.get("loss") is not None and r["step"] in base]
  return (np.array([r["tokens"] for r in kept], float),
          np.array([r["loss"] - base[r["step"]] for r in kept], float))


def _save(fig, out_dir: str, name: str) -> str:
  plot.save(fig, os.path.join(out_dir, name))
  return name
