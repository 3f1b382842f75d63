"""Error of every σ′ (and the σ the backward sums into dc) against a float64 reference, on 1M
points over z ∈ [−20, 20]: the saturated tails included, where a biased derivative would show.

The block maths runs vectorised on the whole grid (`mix.backward_block`, the code every backend
runs per block), for each precision the kernel offers; a smaller interpreted pallas_call checks
the same through the real kernels. Bounds: docs/kernel.md, "Accuracy".
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from moa_jax import activations
from moa_jax.kernels import entry, mix, tpu

ALL = tuple(activations.ACTIVATIONS)
_C = np.sqrt(2.0 / np.pi)


def _sigmoid(z):
  return 0.5 * (1.0 + np.tanh(0.5 * z))


# float64 σ and σ′, written independently of the kernel's forms.
REFERENCE = {
    "identity": (lambda z: z, np.ones_like),
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(np.float64)),
    "relu2": (lambda z: np.maximum(z, 0.0) ** 2, lambda z: 2.0 * np.maximum(z, 0.0)),
    "leaky_relu": (lambda z: np.where(z >= 0, z, 0.01 * z), lambda z: np.where(z >= 0, 1.0, 0.01)),
    "gelu": (lambda z: 0.5 * z * (1.0 + special.erf(z / np.sqrt(2.0))),
             lambda z: 0.5 * (1.0 + special.erf(z / np.sqrt(2.0)))
             + z * np.exp(-0.5 * z * z) / np.sqrt(2.0 * np.pi)),
    "gelu_tanh": (lambda z: 0.5 * z * (1.0 + np.tanh(_C * (z + 0.044715 * z**3))),
                  lambda z: 0.5 * (1.0 + np.tanh(_C * (z + 0.044715 * z**3)))
                  + 0.5 * z * (1.0 - np.tanh(_C * (z + 0.044715 * z**3)) ** 2)
                  * _C * (1.0 + 3 * 0.044715 * z * z)),
    "silu": (lambda z: z * _sigmoid(z), lambda z: _sigmoid(z) * (1.0 + z * (1.0 - _sigmoid(z)))),
    "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
}

# Bounds every backward path meets (docs/kernel.md): |error| ≤ ABS · max(1, |z|, |ref|) everywhere, and
# relative error ≤ REL where |reference| ≥ FLOOR (below it, fp32 cancellation in 1 − tanh² and
# ½(1 + tanh) leaves only the absolute bound: the true value there is below FLOOR anyway).
ABS, REL, FLOOR = 1e-6, 1e-4, 1e-2


def _grid(n=1 << 20):
  z = np.linspace(-20.0, 20.0, n, dtype=np.float32)
  z[:5] = (0.0, -0.0, 1e-30, -1e-30, 20.0)  # the kinks and the edge exactly
  return z


def _errors(got, z, want):
  got, z = np.asarray(got, np.float64).ravel(), z.astype(np.float64)
  err = np.abs(got - want)
  big = np.abs(want) >= FLOOR
  return (float(np.max(err / np.maximum(np.maximum(1.0, np.abs(z)), np.abs(want)))),
          float(np.max(err[big] / np.abs(want[big]))) if big.any() else 0.0)


def _block_maths(name, precision, z):
  """(σ′, σ) as the backward block computes them: dh with dy = 1 and gate 1, and the per-element
  terms the dc reduction sums (row_sum = identity)."""
  spec = mix.Spec((name,), None, False, tpu.LAYOUT, True, precision, None, None)
  h = jnp.asarray(z.reshape(1024, -1))
  ones = jnp.ones((h.shape[0], 1), jnp.float32)
  dh, _, sums, _ = jax.jit(lambda h: mix.backward_block(spec, h, [ones], None, None,
                                                        jnp.ones_like(h), lambda x: x))(h)
  (sigma,) = jax.jit(lambda s: mix.forms.coef_grads((name,), s))(sums)
  return dh, sigma


@pytest.mark.parametrize("precision", entry.PRECISIONS)
@pytest.mark.parametrize("name", ALL)
def test_backward_block_error_on_the_tails(name, precision):
  """Per σ′: max abs (scaled by max(1, |z|)) and max rel error over 1M points, fast path's
  emulation included; the same bound for the σ values the gate gradient sums."""
  z = _grid()
  fn, grad = REFERENCE[name]
  dh, sigma = _block_maths(name, precision, z)
  for label, got, want in (("σ′", dh, grad(z.astype(np.float64))),
                           ("σ", sigma, fn(z.astype(np.float64)))):
    abs_err, rel_err = _errors(got, z, want)
    assert abs_err <= ABS and rel_err <= REL, (name, precision, label, abs_err, rel_err)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_interpreted_kernel_gradients_on_the_tails(backend):
  """The interpreted pallas_calls, fast precision (the GPU default), on 4096 points: token k
  has a one-hot gate on σ_k, so dh[k] = σ_k′(z) and dc[k, k] = Σ_f σ_k(z), against float64."""
  z = _grid(4096)
  z64 = z.astype(np.float64)
  k = len(ALL)
  h = jnp.asarray(np.tile(z, (k, 1)))                        # (K, 4096)
  coef = jnp.eye(k, dtype=jnp.float32)[:, None, :]          # (T = K, G = 1, K)
  blocks = dict(block_t=128, block_f=512) if backend == "tpu" else dict(block_t=8, block_f=512)
  y, vjp = jax.vjp(lambda h, c: entry.mix_product(h, c, ALL, backend=backend, interpret=True,
                                                  precision="fast", **blocks), h, coef)
  dh, dc = vjp(jnp.ones_like(y))
  for i, name in enumerate(ALL):
    fn, grad = REFERENCE[name]
    abs_err, rel_err = _errors(dh[i], z, grad(z64))
    assert abs_err <= ABS and rel_err <= REL, (name, "σ′", abs_err, rel_err)
    dc_err = abs(float(dc[i, 0, i]) - fn(z64).sum())
    assert dc_err <= ABS * np.maximum(1.0, np.abs(z64)).sum(), (name, "dc", dc_err)
