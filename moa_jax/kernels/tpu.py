"""TPU layout of the fused mixing kernel (Pallas Mosaic TPU; also the CPU default, interpreted).

Grid (T/bt, G/n, Fg·n/bf) in both directions, blocks (bt, bf) with the last two dims multiples
of (8, 128) or whole. Gates arrive lane-dense (G, Kp, T) with tokens on lanes, n groups per
block; dc is accumulated over the innermost "arbitrary" F axis into a resident (n, Kp, bt) block.

n = 1 when a group's width Fg is a multiple of 128 (or G = 1): blocks tile one group. Otherwise
(G = 8, F = 5632: Fg = 704 = 5.5·128) a block holds n whole groups, bf = n·Fg with n the fewest
groups whose width is a multiple of 128 (or all G), and the kernel selects each lane's gate
coefficients by its group (`mix.GroupLanes`): one select per basis and element instead of
padding every T×F operand to 6144 columns outside the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from moa_jax.kernels import forms, mix

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str = "tpu"
  fwd_block: tuple[int, int] = (256, 512)
  bwd_block: tuple[int, int] = (256, 256)

  fast_tanh = staticmethod(jnp.tanh)  # the EUP's tanh is the fast one

  def kpad(self, k: int) -> int:
    return -(-k // 8) * 8

  def tiling(self, t: int, fg: int, groups: int, backward: bool, block_t, block_f) -> mix.Tiling:
    """block_f applies when blocks tile one group; a block spanning groups is n·Fg wide."""
    mix.check_block(block_t, "block_t", 128, False, self.name)
    mix.check_block(block_f, "block_f", 128, False, self.name)
    target_t, target_f = self.bwd_block if backward else self.fwd_block
    n = spanned_groups(fg, groups)
    if n > 1:
      rows = max(128, target_t * target_f // (n * fg) // 128 * 128)
      bt, t_pad = mix.multiple_tile(t, block_t or rows, 128, whole=True)
      return mix.Tiling(bt, n * fg, t_pad, fg, n)
    bt, t_pad = mix.multiple_tile(t, block_t or target_t, 128, whole=True)
    # A channel block may be a whole row only when that row is one group.
    bf, f_pad = mix.multiple_tile(fg, block_f or target_f, 128, whole=groups == 1)
    return mix.Tiling(bt, bf, t_pad, f_pad)

  def compiler_params(self, spec: mix.Spec, tl: mix.Tiling, backward: bool):
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary" if backward else "parallel"),
        vmem_limit_bytes=vmem_limit(spec, tl, backward))

  def _call(self, spec, kernel, h, gates, u, gates_u, extra, backward, out_shape_fn):
    (t, f), groups = h.shape, gates.shape[0]
    tl = self.tiling(t, f // groups, groups, backward, spec.block_t, spec.block_f)
    nf, n = tl.f_blocks, tl.groups_per_block
    x_spec = pl.BlockSpec((tl.bt, tl.bf), lambda i, g, j: (i, g * nf + j))
    args, in_specs = mix.block_inputs(spec, tl, self.kpad, h, gates, u, gates_u, x_spec,
                                      lambda i, g, j: (g, 0, i), gate_groups=n)
    for x in extra:
      args.append(mix.pad_x(x, groups, tl))
      in_specs.append(x_spec)
    out_shape, out_specs = out_shape_fn(tl, args[0].shape, x_spec)
    lanes = mix.GroupLanes(n, f // groups)
    outs = pl.pallas_call(
        functools.partial(kernel, spec=spec, lanes=lanes), out_shape=out_shape,
        grid=(tl.t_pad // tl.bt, groups // n, nf), in_specs=in_specs, out_specs=out_specs,
        compiler_params=self.compiler_params(spec, tl, backward), interpret=spec.interpret,
        cost_estimate=mix.cost_estimate(spec, args, out_shape, backward),
        name="mix_product_bwd" if backward else "mix_product_fwd",
    )(*args)
    return outs, tl

  def forward(self, spec: mix.Spec, h, gates, u, gates_u) -> Array:
    (t, f), groups = h.shape, gates.shape[0]
    y, tl = self._call(spec, _forward_kernel, h, gates, u, gates_u, (), False,
                       lambda tl, shape, x_spec: (jax.ShapeDtypeStruct(shape, h.dtype), x_spec))
    return mix.unpad_x(y, groups, t, f // groups, tl)

  def backward(self, spec: mix.Spec, h, gates, u, gates_u, dy):
    (t, f), groups = h.shape, gates.shape[0]
    k, k_u = gates.shape[1], None if gates_u is None else gates_u.shape[1]

    def outputs(tl, shape, x_spec):
      n = tl.groups_per_block
      dc = lambda kk: (jax.ShapeDtypeStruct((groups, self.kpad(kk), tl.t_pad), jnp.float32),
                       pl.BlockSpec((n, self.kpad(kk), tl.bt), lambda i, g, j: (g, 0, i)))
      out = [(jax.ShapeDtypeStruct(shape, h.dtype), x_spec), dc(k)]
      if spec.glu:
        out.append((jax.ShapeDtypeStruct(shape, u.dtype), x_spec))
      if spec.bi:
        out.append(dc(k_u))
      return [o[0] for o in out], [o[1] for o in out]

    outs, tl = self._call(spec, _backward_kernel, h, gates, u, gates_u, (dy,), True, outputs)
    fg = f // groups
    dh = mix.unpad_x(outs[0], groups, t, fg, tl)
    du = mix.unpad_x(outs[2], groups, t, fg, tl) if spec.glu else None
    dcu = outs[3][:, :k_u, :t] if spec.bi else None
    return dh, outs[1][:, :k, :t], du, dcu


LAYOUT = Layout()
VMEM_CAP = 64 << 20  # bytes a block may ask for: under the VMEM of v5e, v5p and v6e cores


def spanned_groups(fg: int, groups: int) -> int:
  """Groups per block: 1 when Fg is a multiple of 128 (or G = 1), else the fewest whole groups
  whose width is, or all G when those do not divide G."""
  if groups == 1 or fg % 128 == 0:
    return 1
  n = 128 // math.gcd(fg, 128)
  return n if groups % n == 0 else groups


def vmem_limit(spec: mix.Spec, tl: mix.Tiling, backward: bool) -> int:
  """Scoped VMEM for one block: double-buffered (bt, bf) operands plus the fp32 temporaries of
  the block maths (one per basis of σ and σ′, and a few products), with 50% headroom."""
  sides = [spec.names] + ([spec.names_u] if spec.bi else [])
  bases = sum(len(forms.fn_bases(s)) + (len(forms.grad_bases(s)) if backward else 0)
              for s in sides)
  operands = (2 if spec.glu else 1) + (2 if backward else 0) + (1 if backward and spec.glu else 0)
  need = tl.bt * tl.bf * 4 * (2 * operands + bases + 4) * 3 // 2
  if need > VMEM_CAP:
    raise ValueError(f"a TPU block of {tl.bt}x{tl.bf} needs ~{need >> 20} MiB of VMEM, above "
                     f"{VMEM_CAP >> 20} MiB; pass a smaller block_t (multiple of 128)")
  return max(need, 32 << 20)


def _columns(c_ref, k: int, lanes: mix.GroupLanes):
  """K gate columns (bt, 1) per group of the (n, Kp, bt) gate block; flat when n = 1."""
  per = [_group_columns(c_ref[r], k) for r in range(lanes.n)]
  return per[0] if lanes.n == 1 else per


def _group_columns(c: Array, k: int) -> list[Array]:
  # Tokens sit on lanes in the gate block and on sublanes in h: one aligned (Kp, bt) transpose,
  # then column i by a masked lane reduction (no unaligned lane slicing).
  ct = c.T  # (bt, Kp)
  lane = lax.broadcasted_iota(jnp.int32, ct.shape, 1)
  return [jnp.sum(jnp.where(lane == i, ct, 0.0), axis=1, keepdims=True) for i in range(k)]


def _store_dcoef(dc_ref, names, sums: dict[str, list[Array]], lanes: mix.GroupLanes):
  """Adds each group's dc rows (each (bt, 1)) into the resident (n, Kp, bt) block, zeroed at the
  first F block."""
  @pl.when(pl.program_id(2) == 0)
  def _init():
    dc_ref[...] = jnp.zeros(dc_ref.shape, dc_ref.dtype)

  _, kp, bt = dc_ref.shape
  lane = lax.broadcasted_iota(jnp.int32, (bt, kp), 1)
  for r in range(lanes.n):
    rows = forms.coef_grads(names, {b: s[r] for b, s in sums.items()})
    block = functools.reduce(jnp.add, [jnp.where(lane == k, x, 0.0) for k, x in enumerate(rows)])
    dc_ref[r] += block.T


def _forward_kernel(h_ref, c_ref, *refs, spec: mix.Spec, lanes: mix.GroupLanes):
  refs = list(refs)
  u_ref = refs.pop(0) if spec.glu else None
  cu_ref = refs.pop(0) if spec.bi else None
  (y_ref,) = refs
  cols = _columns(c_ref, len(spec.names), lanes)
  cols_u = _columns(cu_ref, len(spec.names_u), lanes) if spec.bi else None
  u = u_ref[...].astype(jnp.float32) if spec.glu else None
  y = mix.forward_block(spec, h_ref[...].astype(jnp.float32), cols, u, cols_u, lanes)
  y_ref[...] = y.astype(y_ref.dtype)


def _backward_kernel(h_ref, c_ref, *refs, spec: mix.Spec, lanes: mix.GroupLanes):
  refs = list(refs)
  u_ref = refs.pop(0) if spec.glu else None
  cu_ref = refs.pop(0) if spec.bi else None
  dy_ref, dh_ref, dc_ref, *refs = refs
  du_ref = refs.pop(0) if spec.glu else None
  dcu_ref = refs.pop(0) if spec.bi else None
  cols = _columns(c_ref, len(spec.names), lanes)
  cols_u = _columns(cu_ref, len(spec.names_u), lanes) if spec.bi else None
  u = u_ref[...].astype(jnp.float32) if spec.glu else None
  dh, du, sums, sums_u = mix.backward_block(
      spec, h_ref[...].astype(jnp.float32), cols, u, cols_u, dy_ref[...].astype(jnp.float32),
      lanes.row_sums, lanes)
  dh_ref[...] = dh.astype(dh_ref.dtype)
  _store_dcoef(dc_ref, spec.names, sums, lanes)
  if spec.glu:
    du_ref[...] = du.astype(du_ref.dtype)
  if spec.bi:
    _store_dcoef(dcu_ref, spec.names_u, sums_u, lanes)
