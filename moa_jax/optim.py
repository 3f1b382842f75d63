"""Optimizers (AdamW, Muon) and learning-rate schedules, from the `optim` config group."""

from __future__ import annotations

import optax
from jax.sharding import PartitionSpec as P
import jax

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


def make_optimizer(c, steps: int, params, logical_specs) -> optax.GradientTransformation:
  """params: abstract parameter tree; logical_specs: its logical PartitionSpecs (for Muon's axes)."""
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
  return optax.chain(optax.clip_by_global_norm(c.clip_norm), opt) if c.clip_norm > 0 else opt
