"""Fused mixing of activations: y = m(h), m(h) ⊙ u or m(h) ⊙ m_u(u) as one Pallas kernel.

    m(h)[t, f] = Σ_k c[t, g(f), k] · σ_k(h[t, f])        (SPEC §1, §3)

with per-token gates c (MoA) or one set of coefficients for all tokens (LA, broadcast here).
The forward is one pass over T×F; the backward one pass computing dh, du and the per-token
dc_k = Σ_{f in group} dy ⊙ (other branch) ⊙ σ_k(h). The custom VJP keeps only its inputs as
residuals and recomputes every σ_k, so activation memory is that of a plain SwiGLU.

Layout (all backends run the same kernel bodies):
  h, u, y, dy:  (T, G·Fg) with Fg = F/G channels per group; block (bt, bf); grid (T/bt, G, Fg/bf),
                so a block never straddles two groups. Shapes that the blocks do not tile are
                zero-padded outside the kernel (Triton loads through `ref[...]` are unmasked).
  gates:        lane-dense fp32 (G, Kp, T), K padded to Kp; block (Kp, bt), tokens on lanes.
  dc:           GPU (Triton): per-F-block partial sums (Fg/bf, G, Kp, T), then one small XLA sum
                (Triton programs run concurrently, so nothing accumulates across the grid).
                TPU (Mosaic) and CPU (interpret): accumulated over the innermost "arbitrary"
                F axis into a resident (Kp, bt) output block.

Backend: GPU → Triton (`pallas.triton.CompilerParams`), TPU → Mosaic, anything else → the TPU
kernel in interpret mode. `backend=` and `interpret=` override the choice (tests run both
kernel variants on CPU; `jax.export(..., platforms=("tpu",))` checks the Mosaic lowering).

Sharded inputs: mixing is independent per token, so the kernel runs per device in `shard_map`
(`mix_product_sharded`). Inputs sharded over Explicit mesh axes take that path by themselves;
over Auto axes, XLA partitions the call as it sees fit (on accelerators a custom call is
replicated, operands gathered), so FFNs on Auto meshes should call `mix_product_sharded`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

from moa_jax import activations

Array = jax.Array

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

# erf(x) ≈ x·P(x²)/Q(x²) on [-4, 4] (±1 beyond in fp32): the rational form XLA and Eigen use for
# fp32; |error| < 5e-7 over R. The kernel uses it on every backend because Triton lowers no erf.
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


class _Block:
  """One fp32 block z and the intermediates its activations share, each computed on first use.

  relu, relu2 and leaky_relu share one comparison; silu and tanh share exp(-z), since
  tanh z = 2 / (1 + exp(-z)²) - 1; gelu_tanh is z·sigmoid(2·√(2/π)(z + 0.044715 z³)).
  """

  def __init__(self, z: Array):
    self.z = z

  @functools.cached_property
  def positive(self):
    return self.z > 0

  @functools.cached_property
  def relu(self):
    return jnp.where(self.positive, self.z, 0.0)

  @functools.cached_property
  def exp_neg(self):
    return jnp.exp(-self.z)

  @functools.cached_property
  def sigmoid(self):
    return 1.0 / (1.0 + self.exp_neg)

  @functools.cached_property
  def tanh(self):
    return 2.0 / (1.0 + self.exp_neg * self.exp_neg) - 1.0

  @functools.cached_property
  def gelu_tanh_gate(self):  # 0.5·(1 + tanh(a)) = sigmoid(2a)
    z = self.z
    return 1.0 / (1.0 + jnp.exp(-2.0 * _SQRT_2_OVER_PI * (z + _GELU_CUBIC * z * z * z)))

  @functools.cached_property
  def normal_cdf(self):
    return 0.5 + 0.5 * erf(self.z * _INV_SQRT_2)


def _gelu_tanh_grad(b: _Block) -> Array:
  q = b.gelu_tanh_gate
  return q + 2.0 * _SQRT_2_OVER_PI * b.z * q * (1.0 - q) * (1.0 + 3.0 * _GELU_CUBIC * b.z * b.z)


# name -> (σ, σ') written on a _Block; the same functions as `activations.ACTIVATIONS`, sharing
# work. A name missing here runs the table's own fn / grad inside the kernel.
_KERNEL_FORMS: dict[str, tuple[Callable[[_Block], Array], Callable[[_Block], Array]]] = {
    "identity": (lambda b: b.z, lambda b: 1.0),
    "relu": (lambda b: b.relu, lambda b: jnp.where(b.positive, 1.0, 0.0)),
    "relu2": (lambda b: b.relu * b.relu, lambda b: 2.0 * b.relu),
    "leaky_relu": (lambda b: jnp.where(b.positive, b.z, activations.LEAKY_SLOPE * b.z),
                   lambda b: jnp.where(b.z >= 0, 1.0, activations.LEAKY_SLOPE)),
    "gelu": (lambda b: b.z * b.normal_cdf,
             lambda b: b.normal_cdf + b.z * _INV_SQRT_2PI * jnp.exp(-0.5 * b.z * b.z)),
    "gelu_tanh": (lambda b: b.z * b.gelu_tanh_gate, _gelu_tanh_grad),
    "silu": (lambda b: b.z * b.sigmoid, lambda b: b.sigmoid * (1.0 + b.z * (1.0 - b.sigmoid))),
    "tanh": (lambda b: b.tanh, lambda b: 1.0 - b.tanh * b.tanh),
}


def _forms(names: Sequence[str]):
  out = []
  for name in names:
    if name in _KERNEL_FORMS:
      out.append(_KERNEL_FORMS[name])
    else:
      act = activations.ACTIVATIONS[name]
      out.append((lambda b, f=act.fn: f(b.z), lambda b, g=act.grad: g(b.z)))
  return out


def _weighted_sum(cols: Sequence[Array], terms: Sequence[Array]) -> Array:
  """Σ_k cols[k] · terms[k]; cols are (bt, 1) gate columns, terms (bt, bf) blocks."""
  out = cols[0] * terms[0]
  for c, t in zip(cols[1:], terms[1:]):
    out = out + c * t
  return out


# ---------------------------------------------------------------------------------------------
# Backend layouts: how blocks are sized, how a gate column is read, how dc is reduced.


@dataclasses.dataclass(frozen=True)
class _Tiling:
  bt: int     # tokens per block
  bf: int     # channels per block (within one group)
  t_pad: int  # T rounded up to bt
  f_pad: int  # Fg rounded up to bf

  @property
  def f_blocks(self) -> int:
    return self.f_pad // self.bf


def _tile(n: int, target: int, quantum: int, pow2: bool, whole: bool = False,
          floor: int | None = None) -> tuple[int, int]:
  """(block, padded n): the largest block in [floor, target] that tiles n, else pad n.

  pow2: blocks are powers of two (Triton); else multiples of quantum, or all of n when whole
  and n ≤ target. floor defaults to target/4.
  """
  if whole and not pow2 and n <= target:
    return n, n
  floor = max(quantum, target // 4 if floor is None else floor)
  if pow2:
    block = min(target, 1 << (n.bit_length() - 1))
    candidates = [block >> i for i in range(block.bit_length()) if block >> i >= floor]
  else:
    block = min(target, n // quantum * quantum)
    candidates = range(block, floor - 1, -quantum)
  for b in candidates:
    if n % b == 0:
      return b, n
  if n <= target:  # one block, padded
    block = max(pl.next_power_of_2(n), quantum) if pow2 else -(-n // quantum) * quantum
    return block, block
  return target, -(-n // target) * target


def _check_block(value: int | None, field: str, quantum: int, pow2: bool, backend: str):
  if value is None:
    return
  if value <= 0 or (pow2 and value & (value - 1)) or value % quantum:
    rule = "a power of two" if pow2 else f"a multiple of {quantum}"
    raise ValueError(f"{field} = {value}; the {backend} kernel needs {rule}")


@dataclasses.dataclass(frozen=True)
class _Triton:
  """GPU: power-of-two blocks, gate rows read as `ref[k]`, dc as per-F-block partial sums."""
  name: str = "gpu"
  fwd_elems: int = 16384  # block size (bt·bf) of the forward; SPEC §3 measured 16×1024
  bwd_elems: int = 8192
  target_f: int = 1024

  def kpad(self, k: int) -> int:
    return pl.next_power_of_2(k)

  def tiling(self, t: int, fg: int, groups: int, backward: bool, block_t, block_f) -> _Tiling:
    _check_block(block_t, "block_t", 1, True, self.name)
    _check_block(block_f, "block_f", 1, True, self.name)
    bf, f_pad = _tile(fg, block_f or self.target_f, 1, True, floor=64)  # F = 11·512, 11·64
    elems = self.bwd_elems if backward else self.fwd_elems
    bt, t_pad = _tile(t, block_t or max(1, elems // bf), 1, True)
    return _Tiling(bt, bf, t_pad, f_pad)

  def compiler_params(self, tiling: _Tiling, backward: bool):
    from jax.experimental.pallas import triton as pl_triton  # deprecated upstream: import lazily
    return pl_triton.CompilerParams(num_warps=4 if tiling.bt * tiling.bf <= 8192 else 8)

  def gate_columns(self, c_ref, k: int) -> list[Array]:
    return [c_ref[i][:, None] for i in range(k)]  # (bt, 1) each; no slicing of loaded values

  def dcoef_output(self, tiling: _Tiling, groups: int, kp: int):
    shape = jax.ShapeDtypeStruct((tiling.f_blocks, groups, kp, tiling.t_pad), jnp.float32)
    return shape, pl.BlockSpec((None, None, kp, tiling.bt), lambda i, g, j: (j, g, 0, i))

  def store_dcoef(self, dc_ref, terms: Sequence[Array]):
    for k, term in enumerate(terms):
      dc_ref[k] = jnp.sum(term, axis=1)

  def finish_dcoef(self, dc: Array, k: int, t: int) -> Array:
    return dc[:, :, :k, :t].sum(axis=0)  # (G, K, T)


@dataclasses.dataclass(frozen=True)
class _Mosaic:
  """TPU (and CPU interpret): (8, 128) tiles, tokens on lanes, dc accumulated over F blocks."""
  name: str = "tpu"
  fwd_block: tuple[int, int] = (256, 512)
  bwd_block: tuple[int, int] = (256, 256)

  def kpad(self, k: int) -> int:
    return -(-k // 8) * 8

  def tiling(self, t: int, fg: int, groups: int, backward: bool, block_t, block_f) -> _Tiling:
    _check_block(block_t, "block_t", 128, False, self.name)
    _check_block(block_f, "block_f", 128, False, self.name)
    target_t, target_f = self.bwd_block if backward else self.fwd_block
    bt, t_pad = _tile(t, block_t or target_t, 128, False, whole=True)
    # A channel block may be a whole row only when that row is one group.
    bf, f_pad = _tile(fg, block_f or target_f, 128, False, whole=groups == 1, floor=128)
    return _Tiling(bt, bf, t_pad, f_pad)

  def compiler_params(self, tiling: _Tiling, backward: bool):
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary" if backward else "parallel"))

  def gate_columns(self, c_ref, k: int) -> list[Array]:
    # Tokens sit on lanes in the gate block and on sublanes in h: one aligned (Kp, bt) transpose,
    # then column i by a masked lane reduction (no unaligned lane slicing).
    ct = c_ref[...].T  # (bt, Kp)
    lane = lax.broadcasted_iota(jnp.int32, ct.shape, 1)
    return [jnp.sum(jnp.where(lane == i, ct, 0.0), axis=1, keepdims=True) for i in range(k)]

  def dcoef_output(self, tiling: _Tiling, groups: int, kp: int):
    shape = jax.ShapeDtypeStruct((groups, kp, tiling.t_pad), jnp.float32)
    return shape, pl.BlockSpec((None, kp, tiling.bt), lambda i, g, j: (g, 0, i))

  def store_dcoef(self, dc_ref, terms: Sequence[Array]):
    @pl.when(pl.program_id(2) == 0)
    def _init():
      dc_ref[...] = jnp.zeros(dc_ref.shape, dc_ref.dtype)

    bt, kp = dc_ref.shape[1], dc_ref.shape[0]
    lane = lax.broadcasted_iota(jnp.int32, (bt, kp), 1)
    sums = functools.reduce(jnp.add, [
        jnp.where(lane == k, jnp.sum(term, axis=1, keepdims=True), 0.0)
        for k, term in enumerate(terms)])  # (bt, Kp)
    dc_ref[...] += sums.T

  def finish_dcoef(self, dc: Array, k: int, t: int) -> Array:
    return dc[:, :k, :t]  # (G, K, T)


_BACKENDS = {"gpu": _Triton(), "tpu": _Mosaic()}


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about one call: the kernels' closure and the custom_vjp's nondiff arg."""
  names: tuple[str, ...]
  names_u: tuple[str, ...] | None  # set for the bi-sided product
  glu: bool                        # u is given
  layout: _Triton | _Mosaic
  interpret: bool
  block_t: int | None
  block_f: int | None

  @property
  def bi(self) -> bool:
    return self.names_u is not None


