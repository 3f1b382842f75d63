"""Causal multi-head attention with RoPE and grouped-query heads (no biases).

`model.attention_impl` picks the kernel: xla (jax.nn.dot_product_attention, which builds the (B, N, T, S)
scores), cudnn (its fused cuDNN kernel, GPU), splash (jax's Pallas TPU splash attention, which MaxText
uses: flash-style blocks, no (T, S) scores in memory; interpreted off TPU), or auto: splash on TPU, cuDNN
on GPU (bf16/fp16), xla on CPU, for the platform being compiled for (moa_jax.platforms: the --target's).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from moa_jax import platforms
from moa_jax.ffn import dense_init, param

IMPLS = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCK = 512  # splash attention's q and kv block (MaxText's default); shorter sequences: one block

Array = jax.Array


def rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding, rotate-half form. x: (B, T, N, H), positions: (B, T)."""
  half = x.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)         # (H/2,)
  angle = positions[..., None].astype(jnp.float32) * freq                # (B, T, H/2)
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def resolve_impl(impl: str, dtype, seq_len: int, platform: str | None = None) -> str:
  """auto -> splash (TPU, T a multiple of 128), cudnn (GPU, bf16/fp16) or xla; others unchanged."""
  if impl != "auto":
    return impl
  platform = platform or platforms.current()
  if platform == "tpu" and seq_len % 128 == 0:
    return "splash"
  if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


@functools.lru_cache(maxsize=None)
def _splash_kernel(t: int, group: int, interpret: bool):
  """One causal splash kernel for q (group, T, H) against one kv head k, v (T, H)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # slow import: only when used

  block = min(SPLASH_BLOCK, t)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((t, t)) for _ in range(group)])
  return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q: Array, k: Array, v: Array) -> Array:
  """q (B, T, N, H), k, v (B, T, K, H) on one device -> (B, T, N, H): a vmapped MQA kernel per kv head."""
  b, t, n, h = q.shape
  kv = k.shape[2]
  kernel = _splash_kernel(t, n // kv, platforms.current() != "tpu")
  q = (q * h**-0.5).reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # (B, K, N/K, T, H)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                   # (B, K, T, H)
  o = jax.vmap(jax.vmap(kernel))(q, k, v)                                    # (B, K, N/K, T, H)
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)



def splash_attention(q: Array, k: Array, v: Array) -> Array:
  """Causal splash attention; q (B, T, N, H), k, v (B, T, K, H) -> (B, T, N, H). Under the trainer's mesh
  it runs per device in shard_map (batch over the data axes, heads over tensor): a Pallas call is not
  partitioned by XLA."""
  mesh = platforms.auto_mesh()
  if mesh is None:
    return _splash_local(q, k, v)
  q_spec = nn.logical_to_mesh_axes(("batch", "length", "q_heads", "head_dim"))
  kv_spec = nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"))
  return jax.shard_map(_splash_local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                       check_vma=False)(q, k, v)


class Attention(nn.Module):
  """x (B, T, D) -> (B, T, D). `impl`: auto | xla | cudnn | splash (see the module docstring)."""
  n_heads: int
  n_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  impl: str = "auto"
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
    impl = resolve_impl(self.impl, self.dtype, x.shape[1])
    if impl == "splash":
      o = splash_attention(q, k, v)                                                  # (B, T, N, H)
    else:
      o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)  # (B, T, N, H)
    return jnp.einsum("BTNH,NHD->BTD", o, wo.astype(self.dtype))
