"""The platform code is being traced for: the compile target's (`--target`), else the host backend's.

A deviceless compile (moa_jax.aot) traces on a CPU host for TPU or GPU devices; kernels and attention
choose their implementation from `current()`, not from `jax.default_backend()`, so a TPU target gets
the Mosaic kernel and splash attention, not the CPU fallbacks.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("moa_jax_target_platform", default=None)


def normalize(platform: str) -> str:
  """jax device platforms -> backend names: cuda/rocm -> gpu; tpu and cpu unchanged."""
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def current() -> str:
  """'cpu', 'gpu' or 'tpu': the target set by `target(...)`, else jax.default_backend()."""
  return _TARGET.get() or normalize(jax.default_backend())


@contextlib.contextmanager
def target(platform: str):
  """Trace for `platform` ('tpu', 'gpu', 'cuda', 'cpu') inside the block."""
  token = _TARGET.set(normalize(platform))
  try:
    yield
  finally:
    _TARGET.reset(token)


def auto_mesh():
  """The mesh being traced under if it spans several devices and all its axes are automatic (the
  trainer's, not inside shard_map), else None: where a Pallas call must be wrapped in shard_map."""
  get = getattr(jax.sharding, "get_abstract_mesh", None)
  mesh = get() if get else None
  if mesh is None or getattr(mesh, "empty", True) or mesh.size == 1:
    return None
  auto = getattr(jax.sharding.AxisType, "Auto", None)
  if auto is not None and any(t != auto for t in getattr(mesh, "axis_types", ())):
    return None
  return mesh
