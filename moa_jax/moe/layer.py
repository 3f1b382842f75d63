"""The MoE layer: parameters, the shard_map placement over a mesh, and the Flax module.

    y(x) = Σ_{e ∈ top-k(s(x))} w_e(x) · FFN_e(x)   [+ FFN_shared(x)]

The experts are the FFNs of `moa_jax.ffn` (fixed, LA or MoA, Type-I or II) with a leading expert axis on
every parameter (`experts/w1` is (E, D, F), `experts/mix/gate_kernel` (E, D, G, K), ...):
`tree.map(lambda p: p[e], experts)` is expert e's FFN parameter tree, so each expert has its own gates.

Expert parallelism. When a mesh is current (train.py enters one), the layer runs per device inside
`jax.shard_map`: tokens stay sharded over the batch axes (data, fsdp, expert), experts over `expert`
(E/P per device), and assignments travel as `exchange.py` describes (ragged all-to-all on GPU/TPU, the
padded emulation on CPU). With mesh.tensor > 1 each expert's F is split over `tensor` (w1, w2 by columns,
w3 by rows), so tensor ranks share the expert FLOPs instead of repeating them. On the dropless path the
tokens are split over `tensor` too: each rank routes and exchanges 1/tp of them, the ranks all-gather
their rows before the expert FFN and reduce-scatter its partial outputs after w3, and the layer's output
is all-gathered over `tensor` at the end. (The capacity path keeps the tokens whole and all-reduces.)
Expert weights are gathered over fsdp at the shard_map boundary (FSDP-style); router and shared experts
are ordinary partitioned layers. Router statistics are summed over the batch
axes, so every mesh computes the same losses; the capacity path limits each device's N tokens, as
GShard's groups do.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moa_jax import ffn as ffn_lib, platforms
from moa_jax.ffn import FFN, FFNSpec, dense_init, param
from moa_jax.moe.grouped import branches
from moa_jax.moe.paths import moe_tokens
from moa_jax.moe.spec import MoESpec
from moa_jax.sharding import BATCH_AXES

Array = jax.Array

EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


# ---- Parameters ---------------------------------------------------------------------------------

class _MixParams(nn.Module):
  spec: FFNSpec
  primary: str
  num_experts: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, d: int) -> dict:
    return ffn_lib.mix_params(self, self.spec, self.primary, d, self.param_dtype, self.num_experts)


class Experts(nn.Module):
  """E FFNs' parameters: the FFN module's tree (w1, w2, mix, mix_u, w3) with a leading expert axis."""
  spec: FFNSpec
  num_experts: int
  param_dtype: jnp.dtype = jnp.float32
  out_scale: float = 1.0

  @nn.compact
  def __call__(self, d: int) -> dict:
    s, e, f, pd = self.spec, self.num_experts, self.spec.d_ff, self.param_dtype
    p = {"w1": param(self, "w1", (e, d, f), ("experts", "embed", "mlp"), dense_init(d), pd)}
    if s.type == "glu":
      p["w2"] = param(self, "w2", (e, d, f), ("experts", "embed", "mlp"), dense_init(d), pd)
    if s.mix != "fixed":
      p["mix"] = _MixParams(s, s.primary, e, pd, name="mix")(d)
      if s.bi_sided:
        p["mix_u"] = _MixParams(s, s.primary_u, e, pd, name="mix_u")(d)
    p["w3"] = param(self, "w3", (e, f, d), ("experts", "mlp", "embed"), dense_init(f, self.out_scale), pd)
    return p


def transport(name: str = "auto") -> str:
  """model.moe.transport: `auto` is padded on CPU (XLA:CPU has no ragged all-to-all), ragged elsewhere (the
  platform compiled for: moa_jax.platforms)."""
  if name != "auto":
    return name
  return "padded" if platforms.current() == "cpu" else "ragged"


def _token_axes(sizes: dict, batch: int) -> tuple[str, ...]:
  """The batch axes (of size > 1) the batch dimension is split over, as far as it divides."""
  axes, split = [], 1
  for a in BATCH_AXES:
    if sizes.get(a, 1) > 1 and batch % (split * sizes[a]) == 0:
      axes.append(a)
      split *= sizes[a]
  return tuple(axes)


def moe_apply(x: Array, router: Array, experts: dict, spec: MoESpec, ffn: FFNSpec, bias: Array | None = None):
  """x (B, T, D) -> (B, T, D), stats. Per device in shard_map when a mesh is current (see the module
  docstring); otherwise one program that XLA partitions (also the fallback when the batch does not split
  over the `expert` axis, e.g. sampling one sequence)."""
  b, t, d = x.shape
  mesh = jax.sharding.get_abstract_mesh()
  sizes = {} if mesh.empty else dict(mesh.shape)
  shards = sizes.get(EXPERT_AXIS, 1)
  axes = _token_axes(sizes, b)
  if spec.num_experts % shards:
    raise ValueError(f"model.moe.num_experts = {spec.num_experts} does not divide over mesh.expert = {shards}; "
                     "use a multiple of mesh.expert experts, or a mesh.expert that divides num_experts")
  if (shards > 1 and EXPERT_AXIS not in axes) or (shards == 1 and not axes):
    y, stats = moe_tokens(x.reshape(b * t, d), router, experts, spec, ffn, bias=bias, seq_len=t)
    return y.reshape(b, t, d), stats
  n_tokens = b * t
  axis = EXPERT_AXIS if shards > 1 else None
  tp = sizes.get(TENSOR_AXIS, 1)
  # Tensor-parallel experts: F split over `tensor` (MoA/LA coefficients are per group, so one group).
  tensor_axis = TENSOR_AXIS if tp > 1 and ffn.d_ff % tp == 0 and (ffn.mix == "fixed" or ffn.groups == 1) else None

  # Dropless: the tokens are split over `tensor` as well, so routing and the exchange carry 1/tp of them
  # and tensor ranks meet only around the expert FFN (all-gather rows, reduce-scatter outputs). Tokens that
  # do not split over tensor: every rank runs the whole expert FFN.
  split = tensor_axis is not None and spec.path == "dropless"
  if split and (b // math.prod(sizes[a] for a in axes) * t) % tp:
    split, tensor_axis = False, None

  def local(x, router, experts, bias):
    lb = x.shape[0]
    x = x.reshape(lb * t, d)
    start = 0
    if split:
      m = lb * t // tp
      start = jax.lax.axis_index(TENSOR_AXIS) * m
      x = jax.lax.dynamic_slice_in_dim(x, start, m)
    y, stats = moe_tokens(x, router, experts, spec, ffn, token_axes=axes + ((TENSOR_AXIS,) if split else ()),
                          n_tokens=n_tokens, axis=axis, shards=shards, transport=transport(spec.transport),
                          tensor_axis=tensor_axis, bias=bias, seq_len=t, seq_start=start,
                          seq_group=(TENSOR_AXIS, tp) if split else None)
    if split:
      y = jax.lax.all_gather(y, TENSOR_AXIS, tiled=True)
    return y.reshape(lb, t, d), stats

  f_split = {"w1": P(axis, None, tensor_axis), "w2": P(axis, None, tensor_axis), "w3": P(axis, tensor_axis, None)}
  expert_specs = {k: f_split.get(k, jax.tree.map(lambda _: P(axis), v)) for k, v in experts.items()}
  # check_vma=False: Pallas kernels (megablox, tokamax) declare their outputs without the varying-axes
  # types that shard_map's check requires (jax 0.10); the 8-device tests compare gradients without it.
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(), expert_specs, P()), out_specs=(P(axes), P()),
                     check_vma=False)
  return fn(x, router, experts, bias)


class MoE(nn.Module):
  """x (B, T, D) -> (B, T, D). Sows `aux_losses` (aux_loss, z_loss), `moe_stats` (load per expert;
  dropped fraction on the capacity path; ep_overflow, the fraction dropped by full expert-parallel
  receive buffers) and the experts' mean gates as `mix_mean`."""
  spec: MoESpec
  ffn: FFNSpec                   # each expert's FFN (d_ff: the expert width)
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  out_scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s, d = self.spec, x.shape[-1]
    x = x.astype(self.dtype)
    router = param(self, "router", (d, s.num_experts), ("embed", None), dense_init(d), self.param_dtype)
    experts = Experts(self.ffn, s.num_experts, self.param_dtype, self.out_scale, name="experts")(d)
    # Loss-free balancing: a bias that only picks experts. Stored with the parameters (so it is checkpointed
    # and used by eval and sampling) but not trained: no gradient reaches it, and step.py sets it each step.
    bias = (param(self, "router_bias", (s.num_experts,), (None,), nn.initializers.zeros, jnp.float32)
            if s.bias_rate > 0 else None)
    y, stats = moe_apply(x, router, experts, s, self.ffn, bias)
    if s.routed_scale != 1.0:
      y = y * s.routed_scale
    self.sow("intermediates", "aux_losses", {k: stats[k] for k in ("aux_loss", "seq_aux_loss", "z_loss")})
    self.sow("intermediates", "moe_stats", {k: stats[k] for k in ("load", "dropped", "ep_overflow", "ep_overflow_expert")
                                          if k in stats})
    if self.ffn.mix != "fixed":  # LA: mean coefficients over experts; MoA: mean gates over routed tokens
      self.sow("intermediates", "mix_mean", {b: jnp.mean(experts[b]["coef"], axis=(0, 1)) if self.ffn.mix == "la"
                                             else stats[f"gates_{b}"] for b in branches(self.ffn)})
    if s.shared_experts:
      shared = dataclasses.replace(self.ffn, d_ff=s.shared_experts * self.ffn.d_ff)
      y = y + FFN(shared, self.dtype, self.param_dtype, self.out_scale, name="shared")(x)
    return y
