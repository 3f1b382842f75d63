"""Where a run's numbers go: `WORKDIR/metrics.jsonl` (one JSON object per record), TensorBoard event
files under `WORKDIR/tb`, and a live progress bar. Only process 0 writes."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip (datasheets), for MFU. Unknown devices report mfu = null.
PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops(device) -> float | None:
  kind = device.device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k.lower() in kind.lower()), None)


def mix_record(intermediates, names: tuple[str, ...]) -> dict:
  """Sown `mix_mean` values (per layer × activation) -> {branch: {activation: [per layer]}}."""
  out = {}
  for path, value in jax.tree_util.tree_leaves_with_path(intermediates):
    keys = [str(getattr(k, "key", "")) for k in path]
    if "mix_mean" not in keys:
      continue
    branch = ".".join(k for k in keys if k and k not in ("layers", "mix_mean", "intermediates"))
    value = np.asarray(value).reshape(-1, len(names))  # (layers, K)
    out[branch] = {n: [round(float(v), 5) for v in value[:, k]] for k, n in enumerate(names)}
  return out


def moe_record(intermediates) -> dict:
  """Sown `moe_stats` -> expert_load_max / expert_load_min (fraction of assignments, one entry per MoE
  layer) and dropped_fraction (capacity path: mean over MoE layers). {} for a dense model."""
  loads, dropped = [], []
  for path, value in jax.tree_util.tree_leaves_with_path(intermediates):
    keys = [str(getattr(k, "key", "")) for k in path]
    if "moe_stats" in keys and keys[-1] == "load":
      loads.append(np.asarray(value).reshape(-1, np.shape(value)[-1]))  # (MoE layers, E)
    elif "moe_stats" in keys and keys[-1] == "dropped":
      dropped.append(np.asarray(value).reshape(-1))
  if not loads:
    return {}
  load = np.concatenate(loads)
  out = {"expert_load_max": [round(float(v), 5) for v in load.max(axis=1)],
         "expert_load_min": [round(float(v), 5) for v in load.min(axis=1)]}
  if dropped:
    out["dropped_fraction"] = float(np.mean(np.concatenate(dropped)))
  return out


def _finite(x):
  return x if x is None or math.isfinite(x) else None


def _is_remote(path: str) -> bool:
  return "://" in path


def _kept_lines(text: str, step: int) -> list[str]:
  """Records up to `step` (a resumed run recomputes the rest); a line cut short by a crash is dropped."""
  keep = []
  for line in text.splitlines(keepends=True):
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    except (ValueError, KeyError):
      continue
  return keep


class _Jsonl:
  """Append-only JSON lines. Local files are appended to; object stores (gs://, via etils.epath), which
  cannot append, get the whole file rewritten on each record (records are few: one per log step)."""

  def __init__(self, path: str, start_step: int):
    from etils import epath
    self._path = epath.Path(path)
    text = self._path.read_text() if self._path.exists() else ""
    self._lines = _kept_lines(text, start_step)
    if "".join(self._lines) != text:
      if _is_remote(path):  # an object write replaces the whole object at once
        self._path.write_text("".join(self._lines))
      else:
        with open(path + ".tmp", "w") as f:
          f.writelines(self._lines)
        os.replace(path + ".tmp", path)
    self._file = open(path, "a") if not _is_remote(path) else None

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
  def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool):
    self.enabled = enabled
    self._bar = self._jsonl = self._tb = None
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
    from tqdm.auto import tqdm
    self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1)

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
