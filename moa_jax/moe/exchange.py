"""Expert-parallel exchange, per device inside `shard_map` over mesh axis `expert` (P devices, E/P
experts each).

A device holds A = N·k assignments sorted by expert. Destination device p holds experts
[p·E/P, (p+1)·E/P). Every device may receive at most `cap` rows from each other device,

    cap = ⌈buffer_factor · A / P⌉   (A / P is the balanced count; A·min(k, E/P)/k the most possible)

so a receive buffer is P·cap = buffer_factor · A rows, not the worst case of P·A. Rows past `cap` to one
device are dropped (their output is zero, the token keeps its other experts and the residual) and counted
as `ep_overflow`. Receiver layout, the same for both transports: rows from device s sit at
[s·cap, s·cap + min(n_s, cap)), grouped by local expert; the receiver knows how many rows of each of its
experts came from each device from an all-gather of the per-expert counts, so expert ids never travel.

Transports (`transport`):
    ragged  jax.lax.ragged_all_to_all: sends only the kept rows (GPU, TPU).
    padded  jax.lax.all_to_all of fixed (P, cap, D) buffers: the same rows plus padding. XLA:CPU has no
            ragged all-to-all, so this is the CPU emulation and the reference the tests compare with.
The experts run on the received rows sorted by local expert, with group sizes counting valid rows only,
so a grouped-matmul kernel does no work for padding. The rows that arrive and the expert outputs once
back home are named `moe_dispatched` / `moe_expert_out` for the remat policies (the backward needs both:
the weight gradients and the router-weight gradient), so a backward pass need not repeat the exchange.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moa_jax.ffn import FFNSpec
from moa_jax.moe.grouped import unsorted_ffn

Array = jax.Array


def per_pair_capacity(assignments: int, shards: int, top_k: int, local_experts: int, buffer_factor: float) -> int:
  """Rows one device may receive from another: buffer_factor × balanced, a multiple of 8, at most the
  worst case (every token sends min(k, E/P) assignments to one device)."""
  worst = assignments // top_k * min(top_k, local_experts)
  return min(worst, -(-math.ceil(buffer_factor * assignments / shards) // 8) * 8)


def _exclusive_cumsum(x: Array, axis: int = -1) -> Array:
  return jnp.cumsum(x, axis=axis) - x


def exchange_ffn(rows: Array, sorted_e: Array, sizes: Array, p: dict, ffn: FFNSpec, *, axis: str, shards: int,
                 cap: int, transport: str, gmm: str, tensor_axis=None):
  """rows (A, D) sorted by global expert sorted_e (A,), sizes (E,) this device's rows per expert; p: this
  device's experts. Returns the experts' outputs for the rows (A, D) (zero where dropped), the per-row
  mixing coefficients and validity of the received rows (for the gate metrics), and the count dropped."""
  a, d = rows.shape
  n_experts = sizes.shape[0]
  e_loc = n_experts // shards
  me = jax.lax.axis_index(axis)
  counts = jax.lax.all_gather(sizes, axis)                                 # (P_src, E)
  to_dev = counts.reshape(shards, shards, e_loc).sum(-1)                   # (P_src, P_dst) rows
  sent = jnp.minimum(to_dev, cap)                                          # kept rows per pair
  start = _exclusive_cumsum(to_dev)                                        # (P_src, P_dst): offsets at sources
  dest = sorted_e // e_loc                                                 # (A,)
  slot = jnp.arange(a) - start[me][dest]                                   # position within its pair's chunk
  dropped = jnp.sum(slot >= cap)

  # What arrives: from device s, min(n_s, cap) rows grouped by my local experts.
  mine = jax.lax.dynamic_slice_in_dim(counts, me * e_loc, e_loc, axis=1)  # (P_src, e_loc)
  q = jnp.arange(cap)
  ends = jnp.cumsum(mine, axis=1)                                          # (P_src, e_loc)
  local = jnp.sum(q[None, :, None] >= ends[:, None, :], axis=-1)           # (P_src, cap): local expert of slot q
  ids = jnp.where(q[None, :] < sent[:, me][:, None], local, e_loc).reshape(-1)   # e_loc marks padding

  if transport == "ragged":
    recv = jax.lax.ragged_all_to_all(rows, jnp.zeros((shards * cap, d), rows.dtype), start[me], sent[me],
                                     jnp.full((shards,), me * cap, jnp.int32), sent[:, me], axis_name=axis)
  else:
    send = jnp.zeros((shards, cap, d), rows.dtype).at[dest, slot].set(rows, mode="drop")
    recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True).reshape(shards * cap, d)

  # By local expert, run, back to arrival order; with tensor_axis the tensor ranks share the FLOPs.
  out, coefs = unsorted_ffn(checkpoint_name(recv, "moe_dispatched"), ids, e_loc, p, ffn, gmm, tensor_axis)

  if transport == "ragged":
    back = jax.lax.ragged_all_to_all(out, jnp.zeros((a, d), out.dtype), jnp.arange(shards, dtype=jnp.int32) * cap,
                                     sent[:, me], start[:, me], sent[me], axis_name=axis)
  else:
    back = jax.lax.all_to_all(out.reshape(shards, cap, d), axis, 0, 0, tiled=True)
    back = back.at[dest, slot].get(mode="fill", fill_value=0)
  return checkpoint_name(back, "moe_expert_out"), coefs, ids < e_loc, dropped
