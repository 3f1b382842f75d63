"""The generation loop: greedy, temperature and top-k sampling from a model's apply function.

Training (its periodic samples) and `moa_jax.sample` (the CLI) both import this module; neither
imports the other.

Dense models decode with a KV cache (`moa_jax.kv_cache`: the prompt in one pass, then one token per
step). `generate` is the uncached loop, kept as the reference and for MoE models: each new token reruns
the causal model over a fixed-length buffer (one compile). Tokens/s of both:
`python experiments/bench_generate.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moa_jax import kv_cache


@functools.partial(jax.jit, static_argnames=("apply_fn", "top_k"))
def _next_token(apply_fn, params, buffer, position, key, temperature, top_k):
  return _pick(apply_fn({"params": params}, buffer)[0, position - 1], key, temperature, top_k)


@functools.partial(jax.jit, static_argnames=("top_k",))
def _pick(logits, key, temperature, top_k):
  """logits (V,) -> one token: greedy at temperature 0, else sampled from the top_k."""
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


def generate_cached(model, params, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.8,
                    top_k: int = 40, seed: int = 0, eos_id: int | None = None) -> list[int]:
  """`generate` through a KV cache (dense models): the same tokens, without recomputing the prefix."""
  if not prompt:
    raise ValueError("the prompt is empty; give at least one token")
  spec = model.spec
  cache = kv_cache.init_cache(spec, 1, len(prompt) + max_new_tokens)
  logits, cache = kv_cache.forward(spec, params, jnp.asarray([prompt], jnp.int32), cache, jnp.int32(0))
  key, out, position = jax.random.key(seed), [], len(prompt)
  for _ in range(max_new_tokens):
    key, sub = jax.random.split(key)
    token = _pick(logits[0, -1], sub, temperature, top_k)
    out.append(int(token))
    if (eos_id is not None and out[-1] == eos_id) or len(out) == max_new_tokens:
      break
    logits, cache = kv_cache.forward(spec, params, token.reshape(1, 1), cache, jnp.int32(position))
    position += 1
  return out


def continue_text(model, tokenizer, params, prompt_ids: list[int], max_new_tokens: int, *, temperature: float,
                  top_k: int, seed: int) -> str:
  """The decoded continuation of `prompt_ids` under a Flax model and its tokenizer."""
  if kv_cache.supported(model.spec):
    ids = generate_cached(model, params, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                          seed=seed, eos_id=tokenizer.eos_id)
  else:
    ids = generate(model.apply, params, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                   seed=seed, eos_id=tokenizer.eos_id)
  return tokenizer.decode(ids)
