"""model.ffn.impl='fused' (the mixing in the x·[W1|W2] matmul epilogue) equals impl='xla':
the FFN's output and every gradient (x, W1, W2, W3, gate kernels, biases, LA coefficients), in
the Pallas interpreter on CPU; lowering for TPU (Mosaic) and GPU (Triton) without devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax import activations, ffn
from moa_jax.kernels import fused, triton as mix_triton

PAPER = activations.PAPER_DICTIONARY
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2}  # ‖fused − xla‖ / ‖xla‖


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _run(spec, dtype, params, x):
  model = ffn.FFN(spec, dtype=dtype)
  loss = lambda p, x: jnp.sum(model.apply(p, x).astype(jnp.float32) ** 2)
  y = model.apply(params, x)
  return y, jax.grad(loss, argnums=(0, 1))(params, x)


def _case(type_, mix, sides, groups, dtype, d=64, f=256, seed=0):
  kw = dict(type=type_, mix=mix, activations=PAPER, primary="silu", groups=groups, d_ff=f)
  if sides == "bi":
    kw.update(sides="bi", primary_u="identity")
  x = jax.random.normal(jax.random.PRNGKey(seed), (2, 8, d), jnp.float32)
  base = ffn.FFNSpec(**kw)
  params = ffn.FFN(base, dtype=dtype).init(jax.random.PRNGKey(1), x)
  # Random everything (the init's zero gate kernels and one-hot coefficients would hide errors).
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  params = jax.tree.unflatten(tree, [jax.random.normal(k, l.shape, l.dtype) / np.sqrt(l.shape[0])
                                     for k, l in zip(keys, leaves)])
  want = _run(base, dtype, params, x)
  got = _run(ffn.FFNSpec(**kw, impl="fused"), dtype, params, x)
  flat_got, flat_want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(flat_got) == len(flat_want)
  for g, w in zip(flat_got, flat_want):
    assert g.shape == w.shape and g.dtype == w.dtype
    assert _rel(g, w) < TOL[dtype], (_rel(g, w), g.shape)


# The full grid (24 cases, ~15 s each interpreted on 2 cores) is slow; the default set keeps
# four that together cover every axis: Type-I / one- / bi-sided, LA / MoA, G 1 / 8, fp32 / bf16.
FAST = {("glu", "moa", "bi", 8, jnp.float32), ("glu", "la", "one", 1, jnp.bfloat16),
        ("mlp", "moa", "one", 8, jnp.bfloat16), ("glu", "la", "bi", 1, jnp.float32)}
CASES = [(t, m, s, g, dt) for t, s in (("mlp", "one"), ("glu", "one"), ("glu", "bi"))
         for m in ("la", "moa") for g in (1, 8) for dt in (jnp.float32, jnp.bfloat16)]


@pytest.mark.parametrize("type_,mix,sides,groups,dtype", [
    pytest.param(*c, id=f"{c[0]}-{c[2]}-{c[1]}-G{c[3]}-{jnp.dtype(c[4]).name}",
                 marks=() if c in FAST else pytest.mark.slow) for c in CASES])
def test_fused_ffn_equals_xla(type_, mix, sides, groups, dtype):
  _case(type_, mix, sides, groups, dtype)


@pytest.mark.slow
def test_fused_ffn_equals_xla_wide():
  """A grid of several T, F and D blocks at the anchor's group width F/G = 704 (G = 8)."""
  _case("glu", "moa", "bi", 8, jnp.float32, d=512, f=5632)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_fused_layouts_equal_reference(backend):
  """Both layouts' fused forward and backward against the plain reference, several blocks."""
  ks = jax.random.split(jax.random.PRNGKey(3), 5)
  t, d, f, g = 64, 256, 512, 2
  x = jax.random.normal(ks[0], (t, d))
  w1, w2 = (jax.random.normal(k, (d, f)) / 16 for k in ks[1:3])
  c, cu = (jax.random.normal(k, (t, g, len(PAPER))) for k in ks[3:5])
  blocks = dict(block_t=128, block_f=128) if backend == "tpu" else dict(block_t=16, block_f=64)
  fn = lambda *a: fused.fused_mix_product(a[0], a[1], a[3], PAPER, a[2], a[4], PAPER,
                                          backend=backend, interpret=True, block_d=128, **blocks)
  ref = lambda *a: activations.mix_product_reference(a[0] @ a[1], a[3], PAPER, a[0] @ a[2],
                                                     a[4], PAPER)
  loss = lambda f: lambda *a: jnp.sum(f(*a) ** 2)
  args = (x, w1, w2, c, cu)
  assert _rel(fn(*args), ref(*args)) < 2e-6
  for g_, r_ in zip(jax.grad(loss(fn), argnums=range(5))(*args),
                    jax.grad(loss(ref), argnums=range(5))(*args)):
    assert _rel(g_, r_) < 2e-6


def _lowering(backend):
  x = jax.ShapeDtypeStruct((512, 2048), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((2048, 5632), jnp.bfloat16)
  c = jax.ShapeDtypeStruct((512, 8, len(PAPER)), jnp.float32)
  def loss(x, w1, w2, c, cu):
    y = fused.fused_mix_product(x, w1, c, PAPER, w2, cu, PAPER, backend=backend, interpret=False)
    return jnp.sum(y.astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=range(5))), (x, w, w, c, c)


def test_fused_lowers_for_tpu():
  """Bi-MoA-7 at d = 2048, F = 5632, G = 8: the fused forward and the mixing backward."""
  fn, args = _lowering("tpu")
  text = jax.export.export(fn, platforms=("tpu",))(*args).mlir_module()
  assert text.count("stablehlo.custom_call @tpu_custom_call") == 2
  assert "fused_up_mix_fwd" in text


def test_fused_lowers_for_gpu():
  fn, args = _lowering("gpu")
  text = mix_triton.export_for_gpu(fn, *args).mlir_module()
  assert text.count(f"stablehlo.custom_call @{mix_triton.CUSTOM_CALL}") == 2
  assert "fused_up_mix_fwd" in text


def test_fused_errors_name_the_fix():
  x, w = jnp.ones((8, 96)), jnp.ones((96, 256))
  with pytest.raises(ValueError, match="block_d = 64 does not divide D = 96"):
    fused.fused_mix_product(x, w, jnp.ones((1, 1)), ("relu",), block_d=64)
  with pytest.raises(ValueError, match="needs both"):
    fused.fused_mix_product(x, w, jnp.ones((1, 1)), ("relu",), coef_u=jnp.ones((1, 1)),
                            names_u=("relu",))
