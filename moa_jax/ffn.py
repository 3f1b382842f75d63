"""Feedforward layers: Type-I (`mlp`) and Type-II (`glu`), with fixed, LA or MoA activations (docs/method.md).

    Type-I : y = W3 · m(W1 x)
    Type-II: y = W3 · (m(W1 x) ⊙ W2 x)          one-sided
             y = W3 · (m(W1 x) ⊙ m_u(W2 x))     bi-sided, m_u with its own coefficients/gates

m is σ (fixed), Σ_k a_k σ_k (LA) or Σ_k π_k(x) σ_k (MoA, π = φ(U x + b)), with G channel groups.

Initialisation (tested in tests/test_ffn.py):
- LA coefficients start one-hot on `primary` (and on `primary_u` for the second branch), so LA at
  init computes exactly the fixed FFN of that activation (bi-LA with primary_u = identity: SwiGLU).
- MoA gate weights U start at zero, so MoA at init computes exactly LA with coefficients φ(b).
  The bias puts `primary` ahead by `gate_bias_init` logits: sigmoid b = ±margin (≈0.98 / 0.02 at
  margin 4), softmax b = margin·onehot, tanh b = margin·onehot (others exactly 0).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moa_jax import activations, kernels

Array = jax.Array

FFN_TYPES = ("mlp", "glu")
MIXES = ("fixed", "la", "moa")
SIDES = ("one", "bi")
GATES: dict[str, Callable[[Array], Array]] = {
    "sigmoid": jax.nn.sigmoid,
    "softmax": lambda z: jax.nn.softmax(z, axis=-1),
    "tanh": jnp.tanh,
}


def _choice(field: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{field} = {value!r}; allowed: {', '.join(map(str, allowed))}")


@dataclasses.dataclass(frozen=True)
class FFNSpec:
  """Everything an FFN layer needs, validated once (the `model.ffn` config group)."""
  type: str = "glu"                        # mlp (Type-I) | glu (Type-II)
  mix: str = "fixed"                       # fixed | la | moa
  activations: tuple[str, ...] = ("silu",)
  primary: str = "silu"                    # activation that dominates at init
  sides: str = "one"                       # glu only: one | bi
  primary_u: str = "identity"              # bi-sided: dominant activation of the W2 branch at init
  gate: str = "sigmoid"                    # moa: sigmoid | softmax | tanh
  gate_bias: bool = True                   # moa: π = φ(Ux + b) rather than φ(Ux)
  gate_bias_init: float = 4.0              # moa: logit margin of `primary` at init
  groups: int = 1                          # G channel groups, each with its own coefficients
  d_ff: int = 0                            # hidden width F
  impl: str = "xla"                        # xla | pallas | fused (mixing in the W1/W2 matmul epilogue)

  def __post_init__(self):
    _choice("model.ffn.type", self.type, FFN_TYPES)
    _choice("model.ffn.mix", self.mix, MIXES)
    _choice("model.ffn.sides", self.sides, SIDES)
    _choice("model.ffn.gate", self.gate, tuple(GATES))
    _choice("model.ffn.impl", self.impl, kernels.IMPLS)
    names = activations.check_names(self.activations)
    object.__setattr__(self, "activations", names)
    if self.mix == "fixed" and len(names) != 1:
      raise ValueError(f"model.ffn.mix = 'fixed' takes one activation, got model.ffn.activations = {names}; "
                       "use mix='la' or 'moa' to mix several")
    if self.primary not in names:
      raise ValueError(f"model.ffn.primary = {self.primary!r} is not in model.ffn.activations = {names}")
    if self.bi_sided and self.primary_u not in names:
      raise ValueError(f"model.ffn.primary_u = {self.primary_u!r} is not in model.ffn.activations = {names}")
    if self.sides == "bi" and (self.type != "glu" or self.mix == "fixed"):
      raise ValueError("model.ffn.sides = 'bi' needs type='glu' and mix='la' or 'moa' "
                       f"(got type={self.type!r}, mix={self.mix!r})")
    if self.d_ff <= 0:
      raise ValueError(f"model.ffn.d_ff = {self.d_ff}; must be a positive width")
    if self.groups < 1 or self.d_ff % self.groups:
      raise ValueError(f"model.ffn.groups = {self.groups} must be ≥ 1 and divide model.ffn.d_ff = {self.d_ff}")

  @property
  def bi_sided(self) -> bool:
    return self.type == "glu" and self.sides == "bi"

  @property
  def mixed_branches(self) -> int:
    return 0 if self.mix == "fixed" else (2 if self.bi_sided else 1)


def param(module: nn.Module, name: str, shape, axes: tuple, init, dtype) -> Array:
  """A parameter with logical axis names (mapped to mesh axes by moa_jax.sharding)."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def dense_init(fan_in: int, scale: float = 1.0):
  return nn.initializers.truncated_normal(stddev=scale / fan_in**0.5)


