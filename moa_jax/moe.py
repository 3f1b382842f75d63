"""Mixture-of-Experts FFN layer (SPEC §2): router, dropless grouped experts, capacity reference,
expert-parallel dispatch.

    y(x) = Σ_{e ∈ top-k(s(x))} w_e(x) · FFN_e(x)   [+ FFN_shared(x)]

Router: logits r = W_r x (fp32, E of them), scores s = softmax(r) or sigmoid(r); the k highest scores,
renormalised to sum to one, weight the chosen experts. The experts are the FFNs of `moa_jax.ffn` (fixed,
LA or MoA, Type-I or II) with a leading expert axis on every parameter (`experts/w1` is (E, D, F),
`experts/mix/gate_kernel` (E, D, G, K), ...): `tree.map(lambda p: p[e], experts)` is expert e's FFN
parameter tree, so each expert has its own gates.

Router losses, over the N tokens of the global batch (sown as `aux_losses`; train.py weights them with
`config.loss_weights`):
    aux_loss = E · Σ_e f_e · P_e    f_e: fraction of the N·k assignments sent to expert e,
                                    P_e: mean over tokens of s_e / Σ_e' s_e'   (1.0 when balanced)
    z_loss   = mean_n (log Σ_e exp r_ne)²

Paths (`model.moe.path`):
    dropless  assignments sorted by expert, grouped matmuls with `jax.lax.ragged_dot`; nothing dropped.
    capacity  the GShard-style reference: expert e takes at most C = ⌈capacity_factor · N · k / E⌉ of a
              device's N tokens (first choices before second choices, then token order) through one-hot
              einsum dispatch/combine; the rest are dropped and counted (O(N²) memory: a reference).

Expert parallelism. When a mesh is current (train.py enters one), the layer runs per device inside
`jax.shard_map`: tokens stay sharded over the batch axes (data, fsdp, expert), experts over `expert`
(E/P per device). Each device routes its own tokens, sends every assignment to the device holding its
expert with `jax.lax.all_to_all` over `expert`, the receiver runs its experts, and a second all-to-all
brings the results back, where they return to token order. The exchange is a *padded* all-to-all:
every device sends every other device a fixed buffer of N·min(k, E/P) rows, the most that N tokens can
send to E/P experts, so nothing is ever dropped. `jax.lax.ragged_all_to_all` would send only the rows
routed (up to P·min(k, E/P)/k times fewer bytes), but XLA:CPU does not implement it ("UNIMPLEMENTED:
HLO opcode ragged-all-to-all", jax 0.10), so the tests on fake CPU devices could not check it; the
receive buffer of a dropless ragged exchange must be worst-case sized anyway. Expert weights are
gathered over fsdp/tensor at the shard_map boundary (FSDP-style); router and shared experts are
ordinary partitioned layers. Router statistics are summed over the batch axes, so every mesh computes
the same losses; the capacity path limits each device's N tokens, as GShard's groups do.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moa_jax import ffn as ffn_lib
from moa_jax.ffn import FFN, FFNSpec, dense_init, param
from moa_jax.sharding import BATCH_AXES

Array = jax.Array

ROUTERS = ("softmax", "sigmoid")
PATHS = ("dropless", "capacity")
EXPERT_AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """The `model.moe` config group, validated. num_experts = 0 is a dense model."""
  num_experts: int = 0           # routed experts E (0: dense FFNs everywhere)
  top_k: int = 2                 # experts per token
  every: int = 1                 # MoE in every N-th layer (layers N-1, 2N-1, ...), dense FFNs between
  router: str = "softmax"        # softmax | sigmoid scores
  shared_experts: int = 0        # always-on experts, run as one FFN of width shared_experts · d_ff_expert
  d_ff_expert: int = 0           # expert hidden width (0: model.ffn.d_ff)
  path: str = "dropless"         # dropless (ragged_dot) | capacity (einsum reference, drops overflow)
  capacity_factor: float = 1.25  # capacity path: slots per expert = ⌈factor · tokens · top_k / E⌉

  def __post_init__(self):
    ffn_lib._choice("model.moe.router", self.router, ROUTERS)
    ffn_lib._choice("model.moe.path", self.path, PATHS)
    if self.num_experts < 0:
      raise ValueError(f"model.moe.num_experts = {self.num_experts}; use 0 (dense) or a positive count")
    if not self.num_experts:
      return
    if self.top_k < 1:
      raise ValueError(f"model.moe.top_k = {self.top_k}; must be ≥ 1")
    if self.top_k > self.num_experts:
      raise ValueError(f"model.moe.top_k = {self.top_k} > model.moe.num_experts = {self.num_experts}; "
                       "route each token to at most num_experts experts")
    if self.every < 1:
      raise ValueError(f"model.moe.every = {self.every}; must be ≥ 1 (1: every layer is MoE)")
    for field in ("shared_experts", "d_ff_expert"):
      if getattr(self, field) < 0:
        raise ValueError(f"model.moe.{field} = {getattr(self, field)}; must be ≥ 0")
    if self.capacity_factor <= 0:
      raise ValueError(f"model.moe.capacity_factor = {self.capacity_factor}; must be positive")


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


def _branches(spec: FFNSpec) -> tuple[str, ...]:
  return () if spec.mix == "fixed" else (("mix", "mix_u") if spec.bi_sided else ("mix",))


# ---- Routing ------------------------------------------------------------------------------------

def route(x: Array, kernel: Array, spec: MoESpec):
  """x (N, D), kernel (D, E) -> weights (N, k) fp32 summing to 1, experts (N, k) int32,
  logits (N, E) fp32 and the normalised scores (N, E) the balance loss uses."""
  logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  scores = jax.nn.softmax(logits, axis=-1) if spec.router == "softmax" else jax.nn.sigmoid(logits)
  top, experts = jax.lax.top_k(scores, spec.top_k)
  weights = top / jnp.sum(top, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32), logits, scores / jnp.sum(scores, axis=-1, keepdims=True)


def router_losses(counts: Array, score_sum: Array, z_sum: Array, n_tokens: int, top_k: int) -> dict:
  """The balance and z losses from global sums: counts (E,) assignments per expert, score_sum (E,) Σ_n of
  normalised scores, z_sum Σ_n logsumexp², over n_tokens tokens."""
  load = counts.astype(jnp.float32) / (n_tokens * top_k)             # f_e, sums to 1
  return {"aux_loss": counts.shape[0] * jnp.sum(load * score_sum / n_tokens),
          "z_loss": z_sum / n_tokens, "load": load}


# ---- Expert FFNs on grouped rows (dropless) and on capacity buffers -------------------------------

def grouped_ffn(rows: Array, ids: Array, sizes: Array, p: dict, spec: FFNSpec):
  """The experts' FFNs on rows sorted by expert: group e is the next sizes[e] rows. Rows past Σ sizes
  are padding: they come out zero. ids (M,): each row's expert (any valid index for padding).
  Returns (M, D) and each mixed branch's per-row coefficients (M, G, K)."""
  dt = rows.dtype
  h = jax.lax.ragged_dot(rows, p["w1"].astype(dt), sizes)                 # (M, F)
  u = jax.lax.ragged_dot(rows, p["w2"].astype(dt), sizes) if spec.type == "glu" else None
  coefs = {}
  for b in _branches(spec):
    if spec.mix == "la":
      coefs[b] = p[b]["coef"][ids]                                          # (M, G, K)
      continue
    kernel = p[b]["gate_kernel"]                                            # (E, D, G, K)
    e, d, g, k = kernel.shape
    logits = jax.lax.ragged_dot(rows, kernel.reshape(e, d, g * k).astype(dt), sizes,
                                preferred_element_type=jnp.float32).reshape(-1, g, k)
    bias = p[b]["gate_bias"][ids] if "gate_bias" in p[b] else None
    coefs[b] = ffn_lib.gates(spec, logits, bias)
  y = ffn_lib.mix_hidden(spec, h, u, coefs.get("mix"), coefs.get("mix_u"))
  return jax.lax.ragged_dot(y, p["w3"].astype(dt), sizes), coefs


