"""Where a run's numbers go: `WORKDIR/metrics.jsonl` (one JSON object per record), TensorBoard event
files under `WORKDIR/tb`, and a live progress bar. Only process 0 writes."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

from moa_jax import progress, wandb_log

# Dense bf16 peak FLOP/s per chip (datasheets), for MFU. Unknown devices report mfu = null.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(device) -> float | None:
  kind = device.device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


def mix_record(intermediates, names: tuple[str, ...], sown: str = "mix_mean") -> dict:
  """Sown `mix_mean` values (per layer × activation) -> {branch: {activation: [per layer]}}.
  sown="mix_std": MoA gates' standard deviation over the tokens of the batch, in the same shape."""
  out = {}
  for path, value in jax.tree_util.tree_leaves_with_path(intermediates):
    keys = [str(getattr(k, "key", "")) for k in path]
    if sown not in keys:
      continue
    branch = ".".join(k for k in keys if k and k not in ("layers", sown, "intermediates"))
    value = np.asarray(value).reshape(-1, len(names))  # (layers, K)
    out[branch] = {n: [round(float(v), 5) for v in value[:, k]] for k, n in enumerate(names)}
  return out


def moe_record(intermediates) -> dict:
  """Sown `moe_stats` -> expert_load_max / expert_load_min (fraction of assignments, one entry per MoE
  layer), dropped_fraction (capacity path) and ep_overflow_fraction (assignments dropped by full
  expert-parallel receive buffers), each a mean over MoE layers; ep_overflow_layer (one per MoE layer)
  and ep_overflow_expert (per layer, per expert: the fraction of that expert's assignments dropped).
  {} for a dense model."""
  loads, fractions, per_expert = [], {"dropped": [], "ep_overflow": []}, []
  for path, value in jax.tree_util.tree_leaves_with_path(intermediates):
    keys = [str(getattr(k, "key", "")) for k in path]
    if "moe_stats" in keys and keys[-1] == "load":
      loads.append(np.asarray(value).reshape(-1, np.shape(value)[-1]))  # (MoE layers, E)
    elif "moe_stats" in keys and keys[-1] in fractions:
      fractions[keys[-1]].append(np.asarray(value).reshape(-1))
    elif "moe_stats" in keys and keys[-1] == "ep_overflow_expert":
      per_expert.append(np.asarray(value).reshape(-1, np.shape(value)[-1]))
  if not loads:
    return {}
  load = np.concatenate(loads)
  out = {"expert_load_max": [round(float(v), 5) for v in load.max(axis=1)],
         "expert_load_min": [round(float(v), 5) for v in load.min(axis=1)]}
  out.update({f"{k}_fraction": float(np.mean(np.concatenate(v))) for k, v in fractions.items() if v})
  if per_expert:
    out["ep_overflow_layer"] = [round(float(v), 5) for v in np.concatenate(fractions["ep_overflow"])]
    out["ep_overflow_expert"] = [[round(float(v), 5) for v in row] for row in np.concatenate(per_expert)]
  return out


def _finite(x):
  return x if x is None or math.isfinite(x) else None


def _is_remote(path: str) -> bool:
  return "://" in path


RESTART = "restart"  # the key of a restart marker: {"restart": true, "step": S}


def parse_records(lines) -> list[dict]:
  """metrics.jsonl lines -> one record per step, in step order. A restart marker at step S (a run
  that went on from step S) supersedes the earlier records after S; among records of one step the
  newest wins; a line cut short by a crash is skipped."""
  by_step = {}
  for line in lines:
    try:
      record = json.loads(line)
      step = int(record["step"])
    except (ValueError, KeyError, TypeError):
      continue
    if record.get(RESTART):
      by_step = {k: v for k, v in by_step.items() if k <= step}
    else:
      by_step[step] = record
  return [by_step[k] for k in sorted(by_step)]


def _superseded(text: str, step: int) -> bool:
  """Whether the file holds records after `step`, which the run starting there will log again."""
  return any(r["step"] > step for r in parse_records(text.splitlines()))


class _Jsonl:
  """Append-only JSON lines: an earlier run's records are never removed. A run that starts at step S
  over records past S appends a restart marker first (readers: parse_records). Local files are
  appended to; object stores (gs://, via etils.epath), which cannot append, get the whole file
  rewritten on each record (records are few: one per log step)."""

  def __init__(self, path: str, start_step: int):
    from etils import epath
    self._path = epath.Path(path)
    text = self._path.read_text() if self._path.exists() else ""
    head = "" if not text or text.endswith("\n") else "\n"  # end a line cut short by a crash
    if _superseded(text, start_step):
      head += json.dumps({RESTART: True, "step": start_step}) + "\n"
    self._lines = [text + head] if text + head else []
    if _is_remote(path):
      if head:  # an object write replaces the whole object at once
        self._path.write_text(text + head)
      self._file = None
    else:
      self._file = open(path, "a")
      self._file.write(head)
      self._file.flush()

  def append(self, line: str) -> None:
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      self._path.write_text("".join(self._lines))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class MetricsWriter:
  """`config`: the run's config; its `logging` group turns on Weights & Biases (moa_jax.wandb_log)."""

  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool, config=None):
    self.enabled = enabled
    self._bar = self._jsonl = self._tb = self._wandb = None
    if not enabled:
      return
    from etils import epath
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    self._jsonl = _Jsonl(os.path.join(workdir, "metrics.jsonl"), start_step)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    except Exception:  # tensorboardX missing, or it cannot write to this filesystem
      self._tb = None
    if config is not None and wandb_log.enabled(config):
      self._wandb = wandb_log.WandbSink(workdir, config)
    self._bar = progress.bar(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1)

  def write(self, record: dict) -> None:
    """record: a flat-ish dict with 'step'; scalar values go to TensorBoard too."""
    if not self.enabled:
      return
    record = {k: (_finite(v) if isinstance(v, float) else v) for k, v in record.items()}
    self._jsonl.append(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, value in record.items():
        if isinstance(value, (int, float)) and key != "step" and value is not None:
          self._tb.add_scalar(key, value, record["step"])
        elif isinstance(value, dict) and key == "gates":
          for branch, per_act in value.items():
            for act, per_layer in per_act.items():
              for layer, v in enumerate(per_layer):
                self._tb.add_scalar(f"gates/{branch}/layer{layer}/{act}", v, record["step"])
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(record)

  def progress(self, step: int, **postfix) -> None:
    if self.enabled:
      self._bar.n = step
      self._bar.set_postfix({k: v for k, v in postfix.items() if v is not None}, refresh=True)

  def print(self, text: str) -> None:
    if self.enabled:
      self._bar.write(text)

  def close(self) -> None:
    if self.enabled:
      self._bar.close()
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()
      if self._wandb is not None:
        self._wandb.close()
