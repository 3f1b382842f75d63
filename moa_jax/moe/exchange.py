"""Expert-parallel exchange, per device inside `shard_map` over mesh axis `expert` (P devices, E/P
experts each).

A device holds A = N·k assignments. Destination device p holds experts [p·E/P, (p+1)·E/P). Each device
may receive at most R rows in all (from every source together):

    R = worst = P·N·min(k, E/P)            buffer_factor < 0 (default): never drops
    R = ⌈buffer_factor · A⌉ (≤ worst)      buffer_factor > 0: A is the balanced count

When the routing sends a device more than R rows, which ones it keeps is decided the same way on every
device, from an all-gather of each assignment's expert, choice slot and router weight (A scalars per
device, not rows):
  1. a fair share per expert (max-min, water-filling): an expert asking for less than an equal share of R
     keeps all of its rows, the rest share what is left, so a co-located unpopular expert never starves;
  2. inside an expert, by priority: first choices before second choices, then higher router weight (then
     source device and position, so the choice is deterministic).
A dropped assignment's output is zero (the token keeps its other experts and the residual); drops are
counted per expert (`dropped`). Nothing depends on which device pair a row travels between, so drops do
not bunch by position or by expert order, and a mesh with fewer devices per exchange drops like one with
more (tests/test_moe_parallel.py).

The kept rows are sorted by expert and sent; receiver layout: rows from source s form one block, grouped
by local expert; the receiver knows the kept count of each (source, local expert) from an all-gather of
per-expert counts, so expert ids never travel.

Transports (`transport`):
    ragged  jax.lax.ragged_all_to_all: sends only the kept rows into an R-row buffer (GPU, TPU).
    padded  jax.lax.all_to_all of (P, C, D) buffers, C = min(R, N·min(k, E/P)) rows per pair: the same
            rows plus padding. XLA:CPU has no ragged all-to-all, so this is the CPU path; it is also the
            fallback for a GPU stack whose ragged all-to-all is slow (`model.moe.transport`).
The experts run on the received rows sorted by local expert, with group sizes counting valid rows only.
The rows that arrive and the expert outputs once back home are named `moe_dispatched` / `moe_expert_out`
for the remat policies, so a backward pass need not repeat the exchange.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moa_jax.moe.grouped import inverse_permutation

Array = jax.Array


def receive_rows(tokens: int, shards: int, top_k: int, local_experts: int, buffer_factor: float) -> int:
  """R: rows one device may receive in all. Never below the balanced count rounded up to 8, never above
  the worst case (every source's every token sends min(k, E/P) assignments here)."""
  worst = shards * tokens * min(top_k, local_experts)
  if buffer_factor < 0:
    return worst
  return min(worst, -(-math.ceil(buffer_factor * tokens * top_k) // 8) * 8)


def _exclusive_cumsum(x: Array, axis: int = -1) -> Array:
  return jnp.cumsum(x, axis=axis) - x


def fair_shares(counts: Array, budget: int) -> Array:
  """Max-min fair split of `budget` rows: counts (..., m) rows asked per expert -> kept (..., m), with
  Σ kept = min(budget, Σ counts) and kept_e = min(counts_e, L) or L + 1 for the water level L."""
  lo, hi = jnp.zeros(counts.shape[:-1], counts.dtype), jnp.full(counts.shape[:-1], budget, counts.dtype)
  for _ in range(max(1, budget).bit_length() + 1):        # largest L with Σ min(counts, L) ≤ budget
    mid = (lo + hi + 1) // 2
    ok = jnp.sum(jnp.minimum(counts, mid[..., None]), axis=-1) <= budget
    lo, hi = jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
  kept = jnp.minimum(counts, lo[..., None])
  spare = budget - jnp.sum(kept, axis=-1, keepdims=True)  # < the number of unsaturated experts
  hungry = counts > kept
  return kept + (hungry & (jnp.cumsum(hungry, axis=-1) <= spare))


def priority_keep(flat: Array, weights: Array, top_k: int, n_experts: int, budget: int, axis: str) -> Array:
  """Which of this device's assignments (flat (A,) experts, weights (A,) router weights) the receivers
  keep, deciding over every device of `axis` at once (module docstring). Returns (A,) bool."""
  shards = jax.lax.psum(1, axis)
  a = flat.shape[0]
  experts = jax.lax.all_gather(flat, axis).reshape(-1)                 # (P·A,) every source's assignments
  weight = jax.lax.all_gather(weights, axis).reshape(-1)
  choice = jnp.tile(jnp.arange(a) % top_k, shards)                     # first, second, ... choice
  order = jnp.lexsort((jnp.arange(shards * a), -weight, choice, experts))  # by expert, then priority
  counts = jnp.bincount(experts, length=n_experts)                     # (E,)
  shares = fair_shares(counts.reshape(shards, -1), budget).reshape(-1)  # (E,) rows each expert keeps
  rank = jnp.arange(shards * a) - _exclusive_cumsum(counts)[experts[order]]
  kept = jnp.zeros((shards * a,), bool).at[order].set(rank < shares[experts[order]])
  return jax.lax.dynamic_slice_in_dim(kept, jax.lax.axis_index(axis) * a, a)


def exchange(x: Array, flat: Array, weights: Array, top_k: int, n_experts: int, expert_fn: Callable, *, axis: str,
             shards: int, buffer_factor: float, transport: str):
  """x (N, D) this device's tokens; flat (A,) = (N·k,) their experts, weights (A,) router weights.
  expert_fn(recv (M, D), ids (M,)) -> (out (M, D), extras): this device's experts on the received rows,
  ids their local expert (E/P marks padding). Returns the outputs in assignment order (A, D), zero where
  dropped; extras; validity of the received rows; and the rows dropped per expert (E,)."""
  n, d = x.shape
  a, e_loc = flat.shape[0], n_experts // shards
  budget = receive_rows(n, shards, top_k, e_loc, buffer_factor)
  never = budget == receive_rows(n, shards, top_k, e_loc, -1)
  kept = jnp.ones((a,), bool) if never else priority_keep(flat, jax.lax.stop_gradient(weights), top_k, n_experts, budget, axis)
  me = jax.lax.axis_index(axis)
  order = jnp.argsort(jnp.where(kept, flat, n_experts), stable=True)  # kept rows by expert, dropped last
  rows = x[order // top_k]                                             # (A, D)
  sizes = jnp.bincount(flat, weights=kept.astype(jnp.int32), length=n_experts)   # kept per expert
  dropped = jnp.bincount(flat, length=n_experts) - sizes
  counts = jax.lax.all_gather(sizes, axis)                             # (P_src, E) kept
  to_dev = counts.reshape(shards, shards, e_loc).sum(-1)               # (P_src, P_dst) rows per pair
  start = _exclusive_cumsum(to_dev)                                    # (P_src, P_dst): offsets at sources
  at_dst = _exclusive_cumsum(to_dev, axis=0)                           # (P_src, P_dst): offsets at receivers
  mine = jax.lax.dynamic_slice_in_dim(counts, me * e_loc, e_loc, axis=1)  # (P_src, e_loc)

  if transport == "ragged":  # R rows: source blocks one after another, each grouped by local expert
    q = jnp.arange(budget)
    group = jnp.sum(q[:, None] >= jnp.cumsum(mine.reshape(-1))[None, :], axis=-1)   # (source, expert) block
    ids = jnp.where(group < shards * e_loc, group % e_loc, e_loc)
    recv = jax.lax.ragged_all_to_all(rows, jnp.zeros((budget, d), rows.dtype), start[me], to_dev[me], at_dst[me],
                                     to_dev[:, me], axis_name=axis)
  else:                      # (P_src, C) rows: source s's block at [s, 0:to_dev[s, me]]
    cap = min(budget, n * min(top_k, e_loc))
    q = jnp.arange(cap)
    local = jnp.sum(q[None, :, None] >= jnp.cumsum(mine, axis=1)[:, None, :], axis=-1)   # (P_src, C)
    ids = jnp.where(q[None, :] < to_dev[:, me][:, None], local, e_loc).reshape(-1)
    dest = jnp.where(jnp.arange(a) < jnp.sum(sizes), flat[order] // e_loc, shards)       # shards: dropped
    slot = jnp.arange(a) - start[me][jnp.minimum(dest, shards - 1)]
    send = jnp.zeros((shards, cap, d), rows.dtype).at[dest, slot].set(rows, mode="drop")
    recv = jax.lax.all_to_all(send, axis, 0, 0, tiled=True).reshape(shards * cap, d)

  out, extras = expert_fn(checkpoint_name(recv, "moe_dispatched"), ids)

  if transport == "ragged":
    back = jax.lax.ragged_all_to_all(out, jnp.zeros((a, d), out.dtype), at_dst[:, me], to_dev[:, me], start[:, me],
                                     to_dev[me], axis_name=axis)
  else:
    back = jax.lax.all_to_all(out.reshape(shards, cap, d), axis, 0, 0, tiled=True)
    back = back.at[dest, slot].get(mode="fill", fill_value=0)
  back = checkpoint_name(back, "moe_expert_out")
  return back[inverse_permutation(order)], extras, ids < e_loc, dropped
