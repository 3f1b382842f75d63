"""The two paths on one device's tokens, and the router statistics they report.

    dropless  assignments sorted by expert, grouped matmuls (grouped.gmm); nothing dropped on one device.
              With expert parallelism the rows travel through exchange.exchange: never dropped by default
              (buffer_factor < 0); with a receive cap, overflow is dropped by fair share and priority and
              reported per expert as ep_overflow_expert (ep_overflow: the fraction of all assignments).
    capacity  GShard-style: expert e takes at most C = ⌈capacity_factor · N · k / E⌉ of a device's N tokens,
              first choices before second choices, then token order. Each assignment's place in its
              expert's queue comes from a stable sort, and rows are scattered into an (E, C, D) buffer and
              gathered back: O(N·k + E·C) memory. The rest are dropped and counted.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moa_jax.ffn import FFNSpec
from moa_jax.moe.exchange import exchange
from moa_jax.moe.grouped import batched_ffn, gate_sums, grouped_ffn, inverse_permutation, unsorted_ffn
from moa_jax.moe.router import route, router_losses, sequence_aux_sum
from moa_jax.moe.spec import MoESpec

Array = jax.Array


def dropless(x, weights, experts, p, spec: MoESpec, ffn: FFNSpec, axis, shards, transport, tensor_axis):
  """x (N, D), weights / experts (N, k) -> y (N, D) fp32, gate sums, dropped (None) and the assignments
  the expert-parallel exchange dropped per expert (E,) (None on one device)."""
  n, k = experts.shape
  flat = experts.reshape(-1)                          # (A,) assignment a = token·k + slot
  if shards == 1:
    order = jnp.argsort(flat, stable=True)
    sorted_e = flat[order]
    rows = checkpoint_name(x[order // k], "moe_dispatched")   # (A, D), grouped by expert
    if tensor_axis is None:
      out, coefs = grouped_ffn(rows, sorted_e, jnp.bincount(flat, length=spec.num_experts), p, ffn, spec.gmm)
    else:
      out, coefs = unsorted_ffn(rows, sorted_e, spec.num_experts, p, ffn, spec.gmm, tensor_axis)
    out = checkpoint_name(out, "moe_expert_out")[inverse_permutation(order)]   # back to assignment order
    valid, overflow = jnp.ones((n * k,), bool), None
  else:
    e_loc = spec.num_experts // shards
    run = lambda recv, ids: unsorted_ffn(recv, ids, e_loc, p, ffn, spec.gmm, tensor_axis)
    out, coefs, valid, overflow = exchange(x, flat, weights.reshape(-1), k, spec.num_experts, run, axis=axis,
                                           shards=shards, buffer_factor=spec.buffer_factor, transport=transport)
  y = jnp.einsum("NK,NKD->ND", weights, out.reshape(n, k, -1).astype(jnp.float32))
  return y, gate_sums(coefs, valid, ffn.mix == "moa"), None, overflow


def capacity(x, weights, experts, p, spec: MoESpec, ffn: FFNSpec, axis, shards, transport, tensor_axis):
  del transport
  n, k = experts.shape
  e = spec.num_experts
  cap = min(n, max(1, math.ceil(spec.capacity_factor * n * k / e)))
  flat = experts.T.reshape(-1)                         # (k·N,) in priority order: slot-major, then token
  order = jnp.argsort(flat, stable=True)
  counts = jnp.bincount(flat, length=e)
  position = jnp.arange(k * n) - (jnp.cumsum(counts) - counts)[flat[order]]   # place in its expert's queue
  position = position[inverse_permutation(order)]
  kept = position < cap
  slot = jnp.where(kept, flat * cap + position, e * cap)                     # e·cap: out of range, dropped
  token = jnp.arange(k * n) % n
  xe = jnp.zeros((e * cap, x.shape[-1]), x.dtype).at[slot].set(x[token], mode="drop").reshape(e, cap, -1)
  filled = jnp.zeros((e * cap,), jnp.float32).at[slot].set(1.0, mode="drop").reshape(e, cap)
  if shards > 1:  # (E, C, ·) -> this device's experts × (sources · C)
    e_loc = e // shards
    there = lambda t: jnp.moveaxis(jax.lax.all_to_all(t.reshape(shards, e_loc, *t.shape[1:]), axis, 0, 0,
                                                      tiled=True), 0, 1)
    xe, filled = there(xe).reshape(e_loc, shards * cap, -1), there(filled).reshape(e_loc, shards * cap)
  ye, coefs = batched_ffn(xe, p, ffn, tensor_axis)
  if shards > 1:
    ye = jax.lax.all_to_all(jnp.moveaxis(ye.reshape(e_loc, shards, cap, -1), 1, 0), axis, 0, 0, tiled=True)
  out = ye.reshape(e * cap, -1).at[slot].get(mode="fill", fill_value=0)      # (k·N, D)
  y = jnp.einsum("KN,KND->ND", weights.T, out.reshape(k, n, -1).astype(jnp.float32))
  return y, gate_sums(coefs, filled, ffn.mix == "moa"), k * n - jnp.sum(kept), None


PATH_FNS = {"dropless": dropless, "capacity": capacity}


def moe_tokens(x: Array, router: Array, experts: dict, spec: MoESpec, ffn: FFNSpec, *,
               token_axes: tuple[str, ...] = (), n_tokens: int | None = None, axis: str | None = None,
               shards: int = 1, transport: str = "padded", tensor_axis: str | None = None,
               bias: Array | None = None, seq_len: int | None = None, seq_start: int | Array = 0,
               seq_group: tuple[str, int] | None = None):
  """One device's tokens x (N, D) -> (N, D) and the router statistics, summed over `token_axes` (the
  mesh axes the tokens are split over; n_tokens is the global count). `experts` holds this device's
  E/shards experts; assignments travel over mesh axis `axis` when shards > 1. With `tensor_axis` the
  experts' F is split over that mesh axis; on the dropless path each tensor rank holds its own tokens
  (token_axes then includes it), on the capacity path they all hold the same tokens. bias (E,): the
  router bias (choice only). Sequences of seq_len tokens (default: all N are one): x starts at token
  seq_start of this device's sequences, which `seq_group` = (mesh axis, size) splits, if set."""
  n = x.shape[0]
  n_tokens = n_tokens or n
  seq_len = seq_len or n
  total = (lambda v: jax.lax.psum(v, token_axes)) if token_axes else (lambda v: v)
  weights, chosen, logits, scores = route(x, router, spec, bias)
  y, sums, dropped, overflow = PATH_FNS[spec.path](x, weights, chosen, experts, spec, ffn, axis, shards, transport,
                                                   tensor_axis)
  group, group_size = seq_group or (None, 1)
  n_seqs = -(-n * group_size // seq_len)                            # this device's sequences
  seq_sum = sequence_aux_sum(chosen, scores, (seq_start + jnp.arange(n)) // seq_len, n_seqs, spec.num_experts,
                             seq_len, group)
  counts = total(jnp.bincount(chosen.reshape(-1), length=spec.num_experts))
  stats = router_losses(counts, total(jnp.sum(scores, axis=0)),
                        total(jnp.sum(jnp.square(jax.nn.logsumexp(logits, axis=-1)))), n_tokens, spec.top_k)
  stats["seq_aux_loss"] = total(seq_sum) / group_size / (n_tokens // seq_len)
  routed = n_tokens * spec.top_k
  lost = 0
  if dropped is not None:
    stats["dropped"] = total(dropped) / routed
    lost = total(dropped)
  if overflow is not None:  # (E,) per expert: the fraction of its assignments dropped, and of all of them
    overflow = total(overflow)
    stats["ep_overflow"] = jnp.sum(overflow) / routed
    stats["ep_overflow_expert"] = overflow / jnp.maximum(counts, 1)
    lost = jnp.sum(overflow)
  stats.update({f"gates_{b}": total(s) / (routed - lost) for b, s in sums.items()})
  return y.astype(x.dtype), stats
