"""Balancing: DeepSeek-V3's auxiliary-loss-free router bias (picks experts, never weights them; moved by
the train step, not the optimizer), the per-sequence balance loss, and the routed scaling factor."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from moa_jax import presets, train
from moa_jax.ffn import FFNSpec
from moa_jax.moe import MoE, MoESpec
from moa_jax.moe.reference import dense_reference
from moa_jax.moe.step import update_router_bias
from moa_jax.transformer import Decoder, model_spec

E, K, D = 8, 2, 16


def _ffn(d_ff=16, variant="swiglu"):
  pre = presets.FFN_PRESETS[variant]
  return FFNSpec(**{**pre, "activations": tuple(pre["activations"])}, d_ff=d_ff)


def _max_load_history(bias_rate: float, steps: int) -> list[float]:
  """A router skewed towards low expert indices (a constant input feature times a ramp); each step either
  moves only the loss-free bias (bias_rate > 0) or trains the router on the aux loss alone with Adam.
  Returns E × the largest expert's share of assignments after each step (1.0: balanced)."""
  spec = MoESpec(num_experts=E, top_k=K, bias_rate=bias_rate)
  layer = MoE(spec, _ffn(), jnp.float32, jnp.float32)
  x = jax.random.normal(jax.random.key(0), (4, 128, D)).at[..., 0].set(1.0)
  params = meta.unbox(layer.init(jax.random.key(1), x))["params"]
  params["router"] = params["router"].at[0].set(jnp.linspace(1.5, -1.5, E))
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    def aux(p):
      _, inter = layer.apply({"params": p}, x, mutable=["intermediates"])
      return inter["intermediates"]["aux_losses"][0]["aux_loss"], inter["intermediates"]
    (_, inter), grads = jax.value_and_grad(aux, has_aux=True)(params)
    if bias_rate:  # the bias alone
      grads = jax.tree.map(jnp.zeros_like, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = update_router_bias(spec, params, optax.apply_updates(params, updates), inter)
    return params, opt_state, inter["moe_stats"][0]["load"]

  opt_state, history = tx.init(params), []
  for _ in range(steps):
    params, opt_state, load = step(params, opt_state)
    history.append(float(E * load.max()))
  return history


def test_loss_free_bias_evens_out_a_skewed_router_faster_than_the_aux_loss():
  """Within 30 steps the bias (γ = 0.01) brings the busiest expert from ~3× its share to ≤ 1.6×; the aux
  loss alone (Adam, lr 3e-3, the debug model's) has moved it by less than 0.5 by then."""
  free, aux = _max_load_history(0.01, 30), _max_load_history(0.0, 30)
  assert free[0] > 2.5 and aux[0] > 2.5, (free[0], aux[0])
  assert max(free[20:]) <= 1.6, free
  assert aux[-1] > 2.5, aux


def test_router_bias_picks_experts_but_does_not_weight_them():
  """With a bias, the layer equals the dense reference that chooses by score + bias and weights by score;
  the bias gets no gradient. routed_scale multiplies the routed output before the shared expert's."""
  layer = MoE(MoESpec(num_experts=4, top_k=2, bias_rate=0.01, routed_scale=2.5, shared_experts=1),
              _ffn(32, "bimoa"), jnp.float32, jnp.float32)
  x = jax.random.normal(jax.random.key(2), (2, 12, D))
  params = meta.unbox(layer.init(jax.random.key(0), x))["params"]
  params["router_bias"] = jnp.asarray([0.5, -0.5, 0.2, 0.0])
  fwd = lambda p: layer.apply({"params": p}, x, mutable=["intermediates"])[0]
  y, grads = jax.value_and_grad(lambda p: jnp.sum(jnp.sin(fwd(p))))(params), None
  ref, chosen = dense_reference(layer.spec, layer.ffn, params, x)
  np.testing.assert_allclose(fwd(params), ref, rtol=1e-4, atol=1e-5)
  unbiased = jax.lax.top_k(jax.nn.softmax(jnp.einsum("BTD,DE->BTE", x, params["router"])), 2)[1]
  assert (np.asarray(chosen) != np.asarray(unbiased)).any()        # the bias changed some choices
  grads = jax.grad(lambda p: jnp.sum(jnp.sin(fwd(p))))(params)
  assert float(jnp.abs(grads["router_bias"]).max()) == 0.0
  del y


def test_train_step_moves_the_bias_by_gamma_sign_and_nothing_else_does():
  """One train step of the debug MoE model (2 scanned MoE layers): each layer's bias moves by exactly
  ±γ towards balance (γ·sign(mean load − load)), which the optimizer alone would not do."""
  c = presets.lm_config("debug_moe", "swiglu")
  c.model.moe.bias_rate = 0.25
  model = Decoder(model_spec(c.model))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 33)))
  params = meta.unbox(model.init(jax.random.key(0), tokens[:, :-1]))["params"]
  tx = optax.adamw(1e-3)
  step = jax.jit(train.make_train_step(model, tx, lambda s: 1e-3, {"aux_loss": 0.01}))
  state = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  new, metrics = step(state, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  load = metrics["intermediates"]["intermediates"]["layers"]["moe"]["moe_stats"][0]["load"]   # (layers, E)
  moved = new.params["layers"]["moe"]["router_bias"] - params["layers"]["moe"]["router_bias"]
  np.testing.assert_allclose(moved, 0.25 * np.sign(1 / load.shape[-1] - load), atol=1e-7)
  assert "seq_aux_loss" in metrics


def test_sequence_balance_loss_by_hand():
  """Two sequences, each sending every token to one expert (opposite ones): the batch is balanced
  (aux_loss 1) but each sequence is not: seq_aux_loss = E · P_own = 2 · e²/(e² + 1)."""
  layer = MoE(MoESpec(num_experts=2, top_k=1), _ffn(4), jnp.float32, jnp.float32)
  x = jnp.asarray([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
  params = meta.unbox(layer.init(jax.random.key(0), x))["params"]
  params["router"] = jnp.asarray([[2.0, 0.0], [0.0, 2.0]])
  _, inter = layer.apply({"params": params}, x, mutable=["intermediates"])
  losses = inter["intermediates"]["aux_losses"][0]
  np.testing.assert_allclose(losses["aux_loss"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(losses["seq_aux_loss"], 2 * math.e**2 / (math.e**2 + 1), rtol=1e-6)


@pytest.mark.parametrize("field,value,message", [
    ("bias_rate", -0.1, r"bias_rate must be ≥ 0"), ("routed_scale", 0.0, r"routed_scale positive")])
def test_bad_balance_configs_fail_clearly(field, value, message):
  with pytest.raises(ValueError, match=message):
    MoESpec(num_experts=4, **{field: value})
