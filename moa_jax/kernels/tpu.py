"""TPU layout of the fused mixing kernel (Pallas Mosaic TPU; also the CPU default, interpreted).

Grid (T/bt, G, Fg/bf) in both directions, blocks (bt, bf) with the last two dims multiples of
(8, 128) or whole. Gates arrive lane-dense (G, Kp, T) with tokens on lanes; dc is accumulated
over the innermost "arbitrary" F axis into a resident (Kp, bt) output block.
"""

from __future__ import annotations

import dataclasses
import functools

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
    mix.check_block(block_t, "block_t", 128, False, self.name)
    mix.check_block(block_f, "block_f", 128, False, self.name)
    target_t, target_f = self.bwd_block if backward else self.fwd_block
    bt, t_pad = mix.multiple_tile(t, block_t or target_t, 128, whole=True)
    # A channel block may be a whole row only when that row is one group.
    bf, f_pad = mix.multiple_tile(fg, block_f or target_f, 128, whole=groups == 1)
    return mix.Tiling(bt, bf, t_pad, f_pad)

  def compiler_params(self, backward: bool):
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary" if backward else "parallel"))

  def _call(self, spec, kernel, h, gates, u, gates_u, extra, backward, out_shape_fn):
    (t, f), groups = h.shape, gates.shape[0]
    tl = self.tiling(t, f // groups, groups, backward, spec.block_t, spec.block_f)
    nf = tl.f_blocks
    x_spec = pl.BlockSpec((tl.bt, tl.bf), lambda i, g, j: (i, g * nf + j))
    args, in_specs = mix.block_inputs(spec, tl, self.kpad, h, gates, u, gates_u, x_spec,
                                      lambda i, g, j: (g, 0, i))
    for x in extra:
      args.append(mix.pad_x(x, groups, tl))
      in_specs.append(x_spec)
    out_shape, out_specs = out_shape_fn(tl, args[0].shape, x_spec)
    outs = pl.pallas_call(
        functools.partial(kernel, spec=spec), out_shape=out_shape,
        grid=(tl.t_pad // tl.bt, groups, nf), in_specs=in_specs, out_specs=out_specs,
        compiler_params=self.compiler_params(backward), interpret=spec.interpret,
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
      dc = lambda kk: (jax.ShapeDtypeStruct((groups, self.kpad(kk), tl.t_pad), jnp.float32),
                       pl.BlockSpec((None, self.kpad(kk), tl.bt), lambda i, g, j: (g, 0, i)))
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


def _columns(c_ref, k: int) -> list[Array]:
  # Tokens sit on lanes in the gate block and on sublanes in h: one aligned (Kp, bt) transpose,
  # then column i by a masked lane reduction (no unaligned lane slicing).
  ct = c_ref[...].T  # (bt, Kp)
  lane = lax.broadcasted_iota(jnp.int32, ct.shape, 1)
  return [jnp.sum(jnp.where(lane == i, ct, 0.0), axis=1, keepdims=True) for i in range(k)]


def _store_dcoef(dc_ref, rows: list[Array]):
  """Adds dc rows (each (bt, 1)) into the resident (Kp, bt) block, zeroed at the first F block."""
  @pl.when(pl.program_id(2) == 0)
  def _init():
    dc_ref[...] = jnp.zeros(dc_ref.shape, dc_ref.dtype)

  kp, bt = dc_ref.shape
  lane = lax.broadcasted_iota(jnp.int32, (bt, kp), 1)
  sums = functools.reduce(jnp.add, [jnp.where(lane == k, r, 0.0) for k, r in enumerate(rows)])
  dc_ref[...] += sums.T


def _forward_kernel(h_ref, c_ref, *refs, spec: mix.Spec):
  refs = list(refs)
  u_ref = refs.pop(0) if spec.glu else None
  cu_ref = refs.pop(0) if spec.bi else None
  (y_ref,) = refs
  cols = _columns(c_ref, len(spec.names))
  cols_u = _columns(cu_ref, len(spec.names_u)) if spec.bi else None
  u = u_ref[...].astype(jnp.float32) if spec.glu else None
  y = mix.forward_block(spec, h_ref[...].astype(jnp.float32), cols, u, cols_u)
  y_ref[...] = y.astype(y_ref.dtype)


def _backward_kernel(h_ref, c_ref, *refs, spec: mix.Spec):
  refs = list(refs)
  u_ref = refs.pop(0) if spec.glu else None
  cu_ref = refs.pop(0) if spec.bi else None
  dy_ref, dh_ref, dc_ref, *refs = refs
  du_ref = refs.pop(0) if spec.glu else None
  dcu_ref = refs.pop(0) if spec.bi else None
  cols = _columns(c_ref, len(spec.names))
  cols_u = _columns(cu_ref, len(spec.names_u)) if spec.bi else None
  u = u_ref[...].astype(jnp.float32) if spec.glu else None
  dh, du, sums, sums_u = mix.backward_block(
      spec, h_ref[...].astype(jnp.float32), cols, u, cols_u, dy_ref[...].astype(jnp.float32),
      lambda x: jnp.sum(x, axis=1, keepdims=True))
  dh_ref[...] = dh.astype(dh_ref.dtype)
  _store_dcoef(dc_ref, forms.coef_grads(spec.names, sums))
  if spec.glu:
    du_ref[...] = du.astype(du_ref.dtype)
  if spec.bi:
    _store_dcoef(dcu_ref, forms.coef_grads(spec.names_u, sums_u))
