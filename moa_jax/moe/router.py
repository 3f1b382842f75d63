"""Router: scores, top-k choice and weights, and the balance / z losses.

    logits r = W_r x (fp32, E of them), scores s = softmax(r) or sigmoid(r)
    weights: the k highest scores, renormalised to sum to one when top_k > 1 and normalize_topk;
             top-1 keeps the raw score (Switch), so the router learns from the LM loss through it.

Losses over the N tokens of the global batch (train.py averages them over MoE layers and weights
them with config.loss_weights):
    aux_loss = E · Σ_e f_e · P_e    f_e: fraction of the N·k assignments sent to expert e,
                                    P_e: mean over tokens of s_e / Σ_e' s_e'   (1.0 when balanced)
    z_loss   = mean_n (log Σ_e exp r_ne)²
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moa_jax.moe.spec import MoESpec

Array = jax.Array


def route(x: Array, kernel: Array, spec: MoESpec):
  """x (N, D), kernel (D, E) -> weights (N, k) fp32, experts (N, k) int32, logits (N, E) fp32 and the
  normalised scores (N, E) the balance loss uses."""
  logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  scores = jax.nn.softmax(logits, axis=-1) if spec.router == "softmax" else jax.nn.sigmoid(logits)
  top, experts = jax.lax.top_k(scores, spec.top_k)
  weights = top / jnp.sum(top, axis=-1, keepdims=True) if spec.top_k > 1 and spec.normalize_topk else top
  return weights, experts.astype(jnp.int32), logits, scores / jnp.sum(scores, axis=-1, keepdims=True)


def router_losses(counts: Array, score_sum: Array, z_sum: Array, n_tokens: int, top_k: int) -> dict:
  """The balance and z losses from global sums: counts (E,) assignments per expert, score_sum (E,) Σ_n of
  normalised scores, z_sum Σ_n logsumexp², over n_tokens tokens."""
  load = counts.astype(jnp.float32) / (n_tokens * top_k)             # f_e, sums to 1
  return {"aux_loss": counts.shape[0] * jnp.sum(load * score_sum / n_tokens),
          "z_loss": z_sum / n_tokens, "load": load}
