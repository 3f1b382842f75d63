"""The generation loop: greedy, temperature and top-k sampling from a model's apply function.

Training (its periodic samples) and `moa_jax.sample` (the CLI) both import this module; neither
imports the other.

No KV cache: each new token reruns the causal model over a fixed-length buffer (one compile), which
is plenty for looking at what a small model has learned.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("apply_fn", "top_k"))
def _next_token(apply_fn, params, buffer, position, key, temperature, top_k):
  logits = apply_fn({"params": params}, buffer)[0, position - 1]        # (V,)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][-1]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  greedy = jnp.argmax(logits)
  sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
  return jnp.where(temperature > 0, sampled, greedy)


def generate(apply_fn, params, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.8,
             top_k: int = 40, seed: int = 0, eos_id: int | None = None) -> list[int]:
  """Returns the prompt's continuation (new token ids only). temperature 0 is greedy."""
  if not prompt:
    raise ValueError("the prompt is empty; give at least one token")
  total = len(prompt) + max_new_tokens
  buffer = np.zeros((1, total), np.int32)
  buffer[0, :len(prompt)] = prompt
  buffer = jnp.asarray(buffer)
  key = jax.random.key(seed)
  out = []
  for position in range(len(prompt), total):
    key, sub = jax.random.split(key)
    token = _next_token(apply_fn, params, buffer, position, sub, temperature, top_k)
    buffer = buffer.at[0, position].set(token)
    out.append(int(token))
    if eos_id is not None and out[-1] == eos_id:
      break
  return out


def continue_text(model, tokenizer, params, prompt_ids: list[int], max_new_tokens: int, *, temperature: float,
                  top_k: int, seed: int) -> str:
  """The decoded continuation of `prompt_ids` under a Flax model and its tokenizer."""
  return tokenizer.decode(generate(model.apply, params, prompt_ids, max_new_tokens, temperature=temperature,
                                   top_k=top_k, seed=seed, eos_id=tokenizer.eos_id))
