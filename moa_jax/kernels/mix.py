"""Fused mixing of activations: y = m(h), m(h) ⊙ u or m(h) ⊙ m_u(u) as one Pallas kernel.

    m(h)[t, f] = Σ_k c[t, g(f), k] · σ_k(h[t, f])        (docs/method.md, docs/kernel.md)

with per-token gates c (MoA) or one set of coefficients for all tokens (LA, broadcast here).
The forward is one pass over T×F; the backward one pass computing dh, du and the per-token
dc_k = Σ_{f in group} dy ⊙ (other branch) ⊙ σ_k(h). The custom VJP keeps only its inputs as
residuals and recomputes every σ_k, so activation memory is that of a plain SwiGLU.

This module is what every backend shares: the block maths (`forward_block`, `backward_block`,
written on the shared bases of `forms`), tiling and the custom VJP; the public call that picks a
backend is `entry.mix_product`. Each backend file lays the blocks out on its hardware and makes the pallas_calls:
  triton.py  GPU (Pallas Triton): forward grid over (T, G, F) blocks; backward grid over (T, G),
             each program looping over its group's F blocks and reducing dc in registers.
  tpu.py     TPU (Mosaic) and CPU (interpret): (8, 128) tiles, dc accumulated over an
             "arbitrary" F grid axis into a resident output block.
Gates reach the kernels lane-dense as fp32 (G, Kp, T), K padded to Kp.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from moa_jax import activations
from moa_jax.kernels import forms

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything static about one call: the kernels' closure and the custom_vjp's nondiff arg."""
  names: tuple[str, ...]
  names_u: tuple[str, ...] | None  # set for the bi-sided product
  glu: bool                        # u is given
  layout: Any                      # a backend layout: triton.Layout or tpu.Layout
  interpret: bool
  precision: str                   # exact | fast (GPU tanh.approx; emulated when interpreted)
  block_t: int | None
  block_f: int | None

  @property
  def bi(self) -> bool:
    return self.names_u is not None


def _truncated_tanh(x: Array) -> Array:
  """tanh with the low 12 mantissa bits cleared: relative error < 2^-11, the accuracy of the
  hardware tanh.approx.f32, so interpreted runs show what the fast GPU path costs."""
  bits = jax.lax.bitcast_convert_type(jnp.tanh(x), jnp.uint32)
  return jax.lax.bitcast_convert_type(bits & jnp.uint32(0xFFFFF000), jnp.float32)


def tanh_fn(spec: Spec):
  """The forward's tanh. The backward always takes jnp.tanh: a derivative formed from an
  approximate tanh (1 − t², ½(1 + t)) carries a bias (docs/kernel.md, "Accuracy")."""
  if spec.precision == "exact":
    return jnp.tanh
  if spec.interpret:
    return _truncated_tanh
  return spec.layout.fast_tanh


# ---------------------------------------------------------------------------------------------
# Block maths, fp32, shared by every backend. h, u, dy: (bt, bf); cols: K gate columns (bt, 1),
# or with GroupLanes(n > 1) one such list per channel group the block holds.


@dataclasses.dataclass(frozen=True)
class GroupLanes:
  """How a (bt, bf) block's channels map to channel groups: n = 1, all one group's (the gates'
  coefficients broadcast along the row); n > 1, n whole groups of `width` channels side by side
  (TPU, when a group's width is no multiple of 128: the block spans groups instead of padding)."""
  n: int = 1
  width: int = 0

  def _lane(self, shape) -> Array:
    return jax.lax.broadcasted_iota(jnp.int32, shape, 1)

  def coefs(self, names, cols, which: int, shape) -> dict[str, Array]:
    """basis -> coefficient: (bt, 1) for n = 1, else (bt, bf) selected per lane's group."""
    if self.n == 1:
      return forms.basis_coefs(names, cols, which)
    per = [forms.basis_coefs(names, c, which) for c in cols]
    lane = self._lane(shape)
    out = {}
    for b, c in per[0].items():
      c = jnp.broadcast_to(c, shape)
      for r in range(1, self.n):
        c = jnp.where(lane >= r * self.width, per[r][b], c)
      out[b] = c
    return out

  def row_sums(self, x: Array) -> list[Array]:
    """Per group, the (bt, 1) sum of x over that group's lanes."""
    if self.n == 1:
      return [jnp.sum(x, axis=1, keepdims=True)]
    lane = self._lane(x.shape)
    inside = lambda r: (lane >= r * self.width) & (lane < (r + 1) * self.width)
    return [jnp.sum(jnp.where(inside(r), x, 0.0), axis=1, keepdims=True) for r in range(self.n)]