def batched_ffn(xe: Array, p: dict, spec: FFNSpec):
  """The experts' FFNs on capacity buffers xe (E, C, D) -> (E, C, D), and per-slot coefficients."""
  dt = xe.dtype
  h = jnp.einsum("ECD,EDF->ECF", xe, p["w1"].astype(dt))
  u = jnp.einsum("ECD,EDF->ECF", xe, p["w2"].astype(dt)) if spec.type == "glu" else None
  coefs = {}
  for b in _branches(spec):
    if spec.mix == "la":
      coefs[b] = p[b]["coef"][:, None]                                      # (E, 1, G, K)
      continue
    logits = jnp.einsum("ECD,EDGK->ECGK", xe, p[b]["gate_kernel"].astype(dt), preferred_element_type=jnp.float32)
    bias = p[b]["gate_bias"][:, None] if "gate_bias" in p[b] else None
    coefs[b] = ffn_lib.gates(spec, logits, bias)                            # (E, C, G, K)
  y = ffn_lib.mix_hidden(spec, h, u, coefs.get("mix"), coefs.get("mix_u"))
  return jnp.einsum("ECF,EFD->ECD", y, p["w3"].astype(dt)), coefs


def _gate_sums(coefs: dict, valid: Array, moa: bool) -> dict:
  """Σ over valid rows of the MoA gates (mean over groups): (K,) per branch, for the gate metrics."""
  if not moa:
    return {}
  return {b: jnp.einsum("...GK,...->K", c, valid.astype(jnp.float32)) / c.shape[-2] for b, c in coefs.items()}


