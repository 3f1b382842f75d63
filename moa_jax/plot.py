"""Figures of runs and studies: loss curves, LR sensitivity, scaling fits, gate heatmaps.

    python -m moa_jax.plot RUN_DIR [RUN_DIR ...] --out FILE.png [--metric loss|lm_loss|eval_loss]

Each function takes plain numbers and returns a matplotlib Figure built without pyplot (no global
state, no GUI backend); `save` writes it. The study report (moa_jax/report.py), the CLI below and the
Colab notebook all draw through these functions.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from moa_jax import cli

SeedCurve = tuple[np.ndarray, np.ndarray]  # (x (N,), y (N,)) of one seed


def ema(y: Sequence[float], smooth: float) -> np.ndarray:
  """Debiased exponential moving average (TensorBoard's smoothing); smooth = 0 returns y."""
  out, s = np.empty(len(y)), 0.0
  for i, v in enumerate(y):
    s = smooth * s + (1 - smooth) * v
    out[i] = s / (1 - smooth ** (i + 1))
  return out


# The y-axis label of each metric metrics.jsonl holds (name, unit).
UNITS = {
    "loss": ("training loss", "nats/token"), "lm_loss": ("training LM loss", "nats/token"),
    "eval_loss": ("eval loss", "nats/token"), "eval_loss_se": ("eval loss standard error", "nats/token"),
    "grad_norm": ("gradient norm", "global L2 norm"), "param_norm": ("parameter norm", "global L2 norm"),
    "update_norm": ("update norm", "global L2 norm"), "lr": ("learning rate", "the schedule's value"),
    "tokens_per_sec": ("throughput", "tokens/s"), "mfu": ("MFU", "fraction of peak FLOP/s"),
    "aux_loss": ("MoE load-balancing loss", "dimensionless"), "z_loss": ("MoE router z-loss", "dimensionless"),
}


def axis_label(metric: str, smooth: float = 0.0) -> str:
  name, unit = UNITS.get(metric, (metric, "as logged"))
  return f"{name} ({unit}{f', EMA {smooth:g}' if smooth else ''})"


def _seed_band(curves: list[SeedCurve], smooth: float):
  """Smoothed seeds on their common x: (x, mean, lo, hi), lo/hi the 95% Student-t interval of the
  mean over seeds (equal to the mean with one seed)."""
  from moa_jax.stats import t_quantile

  common = curves[0][0]
  for x, _ in curves[1:]:
    common = np.intersect1d(common, x)
  ys = np.stack([ema(y, smooth)[np.isin(x, common)] for x, y in curves])  # (seeds, N)
  n = len(curves)
  half = t_quantile(0.975, n - 1) * ys.std(0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(ys.shape[1])
  return common, ys.mean(0), ys.mean(0) - half, ys.mean(0) + half


def _colours(n: int):
  return [f"C{i % 10}" for i in range(n)]


def _log_x(ax, xs: np.ndarray) -> str:
  """A log x axis when the values span a decade or more (else linear: a narrow log axis labels its
  minor ticks into a smear), widened around a single value. Returns the axis label's suffix."""
  xs = xs[xs > 0]
  if len(xs) and xs.max() < 10 * xs.min():
    if xs.min() == xs.max():
      ax.set_xlim(xs.min() * 0.9, xs.max() * 1.1)
    return ""
  ax.set_xscale("log")
  return " (log scale)"


BAND_NOTE = "line: mean over seeds; band: 95% t-interval of the mean"


def loss_curves(series: dict[str, list[SeedCurve]], *, metric: str = "loss", smooth: float = 0.6,
                x_label: str = "training tokens", title: str = "") -> Figure:
  """One colour per label: the mean over seeds of the smoothed curves, and a 95% CI band over seeds.

  Left: the whole run, log-x. Right: the last half of the longest run, linear x and zoomed y, where
  arms that differ by a few hundredths of a nat can be told apart. A single logged point is drawn as
  a marker on both.
  """
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  full, zoom = fig.subplots(1, 2)
  xs = np.concatenate([c[0] for curves in series.values() for c in curves if len(c[0])] or [np.zeros(0)])
  x_max = xs.max() if len(xs) else 1.0
  zoom_lo, zoom_hi = [], []
  for colour, (label, curves) in zip(_colours(len(series)), series.items()):
    curves = [c for c in curves if len(c[0])]
    if not curves:
      continue
    x, mean, lo, hi = _seed_band(curves, smooth)
    name = f"{label} ({len(curves)} seeds)" if len(curves) > 1 else label
    for ax in (full, zoom):
      ax.plot(x, mean, color=colour, lw=1.6, label=name, marker="o" if len(x) < 12 else None, ms=3)
      if len(curves) > 1:
        ax.fill_between(x, lo, hi, color=colour, alpha=0.2, lw=0)
    late = x >= x_max / 2
    if late.any():
      zoom_lo.append(lo[late].min())
      zoom_hi.append(hi[late].max())
  y_label = axis_label(metric, smooth)
  scale = _log_x(full, xs)
  full.set(xlabel=f"{x_label}{scale}", ylabel=y_label, title="whole run")
  zoom.set(xlabel=x_label, ylabel=y_label, title="last half (linear, zoomed)")
  if len(xs) and xs.min() < xs.max():
    zoom.set_xlim(x_max / 2, x_max * 1.01)
  if zoom_lo:
    pad = 0.05 * (max(zoom_hi) - min(zoom_lo)) or 0.01
    zoom.set_ylim(min(zoom_lo) - pad, max(zoom_hi) + pad)
  for ax in (full, zoom):
    ax.grid(True, which="both", alpha=0.3)
  full.legend(fontsize=8)
  if any(len(c) > 1 for c in series.values()):
    zoom.text(0.99, 0.99, BAND_NOTE, transform=zoom.transAxes, ha="right", va="top", fontsize=8, color="0.35")
  if title:
    fig.suptitle(title)
  return fig


def difference_curves(series: dict[str, list[SeedCurve]], *, metric: str = "eval_loss", smooth: float = 0.0,
                      title: str = "") -> Figure:
  """series: "a − b" -> per-seed (tokens, a − b) at the steps both logged. One colour per pair: the
  mean over seeds of the paired differences and its 95% t-interval (the paired CI at every point).
  Linear x, so the end of training, where the comparison is made, is not squeezed into a corner."""
  fig = Figure(figsize=(8, 4.5), layout="constrained")
  ax = fig.subplots()
  ax.axhline(0.0, color="0.3", lw=1, ls="--")
  for colour, (label, curves) in zip(_colours(len(series)), series.items()):
    curves = [c for c in curves if len(c[0])]
    if not curves:
      continue
    x, mean, lo, hi = _seed_band(curves, smooth)
    ax.plot(x, mean, color=colour, lw=1.6, marker="o" if len(x) < 12 else None, ms=3,
            label=f"{label} ({len(curves)} seeds)" if len(curves) > 1 else label)
    if len(curves) > 1:
      ax.fill_between(x, lo, hi, color=colour, alpha=0.2, lw=0)
  name, unit = UNITS.get(metric, (metric, "as logged"))
  ax.set(xlabel="training tokens", ylabel=f"Δ {name} ({unit})",
         title=title or "paired differences, seed by seed (below 0: the first arm is ahead)")
  ax.grid(True, alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  if any(len(c) > 1 for c in series.values()):
    ax.text(0.99, 0.01, BAND_NOTE + " (paired)", transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
            color="0.35")
  return fig


def wall_clock(records: list[dict]) -> np.ndarray:
  """Seconds of training up to each record: the sum over logged intervals of tokens / tokens_per_sec
  (compilation and evaluation are not in tokens_per_sec, so not in this clock)."""
  t, last, out = 0.0, 0, []
  for r in records:
    if r.get("tokens_per_sec"):
      t += (r["tokens"] - last) / r["tokens_per_sec"]
    last = r["tokens"]
    out.append(t)
  return np.array(out, float)


def loss_vs_compute(series: dict[str, list[tuple[list[dict], float]]], *, metric: str = "eval_loss",
                    title: str = "") -> Figure:
  """series: label -> [(one seed's records, training FLOPs per token)]. Left: the metric against
  training FLOPs; right: against training wall-clock seconds. One thin line per seed."""
  fig = Figure(figsize=(12, 4.5), layout="constrained")
  flops_ax, time_ax = fig.subplots(1, 2)
  all_x = {flops_ax: [], time_ax: []}
  for colour, (label, runs) in zip(_colours(len(series)), series.items()):
    for i, (records, flops_per_token) in enumerate(runs):
      kept = [j for j, r in enumerate(records) if r.get(metric) is not None]
      if not kept:
        continue
      y = np.array([records[j][metric] for j in kept], float)
      flops = np.array([records[j]["tokens"] for j in kept], float) * flops_per_token
      seconds = wall_clock(records)[kept]
      for ax, x in ((flops_ax, flops), (time_ax, seconds)):
        ax.plot(x, y, color=colour, lw=1.0, alpha=0.8, marker="o" if len(x) < 12 else None, ms=3,
                label=label if i == 0 else None)
        all_x[ax].append(x)
  for ax, name in ((flops_ax, "training FLOPs (mixing included)"), (time_ax, "training wall-clock (s)")):
    xs = np.concatenate(all_x[ax]) if all_x[ax] else np.zeros(0)
    ax.set(xlabel=f"{name}{_log_x(ax, xs)}", ylabel=axis_label(metric))
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  fig.suptitle(title or f"{UNITS.get(metric, (metric,))[0]} against compute and time (one line per seed)")
  return fig


def lr_sensitivity(points: dict[str, list[tuple[float, float, float, int]]], *, best: dict | None = None,
                   title: str = "", ylabel: str = "final eval loss (nats/token)") -> Figure:
  """points: label -> [(peak lr, mean final eval loss, 95% CI half-width, diverged seeds)], one per lr.

  A diverged seed is drawn as a cross at the top of the plot; means use the seeds that finished.
  best: label -> the chosen peak lr, ringed. A point from one seed (no CI) is drawn hollow: n = 1.
  """
  fig = Figure(figsize=(6.5, 4.5), layout="constrained")
  ax = fig.subplots()
  finite = [m for pts in points.values() for _, m, _, _ in pts if math.isfinite(m)]
  top = max(finite) + 0.05 * (max(finite) - min(finite) or 1) if finite else 1.0
  for colour, (label, pts) in zip(_colours(len(points)), points.items()):
    pts = sorted(pts)
    ok = [(lr, m, h) for lr, m, h, _ in pts if math.isfinite(m)]
    if ok:
      lrs, means, halves = map(np.array, zip(*ok))
      ax.errorbar(lrs, means, yerr=np.where(np.isfinite(halves), halves, 0), color=colour, marker="o",
                  capsize=3, label=label)
      single = ~np.isfinite(halves)
      if single.any():
        ax.scatter(lrs[single], means[single], s=36, facecolors="white", edgecolors=colour, zorder=3)
    chosen = [(lr, m) for lr, m, _ in ok if best and label in best and math.isclose(lr, best[label], rel_tol=1e-6)]
    if chosen:
      ax.scatter(*zip(*chosen), s=160, facecolors="none", edgecolors=colour, lw=1.5, zorder=4)
    failed = [lr for lr, _, _, n_failed in pts if n_failed]
    if failed:
      ax.scatter(failed, [top] * len(failed), marker="x", s=60, color=colour)
  notes = (["×: a seed diverged at this lr"] if any(n for pts in points.values() for *_, n in pts) else []) + (
      ["hollow: n = 1 (one seed, no CI)"] if any(not math.isfinite(h) for pts in points.values()
                                                   for _, m, h, _ in pts if math.isfinite(m)) else [])
  if notes:
    ax.text(0.01, 0.99, "; ".join(notes), transform=ax.transAxes, va="top", fontsize=8)
  lrs = np.array([lr for pts in points.values() for lr, *_ in pts], float)
  ax.set_xscale("log")  # lr grids are geometric
  if len(lrs) and lrs.min() == lrs.max():
    ax.set_xlim(lrs.min() / 2, lrs.max() * 2)
  ax.set(xlabel="peak learning rate (log scale)", ylabel=ylabel,
         title=title or "learning-rate sensitivity (mean ± 95% CI over seeds)")
  ax.grid(True, which="both", alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  return fig


def scaling(points: dict[str, list[tuple[float, float]]], fits: dict[str, tuple[float, float]], *,
            title: str = "") -> Figure:
  """points: label -> [(training FLOPs, final eval loss)]; fits: label -> (a, b) of loss = a · C^-b."""
  fig = Figure(figsize=(6.5, 4.5), layout="constrained")
  ax = fig.subplots()
  for colour, (label, pts) in zip(_colours(len(points)), points.items()):
    c, loss = map(np.array, zip(*sorted(pts)))
    name = label
    if label in fits:
      a, b = fits[label]
      grid = np.geomspace(c.min() / 2, c.max() * 2, 50)
      ax.plot(grid, a * grid ** -b, color=colour, ls="--", lw=1)
      name = f"{label}: L = {a:.3g}·C^-{b:.3f}"
    ax.scatter(c, loss, color=colour, label=name, zorder=3)
  ax.set_xscale("log")
  ax.set_yscale("log")
  plain = FuncFormatter(lambda v, _: f"{v:g}")  # losses span a narrow range: label minor ticks too
  ax.yaxis.set_major_formatter(plain)
  ax.yaxis.set_minor_formatter(plain)
  ax.set(xlabel="training compute C (FLOPs, log scale)", ylabel="final eval loss (nats/token, log scale)",
         title=title or "scaling: final loss vs compute, power-law fit")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def gate_heatmaps(panels: list[tuple[str, dict[str, list[float]]]], *, colour_label: str = "mean gate / coefficient",
                  title: str = "") -> Figure:
  """panels: [(title, {activation: [value per layer]})]: one heatmap (layers × activations) each, on
  one shared colour scale (mean gates, or their std over tokens)."""
  cols = min(len(panels), 2)
  rows = math.ceil(len(panels) / cols)
  n_layers = max(len(v) for _, gates in panels for v in gates.values())
  n_acts = max(len(gates) for _, gates in panels)
  fig = Figure(figsize=(cols * (1.2 + 0.75 * n_acts), rows * (1.6 + 0.35 * n_layers)), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
  values = np.concatenate([np.ravel(list(g.values())) for _, g in panels])
  lo, hi = min(values.min(), 0.0), max(values.max(), 1e-6)
  cmap = "RdBu_r" if lo < 0 else "viridis"
  if lo < 0:
    lo, hi = -max(-lo, hi), max(-lo, hi)
  image = None
  for ax, (name, gates) in zip(axes, panels):
    acts = list(gates)
    grid = np.array([gates[a] for a in acts]).T  # (layers, K)
    image = ax.imshow(grid, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
    ax.set_xticks(range(len(acts)), acts, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(grid.shape[0]), [str(i) for i in range(grid.shape[0])], fontsize=8)
    ax.set(ylabel="layer", title=name)
    if grid.size <= 200:
      for (i, j), v in np.ndenumerate(grid):
        dark = abs(v) > 0.6 * hi if cmap == "RdBu_r" else (v - lo) < 0.6 * (hi - lo)
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  fig.colorbar(image, ax=axes[:len(panels)].tolist(), label=colour_label, shrink=0.8)
  fig.suptitle(title or "mean gate value per layer × activation (last logged step, mean over seeds)")
  return fig


def save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  return path


def run_curve(records: list[dict], metric: str, x: str = "tokens") -> SeedCurve:
  """(x, y) of one run's records that carry `metric`."""
  kept = [r for r in records if r.get(metric) is not None]
  return np.array([r[x] for r in kept], float), np.array([r[metric] for r in kept], float)


@cli.command()
def main(argv: list[str] | None = None) -> None:
  from moa_jax import rundir

  parser = cli.ArgumentParser(
      prog="python -m moa_jax.plot", description="Loss curves of one or more runs, one colour per run.")
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories written by moa_jax.train")
  parser.add_argument("--out", required=True, help="PNG file to write")
  parser.add_argument("--metric", default="loss", help="loss | lm_loss | eval_loss | grad_norm | ...")
  parser.add_argument("--smooth", type=float, default=None,
                      help="EMA smoothing in [0, 1) (default 0.6; 0 for eval_loss)")
  parser.add_argument("--x", default="tokens", choices=("tokens", "step"), help="x axis")
  args = parser.parse_args(argv)
  if args.smooth is not None and not 0 <= args.smooth < 1:
    raise ValueError(f"--smooth = {args.smooth}; must be in [0, 1) (0: no smoothing)")
  smooth = args.smooth if args.smooth is not None else (0.0 if args.metric == "eval_loss" else 0.6)
  names = [os.path.basename(os.path.normpath(d)) for d in args.run_dirs]
  if len(set(names)) < len(names):
    names = [os.path.normpath(d) for d in args.run_dirs]
  series = {}
  for name, workdir in zip(names, args.run_dirs):
    curve = run_curve(rundir.records(workdir), args.metric, args.x)
    if not len(curve[0]):
      raise SystemExit(f"error: {workdir}/metrics.jsonl has no {args.metric!r} values")
    series[name] = [curve]
  fig = loss_curves(series, metric=args.metric, smooth=smooth,
                    x_label="training tokens" if args.x == "tokens" else "optimizer step")
  print(f"wrote {save(fig, args.out)}")


if __name__ == "__main__":
  main()
