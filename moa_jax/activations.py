"""The activation dictionary (one table) and the LA / MoA mixing reference.

Every activation is one `Activation(fn, grad, flops)` entry in `ACTIVATIONS`: the function, its
derivative and its forward cost (for moa_jax.summary), both elementwise and written with cheap primitives so the Pallas kernel can call them
in its body. Adding a function to the dictionary is adding one entry here.

Mixing (docs/method.md): with coefficients c of shape (..., G, K) that broadcast against the token
dimensions of h (..., F), channel group g = f // (F / G) uses c[..., g, :]:

    m(h)[..., f] = Σ_k c[..., g(f), k] · σ_k(h[..., f])

LA passes c of shape (G, K) (one set for all tokens), MoA per-token gates (B, T, G, K).
This module is the table and the reference only: the seam that picks an implementation
(`impl` = xla | pallas) is `moa_jax.kernels.mix_product`, and the fused kernel lives beside it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
LEAKY_SLOPE = 0.01


@dataclasses.dataclass(frozen=True)
class Activation:
  fn: Callable[[Array], Array]    # σ(z)
  grad: Callable[[Array], Array]  # σ'(z)
  flops: int                      # forward FLOPs per element (a transcendental counts 1)


def _gelu_tanh(z):
  return 0.5 * z * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3)))


def _gelu_tanh_grad(z):
  t = jnp.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3))
  dt = (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
  return 0.5 * (1.0 + t) + 0.5 * z * dt


def _gelu_erf(z):
  return 0.5 * z * (1.0 + jax.lax.erf(z * _INV_SQRT_2))


def _gelu_erf_grad(z):
  return 0.5 * (1.0 + jax.lax.erf(z * _INV_SQRT_2)) + z * _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)


def _silu_grad(z):
  s = jax.nn.sigmoid(z)
  return s * (1.0 + z * (1.0 - s))


ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation(lambda z: z, jnp.ones_like, 0),
    "relu": Activation(lambda z: jnp.where(z > 0, z, 0.0), lambda z: (z > 0).astype(z.dtype), 1),  # relu'(0) = 0
    "relu2": Activation(lambda z: jnp.square(jnp.where(z > 0, z, 0.0)), lambda z: 2.0 * jnp.maximum(z, 0.0), 2),
    "leaky_relu": Activation(lambda z: jnp.where(z >= 0, z, LEAKY_SLOPE * z),
                             lambda z: jnp.where(z >= 0, 1.0, LEAKY_SLOPE).astype(z.dtype), 2),
    "gelu": Activation(_gelu_erf, _gelu_erf_grad, 8),         # exact: z·Φ(z)
    "gelu_tanh": Activation(_gelu_tanh, _gelu_tanh_grad, 9),  # tanh approximation
    "silu": Activation(lambda z: z * jax.nn.sigmoid(z), _silu_grad, 4),
    "tanh": Activation(jnp.tanh, lambda z: 1.0 - jnp.square(jnp.tanh(z)), 1),
}

# The paper's seven-function dictionary (GELU in its tanh form: it lowers everywhere, Triton included).
PAPER_DICTIONARY = ("identity", "relu", "relu2", "leaky_relu", "gelu_tanh", "silu", "tanh")


def check_names(names: Sequence[str], field: str = "model.ffn.activations") -> tuple[str, ...]:
  """Returns `names` as a tuple, or raises naming the unknown entry and the known ones."""
  if isinstance(names, str):
    names = (names,)
  names = tuple(names)
  if not names:
    raise ValueError(f"{field} is empty; give at least one of: {', '.join(ACTIVATIONS)}")
  for name in names:
    if name not in ACTIVATIONS:
      raise ValueError(f"{field} contains {name!r}; known: {', '.join(ACTIVATIONS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"{field} = {names} repeats a name; list each activation once")
  return names


def get(name: str) -> Activation:
  return ACTIVATIONS[check_names((name,), "activation")[0]]


def _grouped(h: Array, groups: int) -> Array:
  f = h.shape[-1]
  return h.reshape(*h.shape[:-1], groups, f // groups)  # (..., G, F/G)


def mix(h: Array, coef: Array, names: Sequence[str]) -> Array:
  """Reference mixing m(h) = Σ_k c_k σ_k(h) in fp32, returned in h's dtype.

  h: (..., F); coef: (..., G, K) broadcastable against h's leading dims; G divides F.
  """
  groups = coef.shape[-2]
  hg = _grouped(h, groups).astype(jnp.float32)  # (..., G, F/G)
  c = coef.astype(jnp.float32)
  out = sum(c[..., k, None] * ACTIVATIONS[n].fn(hg) for k, n in enumerate(names))
  return out.reshape(h.shape).astype(h.dtype)


def activate(h: Array, name: str, u: Array | None = None) -> Array:
  """A fixed activation σ(h) (⊙ u for a GLU), with the same fp32 rounding path as the mixing."""
  y = ACTIVATIONS[name].fn(h.astype(jnp.float32)).astype(h.dtype)
  if u is None:
    return y
  return (y.astype(jnp.float32) * u.astype(jnp.float32)).astype(h.dtype)


def mix_product_reference(h: Array, coef: Array, names: Sequence[str], u: Array | None = None,
                          coef_u: Array | None = None, names_u: Sequence[str] | None = None) -> Array:
  """m(h) (Type-I), m(h) ⊙ u (one-sided GLU) or m(h) ⊙ m_u(u) (bi-sided), all in plain jnp."""
  y = mix(h, coef, names)
  if u is None:
    return y
  if coef_u is not None:
    u = mix(u, coef_u, names_u)
  return (y.astype(jnp.float32) * u.astype(jnp.float32)).astype(h.dtype)