# ---- The two paths, per device --------------------------------------------------------------------

def _all_to_all(x: Array, axis: str) -> Array:
  """x (P, ...): row s goes to device s; returns (P, ...) with row s from device s."""
  return jax.lax.all_to_all(x, axis, 0, 0, tiled=True)


def _dropless(x, weights, experts, p, spec: MoESpec, ffn: FFNSpec, axis, shards):
  n, k = experts.shape
  flat = experts.reshape(-1)                          # (A,) assignment a = token·k + slot
  order = jnp.argsort(flat, stable=True)
  sorted_e = flat[order]
  rows = x[order // k]                                # (A, D), grouped by expert
  sizes = jnp.bincount(flat, length=spec.num_experts)
  if shards == 1:
    out, coefs = grouped_ffn(rows, sorted_e, sizes, p, ffn)
    valid = jnp.ones((n * k,), bool)
  else:  # a device's n tokens send at most n·min(k, E/P) assignments to one device
    cap = n * min(k, spec.num_experts // shards)
    out, coefs, valid = _exchange_grouped(rows, sorted_e, sizes, p, ffn, axis, shards, cap)
  out = jnp.zeros_like(out).at[order].set(out)        # back to assignment order
  y = jnp.einsum("NK,NKD->ND", weights, out.reshape(n, k, -1).astype(jnp.float32))
  return y, _gate_sums(coefs, valid, ffn.mix == "moa"), None


def _exchange_grouped(rows, sorted_e, sizes, p, ffn: FFNSpec, axis, shards, cap):
  """Padded all-to-all: row i goes to slot i - start[dest] of the buffer for device dest = e // (E/P);
  the receiver regroups what it got by its local experts (padding last), runs them, and sends back."""
  a, d = rows.shape
  e_loc = sizes.shape[0] // shards
  dest = sorted_e // e_loc                                                       # (A,)
  per_device = sizes.reshape(shards, e_loc).sum(axis=1)
  slot = jnp.arange(a) - (jnp.cumsum(per_device) - per_device)[dest]
  send = jnp.zeros((shards, cap, d), rows.dtype).at[dest, slot].set(rows)        # (P, cap, D)
  send_ids = jnp.full((shards, cap), e_loc, jnp.int32).at[dest, slot].set(sorted_e - dest * e_loc)
  recv, recv_ids = _all_to_all(send, axis).reshape(-1, d), _all_to_all(send_ids, axis).reshape(-1)
  order = jnp.argsort(recv_ids, stable=True)         # by local expert; padding (id e_loc) last
  local_sizes = jnp.bincount(recv_ids, length=e_loc)
  out, coefs = grouped_ffn(recv[order], jnp.minimum(recv_ids[order], e_loc - 1), local_sizes, p, ffn)
  valid = recv_ids[order] < e_loc
  out = jnp.zeros_like(out).at[order].set(out).reshape(shards, cap, d)
  return _all_to_all(out, axis)[dest, slot], coefs, valid


def _capacity(x, weights, experts, p, spec: MoESpec, ffn: FFNSpec, axis, shards):
  n, k = experts.shape
  e = spec.num_experts
  cap = min(n, max(1, math.ceil(spec.capacity_factor * n * k / e)))
  choice = jax.nn.one_hot(experts.T, e, dtype=jnp.int32)                          # (k, N, E): by slot first
  position = jnp.sum((jnp.cumsum(choice.reshape(k * n, e), axis=0).reshape(k, n, e) - 1) * choice, axis=-1)
  slots = jax.nn.one_hot(position, cap, dtype=jnp.float32)                        # (k, N, C); 0 past capacity
  chosen = choice.astype(jnp.float32)
  dispatch = jnp.einsum("KNE,KNC->NEC", chosen, slots)                            # 0/1
  combine = jnp.einsum("KNE,KNC,NK->NEC", chosen, slots, weights)
  xe = jnp.einsum("NEC,ND->ECD", dispatch.astype(x.dtype), x)                     # (E, C, D)
  filled = jnp.sum(dispatch, axis=0)                                              # (E, C)
  if shards > 1:  # (E, C, ·) -> this device's experts × (sources · C)
    e_loc = e // shards
    there = lambda t: jnp.moveaxis(_all_to_all(t.reshape(shards, e_loc, *t.shape[1:]), axis), 0, 1)
    xe, filled = there(xe).reshape(e_loc, shards * cap, -1), there(filled).reshape(e_loc, shards * cap)
  ye, coefs = batched_ffn(xe, p, ffn)
  if shards > 1:
    ye = _all_to_all(jnp.moveaxis(ye.reshape(e_loc, shards, cap, -1), 1, 0), axis).reshape(e, cap, -1)
  y = jnp.einsum("NEC,ECD->ND", combine, ye.astype(jnp.float32))
  return y, _gate_sums(coefs, filled, ffn.mix == "moa"), n * k - jnp.sum(dispatch)


def moe_tokens(x: Array, router: Array, experts: dict, spec: MoESpec, ffn: FFNSpec, *,
               token_axes: tuple[str, ...] = (), n_tokens: int | None = None, axis: str | None = None,
               shards: int = 1):
  """One device's tokens x (N, D) -> (N, D) and the router statistics, summed over `token_axes` (the
  mesh axes the tokens are split over; n_tokens is the global count). `experts` holds this device's
  E/shards experts; assignments travel over mesh axis `axis` when shards > 1."""
  n = x.shape[0]
  n_tokens = n_tokens or n
  total = (lambda v: jax.lax.psum(v, token_axes)) if token_axes else (lambda v: v)
  weights, chosen, logits, scores = route(x, router, spec)
  path = _dropless if spec.path == "dropless" else _capacity
  y, gate_sums, dropped = path(x, weights, chosen, experts, spec, ffn, axis, shards)
  counts = total(jnp.bincount(chosen.reshape(-1), length=spec.num_experts))
  stats = router_losses(counts, total(jnp.sum(scores, axis=0)),
                        total(jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)))), n_tokens, spec.top_k)
  routed = n_tokens * spec.top_k
  if dropped is not None:
    dropped = total(dropped)
    stats["dropped"] = dropped / routed
  kept = routed - (0 if dropped is None else dropped)
  stats.update({f"gates_{b}": total(s) / kept for b, s in gate_sums.items()})
  return y.astype(x.dtype), stats


