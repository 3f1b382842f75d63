"""Router: scores, top-k choice and weights, and the balance / z losses.

    logits r = W_r x (fp32, E of them), scores s = softmax(r) or sigmoid(r)
    choice:  the k highest s + b, b the layer's router bias (zero unless model.moe.bias_rate > 0:
             DeepSeek-V3's auxiliary-loss-free balancing, a non-trainable bias that step.py moves
             each step by b += γ·sign(mean load − load)); b picks experts and never weights them
    weights: the chosen experts' scores s, renormalised to sum to one when top_k > 1 and normalize_topk;
             top-1 keeps the raw score (Switch), so the router learns from the LM loss through it.

Losses (train.py averages them over MoE layers and weights them with config.loss_weights):
    aux_loss     = E · Σ_e f_e · P_e   over the N tokens of the global batch; f_e: fraction of the N·k
                   assignments sent to expert e, P_e: mean over tokens of s_e / Σ_e' s_e' (1.0 balanced)
    seq_aux_loss = the same per sequence, averaged over sequences (DeepSeek-V3's sequence-wise loss)
    z_loss       = mean_n (log Σ_e exp r_ne)²
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moa_jax.moe.spec import MoESpec

Array = jax.Array


def route(x: Array, kernel: Array, spec: MoESpec, bias: Array | None = None):
  """x (N, D), kernel (D, E), bias (E,) or None -> weights (N, k) fp32, experts (N, k) int32, logits
  (N, E) fp32 and the normalised scores (N, E) the balance losses use."""
  logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  scores = jax.nn.softmax(logits, axis=-1) if spec.router == "softmax" else jax.nn.sigmoid(logits)
  if bias is None:
    top, experts = jax.lax.top_k(scores, spec.top_k)
  else:  # the bias picks, the scores weight
    experts = jax.lax.top_k(scores + jax.lax.stop_gradient(bias).astype(jnp.float32), spec.top_k)[1]
    top = jnp.take_along_axis(scores, experts, axis=-1)
  weights = top / jnp.sum(top, axis=-1, keepdims=True) if spec.top_k > 1 and spec.normalize_topk else top
  return weights, experts.astype(jnp.int32), logits, scores / jnp.sum(scores, axis=-1, keepdims=True)


def sequence_aux_sum(chosen: Array, scores: Array, seq_of: Array, n_seqs: int, n_experts: int, seq_len: int,
                     group_axis: str | None = None) -> Array:
  """Σ over this device's sequences of E · Σ_e f_se · P_se: chosen (N, k) experts, scores (N, E)
  normalised, seq_of (N,) each token's local sequence (< n_seqs). With `group_axis` the sequences' tokens
  are split over that mesh axis: their counts are summed over it first (each rank then holds the sum)."""
  k = chosen.shape[1]
  counts = jnp.zeros((n_seqs, n_experts), jnp.float32).at[jnp.repeat(seq_of, k), chosen.reshape(-1)].add(1.0)
  score_sum = jax.ops.segment_sum(scores, seq_of, n_seqs)                     # (S, E)
  if group_axis is not None:
    counts, score_sum = jax.lax.psum((counts, score_sum), group_axis)
  return n_experts * jnp.sum(counts / (seq_len * k) * score_sum / seq_len)


def router_losses(counts: Array, score_sum: Array, z_sum: Array, n_tokens: int, top_k: int) -> dict:
  """The balance and z losses from global sums: counts (E,) assignments per expert, score_sum (E,) Σ_n of
  normalised scores, z_sum Σ_n logsumexp², over n_tokens tokens."""
  load = counts.astype(jnp.float32) / (n_tokens * top_k)             # f_e, sums to 1
  return {"aux_loss": counts.shape[0] * jnp.sum(load * score_sum / n_tokens),
          "z_loss": z_sum / n_tokens, "load": load}