# ---------------------------------------------------------------------------------------------
# Kernels.


def _mix_forward_kernel(*refs, spec: _Spec):
  h_ref, c_ref, *refs = refs
  u_ref = refs.pop(0) if spec.glu else None
  cu_ref = refs.pop(0) if spec.bi else None
  (y_ref,) = refs
  hb = _Block(h_ref[...].astype(jnp.float32))  # (bt, bf)
  cols = spec.layout.gate_columns(c_ref, len(spec.names))
  y = _weighted_sum(cols, [fn(hb) for fn, _ in _forms(spec.names)])
  if u_ref is not None:
    v = u_ref[...].astype(jnp.float32)
    if cu_ref is not None:
      cols_u = spec.layout.gate_columns(cu_ref, len(spec.names_u))
      ub = _Block(v)
      v = _weighted_sum(cols_u, [fn(ub) for fn, _ in _forms(spec.names_u)])
    y = y * v
  y_ref[...] = y.astype(y_ref.dtype)


def _mix_backward_kernel(*refs, spec: _Spec):
  h_ref, c_ref, *refs = refs
  u_ref = refs.pop(0) if spec.glu else None
  cu_ref = refs.pop(0) if spec.bi else None
  dy_ref, dh_ref, dc_ref, *refs = refs
  du_ref = refs.pop(0) if spec.glu else None
  dcu_ref = refs.pop(0) if spec.bi else None
  layout = spec.layout

  dy = dy_ref[...].astype(jnp.float32)  # (bt, bf)
  hb = _Block(h_ref[...].astype(jnp.float32))
  cols = layout.gate_columns(c_ref, len(spec.names))
  forms = _forms(spec.names)
  sig = [fn(hb) for fn, _ in forms]  # σ_k(h)
  dm = dy  # dL/dm(h)
  if u_ref is not None:
    ub = _Block(u_ref[...].astype(jnp.float32))
    dv = dy * _weighted_sum(cols, sig)  # dL/d(other branch) = dy ⊙ m(h)
    if cu_ref is not None:
      cols_u = layout.gate_columns(cu_ref, len(spec.names_u))
      forms_u = _forms(spec.names_u)
      sig_u = [fn(ub) for fn, _ in forms_u]
      dm = dy * _weighted_sum(cols_u, sig_u)
      du = dv * _weighted_sum(cols_u, [grad(ub) for _, grad in forms_u])
      layout.store_dcoef(dcu_ref, [dv * s for s in sig_u])
    else:
      dm = dy * ub.z
      du = dv
    du_ref[...] = du.astype(du_ref.dtype)
  dh_ref[...] = (dm * _weighted_sum(cols, [grad(hb) for _, grad in forms])).astype(dh_ref.dtype)
  layout.store_dcoef(dc_ref, [dm * s for s in sig])


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers on 2-D operands: x (T, F), gates (G, K, T).


