"""Orbax checkpoints of {train state, data iterator state, run metadata} in `WORKDIR/checkpoints/<step>`.

Saves are asynchronous; Orbax writes each step to a temporary directory and renames it when complete,
so `latest_step()` only ever sees finished checkpoints. The metadata holds the run's config (which a
resuming run compares with its own before compiling anything), the state's structure (leaf paths,
shapes, dtypes: a changed optimizer is told apart from a damaged checkpoint), and a checksum of every
leaf of the state, weighted by position so that swapped elements count too (restored contents are
verified: flipped bits send the restore to an older step). Orbax itself checksums only its index.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


class CorruptCheckpoint(RuntimeError):
  """Restored contents differ from what was saved."""


def structure(tree) -> list[str]:
  """'path: shape dtype' for every leaf of a (possibly abstract) tree."""
  return [f"{jax.tree_util.keystr(path)}: {tuple(x.shape)} {jnp.dtype(x.dtype).name}"
          for path, x in jax.tree_util.tree_leaves_with_path(tree)]


@jax.jit
def _sums(tree):
  """Checkpoints before the weighted sum: one uint32 per leaf, the wrapping sum of its elements' bit patterns."""
  def leaf(x):
    return jnp.sum(_bits(x), dtype=jnp.uint32)
  return jax.tree.map(leaf, tree)


@jax.jit
def _weighted_sums(tree):
  """One uint32 per leaf: Σ_i (2i + 1)·bits_i mod 2^32, i the element's flat index. A flipped bit changes
  it (by an odd multiple of 2^k); swapping elements a and b at i and j changes it by 2(a − b)(i − j), which
  a plain sum cannot see; a sum's order does not matter, so every sharding agrees."""
  def leaf(x):
    weights = 2 * jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape) + 1
    return jnp.sum(_bits(x) * weights, dtype=jnp.uint32)
  return jax.tree.map(leaf, tree)


def _bits(x):
  return jax.lax.bitcast_convert_type(x, _UNSIGNED[jnp.dtype(x.dtype).itemsize]).astype(jnp.uint32)


_KINDS = {"sum": _sums, "weighted_sum": _weighted_sums}


def checksums(tree, kind: str = "weighted_sum") -> dict:
  """What the metadata stores: {'kind', 'values': one uint32 per leaf}."""
  return {"kind": kind, "values": [int(v) for v in jax.tree.leaves(jax.device_get(_KINDS[kind](tree)))]}


def _free_name(path: str) -> str:
  """`path`, or `path.1`, `path.2`, ... : the first name not taken."""
  candidate, n = path, 0
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}.{n}"
  return candidate


class Checkpoints:
  def __init__(self, workdir: str, every: int, keep: int):
    if keep < 1:
      raise ValueError(f"checkpoint.keep = {keep}; must be ≥ 1 (the newest `keep` checkpoints are kept, "
                       "the final one always)")
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

  def set_aside(self, step: int, where: str = "checkpoints_unreadable") -> str:
    """Moves a checkpoint out of the way (kept for inspection, not deleted) to WORKDIR/<where>/<step>
    (or <step>.1, <step>.2, ... if taken); returns where. Process 0 moves it; every process then rescans."""
    from jax.experimental import multihost_utils
    target = os.path.join(os.path.dirname(self.directory), where, str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      target = _free_name(target)
      os.rename(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self._manager.reload()
    return target

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def check_space(self, state) -> None:
    """Raises ENOSPC before a save that cannot fit on a local disk (the state's bytes plus 1 MiB), so a
    full disk stops the run with one line instead of a half-written checkpoint and a storm of errors
    from Orbax's writer threads. Object stores are not checked."""
    if "://" in self.directory:
      return
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) + 2**20
    free = shutil.disk_usage(self.directory).free
    if free < need:
      raise OSError(errno.ENOSPC, f"No space left on device (the checkpoint needs {need / 2**20:.1f} MiB, "
                    f"{free / 2**20:.1f} MiB are free)", self.directory)

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    self.check_space(state)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state, expected: dict | list[int] | None = None):
    """abstract_state: ShapeDtypeStructs with shardings; expected: the checksums saved in the meta (None:
    a checkpoint from before checksums, not verified). Returns (state, data_state); raises
    CorruptCheckpoint when the restored contents differ from what was saved."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    if expected is not None:
      if not isinstance(expected, dict):  # a checkpoint from before the weighted sum: a list of plain sums
        expected = {"kind": "sum", "values": expected}
      got, expected = checksums(out["state"], expected["kind"])["values"], expected["values"]
      bad = [name for name, a, b in zip(structure(abstract_state), got, expected) if a != b]
      if len(got) != len(expected) or bad:
        raise CorruptCheckpoint(f"checksum mismatch in {len(bad)} array(s), first {bad[:1]}")
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
