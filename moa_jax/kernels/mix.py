"""Fused mixing of activations: y = m(h), m(h) ⊙ u or m(h) ⊙ m_u(u) as one Pallas kernel.

    m(h)[t, f] = Σ_k c[t, g(f), k] · σ_k(h[t, f])        (docs/method.md, docs/kernel.md)

with per-token gates c (MoA) or one set of coefficients for all tokens (LA, broadcast here).
The forward is one pass over T×F; the backward one pass computing dh, du and the per-token
dc_k = Σ_{f in group} dy ⊙ (other branch) ⊙ σ_k(h). The custom VJP keeps only its inputs as
residuals and recomputes every σ_k, so activation memory is that of a plain SwiGLU.

This module is what every backend shares: the block maths (`forward_block`, `backward_block`,
written on the shared bases of `forms`), the custom VJP, the public entry and the sharded
wrapper. Each backend file lays the blocks out on its hardware and makes the pallas_calls:
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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

from moa_jax import activations, platforms
from moa_jax.kernels import forms

Array = jax.Array
PRECISIONS = ("exact", "fast")


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
  if spec.precision == "exact":
    return jnp.tanh
  if spec.interpret:
    return _truncated_tanh
  return spec.layout.fast_tanh


# ---------------------------------------------------------------------------------------------
# Block maths, fp32, shared by every backend. h, u, dy: (bt, bf); cols: K gate columns (bt, 1).


def forward_block(spec: Spec, h: Array, cols, u: Array | None, cols_u) -> Array:
  tanh = tanh_fn(spec)
  y = forms.combine(forms.basis_coefs(spec.names, cols, 0), forms.Basis(h, tanh))
  if u is None:
    return y
  if spec.bi:
    u = forms.combine(forms.basis_coefs(spec.names_u, cols_u, 0), forms.Basis(u, tanh))
  return y * u


def backward_block(spec: Spec, h: Array, cols, u: Array | None, cols_u, dy: Array, row_sum):
  """(dh, du, sums, sums_u): sums map each basis b_j of σ to row_sum(dm ⊙ b_j(h)), the
  reductions dc is made of (`forms.coef_grads`); du and sums_u are None when unused."""
  tanh = tanh_fn(spec)
  hb = forms.Basis(h, tanh)
  dm, du, sums_u = dy, None, None  # dm = dL/dm(h)
  if u is not None:
    dv = dy * forms.combine(forms.basis_coefs(spec.names, cols, 0), hb)  # dL/d(other branch)
    if spec.bi:
      ub = forms.Basis(u, tanh)
      dm = dy * forms.combine(forms.basis_coefs(spec.names_u, cols_u, 0), ub)
      du = dv * forms.combine(forms.basis_coefs(spec.names_u, cols_u, 1), ub)
      sums_u = {b: row_sum(dv * ub[b]) for b in forms.fn_bases(spec.names_u)}
    else:
      dm, du = dy * u, dv
  dh = dm * forms.combine(forms.basis_coefs(spec.names, cols, 1), hb)
  sums = {b: row_sum(dm * hb[b]) for b in forms.fn_bases(spec.names)}
  return dh, du, sums, sums_u


# ---------------------------------------------------------------------------------------------
# Tiling and padding, shared by the backends.


@dataclasses.dataclass(frozen=True)
class Tiling:
  bt: int     # tokens per block
  bf: int     # channels per block (within one group)
  t_pad: int  # T rounded up to bt
  f_pad: int  # Fg rounded up to bf

  @property
  def f_blocks(self) -> int:
    return self.f_pad // self.bf


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


def block_inputs(spec: Spec, tl: Tiling, kpad, h, gates, u, gates_u, x_spec, gate_index):
  """The padded kernel operands (h, gates[, u][, gates_u]) and their BlockSpecs, for either backend:
  x_spec blocks (T, F) operands, gate_index maps a grid index to a (G, Kp, T) gate block."""
  groups = gates.shape[0]
  gate_spec = lambda c: pl.BlockSpec((None, kpad(c.shape[1]), tl.bt), gate_index)
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
def _mix_product(spec: Spec, h, gates, u, gates_u):
  return spec.layout.forward(spec, h, gates, u, gates_u)


def _mix_product_fwd(spec: Spec, h, gates, u, gates_u):
  return spec.layout.forward(spec, h, gates, u, gates_u), (h, gates, u, gates_u)  # inputs only


def _mix_product_bwd(spec: Spec, residuals, dy):
  return spec.layout.backward(spec, *residuals, dy)


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


def _layouts():
  from moa_jax.kernels import tpu, triton  # backends import this module: import them late
  return {"gpu": triton.LAYOUT, "tpu": tpu.LAYOUT}


def _resolve(backend: str | None, interpret: bool | None, precision: str | None):
  layouts = _layouts()
  platform = platforms.current()  # the compile target's platform (moa_jax.aot), else the host's
  if backend is None:
    backend = platform if platform in layouts else "tpu"
  if backend not in layouts:
    raise ValueError(f"backend = {backend!r}; known: {', '.join(layouts)} (None: automatic)")
  if interpret is None:
    interpret = platform not in layouts
  if precision is None:
    precision = "fast" if backend == "gpu" and not interpret else "exact"
  if precision not in PRECISIONS:
    raise ValueError(f"precision = {precision!r}; known: {', '.join(PRECISIONS)} (None: fast "
                     "on GPU, exact elsewhere)")
  return layouts[backend], bool(interpret), precision


def _names(names, field: str) -> tuple[str, ...]:
  return activations.check_names(names, field)


def mix_product(h: Array, coef: Array, names: Sequence[str], u: Array | None = None,
                coef_u: Array | None = None, names_u: Sequence[str] | None = None, *,
                interpret: bool | None = None, block_t: int | None = None,
                block_f: int | None = None, backend: str | None = None,
                precision: str | None = None) -> Array:
  """Fused `activations.mix_product_reference`: m(h), m(h) ⊙ u, or m(h) ⊙ m_u(u).

  h, u: (..., F) in bf16 or fp32; coef: (..., G, K) broadcastable to h's leading dims ((G, K)
  for LA, per-token gates (B, T, G, K) for MoA), K = len(names); coef_u likewise for the
  bi-sided product with its own names_u. Returns h.dtype; differentiable in h, u, coef, coef_u.

  interpret: run the kernel in the Pallas interpreter (None: when not on GPU or TPU).
  block_t, block_f: block targets in tokens and channels (None: per-backend defaults).
  backend: "gpu" (Triton) or "tpu" (Mosaic) kernel variant (None: the current platform's; on
  other platforms the TPU variant, interpreted).
  precision: "fast" (GPU: hardware tanh.approx.f32, relative error < 2^-11; interpreted: tanh
  truncated to that accuracy) or "exact" (None: fast on GPU, exact elsewhere).
  Jitted with every non-array argument static, so repeated eager calls compile once.
  """
  names = _names(names, "names")
  if coef_u is not None:
    if u is None or names_u is None:
      raise ValueError("coef_u is given without u or names_u; the bi-sided product needs both")
    names_u = _names(names_u, "names_u")
  else:
    names_u = None
  if u is not None and u.shape != h.shape:
    raise ValueError(f"u has shape {u.shape}; expected h's shape {h.shape}")
  layout, interpret, precision = _resolve(backend, interpret, precision)
  if explicit_spec(h) is not None:  # pallas_call takes no Explicit shardings: one per device
    return mix_product_sharded(h, coef, names, u, coef_u, names_u, interpret=interpret,
                               block_t=block_t, block_f=block_f, backend=layout.name,
                               precision=precision)
  spec = Spec(names, names_u, u is not None, layout, interpret, precision, block_t, block_f)
  return _mix_product_jit(h, coef, u, coef_u, spec=spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _mix_product_jit(h, coef, u, coef_u, *, spec: Spec):
  names, names_u = spec.names, spec.names_u
  lead, f = h.shape[:-1], h.shape[-1]
  groups = _groups(coef, names, lead, f, "coef")
  if coef_u is not None:
    groups = math.lcm(groups, _groups(coef_u, names_u, lead, f, "coef_u"))
  t = math.prod(lead)
  gates = _lane_dense_gates(coef, lead, groups)
  gates_u = None if coef_u is None else _lane_dense_gates(coef_u, lead, groups)
  u2 = None if u is None else u.reshape(t, f)
  y = _mix_product(spec, h.reshape(t, f), gates, u2, gates_u)
  return y.reshape(h.shape)


def explicit_spec(x: Array) -> PartitionSpec | None:
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
    spec = explicit_spec(h)
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
  if explicit_spec(h) is not None:
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
