"""Activation table, FFN variants, their initialisation claims and the expressivity facts of docs/method.md."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from moa_jax import activations
from moa_jax.ffn import FFN, FFNSpec

K7 = activations.PAPER_DICTIONARY
_erf = np.vectorize(math.erf)

CLOSED_FORMS = {
    "identity": lambda z: z,
    "relu": lambda z: np.where(z > 0, z, 0.0),
    "relu2": lambda z: np.where(z > 0, z * z, 0.0),
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
    "gelu": lambda z: z * 0.5 * (1 + _erf(z / np.sqrt(2))),
    "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))),
    "silu": lambda z: z / (1 + np.exp(-z)),
    "tanh": np.tanh,
}


def test_table_is_exactly_the_closed_forms():
  assert set(CLOSED_FORMS) == set(activations.ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_activation_and_derivative(name):
  z = np.random.default_rng(0).normal(scale=3.0, size=4096).astype(np.float32)
  act = activations.get(name)
  np.testing.assert_allclose(act.fn(jnp.asarray(z)), CLOSED_FORMS[name](z.astype(np.float64)),
                             rtol=2e-6, atol=2e-6)
  autodiff = jax.vmap(jax.grad(act.fn))(jnp.asarray(z))
  np.testing.assert_allclose(act.grad(jnp.asarray(z)), autodiff, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_relu_derivative_at_zero_is_zero_on_both_paths(impl):
  """relu'(0) = 0 through the FFN's mixing seam (the xla path once gave 0.5, autodiff of max)."""
  from moa_jax.ffn import mix_hidden
  s = spec(type="mlp", activations=("relu", "tanh"), primary="relu", impl=impl)
  h, coef = jnp.zeros((1, 2, 48)), jnp.array([[1.0, 0.0]])
  grad = jax.grad(lambda h: jnp.sum(mix_hidden(s, h, None, coef)))(h)
  assert float(jnp.abs(grad).max()) == 0.0


def test_unknown_activation_names_the_known_ones():
  with pytest.raises(ValueError, match=r"contains 'swish2'; known: identity, relu, .*tanh"):
    activations.check_names(("relu", "swish2"))


def spec(**kw) -> FFNSpec:
  base = dict(type="glu", mix="la", activations=K7, primary="silu", d_ff=48)
  return FFNSpec(**{**base, **kw})


def init(module, x, seed=0):
  return meta.unbox(module.init(jax.random.key(seed), x))


def run(module, params, x):
  return module.apply(params, x)


def x_input(d=16, shape=(2, 5), seed=1):
  return jax.random.normal(jax.random.key(seed), (*shape, d), jnp.float32)


def set_leaf(params, path, value):
  tree = jax.tree_util.tree_map(lambda a: a, params)
  node = tree["params"]
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = value
  return tree


@pytest.mark.parametrize("ffn_type,primary", [("mlp", "gelu_tanh"), ("glu", "silu"), ("glu", "relu2")])
def test_la_with_one_hot_coefficients_is_the_fixed_ffn_exactly(ffn_type, primary):
  x = x_input()
  fixed = FFN(spec(type=ffn_type, mix="fixed", activations=(primary,), primary=primary), jnp.float32)
  la = FFN(spec(type=ffn_type, mix="la", primary=primary), jnp.float32)
  p_la = init(la, x)  # LA's init is one-hot on `primary` (the documented claim)
  p_fixed = {"params": {k: v for k, v in p_la["params"].items() if k != "mix"}}
  assert set(p_fixed["params"]) == set(init(fixed, x)["params"])
  np.testing.assert_array_equal(run(la, p_la, x), run(fixed, p_fixed, x))


@pytest.mark.parametrize("gate", ["sigmoid", "softmax", "tanh"])
@pytest.mark.parametrize("sides", ["one", "bi"])
def test_moa_with_zero_gate_weights_is_la_with_coefficients_phi_b(gate, sides):
  x = x_input()
  moa = FFN(spec(mix="moa", gate=gate, sides=sides, groups=3), jnp.float32)
  la = FFN(spec(mix="la", sides=sides, groups=3), jnp.float32)
  p = init(moa, x)
  branches = ["mix", "mix_u"] if sides == "bi" else ["mix"]
  for b in branches:  # U is zero at init: that is the claim under test; randomise the bias
    assert not np.any(p["params"][b]["gate_kernel"])
    p = set_leaf(p, [b, "gate_bias"], jax.random.normal(jax.random.key(len(b)), (3, 7)))
  p_la = {"params": {k: v for k, v in p["params"].items() if k not in branches}}
  phi = {"sigmoid": jax.nn.sigmoid, "softmax": jax.nn.softmax, "tanh": jnp.tanh}[gate]
  for b in branches:
    p_la["params"][b] = {"coef": phi(p["params"][b]["gate_bias"])}
  np.testing.assert_allclose(run(moa, p, x), run(la, p_la, x), rtol=1e-6, atol=1e-6)


def test_bi_sided_with_identity_second_branch_is_one_sided():
  x = x_input()
  bi = FFN(spec(sides="bi", primary_u="identity"), jnp.float32)
  one = FFN(spec(sides="one"), jnp.float32)
  p = init(bi, x)
  p = set_leaf(p, ["mix", "coef"], jax.random.normal(jax.random.key(3), (1, 7)))  # any first branch
  np.testing.assert_array_equal(p["params"]["mix_u"]["coef"], jax.nn.one_hot([[0]], 7)[0])  # identity, 1
  p_one = {"params": {k: v for k, v in p["params"].items() if k != "mix_u"}}
  np.testing.assert_array_equal(run(bi, p, x), run(one, p_one, x))


def test_moa_at_init_is_close_to_its_baseline_and_prefers_primary():
  x = x_input()
  moa = FFN(spec(mix="moa"), jnp.float32)
  p = init(moa, x)
  gates = jax.nn.sigmoid(p["params"]["mix"]["gate_bias"][0])
  assert int(jnp.argmax(gates)) == K7.index("silu") and gates.max() > 0.98 and gates.min() < 0.02
  fixed = FFN(spec(mix="fixed", activations=("silu",)), jnp.float32)
  p_fixed = {"params": {k: v for k, v in p["params"].items() if k != "mix"}}
  y, y0 = run(moa, p, x), run(fixed, p_fixed, x)
  assert float(jnp.linalg.norm(y - y0) / jnp.linalg.norm(y0)) < 0.15


def test_channel_groups_mix_each_group_with_its_own_gates():
  h = jax.random.normal(jax.random.key(0), (3, 4, 12))
  coef = jax.random.normal(jax.random.key(1), (3, 4, 2, 2))
  y = activations.mix(h, coef, ("relu", "tanh"))
  for g, sl in enumerate([slice(0, 6), slice(6, 12)]):
    expect = coef[..., g, 0, None] * jax.nn.relu(h[..., sl]) + coef[..., g, 1, None] * jnp.tanh(h[..., sl])
    np.testing.assert_allclose(y[..., sl], expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mix,sides", [("la", "one"), ("moa", "one"), ("moa", "bi"), ("la", "bi")])
def test_gradients_reach_every_mixing_parameter(mix, sides):
  x = x_input()
  ffn = FFN(spec(mix=mix, sides=sides, groups=2), jnp.float32)
  p = init(ffn, x)
  grads = jax.grad(lambda p: jnp.sum(run(ffn, p, x) ** 2))(p)["params"]
  branches = ["mix", "mix_u"] if sides == "bi" else ["mix"]
  for b in branches:
    for name, g in grads[b].items():
      assert g.shape == p["params"][b][name].shape
      assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0, (b, name)


@pytest.mark.parametrize("ffn_type", ["mlp", "glu"])
def test_shapes_and_dtypes_at_the_boundary(ffn_type):
  x = x_input(d=32, shape=(2, 7)).astype(jnp.bfloat16)
  ffn = FFN(spec(type=ffn_type, mix="moa", d_ff=64), jnp.bfloat16, jnp.float32)
  p = init(ffn, x)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(p))
  y = run(ffn, p, x)
  assert y.shape == (2, 7, 32) and y.dtype == jnp.bfloat16


def test_every_parameter_has_logical_axis_names():
  x = x_input()
  boxed = FFN(spec(mix="moa", sides="bi")).init(jax.random.key(0), x)["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda v: isinstance(v, meta.Partitioned))
  assert leaves and all(isinstance(v, meta.Partitioned) and len(v.names) == v.value.ndim for v in leaves)


@pytest.mark.parametrize("field,value,message", [
    ("activations", ("relu", "swish2"), r"model.ffn.activations contains 'swish2'; known: identity"),
    ("mix", "mixture", r"model.ffn.mix = 'mixture'; allowed: fixed, la, moa"),
    ("gate", "relu", r"model.ffn.gate = 'relu'; allowed: sigmoid, softmax, tanh"),
    ("groups", 5, r"model.ffn.groups = 5 must be ≥ 1 and divide model.ffn.d_ff = 48"),
    ("primary", "gelu", r"model.ffn.primary = 'gelu' is not in model.ffn.activations"),
])
def test_bad_ffn_config_names_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    spec(**{field: value})


def test_fixed_with_two_activations_is_refused():
  with pytest.raises(ValueError, match=r"mix = 'fixed' takes one activation.*use mix='la' or 'moa'"):
    spec(mix="fixed", activations=("relu", "silu"), primary="relu")


# ---- Expressivity facts (docs/method.md), shown numerically on 1-D / 2-D inputs --------------------------

def _lstsq_rel_error(features: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray]:
  coef, *_ = np.linalg.lstsq(features, target, rcond=None)
  return float(np.linalg.norm(features @ coef - target) / np.linalg.norm(target)), coef


def _features(z: np.ndarray) -> np.ndarray:
  return np.stack([np.asarray(activations.ACTIVATIONS[n].fn(jnp.asarray(z)), np.float64) for n in K7], -1)


def test_width_one_la_represents_relu_plus_relu2_and_no_fixed_ffn_does():
  z = np.linspace(-3, 3, 2001)
  target = np.maximum(z, 0) + np.maximum(z, 0) ** 2
  # LA, width 1 (w1 = w3 = 1): a linear fit over the dictionary's features.
  err, coef = _lstsq_rel_error(_features(z), target)
  assert err < 1e-6
  # The fitted coefficients run through the real FFN module (Type-I, d = F = 1) give the target.
  la = FFN(FFNSpec(type="mlp", mix="la", activations=K7, primary="relu", d_ff=1), jnp.float32)
  x = jnp.asarray(z, jnp.float32)[None, :, None]
  p = init(la, x)
  p = set_leaf(set_leaf(set_leaf(p, ["w1"], jnp.ones((1, 1))), ["w3"], jnp.ones((1, 1))),
               ["mix", "coef"], jnp.asarray(coef, jnp.float32)[None])
  y = np.asarray(run(la, p, x))[0, :, 0]
  assert np.linalg.norm(y - target) / np.linalg.norm(target) < 1e-5
  # Fixed, width 1: y = w3·σ(w1·z); search w1 densely, w3 by least squares, every activation.
  best = min(_lstsq_rel_error(_features(w1 * z)[:, [k]], target)[0]
             for k in range(len(K7)) for w1 in np.concatenate([np.linspace(-6, 6, 601), [1.0]]))
  assert best > 0.02


def test_width_one_moa_represents_tanh_gate_times_relu_and_la_cannot():
  lam = 1.5
  g = np.linspace(-2, 2, 61)
  x1, x2 = [a.ravel() for a in np.meshgrid(g, g)]
  target = np.tanh(lam * x1) * np.maximum(x2, 0)
  # MoA, width 1, tanh gates: π_relu = tanh(λ x1), other gates 0, pre-activation w1·x = x2.
  moa = FFN(FFNSpec(type="mlp", mix="moa", activations=K7, primary="relu", gate="tanh", d_ff=1), jnp.float32)
  x = jnp.asarray(np.stack([x1, x2], -1), jnp.float32)[None]
  p = init(moa, x)
  u = np.zeros((2, 1, 7), np.float32)
  u[0, 0, K7.index("relu")] = lam
  p = set_leaf(p, ["mix", "gate_kernel"], jnp.asarray(u))
  p = set_leaf(p, ["mix", "gate_bias"], jnp.zeros((1, 7)))
  p = set_leaf(set_leaf(p, ["w1"], jnp.asarray([[0.0], [1.0]])), ["w3"], jnp.asarray([[1.0, 0.0]]))
  y = np.asarray(run(moa, p, x))[0, :, 0]  # the model's output is 2-D like its input: read channel 0
  assert np.linalg.norm(y - target) / np.linalg.norm(target) < 1e-6
  # LA, width 1: a ridge function Σ_k a_k σ_k(w·x). Search directions and scales of w; a by least squares.
  best = 1.0
  for theta in np.linspace(0, np.pi, 90, endpoint=False):
    for r in (0.25, 0.5, 1.0, 2.0, 4.0):
      z = r * (np.cos(theta) * x1 + np.sin(theta) * x2)
      best = min(best, _lstsq_rel_error(_features(z), target)[0])
  assert best > 0.2


def test_spec_fields_match_the_config_fields():
  from moa_jax import presets
  config_fields = set(presets.ffn_config("bimoa", 64, 32))
  assert config_fields == {f.name for f in dataclasses.fields(FFNSpec)}