def _pad_x(x: Array, groups: int, tiling: _Tiling) -> Array:
  """(T, G·Fg) -> (t_pad, G·f_pad), zeros in the padding; a no-op when the blocks tile x."""
  t, f = x.shape
  fg = f // groups
  if (tiling.t_pad, tiling.f_pad) == (t, fg):
    return x
  x = x.reshape(t, groups, fg)
  x = jnp.pad(x, ((0, tiling.t_pad - t), (0, 0), (0, tiling.f_pad - fg)))
  return x.reshape(tiling.t_pad, groups * tiling.f_pad)


def _unpad_x(x: Array, groups: int, t: int, fg: int, tiling: _Tiling) -> Array:
  if (tiling.t_pad, tiling.f_pad) == (t, fg):
    return x
  return x.reshape(tiling.t_pad, groups, tiling.f_pad)[:t, :, :fg].reshape(t, groups * fg)


def _pad_gates(c: Array, kp: int, tiling: _Tiling) -> Array:
  g, k, t = c.shape
  return jnp.pad(c, ((0, 0), (0, kp - k), (0, tiling.t_pad - t)))


def _specs(spec: _Spec, tiling: _Tiling, kp: int, kp_u: int | None):
  nf = tiling.f_blocks
  x_spec = pl.BlockSpec((tiling.bt, tiling.bf), lambda i, g, j: (i, g * nf + j))
  c_spec = pl.BlockSpec((None, kp, tiling.bt), lambda i, g, j: (g, 0, i))
  in_specs = [x_spec, c_spec]
  if spec.glu:
    in_specs.append(x_spec)
  if spec.bi:
    in_specs.append(pl.BlockSpec((None, kp_u, tiling.bt), lambda i, g, j: (g, 0, i)))
  return x_spec, in_specs


