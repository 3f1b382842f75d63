"""Cached decoding for dense models: a new token attends to the stored keys and values of the tokens before
it, instead of the whole prefix being recomputed for every token.

The same parameters and modules as `transformer.Decoder` (RMSNorm, the FFN, RoPE); attention is written out
here because it reads the cache. `tests/test_generate.py` compares its logits with the full model's and its
greedy output with the uncached loop; `experiments/bench_generate.py` measures both in tokens/s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax.core import meta

from moa_jax import loss
from moa_jax.attention import rope
from moa_jax.ffn import FFN
from moa_jax.transformer import DTYPES, ModelSpec, RMSNorm

Array = jax.Array


def supported(spec: ModelSpec) -> bool:
  return not spec.moe.num_experts  # MoE models decode through the uncached loop


def init_cache(spec: ModelSpec, batch: int, length: int) -> dict:
  """Keys and values of every layer: (L, B, S, K, H) in compute dtype, zero until written."""
  shape = (spec.n_layers, batch, length, spec.n_kv_heads, spec.resolved_head_dim)
  return {"k": jnp.zeros(shape, DTYPES[spec.dtype]), "v": jnp.zeros(shape, DTYPES[spec.dtype])}


def _attention(spec: ModelSpec, p: dict, x: Array, k_cache: Array, v_cache: Array, start: Array):
  """x (B, T, D) at positions start.. start + T - 1; caches (B, S, K, H) -> (out (B, T, D), new caches)."""
  dtype = DTYPES[spec.dtype]
  b, t, _ = x.shape
  kv, group = spec.n_kv_heads, spec.n_heads // spec.n_kv_heads
  positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
  q = rope(jnp.einsum("BTD,DNH->BTNH", x, p["wq"].astype(dtype)), positions, spec.rope_theta)
  k = rope(jnp.einsum("BTD,DKH->BTKH", x, p["wk"].astype(dtype)), positions, spec.rope_theta)
  v = jnp.einsum("BTD,DKH->BTKH", x, p["wv"].astype(dtype))
  k_cache = jax.lax.dynamic_update_slice(k_cache, k, (0, start, 0, 0))
  v_cache = jax.lax.dynamic_update_slice(v_cache, v, (0, start, 0, 0))
  q = q.reshape(b, t, kv, group, -1)                                                     # (B, T, K, G, H)
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k_cache, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
  visible = jnp.arange(k_cache.shape[1])[None, :] <= positions[0][:, None]                 # (T, S)
  weights = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(dtype)
  o = jnp.einsum("BKGTS,BSKH->BTKGH", weights, v_cache).reshape(b, t, spec.n_heads, -1)  # (B, T, N, H)
  return jnp.einsum("BTNH,NHD->BTD", o, p["wo"].astype(dtype)), k_cache, v_cache


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache",))
def forward(spec: ModelSpec, params, tokens: Array, cache: dict, start: Array):
  """tokens (B, T) at positions start.. -> logits (B, T, V) float32, and the cache with their keys/values."""
  params = meta.unbox(params)  # as Flax's init returns them (logically partitioned) or already plain
  dtype, pdtype = DTYPES[spec.dtype], DTYPES[spec.param_dtype]
  norm = lambda scale, h: RMSNorm(spec.norm_eps, pdtype).apply({"params": {"scale": scale}}, h)
  ffn = FFN(spec.ffn, dtype, pdtype)
  x = jnp.take(params["embedding"], tokens, axis=0).astype(dtype)                          # (B, T, D)

  def layer(x, inputs):
    p, k_cache, v_cache = inputs
    out, k_cache, v_cache = _attention(spec, p["attention"], norm(p["attention_norm"]["scale"], x),
                                       k_cache, v_cache, start)
    x = x + out
    x = x + ffn.apply({"params": p["ffn"]}, norm(p["ffn_norm"]["scale"], x))
    return x, (k_cache, v_cache)

  x, (k, v) = jax.lax.scan(layer, x, (params["layers"], cache["k"], cache["v"]))
  x = norm(params["final_norm"]["scale"], x)
  unembed = params["embedding"].T if spec.tie_embeddings else params["unembed"]
  return loss.logits(x, unembed), {"k": k, "v": v}
