"""The KV-cached decoder against the full model: logits at every position, and the same tokens as the
uncached loop (greedy and sampled)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax import generate, kv_cache, presets
from moa_jax.transformer import Decoder, model_spec


@pytest.fixture(scope="module", params=["bimoa", pytest.param("swiglu", marks=pytest.mark.slow)])
def model_and_params(request):
  c = presets.lm_config("debug", request.param)
  c.model.n_kv_heads = 2  # grouped-query heads (4 query heads)
  model = Decoder(model_spec(c.model))
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return model, params


def test_cached_logits_equal_the_full_model(model_and_params):
  model, params = model_and_params
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, model.spec.vocab_size, (1, 12)), jnp.int32)
  full = model.apply({"params": params}, tokens)                                          # (1, 12, V)
  cache = kv_cache.init_cache(model.spec, 1, 16)
  prefix, cache = kv_cache.forward(model.spec, params, tokens[:, :7], cache, jnp.int32(0))
  steps = [prefix]
  for i in range(7, 12):
    logits, cache = kv_cache.forward(model.spec, params, tokens[:, i:i + 1], cache, jnp.int32(i))
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_cached_loop_makes_the_same_tokens(model_and_params, temperature):
  model, params = model_and_params
  prompt = [5, 17, 3, 99]
  kwargs = dict(temperature=temperature, top_k=40, seed=3)
  assert generate.generate_cached(model, params, prompt, 20, **kwargs) == generate.generate(
      model.apply, params, prompt, 20, **kwargs)
