"""LLaMA-style decoder: pre-norm RMSNorm blocks of attention + FFN, stacked with `nn.scan` and remat."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from moa_jax import loss
from moa_jax.attention import IMPLS as ATTENTION_IMPLS, Attention
from moa_jax.ffn import FFN, FFNSpec, param
from moa_jax.moe import MoE, MoESpec

Array = jax.Array

# Named remat policies for the scanned block: what the backward pass may keep instead of recomputing.
# The dots policies also keep the MoE's named activations (moa_jax/moe: rows after dispatch, grouped-matmul
# hidden activations, expert outputs), so the backward repeats neither an all-to-all nor a grouped matmul.
# `save_dots_moe_io` keeps the MoE's exchanged rows but not its hidden activations: the backward repeats
# the experts' up-projections and mixing (no all-to-all), for much less memory (docs/moe.md).
MOE_SAVED = ("moe_dispatched", "moe_hidden", "moe_expert_out")
_with_moe = lambda policy, names=MOE_SAVED: jax.checkpoint_policies.save_from_both_policies(
    policy, jax.checkpoint_policies.save_only_these_names(*names))
REMAT_POLICIES = {
    "none": None,                                                       # no remat: keep everything
    "full": jax.checkpoint_policies.nothing_saveable,                   # recompute the whole block
    "save_dots": _with_moe(jax.checkpoint_policies.checkpoint_dots),    # keep every matmul output
    "save_dots_no_batch": _with_moe(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),  # keep projections
    "save_dots_moe_io": _with_moe(jax.checkpoint_policies.dots_with_no_batch_dims_saveable,   # as above, but
                                  ("moe_dispatched", "moe_expert_out")),   # recompute the MoE's hidden rows
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The `model` config group, validated. Sizes, dtypes, the FFN's spec and the MoE's (if any)."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  ffn: FFNSpec
  head_dim: int = 0          # 0: d_model // n_heads
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  remat: str = "save_dots_no_batch"
  attention_impl: str = "auto"
  moe: MoESpec = MoESpec()

  def __post_init__(self):
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads"):
      if getattr(self, field) <= 0:
        raise ValueError(f"model.{field} = {getattr(self, field)}; must be positive")
    if self.head_dim == 0 and self.d_model % self.n_heads:
      raise ValueError(f"model.n_heads = {self.n_heads} does not divide model.d_model = {self.d_model}; "
                       "pick n_heads dividing d_model or set model.head_dim")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_kv_heads = {self.n_kv_heads} must divide model.n_heads = {self.n_heads}")
    if self.resolved_head_dim % 2:
      raise ValueError(f"head dim {self.resolved_head_dim} must be even for RoPE; change model.n_heads")
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in DTYPES:
        raise ValueError(f"model.{field} = {getattr(self, field)!r}; allowed: {', '.join(DTYPES)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat = {self.remat!r}; allowed: {', '.join(REMAT_POLICIES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention_impl = {self.attention_impl!r}; allowed: {', '.join(ATTENTION_IMPLS)}")
    if self.moe.num_experts:
      if self.n_layers % self.moe.every:
        raise ValueError(f"model.n_layers = {self.n_layers} is not a multiple of model.moe.every = "
                         f"{self.moe.every}; MoE layers come every `every` layers")
      width = self.moe.d_ff_expert or self.ffn.d_ff
      if width % self.ffn.groups:
        raise ValueError(f"model.ffn.groups = {self.ffn.groups} must divide the expert width "
                         f"model.moe.d_ff_expert = {width}")

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def expert_ffn(self) -> FFNSpec:
    """One expert's FFN: model.ffn at the expert width."""
    return dataclasses.replace(self.ffn, d_ff=self.moe.d_ff_expert or self.ffn.d_ff)


class RMSNorm(nn.Module):
  eps: float = 1e-6
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # (B, T, D), returned in x's dtype
    scale = param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones, self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(x.dtype)


