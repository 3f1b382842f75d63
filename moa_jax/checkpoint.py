"""Orbax checkpoints of {train state, data iterator state, run metadata} in `WORKDIR/checkpoints/<step>`.

Saves are asynchronous; Orbax writes each step to a temporary directory and renames it when complete,
so `latest_step()` only ever sees finished checkpoints. The metadata holds the model config, which a
resuming run compares with its own before compiling anything.
"""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp


class Checkpoints:
  def __init__(self, workdir: str, every: int, keep: int):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints") if "://" not in workdir \
        else workdir.rstrip("/") + "/checkpoints"
    self.every = every
    options = dict(save_interval_steps=1, enable_async_checkpointing=True, create=True)
    try:
      options["preservation_policy"] = ocp.checkpoint_managers.LatestN(keep)
    except AttributeError:  # older orbax
      options["max_to_keep"] = keep
    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(**options),
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Complete checkpoints, newest first (Orbax never lists one still being written)."""
    return sorted(self._manager.all_steps(), reverse=True)

  def set_aside(self, step: int) -> str:
    """Moves an unreadable checkpoint out of the way (kept for inspection, not deleted); returns where.
    Process 0 moves it; every process then rescans."""
    import jax
    from jax.experimental import multihost_utils
    target = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable", str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.replace(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self._manager.reload()
    return target

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state):
    """abstract_state: ShapeDtypeStructs with shardings. Returns (state, data_state)."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def config_diff(saved: dict, current: dict, prefix: str = "model") -> list[str]:
  """Fields whose values differ between two (nested) config dicts, as 'model.x: saved -> current'."""
  saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_diff(a, b, f"{prefix}.{key}")
    elif a != b:
      out.append(f"{prefix}.{key}: {a!r} in the checkpoint, {b!r} now")
  return out
