"""Optimizers (AdamW, Muon) and learning-rate schedules, from the `optim` config group."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moa_jax import sharding

# Matrix parameters by name: (reduction axes, output axes) as logical names. Muon orthogonalises these;
# every other axis (layers, experts) is a batch axis. Embeddings, norms and mixing parameters use AdamW.
MATRICES = {
    "wq": (("embed",), ("q_heads", "head_dim")),
    "wk": (("embed",), ("kv_heads", "head_dim")),
    "wv": (("embed",), ("kv_heads", "head_dim")),
    "wo": (("q_heads", "head_dim"), ("embed",)),
    "w1": (("embed",), ("mlp",)),
    "w2": (("embed",), ("mlp",)),
    "w3": (("mlp",), ("embed",)),
}
SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")


def schedule(c, steps: int) -> optax.Schedule:
  """Linear warmup to c.lr, then cosine to c.min_lr_ratio·lr, WSD (flat, then linear decay over the
  last c.decay_fraction of steps) or constant."""
  if c.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule = {c.schedule!r}; allowed: {', '.join(SCHEDULES)}")
  warmup = min(c.warmup_steps, max(steps - 1, 0))
  floor = c.lr * c.min_lr_ratio
  if c.schedule == "cosine":
    main = optax.cosine_decay_schedule(c.lr, max(steps - warmup, 1), alpha=c.min_lr_ratio)
  elif c.schedule == "wsd":
    decay = max(int(steps * c.decay_fraction), 1)
    flat = max(steps - warmup - decay, 0)
    main = optax.join_schedules([optax.constant_schedule(c.lr), optax.linear_schedule(c.lr, floor, decay)], [flat])
  else:
    main = optax.constant_schedule(c.lr)
  return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), main], [warmup])


def _name(path) -> str:
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params, c):
  """Weight decay on matrices (ndim ≥ 2 per layer) but not on norms, and not on LA/MoA mixing
  parameters unless optim.decay_mix_params."""
  def keep(path, x):
    is_mix = any("mix" in str(getattr(k, "key", "")) for k in path)
    return _name(path) in MATRICES or _name(path) in ("embedding", "unembed") or (is_mix and c.decay_mix_params)
  return jax.tree_util.tree_map_with_path(keep, params)


def muon_dims(params, logical_specs):
  """MuonDimensionNumbers for each matrix (from its logical axis names); None sends it to AdamW."""
  def dims(path, x, spec):
    if _name(path) not in MATRICES:
      return None
    reduce_names, out_names = MATRICES[_name(path)]
    names = tuple(spec)
    return optax.contrib.MuonDimensionNumbers(tuple(names.index(n) for n in reduce_names),
                                             tuple(names.index(n) for n in out_names))
  specs = jax.tree_util.tree_leaves(logical_specs, is_leaf=lambda s: isinstance(s, P))
  flat = jax.tree_util.tree_leaves_with_path(params)
  treedef = jax.tree_util.tree_structure(params)
  return jax.tree_util.tree_unflatten(treedef, [dims(p, x, s) for (p, x), s in zip(flat, specs)])


def muon_layouts(params, logical_specs, mesh: Mesh) -> list:
  """Where Muon orthogonalises each matrix: the mesh axes that shard a matrix's own dimensions (fsdp,
  tensor) move, one axis per step, to a batch dimension (the stacked layers, or the experts where only
  they divide evenly), so Newton–Schulz multiplies whole matrices on the device that holds them. One axis
  per step keeps every move a single all-to-all (XLA cannot move two axes at once and would gather).
  A lone axis moves even where it does not divide (XLA pads the layer axis); when two would move, one that
  does not divide stays on the matrix, as XLA gathers for such a move (experiments/muon_collectives.py).
  Parameters that are not stacked matrices keep their layout. Returns one tree of NamedShardings per step
  (at least one); the last is where the update runs."""
  dims = muon_dims(params, logical_specs)
  specs = jax.tree_util.tree_leaves(logical_specs, is_leaf=lambda s: isinstance(s, P))
  flat, treedef = jax.tree_util.tree_flatten(params)
  dims_flat = jax.tree_util.tree_leaves(dims, is_leaf=lambda d: d is None or isinstance(d, optax.contrib.MuonDimensionNumbers))

  def steps(x, spec, d) -> list[list[tuple]]:
    axes = [(a,) if isinstance(a, str) else tuple(a or ()) for a in nn.logical_to_mesh_axes(tuple(spec), sharding.LOGICAL_RULES)]
    matrix = set(d.reduction_axis) | set(d.output_axis) if d is not None else set()
    batch = [i for i in range(x.ndim) if i not in matrix]
    if not batch:
      return [axes]
    out = [axes]
    moving = [(i, a) for i in sorted(matrix) for a in axes[i] if mesh.shape[a] > 1]
    for i, a in moving:
      now = list(out[-1])
      now[i] = tuple(b for b in now[i] if b != a)
      size = lambda j: math.prod(mesh.shape[b] for b in now[j]) * mesh.shape[a]
      to = next((j for j in batch if x.shape[j] % size(j) == 0), None)  # evenly where it can
      if to is None and len(moving) > 1:
        continue  # stays on the matrix: XLA would gather for this move
      now[batch[0] if to is None else to] += (a,)
      out.append(now)
    return out[1:] or out

  per_leaf = [steps(x, s, d) for x, s, d in zip(flat, specs, dims_flat)]
  n = max(len(p) for p in per_leaf)
  to_sharding = lambda axes: NamedSharding(mesh, P(*[a or None for a in axes]))
  return [jax.tree_util.tree_unflatten(treedef, [to_sharding(p[min(k, len(p) - 1)]) for p in per_leaf])
          for k in range(n)]


def _orthogonalise_where_stacked(tx: optax.GradientTransformation, params, logical_specs,
                                 mesh: Mesh) -> optax.GradientTransformation:
  """Runs `tx` (Muon) with each stacked matrix's update and momentum resharded over its layer axis
  (muon_layouts): all-to-alls in and out, where FSDP or tensor sharding would otherwise all-gather
  every (L, d, d) matrix for Newton–Schulz. The stored state and the returned updates keep the
  parameters' layout; the values are those of `tx` unchanged."""
  stored = sharding.logical_shardings(logical_specs, mesh)
  layouts = muon_layouts(params, logical_specs, mesh)
  replicated = NamedSharding(mesh, P())

  def move(tree, path):
    for layout in path:
      tree = jax.tree.map(jax.lax.with_sharding_constraint, tree,
                          sharding.match_shardings(tree, params, layout, replicated))
    return tree

  def update(updates, state, params_now=None):
    params_now = None if params_now is None else move(params_now, layouts)  # for the weight decay
    updates, state = tx.update(move(updates, layouts), move(state, layouts), params_now)
    back = layouts[::-1] + [stored]  # the whole update pinned to the last layout, then back step by step
    return move(updates, back), move(state, back)

  return optax.GradientTransformation(tx.init, update)