def _onehot(spec: FFNSpec, name: str) -> Array:
  return jax.nn.one_hot(spec.activations.index(name), len(spec.activations))  # (K,)


def mix_params(module: nn.Module, spec: FFNSpec, primary: str, d: int, dtype, experts: int = 0) -> dict:
  """Creates one mixed branch's parameters on `module`: LA {"coef": (G, K)} or MoA
  {"gate_kernel": (D, G, K), "gate_bias": (G, K)}, with a leading expert axis (E, ...) when experts > 0."""
  g, k = spec.groups, len(spec.activations)
  lead, lead_axes = ((experts,), ("experts",)) if experts else ((), ())
  onehot = _onehot(spec, primary)
  tiled = lambda row: lambda *_: jnp.tile(row, (*lead, g, 1))
  if spec.mix == "la":
    return {"coef": param(module, "coef", (*lead, g, k), (*lead_axes, "mix_groups", "activations"),
                          tiled(onehot), dtype)}
  out = {"gate_kernel": param(module, "gate_kernel", (*lead, d, g, k),
                              (*lead_axes, "embed", "mix_groups", "activations"), nn.initializers.zeros, dtype)}
  if spec.gate_bias:
    margin = spec.gate_bias_init * (2 * onehot - 1 if spec.gate == "sigmoid" else onehot)
    out["gate_bias"] = param(module, "gate_bias", (*lead, g, k), (*lead_axes, "mix_groups", "activations"),
                             tiled(margin), dtype)
  return out


def gates(spec: FFNSpec, logits: Array, bias: Array | None = None) -> Array:
  """MoA gates π = φ(logits [+ b]) in fp32; logits (..., G, K) = U x."""
  return GATES[spec.gate](logits if bias is None else logits + bias)


def mix_hidden(spec: FFNSpec, h: Array, u: Array | None, coef: Array | None = None,
               coef_u: Array | None = None) -> Array:
  """The FFN's hidden product: σ(h) [⊙ u] (fixed), or the LA / MoA mixture with coefficients `coef`
  (and `coef_u` on the second branch when bi-sided). Works per token: h (..., F), coef (..., G, K)."""
  if spec.mix == "fixed":
    return activations.activate(h, spec.activations[0], u)
  names_u = spec.activations if spec.bi_sided else None
  return kernels.mix_product(h, coef, spec.activations, u, coef_u, names_u, impl=spec.impl)


class Mixer(nn.Module):
  """Coefficients of one mixed branch: LA (G, K) or MoA per-token gates (B, T, G, K), fp32."""
  spec: FFNSpec
  primary: str
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:  # x: (B, T, D)
    p = mix_params(self, self.spec, self.primary, x.shape[-1], self.param_dtype)
    if self.spec.mix == "la":
      self.sow("intermediates", "mix_mean", jnp.mean(p["coef"], axis=0))
      return p["coef"]
    logits = jnp.einsum("BTD,DGK->BTGK", x, p["gate_kernel"].astype(x.dtype), preferred_element_type=jnp.float32)
    g = gates(self.spec, logits, p.get("gate_bias"))  # (B, T, G, K)
    self.sow("intermediates", "mix_mean", jnp.mean(g, axis=(0, 1, 2)))
    self.sow("intermediates", "mix_std", jnp.mean(jnp.std(g, axis=(0, 1)), axis=0))  # (K,): over tokens
    return g


class FFN(nn.Module):
  """x (B, T, D) -> (B, T, D)."""
  spec: FFNSpec
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32
  out_scale: float = 1.0  # init scale of W3 (e.g. 1/sqrt(2·layers))

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s, d, f = self.spec, x.shape[-1], self.spec.d_ff
    x = x.astype(self.dtype)
    w1 = param(self, "w1", (d, f), ("embed", "mlp"), dense_init(d), self.param_dtype).astype(self.dtype)
    w2 = None
    if s.type == "glu":
      w2 = param(self, "w2", (d, f), ("embed", "mlp"), dense_init(d), self.param_dtype).astype(self.dtype)
    coef = coef_u = None
    if s.mix != "fixed":
      coef = Mixer(s, s.primary, self.param_dtype, name="mix")(x)
      coef_u = Mixer(s, s.primary_u, self.param_dtype, name="mix_u")(x) if s.bi_sided else None
    if s.impl == "fused" and s.mix != "fixed":  # the mixing in the x·[W1|W2] epilogue
      y = kernels.fused_mix_product(x, w1, coef, s.activations, w2, coef_u,
                                    s.activations if s.bi_sided else None)
    else:
      h = jnp.einsum("BTD,DF->BTF", x, w1)
      u = None if w2 is None else jnp.einsum("BTD,DF->BTF", x, w2)
      y = mix_hidden(s, h, u, coef, coef_u)
    w3 = param(self, "w3", (f, d), ("mlp", "embed"), dense_init(f, self.out_scale), self.param_dtype)
    return jnp.einsum("BTF,FD->BTD", y, w3.astype(self.dtype))
