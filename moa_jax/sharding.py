"""Device mesh and the logical-axis rules that place parameters and activations on it.

Mesh axes: data (pure data parallel), fsdp (data parallel + parameters/optimizer sharded),
tensor (heads and FFN width), expert (MoE experts; data parallel elsewhere).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moa_jax import runtime

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")  # the batch is split over every data-like axis

# Logical axis name -> mesh axis (or None: replicated). One table for parameters and activations. Flax
# takes, for each logical axis, the first rule whose mesh axes the array does not use yet, in table order:
# expert weights (experts, embed, mlp) take `expert` for their expert axis, then `embed` falls back to fsdp;
# every other parameter shards `embed` over fsdp × expert (the expert axis is data parallel outside MoE
# layers, so dense parameters are not replicated over it).
LOGICAL_RULES = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("experts", "expert"),
    ("embed", ("fsdp", "expert")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("mix_groups", None),
    ("activations", None),
)


def mesh_shape(mesh_config, n_devices: int) -> tuple[int, ...]:
  """Resolves the configured axis sizes (one may be -1) against the device count, or says what is wrong."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  given = ", ".join(f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{given}: each axis must be a positive size, and at most one may be -1 (fill the rest)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise ValueError(f"{given}: the fixed axes ({known} devices) do not divide the {n_devices} devices present")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(f"{given} needs {math.prod(sizes)} devices but {n_devices} are present; "
                     f"make the product {n_devices} or set one axis to -1")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  try:
    shape = mesh_shape(mesh_config, len(devices))
  except ValueError as e:
    needed = math.prod(int(mesh_config[a]) for a in MESH_AXES if int(mesh_config[a]) > 0)
    raise ValueError(f"{e}{runtime.accelerator_hint(needed, devices)}") from None
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def mesh_context(mesh: Mesh):
  """The context that makes `mesh` current for tracing (jax.set_mesh where it exists)."""
  return jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh


def batch_divisor(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, None))


def logical_shardings(logical_specs, mesh: Mesh):
  """A tree of logical PartitionSpecs (from nn.get_partition_spec) -> NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def check_divisible(abstract_params, logical_specs, mesh: Mesh) -> None:
  """Every sharded dimension must divide by its mesh axes: say which parameter does not."""
  flat_params = jax.tree_util.tree_leaves_with_path(abstract_params)
  flat_specs = jax.tree_util.tree_leaves(logical_specs, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), spec in zip(flat_params, flat_specs):
    for dim, name, axes in zip(leaf.shape, spec, nn.logical_to_mesh_axes(tuple(spec), LOGICAL_RULES)):
      axes = (axes,) if isinstance(axes, str) else (axes or ())
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size and name == "experts":
        raise ValueError(f"model.moe.num_experts = {dim} does not divide over mesh.expert = {size}; use a "
                         "multiple of mesh.expert experts, or a mesh.expert that divides num_experts")
      if dim % size:
        raise ValueError(f"parameter {jax.tree_util.keystr(path)} has {name!r} dimension {dim}, which does not "
                         f"divide over mesh axes {axes} of size {size}; change the mesh or the model size")


def match_shardings(tree, abstract_params, param_shardings, replicated: NamedSharding):
  """Shardings for a tree whose subtrees mirror the params (optimizer state): a leaf whose key path
  ends with a parameter's key path and has that parameter's shape gets its sharding; the rest
  (step counts, scalars) are replicated."""
  params = {jax.tree_util.keystr(p): (x.shape, s) for (p, x), s in zip(
      jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree_util.tree_leaves(param_shardings))}

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    for param_key, (shape, sharding) in params.items():
      if key.endswith(param_key) and tuple(leaf.shape) == tuple(shape):
        return sharding
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)