ONE_GROUP = GroupLanes()


def forward_block(spec: Spec, h: Array, cols, u: Array | None, cols_u,
                  lanes: GroupLanes = ONE_GROUP) -> Array:
  tanh = tanh_fn(spec)
  y = forms.combine(lanes.coefs(spec.names, cols, 0, h.shape), forms.Basis(h, tanh))
  if u is None:
    return y
  if spec.bi:
    u = forms.combine(lanes.coefs(spec.names_u, cols_u, 0, h.shape), forms.Basis(u, tanh))
  return y * u


def backward_block(spec: Spec, h: Array, cols, u: Array | None, cols_u, dy: Array, row_sum,
                   lanes: GroupLanes = ONE_GROUP):
  """(dh, du, sums, sums_u): sums map each basis b_j of σ to row_sum(dm ⊙ b_j(h)), the
  reductions dc is made of (`forms.coef_grads`); du and sums_u are None when unused."""
  tanh = jnp.tanh  # exact whatever the precision: every value here feeds a gradient
  hb = forms.Basis(h, tanh)
  coefs = lambda names, c, which: lanes.coefs(names, c, which, h.shape)
  dm, du, sums_u = dy, None, None  # dm = dL/dm(h)
  if u is not None:
    dv = dy * forms.combine(coefs(spec.names, cols, 0), hb)  # dL/d(other branch)
    if spec.bi:
      ub = forms.Basis(u, tanh)
      dm = dy * forms.combine(coefs(spec.names_u, cols_u, 0), ub)
      du = dv * forms.combine(coefs(spec.names_u, cols_u, 1), ub)
      sums_u = {b: row_sum(dv * ub[b]) for b in forms.fn_bases(spec.names_u)}
    else:
      dm, du = dy * u, dv
  dh = dm * forms.combine(coefs(spec.names, cols, 1), hb)
  sums = {b: row_sum(dm * hb[b]) for b in forms.fn_bases(spec.names)}
  return dh, du, sums, sums_u


def cost_estimate(spec: Spec, operands, results, backward: bool) -> pl.CostEstimate:
  """What one pallas_call does, for XLA's scheduler. Per element of h, each side costs its
  activations' table FLOPs plus one FMA (2 FLOPs) per activation; the backward forms σ and σ′
  and sums into dc (twice the forward, plus one FMA per activation); the product ⊙ u one FLOP
  forward, three backward. Transcendentals: one per distinct tanh / exp of the bases used.
  Bytes: every operand and result, read or written once."""
  sides = [spec.names] + ([spec.names_u] if spec.bi else [])
  table = lambda side: sum(activations.ACTIVATIONS[n].flops + 2 for n in side)
  per_side = [2 * table(side) + 2 * len(side) if backward else table(side) for side in sides]
  per_elem = sum(per_side) + ((3 if backward else 1) if spec.glu else 0)
  calls = sum(forms.transcendentals(forms.fn_bases(side)
                                    + (forms.grad_bases(side) if backward else ()))
              for side in sides)  # each side on its own input
  elems = math.prod(operands[0].shape)
  nbytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in (*operands, *jax.tree.leaves(results)))
  return pl.CostEstimate(flops=elems * per_elem,
                         transcendentals=elems * calls,
                         bytes_accessed=nbytes)


# ---------------------------------------------------------------------------------------------
# Tiling and padding, shared by the backends.


@dataclasses.dataclass(frozen=True)
class Tiling:
  bt: int     # tokens per block
  bf: int     # channels per block (within one group)
  t_pad: int  # T rounded up to bt
  f_pad: int  # Fg rounded up to bf (bf when a block holds several whole groups)
  groups_per_block: int = 1  # n > 1: bf = n·Fg, the block spans n whole groups (GroupLanes)

  @property
  def f_blocks(self) -> int:  # channel blocks per group (1 when a block spans groups)
    return self.f_pad * self.groups_per_block // self.bf


