"""The dense reference the fast paths are tested against: every token through every expert's FFN
module (expert e's parameters: params["experts"][...][e]), weighted by the router weight of the experts
the token chose (zero for the rest, and for assignments `keep` marks as dropped). E× the FLOPs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moa_jax.ffn import FFN, FFNSpec
from moa_jax.moe.spec import MoESpec


def dense_reference(spec: MoESpec, ffn: FFNSpec, params: dict, x: jax.Array, keep: jax.Array | None = None):
  """x (B, T, D) fp32 -> y (B, T, D) and the chosen experts (B, T, k). keep (B, T, k): 1 kept, 0 dropped."""
  logits = jnp.einsum("BTD,DE->BTE", x, params["router"], precision="highest")
  scores = jax.nn.softmax(logits) if spec.router == "softmax" else jax.nn.sigmoid(logits)
  chosen = jax.lax.top_k(scores + params.get("router_bias", 0.0), spec.top_k)[1]   # the bias only picks
  top = jnp.take_along_axis(scores, chosen, axis=-1)
  weights = top / top.sum(-1, keepdims=True) if spec.top_k > 1 and spec.normalize_topk else top
  if keep is not None:
    weights = weights * keep
  dense = jnp.einsum("BTK,BTKE->BTE", weights, jax.nn.one_hot(chosen, spec.num_experts))
  module = FFN(ffn, jnp.float32, jnp.float32)
  outs = jnp.stack([module.apply({"params": jax.tree.map(lambda p: p[e], params["experts"])}, x)
                    for e in range(spec.num_experts)])                                # (E, B, T, D)
  y = spec.routed_scale * jnp.einsum("BTE,EBTD->BTD", dense, outs)
  if spec.shared_experts:
    shared = FFN(dataclasses.replace(ffn, d_ff=spec.shared_experts * ffn.d_ff), jnp.float32, jnp.float32)
    y = y + shared.apply({"params": params["shared"]}, x)
  return y, chosen