def gate_scale(params, c) -> optax.GradientTransformation | None:
  """Scales the updates of MoA gate parameters: `gate_lr_multiplier` on U (gate_kernel) and b
  (gate_bias); 0 on U when not `gate_kernel_trainable`, so U stays at its init (zero) and the gates
  are σ(b) per layer: the sigmoid-LA control. None when nothing is scaled."""
  trainable, m = c.get("gate_kernel_trainable", True), c.get("gate_lr_multiplier", 1.0)
  if trainable and m == 1.0:
    return None
  factors = {"gate_kernel": m if trainable else 0.0, "gate_bias": m}
  scale = jax.tree_util.tree_map_with_path(lambda path, x: factors.get(_name(path), 1.0), params)
  return optax.GradientTransformation(
      lambda _: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree_util.tree_map(lambda u, f: u * f, updates, scale), state))


def make_optimizer(c, steps: int, params, logical_specs, mesh: Mesh | None = None) -> optax.GradientTransformation:
  """params: abstract parameter tree; logical_specs: its logical PartitionSpecs (for Muon's axes);
  mesh: where the train step runs (Muon then orthogonalises each stacked matrix where it lives)."""
  if c.name not in OPTIMIZERS:
    raise ValueError(f"optim.name = {c.name!r}; allowed: {', '.join(OPTIMIZERS)}")
  lr = schedule(c, steps)
  mask = decay_mask(params, c)
  if c.name == "adamw":
    opt = optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask)
  else:
    opt = optax.contrib.muon(lr, weight_decay=c.weight_decay, weight_decay_mask=mask, adam_b1=c.b1,
                             adam_b2=c.b2, muon_weight_dimension_numbers=muon_dims(params, logical_specs),
                             consistent_rms=0.2)
    if mesh is not None and mesh.size > 1:
      opt = _orthogonalise_where_stacked(opt, params, logical_specs, mesh)
  gates = gate_scale(params, c)
  opt = optax.chain(opt, gates) if gates else opt
  return optax.chain(optax.clip_by_global_norm(c.clip_norm), opt) if c.clip_norm > 0 else opt
