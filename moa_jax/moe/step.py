"""What a train step does for its MoE layers besides the loss: an overflow flag in the step's outputs
(and the one-line warning the loop prints above OVERFLOW_WARN), and, with `model.moe.bias_rate` > 0,
DeepSeek-V3's auxiliary-loss-free balancing update of each layer's router bias (router.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moa_jax.moe.spec import MoESpec

OVERFLOW_WARN = 0.01  # warn when an MoE layer's exchange dropped more than this fraction of its assignments


def _stats(intermediates, name: str) -> list:
  """Every sown `moe_stats/<name>` leaf (one per scanned stack of MoE layers)."""
  names = lambda path: [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
  return [v for p, v in jax.tree_util.tree_leaves_with_path(intermediates) if names(p)[-2:] == ["moe_stats", name]]


def step_outputs(intermediates) -> dict:
  """{'moe_overflow': the largest fraction of assignments any MoE layer's exchange dropped} (expert
  parallelism only; {} otherwise): a scalar, so the loop logs and checks it without the whole tree."""
  found = _stats(intermediates, "ep_overflow")
  return {"moe_overflow": jnp.max(jnp.stack([jnp.max(v) for v in found]))} if found else {}


def overflow_warning(record: dict) -> str | None:
  """One line when a logged step's `moe_overflow` is above OVERFLOW_WARN, else None."""
  value = record.get("moe_overflow", 0.0)
  if value <= OVERFLOW_WARN:
    return None
  return (f"warning: step {record.get('step')}: an MoE layer dropped {value:.1%} of its assignments in the "
          f"expert-parallel exchange (ep_overflow_expert in metrics.jsonl says which experts); raise "
          f"model.moe.buffer_factor, or set it to -1 to never drop")


def update_router_bias(spec: MoESpec, old_params, new_params, intermediates):
  """Loss-free balancing (DeepSeek-V3): every `router_bias` leaf becomes its value before the step plus
  γ·sign(mean load − load), from the load the step's MoE layers sowed at the same place in the tree
  (`moe_stats/load`, (layers, E) under scan). The optimizer's update of the leaf is discarded (it has no
  gradient anyway). A no-op without MoE layers or with bias_rate = 0."""
  if not spec.num_experts or spec.bias_rate <= 0:
    return new_params

  def update(path, old, new):
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    if keys[-1] != "router_bias":
      return new
    node = intermediates.get("intermediates", intermediates)    # apply(..., mutable=...)'s dict, or its content
    for k in keys[:-1]:
      node = node[k]
    load = node["moe_stats"][0]["load"]                                 # (..., E), sums to 1 over E
    return old + spec.bias_rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load).astype(old.dtype)
  return jax.tree_util.tree_map_with_path(update, old_params, new_params)