def pow2_tile(n: int, target: int, floor: int = 1) -> tuple[int, int]:
  """(block, padded n) for power-of-two blocks: the largest block in [floor, target] that
  tiles n; else the block in that range that pads n least (the larger one on ties)."""
  target = max(floor, min(target, next_pow2(n)))
  best = None
  b = target
  while b >= floor:
    padded = -(-n // b) * b
    if best is None or padded < best[1]:
      best = (b, padded)
    b //= 2
  return best


def multiple_tile(n: int, target: int, quantum: int, whole: bool) -> tuple[int, int]:
  """(block, padded n) for blocks that are multiples of quantum (or all of n when whole and
  n ≤ target): the largest such block ≤ target that tiles n, else the one that pads least."""
  if whole and n <= target:
    return n, n
  best = None
  for b in range(max(quantum, target // quantum * quantum), quantum - 1, -quantum):
    padded = -(-n // b) * b
    if best is None or padded < best[1]:
      best = (b, padded)
  return best


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def check_block(value: int | None, field: str, quantum: int, pow2: bool, backend: str):
  if value is None:
    return
  if value <= 0 or (pow2 and value & (value - 1)) or value % quantum:
    rule = "a power of two" if pow2 else f"a multiple of {quantum}"
    raise ValueError(f"{field} = {value}; the {backend} kernel needs {rule}")


def pad_x(x: Array, groups: int, tiling: Tiling) -> Array:
  """(T, G·Fg) -> (t_pad, G·f_pad), zeros in the padding; a no-op when the blocks tile x."""
  t, f = x.shape
  fg = f // groups
  if (tiling.t_pad, tiling.f_pad) == (t, fg):
    return x
  x = x.reshape(t, groups, fg)
  x = jnp.pad(x, ((0, tiling.t_pad - t), (0, 0), (0, tiling.f_pad - fg)))
  return x.reshape(tiling.t_pad, groups * tiling.f_pad)


def unpad_x(x: Array, groups: int, t: int, fg: int, tiling: Tiling) -> Array:
  if (tiling.t_pad, tiling.f_pad) == (t, fg):
    return x
  return x.reshape(tiling.t_pad, groups, tiling.f_pad)[:t, :, :fg].reshape(t, groups * fg)


def pad_gates(c: Array, kp: int, t_pad: int) -> Array:
  g, k, t = c.shape
  return jnp.pad(c, ((0, 0), (0, kp - k), (0, t_pad - t)))


def block_inputs(spec: Spec, tl: Tiling, kpad, h, gates, u, gates_u, x_spec, gate_index,
                 gate_groups: int | None = None):
  """The padded kernel operands (h, gates[, u][, gates_u]) and their BlockSpecs, for either backend:
  x_spec blocks (T, F) operands, gate_index maps a grid index to a (G, Kp, T) gate block of
  gate_groups groups (None: one, squeezed)."""
  groups = gates.shape[0]
  gate_spec = lambda c: pl.BlockSpec((gate_groups, kpad(c.shape[1]), tl.bt), gate_index)
  args = [pad_x(h, groups, tl), pad_gates(gates, kpad(gates.shape[1]), tl.t_pad)]
  in_specs = [x_spec, gate_spec(gates)]
  if spec.glu:
    args.append(pad_x(u, groups, tl))
    in_specs.append(x_spec)
  if spec.bi:
    args.append(pad_gates(gates_u, kpad(gates_u.shape[1]), tl.t_pad))
    in_specs.append(gate_spec(gates_u))
  return args, in_specs


# ---------------------------------------------------------------------------------------------
# Custom VJP on 2-D operands: x (T, F), gates (G, K, T) fp32.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mix_product_vjp(spec: Spec, h, gates, u, gates_u):
  return spec.layout.forward(spec, h, gates, u, gates_u)


def _mix_product_fwd(spec: Spec, h, gates, u, gates_u):
  return spec.layout.forward(spec, h, gates, u, gates_u), (h, gates, u, gates_u)  # inputs only


def _mix_product_bwd(spec: Spec, residuals, dy):
  return spec.layout.backward(spec, *residuals, dy)


mix_product_vjp.defvjp(_mix_product_fwd, _mix_product_bwd)
