"""Causal multi-head attention with RoPE and grouped-query heads (no biases)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moa_jax.ffn import dense_init, param

Array = jax.Array


def rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding, rotate-half form. x: (B, T, N, H), positions: (B, T)."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)         # (H/2,)
  angle = positions[..., None].astype(jnp.float32) * freq                # (B, T, H/2)
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
  """x (B, T, D) -> (B, T, D). `impl`: None (XLA picks), "xla" or "cudnn" (jax.nn.dot_product_attention)."""
  n_heads: int
  n_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  impl: str | None = None
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  out_scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array, positions: Array) -> Array:
    d, n, kv, h = x.shape[-1], self.n_heads, self.n_kv_heads, self.head_dim
    wq = param(self, "wq", (d, n, h), ("embed", "q_heads", "head_dim"), dense_init(d), self.param_dtype)
    wk = param(self, "wk", (d, kv, h), ("embed", "kv_heads", "head_dim"), dense_init(d), self.param_dtype)
    wv = param(self, "wv", (d, kv, h), ("embed", "kv_heads", "head_dim"), dense_init(d), self.param_dtype)
    wo = param(self, "wo", (n, h, d), ("q_heads", "head_dim", "embed"),
               dense_init(n * h, self.out_scale), self.param_dtype)
    x = x.astype(self.dtype)
    q = rope(jnp.einsum("BTD,DNH->BTNH", x, wq.astype(self.dtype)), positions, self.rope_theta)
    k = rope(jnp.einsum("BTD,DKH->BTKH", x, wk.astype(self.dtype)), positions, self.rope_theta)
    v = jnp.einsum("BTD,DKH->BTKH", x, wv.astype(self.dtype))
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.impl)  # (B, T, N, H)
    return jnp.einsum("BTNH,NHD->BTD", o, wo.astype(self.dtype))
