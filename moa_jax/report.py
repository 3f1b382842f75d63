"""The markdown report of a study: its assembly, the scaling fit and the provenance. The tables are in
moa_jax/report_tables.py, the figures in moa_jax/report_figures.py, the runs they read in
moa_jax/study_runs.py, the statistics in moa_jax/stats.py.

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

import json
import math
import os

import numpy as np

from moa_jax import heldout, report_figures, report_tables, scaling, stats
from moa_jax.report_tables import _label, _multiplier, _name, _si, _Variants
from moa_jax.study_runs import RunRef, RunResult, read_run


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
  lines += report_tables._run_shapes(study, results)
  if details:
    lines += ["<details><summary>The study file's notes</summary>", "", "```text", details, "```", "",
              "</details>", ""]
  comparisons = report_tables._comparisons(study, v)
  lines += report_tables._table(study, v, label, tuning)
  lines += report_tables._comparison_table(study, comparisons)
  lines += report_tables._power_table(study, comparisons)
  if tuning:
    lines += report_tables._tuning_table(study, tuning, tuning_runs)
  lines += report_tables._per_seed(study, v, label)
  if getattr(study, "document_se", False):
    pairs = [(c, v.key(c.size, c.arm, c.m), v.key(c.size, c.other, c.m)) for c in comparisons]
    lines += heldout.report_lines({k: v.finished(k) for k in v.keys}, pairs, lambda c: _name(c, study), label)
  scaling_lines, scaling_points, fits = _scaling(study, v)
  lines += scaling_lines
  figures = report_figures._figures(study, v, label, tuning_runs, tuning, comparisons, scaling_points, fits, out_dir)
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
