"""Next-token cross-entropy from the decoder's last hidden states, whole or in chunks of positions.

The fp32 logits (B, T, V) are the largest activation of a language model at a 32k vocabulary: 2 GiB for
8 × 2048 tokens, and as much again for their gradient. `chunked_token_losses` scans over chunks of C
positions with the unembedding inside the scan body and `jax.checkpoint` around it, so at most one
chunk's logits (B, C, V) exist at a time, forward and backward; the backward pass recomputes each
chunk's logits (one extra (B·T, D) × (D, V) matmul per step). `token_losses(logits(...))` is the plain
reference it is tested against (tests/test_accum.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def logits(hidden: Array, unembed: Array) -> Array:
  """hidden (B, T, D) in compute dtype, unembed (D, V) -> logits (B, T, V) float32."""
  return jnp.einsum("BTD,DV->BTV", hidden, unembed.astype(hidden.dtype), preferred_element_type=jnp.float32)


def token_losses(logits: Array, targets: Array) -> Array:
  """logits (B, T, V) float32, targets (B, T) int32 -> per-token losses (B, T) float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def cross_entropy(logits: Array, targets: Array) -> Array:
  """Mean next-token loss over every token of the batch."""
  return token_losses(logits, targets).mean()


def check_chunk(chunk: int, seq_len: int) -> None:
  """train.loss_chunk against train.seq_len: 0 or ≥ seq_len (the whole sequence at once), or a divisor
  of it. A preset's chunk stays valid when a user shortens the sequence below it."""
  if chunk < 0 or (0 < chunk < seq_len and seq_len % chunk):
    raise ValueError(f"train.loss_chunk = {chunk} does not divide train.seq_len = {seq_len}; use 0 (no chunks) "
                     f"or a divisor of {seq_len}, e.g. {_divisor_near(seq_len, min(512, seq_len // 2))}")


def _divisor_near(n: int, target: int) -> int:
  return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


def chunked_token_losses(hidden: Array, unembed: Array, targets: Array, chunk: int) -> Array:
  """Per-token losses (B, T) float32 computed `chunk` positions at a time (0 or ≥ T: all at once).
  hidden (B, T, D), unembed (D, V) (any float dtype; cast to hidden's inside, so its gradient is
  accumulated over chunks in unembed's own dtype), targets (B, T) int32."""
  b, t, d = hidden.shape
  if chunk <= 0 or chunk >= t:
    return token_losses(logits(hidden, unembed), targets)
  check_chunk(chunk, t)
  n = t // chunk
  xs = (hidden.reshape(b, n, chunk, d).swapaxes(0, 1), targets.reshape(b, n, chunk).swapaxes(0, 1))  # (N, B, C, ...)

  @jax.checkpoint  # keep only (x, y) per chunk; the backward recomputes the chunk's logits
  def one(x, y):  # x (B, C, D), y (B, C) -> (B, C)
    return token_losses(logits(x, unembed), y)

  _, losses = jax.lax.scan(lambda carry, xy: (carry, one(*xy)), None, xs)  # (N, B, C)
  return losses.swapaxes(0, 1).reshape(b, t)
