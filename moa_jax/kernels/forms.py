"""The dictionary inside the kernel: every σ_k and σ_k' as a constant combination of shared bases.

    σ_k(z)  = Σ_j a[k, j] · b_j(z)        σ_k'(z) = Σ_j a'[k, j] · b'_j(z)

e.g. silu(z) = ½z + ½·z·tanh(z/2), gelu_tanh(z) = ½z + ½·z·tanh(√(2/π)(z + 0.044715z³)),
leaky_relu(z) = 0.01z + 0.99·relu(z). With gate columns c_k (one per token row):

    m(z)      = Σ_j (Σ_k c_k a[k, j]) · b_j(z)       one FMA per basis per element
    dc_k      = Σ_j a[k, j] · Σ_f dm · b_j(z)        one reduction per basis, not per activation

so the paper's seven functions cost six bases forward (z, relu, relu², z·tanh(z/2), z·tanh(g(z)),
tanh z), three tanh and no divide; the coefficient sums are per token row, amortised over the
channels of a block. Names without a form here fall back to the table's own fn / grad as one
basis each (still exact, just not shared).

`Basis(z, tanh)` caches each basis of one fp32 block on first use; `tanh` is jnp.tanh, or on GPU
the hardware `tanh.approx.f32` (max relative error 2^-10.99, below bf16's 2^-9 rounding).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from moa_jax import activations

Array = jax.Array

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SLOPE = activations.LEAKY_SLOPE

# erf(x) ≈ x·P(x²)/Q(x²) on [-4, 4] (±1 beyond in fp32): the rational form XLA and Eigen use for
# fp32; |error| < 5e-7 over R. Used on every backend because Triton lowers no erf.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def _polyval(coeffs: Sequence[float], x: Array) -> Array:
  acc = x * coeffs[0] + coeffs[1]
  for c in coeffs[2:]:
    acc = acc * x + c
  return acc


def erf(x: Array) -> Array:
  """fp32 erf from cheap primitives only (lowers on Triton, Mosaic and XLA)."""
  x = jnp.clip(x, -4.0, 4.0)
  x2 = x * x
  return x * _polyval(_ERF_P, x2) / _polyval(_ERF_Q, x2)


class Basis:
  """The bases of one fp32 block z, each computed on first use (so only what a dictionary needs)."""

  def __init__(self, z: Array, tanh: Callable[[Array], Array] = jnp.tanh):
    self.z = z
    self._tanh = tanh

  def __getitem__(self, name: str) -> Array | float:
    if name == "one":
      return 1.0
    if name.startswith(("fn:", "grad:")):
      kind, act = name.split(":")
      return getattr(activations.ACTIVATIONS[act], kind)(self.z)
    return getattr(self, name)

  @functools.cached_property
  def step(self):  # [z > 0]: relu'(0) = 0
    return jnp.where(self.z > 0, 1.0, 0.0)

  @functools.cached_property
  def step_ge(self):  # [z ≥ 0]: leaky_relu'(0) = 1, as in the table
    return jnp.where(self.z >= 0, 1.0, 0.0)

  @functools.cached_property
  def relu(self):
    return jnp.maximum(self.z, 0.0)

  @functools.cached_property
  def relu_sq(self):
    return self.relu * self.relu

  @functools.cached_property
  def t(self):  # tanh z
    return self._tanh(self.z)

  @functools.cached_property
  def t_sq(self):
    return self.t * self.t

  @functools.cached_property
  def th(self):  # tanh(z/2): sigmoid z = ½ + ½ tanh(z/2)
    return self._tanh(0.5 * self.z)

  @functools.cached_property
  def z_th(self):
    return self.z * self.th

  @functools.cached_property
  def silu_dt(self):  # z·(1 − tanh²(z/2)) = 4 z σ(1 − σ)
    return self.z - self.z_th * self.th

  @functools.cached_property
  def z_sq(self):
    return self.z * self.z

  @functools.cached_property
  def tg(self):  # tanh(√(2/π)(z + 0.044715 z³))
    return self._tanh(self.z * (SQRT_2_OVER_PI + SQRT_2_OVER_PI * GELU_CUBIC * self.z_sq))

  @functools.cached_property
  def z_tg(self):
    return self.z * self.tg

  @functools.cached_property
  def gelu_dt(self):  # z·(1 − tg²)·√(2/π)(1 + 3·0.044715 z²)
    slope = SQRT_2_OVER_PI + 3.0 * SQRT_2_OVER_PI * GELU_CUBIC * self.z_sq
    return (self.z - self.z_tg * self.tg) * slope

  @functools.cached_property
  def erf(self):  # erf(z/√2) = 2Φ(z) − 1
    return erf(self.z * _INV_SQRT_2)

  @functools.cached_property
  def z_erf(self):
    return self.z * self.erf

  @functools.cached_property
  def z_gauss(self):  # z·exp(−z²/2)
    return self.z * jnp.exp(-0.5 * self.z_sq)


Terms = tuple[tuple[float, str], ...]  # Σ constant · basis

# name -> (σ terms, σ' terms); each must equal the table's fn / grad (tests/test_kernels.py).
FORMS: dict[str, tuple[Terms, Terms]] = {
    "identity": (((1.0, "z"),), ((1.0, "one"),)),
    "relu": (((1.0, "relu"),), ((1.0, "step"),)),
    "relu2": (((1.0, "relu_sq"),), ((2.0, "relu"),)),
    "leaky_relu": (((_SLOPE, "z"), (1.0 - _SLOPE, "relu")),
                   ((_SLOPE, "one"), (1.0 - _SLOPE, "step_ge"))),
    "gelu": (((0.5, "z"), (0.5, "z_erf")),
             ((0.5, "one"), (0.5, "erf"), (_INV_SQRT_2PI, "z_gauss"))),
    "gelu_tanh": (((0.5, "z"), (0.5, "z_tg")), ((0.5, "one"), (0.5, "tg"), (0.5, "gelu_dt"))),
    "silu": (((0.5, "z"), (0.5, "z_th")), ((0.5, "one"), (0.5, "th"), (0.25, "silu_dt"))),
    "tanh": (((1.0, "t"),), ((1.0, "one"), (-1.0, "t_sq"))),
}


# basis -> the transcendental call it is made of (tanh, exp); shared bases share one call.
_TRANSCENDENTAL = {"t": "tanh z", "t_sq": "tanh z", "th": "tanh z/2", "z_th": "tanh z/2",
                   "silu_dt": "tanh z/2", "tg": "tanh g", "z_tg": "tanh g", "gelu_dt": "tanh g",
                   "z_gauss": "exp"}


def transcendentals(bases: Sequence[str]) -> int:
  """Transcendental calls per element for these bases (a table fallback counts one each)."""
  calls = {_TRANSCENDENTAL.get(b, b if b.startswith(("fn:", "grad:")) else None) for b in bases}
  return len(calls - {None})


def terms(name: str) -> tuple[Terms, Terms]:
  return FORMS.get(name, (((1.0, f"fn:{name}"),), ((1.0, f"grad:{name}"),)))


def _bases(names: Sequence[str], which: int) -> tuple[str, ...]:
  out = []
  for name in names:
    for _, b in terms(name)[which]:
      if b not in out:
        out.append(b)
  return tuple(out)


def fn_bases(names: Sequence[str]) -> tuple[str, ...]:
  return _bases(names, 0)


def grad_bases(names: Sequence[str]) -> tuple[str, ...]:
  return _bases(names, 1)


def basis_coefs(names: Sequence[str], cols: Sequence[Array], which: int) -> dict[str, Array]:
  """basis -> Σ_k c_k a[k, basis]: per-row (bt, 1) coefficients of σ (which=0) or σ' (1)."""
  out: dict[str, Array] = {}
  for name, col in zip(names, cols):
    for const, b in terms(name)[which]:
      term = col * const if const != 1.0 else col
      out[b] = out[b] + term if b in out else term
  return out


def combine(coefs: dict[str, Array], basis: Basis) -> Array:
  """Σ_j coefs[j] · b_j: the mixture (or its derivative) on one block."""
  terms_ = [c * basis[name] for name, c in coefs.items()]
  return jnp.broadcast_to(sum(terms_[1:], terms_[0]), basis.z.shape)  # "one" alone is (bt, 1)


def coef_grads(names: Sequence[str], sums: dict[str, Array]) -> list[Array]:
  """dc_k = Σ_j a[k, j] · sums[j], from the per-basis sums Σ_f dm · b_j."""
  out = []
  for name in names:
    acc = None
    for const, b in terms(name)[0]:
      term = sums[b] * const if const != 1.0 else sums[b]
      acc = term if acc is None else acc + term
    out.append(acc)
  return out