def _token_axes(sizes: dict, batch: int) -> tuple[str, ...]:
  """The batch axes (of size > 1) the batch dimension is split over, as far as it divides."""
  axes, split = [], 1
  for a in BATCH_AXES:
    if sizes.get(a, 1) > 1 and batch % (split * sizes[a]) == 0:
      axes.append(a)
      split *= sizes[a]
  return tuple(axes)


def moe_apply(x: Array, router: Array, experts: dict, spec: MoESpec, ffn: FFNSpec):
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
    y, stats = moe_tokens(x.reshape(b * t, d), router, experts, spec, ffn)
    return y.reshape(b, t, d), stats
  n_tokens = b * t
  axis = EXPERT_AXIS if shards > 1 else None

  def local(x, router, experts):
    lb = x.shape[0]
    y, stats = moe_tokens(x.reshape(lb * t, d), router, experts, spec, ffn, token_axes=axes,
                          n_tokens=n_tokens, axis=axis, shards=shards)
    return y.reshape(lb, t, d), stats

  expert_specs = jax.tree.map(lambda _: P(axis), experts)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(), expert_specs), out_specs=(P(axes), P()))
  return fn(x, router, experts)


class MoE(nn.Module):
  """x (B, T, D) -> (B, T, D). Sows `aux_losses` (aux_loss, z_loss), `moe_stats` (load per expert;
  dropped fraction on the capacity path) and the experts' mean gates as `mix_mean`."""
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
    y, stats = moe_apply(x, router, experts, s, self.ffn)
    self.sow("intermediates", "aux_losses", {"aux_loss": stats["aux_loss"], "z_loss": stats["z_loss"]})
    self.sow("intermediates", "moe_stats", {k: stats[k] for k in ("load", "dropped") if k in stats})
    if self.ffn.mix != "fixed":  # LA: mean coefficients over experts; MoA: mean gates over routed tokens
      self.sow("intermediates", "mix_mean", {b: jnp.mean(experts[b]["coef"], axis=(0, 1)) if self.ffn.mix == "la"
                                             else stats[f"gates_{b}"] for b in _branches(self.ffn)})
    if s.shared_experts:
      shared = dataclasses.replace(self.ffn, d_ff=s.shared_experts * self.ffn.d_ff)
      y = y + FFN(shared, self.dtype, self.param_dtype, self.out_scale, name="shared")(x)
    return y