class Block(nn.Module):
  spec: ModelSpec
  moe: bool = False  # an MoE layer in place of the FFN

  @nn.compact
  def __call__(self, x: Array, positions: Array):  # x: (B, T, D) in compute dtype
    s = self.spec
    dtype, pdtype = DTYPES[s.dtype], DTYPES[s.param_dtype]
    out_scale = (2 * s.n_layers) ** -0.5
    attn = Attention(s.n_heads, s.n_kv_heads, s.resolved_head_dim, s.rope_theta,
                     s.attention_impl, dtype, pdtype, out_scale,
                     name="attention")
    x = x + attn(RMSNorm(s.norm_eps, pdtype, name="attention_norm")(x), positions)
    if self.moe:
      ffn = MoE(s.moe, s.expert_ffn, dtype, pdtype, out_scale, name="moe")
    else:
      ffn = FFN(s.ffn, dtype, pdtype, out_scale, name="ffn")
    x = x + ffn(RMSNorm(s.norm_eps, pdtype, name="ffn_norm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, None


class BlockGroup(nn.Module):
  """model.moe.every consecutive blocks, the last one MoE: the scanned unit when every > 1."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, x: Array, positions: Array):
    n = self.spec.moe.every
    for i in range(n):
      x, _ = Block(self.spec, moe=i == n - 1, name=f"block_{i}")(x, positions)
    return x, None


# Weights every layer casts to the compute dtype before its matmuls: cast_matrices casts them once, before
# the model runs, so an FSDP all-gather moves them in the compute dtype (half of fp32's bytes in bf16); the
# same numbers reach the matmuls, and the gradients flow back through the cast to the fp32 parameters.
COMPUTE_CAST = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "gate_kernel")


def cast_matrices(params, spec: "ModelSpec"):
  """params with every COMPUTE_CAST leaf in the compute dtype (spec.dtype); the rest untouched."""
  dtype = DTYPES[spec.dtype]
  name = lambda path: str(getattr(path[-1], "key", ""))
  return jax.tree_util.tree_map_with_path(lambda p, v: v.astype(dtype) if name(p) in COMPUTE_CAST else v, params)


class Decoder(nn.Module):
  """tokens (B, T) int32 -> logits (B, T, V) float32, or with return_hidden=True the final normed
  hidden states (B, T, D) in compute dtype and the unembedding (D, V) in param dtype."""
  spec: ModelSpec

  @nn.compact
  def __call__(self, tokens: Array, return_hidden: bool = False):
    s = self.spec
    dtype, pdtype = DTYPES[s.dtype], DTYPES[s.param_dtype]
    embedding = param(self, "embedding", (s.vocab_size, s.d_model), ("vocab", "embed"),
                      nn.initializers.normal(0.02), pdtype)
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)                   # (B, T, D)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    # Scanned unit: one block (dense, or MoE in every layer), or a group of `every` blocks ending in MoE.
    if s.moe.num_experts and s.moe.every > 1:
      unit, length, args = BlockGroup, s.n_layers // s.moe.every, (s,)
    else:
      unit, length, args = Block, s.n_layers, (s, bool(s.moe.num_experts))
    if REMAT_POLICIES[s.remat] is not None:
      unit = nn.remat(unit, policy=REMAT_POLICIES[s.remat], prevent_cse=False)
    layers = nn.scan(unit, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                     in_axes=(nn.broadcast,), length=length,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = layers(*args, name="layers")(x, positions)
    x = RMSNorm(s.norm_eps, pdtype, name="final_norm")(x)
    if s.tie_embeddings:
      unembed = embedding.T                                                 # (D, V)
    else:
      unembed = param(self, "unembed", (s.d_model, s.vocab_size), ("embed", "vocab"),
                      nn.initializers.normal(s.d_model**-0.5), pdtype)
    if return_hidden:  # for moa_jax.loss.chunked_token_losses, which never builds all the logits at once
      return x, unembed
    return loss.logits(x, unembed)


def model_spec(model_config) -> ModelSpec:
  """Validates the `model` config group (an ml_collections ConfigDict) into a ModelSpec."""
  c = model_config
  groups = {"ffn": _group(c.ffn, "ffn", FFNSpec)}
  if "moe" in c:  # configs without the group are dense
    groups["moe"] = _group(c.moe, "moe", MoESpec)
  fields = {f.name for f in dataclasses.fields(ModelSpec)} - {"ffn", "moe"}
  return ModelSpec(**groups, **{k: _tuple(c[k]) for k in fields if k in c})


def _group(c, name: str, cls):
  known = [f.name for f in dataclasses.fields(cls)]
  unknown = set(c) - set(known)
  if unknown:
    raise ValueError(f"model.{name} has unknown fields {sorted(unknown)}; known: {', '.join(known)}")
  return cls(**{k: _tuple(c[k]) for k in known if k in c})


def _tuple(v):
  return tuple(v) if isinstance(v, list) else v


def build_model(model_config) -> Decoder:
  return Decoder(model_spec(model_config))
