"""experiments/bench_moe.py measures what a training step computes: no matmul of a compared function is
dead code that jit would delete (the dense FFN's last forward matmul was, when the step returned only the
gradients: 1.14x became 1.013x once the output was returned)."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest
from flax.core import meta

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import bench_moe  # noqa: E402
from moa_jax.ffn import FFN, FFNSpec  # noqa: E402
from moa_jax.moe import MoE, MoESpec  # noqa: E402


def _modules():
  expert = FFNSpec(**bench_moe.EXPERTS["bimoa"], d_ff=32)
  return {"dense": FFN(FFNSpec(**bench_moe.EXPERTS["bimoa"], d_ff=64), jnp.float32),
          "dropless": MoE(MoESpec(num_experts=4, top_k=2, gmm="ragged_dot"), expert, jnp.float32),
          "capacity": MoE(MoESpec(num_experts=4, top_k=2, path="capacity"), expert, jnp.float32)}


@pytest.mark.parametrize("name", ["dense", "dropless", "capacity"])
def test_benchmarked_step_has_no_dead_matmuls(name):
  module = _modules()[name]
  x = jax.ShapeDtypeStruct((1, 32, 16), jnp.float32)
  params = meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
  assert bench_moe.dead_matmuls(bench_moe.step_fn(module), params, x, x) == 0


def test_dead_matmuls_sees_an_output_that_nothing_returns():
  """The check can fail: a step that returns only the gradients leaves the dense FFN's w3 matmul dead."""
  module = _modules()["dense"]
  x = jax.ShapeDtypeStruct((1, 32, 16), jnp.float32)
  params = meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])

  def grads_only(p, x, dy):
    return jax.vjp(lambda p, x: module.apply({"params": p}, x), p, x)[1](dy)
  assert bench_moe.dead_matmuls(grads_only, params, x, x) == 1