def _kernel_inputs(spec: _Spec, tiling: _Tiling, h, gates, u, gates_u):
  groups = gates.shape[0]
  layout = spec.layout
  kp = layout.kpad(gates.shape[1])
  kp_u = layout.kpad(gates_u.shape[1]) if spec.bi else None
  args = [_pad_x(h, groups, tiling), _pad_gates(gates, kp, tiling)]
  if spec.glu:
    args.append(_pad_x(u, groups, tiling))
  if spec.bi:
    args.append(_pad_gates(gates_u, kp_u, tiling))
  return args, kp, kp_u


def _forward(spec: _Spec, h, gates, u, gates_u) -> Array:
  (t, f), groups = h.shape, gates.shape[0]
  tiling = spec.layout.tiling(t, f // groups, groups, False, spec.block_t, spec.block_f)
  args, kp, kp_u = _kernel_inputs(spec, tiling, h, gates, u, gates_u)
  x_spec, in_specs = _specs(spec, tiling, kp, kp_u)
  y = pl.pallas_call(
      functools.partial(_mix_forward_kernel, spec=spec),
      out_shape=jax.ShapeDtypeStruct(args[0].shape, h.dtype),
      grid=(tiling.t_pad // tiling.bt, groups, tiling.f_blocks),
      in_specs=in_specs,
      out_specs=x_spec,
      compiler_params=spec.layout.compiler_params(tiling, backward=False),
      interpret=spec.interpret,
      name="mix_product_fwd",
  )(*args)
  return _unpad_x(y, groups, t, f // groups, tiling)


def _backward(spec: _Spec, h, gates, u, gates_u, dy):
  (t, f), groups = h.shape, gates.shape[0]
  layout = spec.layout
  tiling = layout.tiling(t, f // groups, groups, True, spec.block_t, spec.block_f)
  args, kp, kp_u = _kernel_inputs(spec, tiling, h, gates, u, gates_u)
  args.append(_pad_x(dy, groups, tiling))
  x_spec, in_specs = _specs(spec, tiling, kp, kp_u)
  in_specs.append(x_spec)
  dc_shape, dc_spec = layout.dcoef_output(tiling, groups, kp)
  out_shape = [jax.ShapeDtypeStruct(args[0].shape, h.dtype), dc_shape]
  out_specs = [x_spec, dc_spec]
  if spec.glu:
    out_shape.append(jax.ShapeDtypeStruct(args[0].shape, u.dtype))
    out_specs.append(x_spec)
  if spec.bi:
    dcu_shape, dcu_spec = layout.dcoef_output(tiling, groups, kp_u)
    out_shape.append(dcu_shape)
    out_specs.append(dcu_spec)
  outs = pl.pallas_call(
      functools.partial(_mix_backward_kernel, spec=spec),
      out_shape=out_shape,
      grid=(tiling.t_pad // tiling.bt, groups, tiling.f_blocks),
      in_specs=in_specs,
      out_specs=out_specs,
      compiler_params=layout.compiler_params(tiling, backward=True),
      interpret=spec.interpret,
      name="mix_product_bwd",
  )(*args)
  dh = _unpad_x(outs[0], groups, t, f // groups, tiling)
  dc = layout.finish_dcoef(outs[1], gates.shape[1], t)
  du = _unpad_x(outs[2], groups, t, f // groups, tiling) if spec.glu else None
  dcu = layout.finish_dcoef(outs[3], gates_u.shape[1], t) if spec.bi else None
  return dh, dc, du, dcu


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _mix_product(spec: _Spec, h, gates, u, gates_u):
  return _forward(spec, h, gates, u, gates_u)


def _mix_product_fwd(spec: _Spec, h, gates, u, gates_u):
  return _forward(spec, h, gates, u, gates_u), (h, gates, u, gates_u)  # inputs only


def _mix_product_bwd(spec: _Spec, residuals, dy):
  return _backward(spec, *residuals, dy)


_mix_product.defvjp(_mix_product_fwd, _mix_product_bwd)


# ---------------------------------------------------------------------------------------------
# Public API.


def _groups(coef: Array, names: tuple[str, ...], lead: tuple[int, ...], f: int, field: str) -> int:
  if coef.ndim < 2 or coef.shape[-1] != len(names):
    raise ValueError(f"{field} has shape {coef.shape}; expected (..., G, K) with K = "
                     f"{len(names)} = len({names})")
  lead_c = coef.shape[:-2]
  if len(lead_c) > len(lead) or jnp.broadcast_shapes(lead_c, lead) != lead:
    raise ValueError(f"{field} leading dims {lead_c} do not broadcast to the token dims {lead}")
  groups = coef.shape[-2]
  if f % groups:
    raise ValueError(f"{field} has G = {groups} channel groups, which does not divide F = {f}")
  return groups


def _lane_dense_gates(coef: Array, lead: tuple[int, ...], groups: int) -> Array:
  """(..., Gc, K) coefficients -> fp32 (G, K, T): one row of T token gates per (group, k)."""
  gc, k = coef.shape[-2:]
  c = jnp.broadcast_to(coef.astype(jnp.float32), (*lead, gc, k)).reshape(-1, gc, k)
  c = jnp.repeat(c, groups // gc, axis=1)  # (T, G, K): G a multiple of Gc (two branches)
  return c.transpose(1, 2, 0)


def _resolve(backend: str | None, interpret: bool | None):
  platform = jax.default_backend()
  if backend is None:
    backend = platform if platform in _BACKENDS else "tpu"
  if backend not in _BACKENDS:
    raise ValueError(f"backend = {backend!r}; known: {', '.join(_BACKENDS)} (None: automatic)")
  if interpret is None:
    interpret = platform not in _BACKENDS
  return _BACKENDS[backend], interpret


def mix_product(h: Array, coef: Array, names: Sequence[str], u: Array | None = None,
                coef_u: Array | None = None, names_u: Sequence[str] | None = None, *,
                interpret: bool | None = None, block_t: int | None = None,
                block_f: int | None = None, backend: str | None = None) -> Array:
  """Fused `activations.mix_product_reference`: m(h), m(h) ⊙ u, or m(h) ⊙ m_u(u).

  h, u: (..., F) in bf16 or fp32; coef: (..., G, K) broadcastable to h's leading dims ((G, K)
  for LA, per-token gates (B, T, G, K) for MoA), K = len(names); coef_u likewise for the
  bi-sided product with its own names_u. Returns h.dtype; differentiable in h, u, coef, coef_u.

  interpret: run the kernel in the Pallas interpreter (None: when not on GPU or TPU).
  block_t, block_f: block targets in tokens and channels (None: per-backend defaults).
  backend: "gpu" (Triton) or "tpu" (Mosaic) kernel variant (None: the current platform's; on
  other platforms the TPU variant, interpreted).
  """
  names = activations.check_names(names, "names")
  if coef_u is not None:
    if u is None or names_u is None:
      raise ValueError("coef_u is given without u or names_u; the bi-sided product needs both")
    names_u = activations.check_names(names_u, "names_u")
  else:
    names_u = None
  if u is not None and u.shape != h.shape:
    raise ValueError(f"u has shape {u.shape}; expected h's shape {h.shape}")
  lead, f = h.shape[:-1], h.shape[-1]
  groups = _groups(coef, names, lead, f, "coef")
  if _explicit_spec(h) is not None:  # pallas_call takes no Explicit shardings: one per device
    return mix_product_sharded(h, coef, names, u, coef_u, names_u, interpret=interpret,
                               block_t=block_t, block_f=block_f, backend=backend)
  if coef_u is not None:
    groups = math.lcm(groups, _groups(coef_u, names_u, lead, f, "coef_u"))
  layout, interpret = _resolve(backend, interpret)
  spec = _Spec(names, names_u, u is not None, layout, bool(interpret), block_t, block_f)

  t = math.prod(lead)
  gates = _lane_dense_gates(coef, lead, groups)
  gates_u = None if coef_u is None else _lane_dense_gates(coef_u, lead, groups)
  u2 = None if u is None else u.reshape(t, f)
  y = _mix_product(spec, h.reshape(t, f), gates, u2, gates_u)
  return y.reshape(h.shape)


def _explicit_spec(x: Array) -> PartitionSpec | None:
  """x's PartitionSpec when it is sharded over Explicit mesh axes (None otherwise)."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(p is None for p in spec):
    return None
  return spec


def mix_product_sharded(h: Array, coef: Array, names: Sequence[str], u: Array | None = None,
                        coef_u: Array | None = None, names_u: Sequence[str] | None = None, *,
                        mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                        spec: PartitionSpec | None = None, **kernel_kwargs) -> Array:
  """`mix_product` run per device in `shard_map`; `spec` is h's (and u's) PartitionSpec.

  Token dims may be sharded over any mesh axes, and the channel dim too when G = 1 or the
  channel shards divide G (groups stay whole on each device). Per-token gates follow h's token
  sharding; LA coefficients are replicated and shard_map sums their gradient over devices.
  With Explicit mesh axes, mesh and spec default to h's own sharding and the coefficients are
  resharded to match; with Auto axes, pass mesh and spec (shard_map then reshards).
  """
  if spec is None:
    spec = _explicit_spec(h)
    if spec is None:
      raise ValueError("mix_product_sharded needs spec= (h is not sharded over Explicit axes)")
  if mesh is None:
    mesh = jax.typeof(h).sharding.mesh
  entries = tuple(spec) + (None,) * (h.ndim - len(spec))
  token_specs, channel = entries[:-1], entries[-1]
  lead = h.shape[:-1]
  spec = PartitionSpec(*entries)
  channel_shards = math.prod(mesh.shape[a] for a in jax.tree.leaves(channel))

  def coef_spec(c: Array) -> PartitionSpec:
    n = c.ndim - 2
    dims = [token_specs[len(lead) - n + i] if c.shape[i] == lead[len(lead) - n + i] else None
            for i in range(n)]
    if c.shape[-2] == 1 or channel is None:
      return PartitionSpec(*dims, None, None)
    if c.shape[-2] % channel_shards:
      raise ValueError(f"coefficients with G = {c.shape[-2]} groups cannot follow channels "
                       f"split {channel_shards} ways over {channel}; use G divisible by "
                       f"{channel_shards} or G = 1")
    return PartitionSpec(*dims, channel, None)

  operands = [h, coef] + [x for x in (u, coef_u) if x is not None]
  in_specs = [spec, coef_spec(coef)] + [spec if x is u else coef_spec(x)
                                        for x in (u, coef_u) if x is not None]
  if _explicit_spec(h) is not None:
    operands = [jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, s))
                for x, s in zip(operands, in_specs)]

  def local(h, coef, *rest):
    rest = list(rest)
    u_local = rest.pop(0) if u is not None else None
    cu_local = rest.pop(0) if coef_u is not None else None
    return mix_product(h, coef, names, u_local, cu_local, names_u, **kernel_kwargs)

  # check_vma=False: pallas_call outputs carry no varying-axes type; shard_map then psums the
  # cotangents of replicated inputs (LA coefficients) itself.
  return jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=spec,
                       check_vma=False)(*operands)


def mix_product_reference(h, coef, names, u=None, coef_u=None, names_u=None) -> Array:
  """The pure-jnp reference the kernel is tested against (`activations.mix_product_reference`)."""
  return activations.mix_product_reference(h, coef, names, u, coef_u, names_u)
