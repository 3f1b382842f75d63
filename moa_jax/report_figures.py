"""The report's figures: loss curves, paired differences, compute, lr search, scaling and gates."""

from __future__ import annotations

import math
import os

import numpy as np

from moa_jax import plot, stats
from moa_jax.report_tables import _multiplier, _Variants


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
