"""Optional Weights & Biases logging, next to metrics.jsonl and TensorBoard (the `logging` config group).

On when `logging.wandb_project` is set; then `wandb` must be importable (`pip install -e ".[wandb]"`), or
the run stops with one line before anything compiles. Only process 0 logs (MetricsWriter is enabled
there only). The run id is kept in `WORKDIR/wandb_run_id`, so resuming a run resumes the same W&B run.
Records go to W&B as TensorBoard gets them: scalars by name, per-layer lists as `name/layer<i>`, gates as
`gates/<branch>/layer<i>/<activation>`, all at the record's step. W&B steps only move forward: when a
resumed run logs again the steps between its checkpoint and the point where it was killed, W&B keeps the
first values (with a warning) while metrics.jsonl keeps the newest.
"""

from __future__ import annotations

import os
import uuid

RUN_ID_FILE = "wandb_run_id"


def enabled(config) -> bool:
  logging = config.get("logging") or {}
  return bool(logging.get("wandb_project"))


def check(config) -> None:
  """Raises ValueError (one line) when W&B logging is asked for but wandb is not installed."""
  if not enabled(config):
    return
  try:
    import wandb  # noqa: F401
  except ImportError as e:
    raise ValueError(f"logging.wandb_project = {config.logging.wandb_project!r} but the wandb package is not "
                     f"installed; pip install -e '.[wandb]', or leave logging.wandb_project empty") from e


def flatten(record: dict) -> dict:
  """A metrics record -> {name: number} for W&B (None, strings and the step itself left out)."""
  out = {}
  for key, value in record.items():
    if key == "step" or value is None or isinstance(value, (str, bool)):
      continue
    if isinstance(value, (int, float)):
      out[key] = value
    elif isinstance(value, list):
      out.update({f"{key}/layer{i}": v for i, v in enumerate(value) if v is not None})
    elif isinstance(value, dict) and key == "gates":
      for branch, per_act in value.items():
        for act, per_layer in per_act.items():
          out.update({f"gates/{branch}/layer{i}/{act}": v for i, v in enumerate(per_layer)})
  return out


def _run_id(workdir: str) -> str:
  """The W&B run id of this workdir: read back on resume, created (and stored) on the first start."""
  from etils import epath
  path = epath.Path(workdir) / RUN_ID_FILE
  if path.exists():
    run_id = path.read_text().strip()
    if run_id:
      return run_id
  run_id = uuid.uuid4().hex[:12]
  path.write_text(run_id + "\n")
  return run_id


class WandbSink:
  """One W&B run for one workdir; `log(record)` per metrics record, `close()` at the end."""

  def __init__(self, workdir: str, config):
    import wandb
    c = config.logging
    self.run_id = _run_id(workdir)
    self._run = wandb.init(
        project=c.wandb_project, entity=c.get("wandb_entity") or None,
        name=c.get("wandb_run_name") or config.get("name") or os.path.basename(os.path.normpath(workdir)),
        id=self.run_id, resume="allow", config=config.to_dict(), mode=c.get("wandb_mode") or None,
        dir=workdir if "://" not in workdir else None)

  def log(self, record: dict) -> None:
    self._run.log(flatten(record), step=record["step"])

  def close(self) -> None:
    self._run.finish()
