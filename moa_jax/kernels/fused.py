"""The mixing in the up-projection's epilogue: y = m(x·W1) [⊙ x·W2 | ⊙ m_u(x·W2)] as one kernel.

    y[t, f] = m(h)[t, f] · (u | m_u(u))[t, f],   h = x·W1, u = x·W2   (x (T, D), W (D, F))

Forward: one Pallas matmul per (bt, bf) output block. Each program loops over D in bk-wide
slices, accumulating h and u in fp32 from the same x slice: the W1 and W2 tiles of one block
index arrive together, which is x·[W1 | W2] with tile-interleaved weights, without building
the concatenated matrix. The epilogue rounds h and u to x's dtype (as the XLA einsum does), then
runs `mix.forward_block`, and writes y. Under differentiation it also writes the rounded h and u
for the backward (XLA's SwiGLU saves the same two arrays); a forward-only call writes y alone.

Gate logits x·U are computed first, in XLA (`ffn.Mixer`). They are a (T, D)·(D, G·K) matmul,
0.1% of the FFN's FLOPs at K = 7, G = 1, d_ff = 5632. Every F block of a token row needs the
whole row's gates, so fusing them would recompute them in every F block (×F/bf) or serialise
the blocks.

Backward (custom VJP; residuals x, W1, W2, h, u and the gates: SwiGLU's activation memory):
the separate-pass mixing backward (`layout.backward`) gives dh, du and dc, then XLA computes
dx, dW1 and dW2. Saving h and u beats recomputing them: recomputing costs two T×D×F matmuls
(~1.3 ms at the anchor shape at 593 TFLOP/s), while saving them costs four T×F array transfers
(~0.15 ms at 4.8 TB/s). The fused backward epilogue (dOut·W3ᵀ with dh, du and dc in it) is not
built; docs/kernel.md says what is missing.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from moa_jax.kernels import entry, mix, tpu, triton

Array = jax.Array


def _forward_kernel(x_ref, w1_ref, c_ref, *refs, spec: mix.Spec, lanes: mix.GroupLanes,
                    columns, bk: int, save: bool):
  refs = list(refs)
  w2_ref = refs.pop(0) if spec.glu else None
  cu_ref = refs.pop(0) if spec.bi else None
  y_ref, *saved = refs  # saved: h_ref[, u_ref] when the backward will need them
  bt, bf = y_ref.shape

  def step(k, acc):
    xs = x_ref[:, pl.ds(pl.multiple_of(k * bk, bk), bk)]  # (bt, bk)
    tile = lambda w_ref: w_ref[pl.ds(pl.multiple_of(k * bk, bk), bk), :]  # (bk, bf)
    dot = lambda w_ref: jnp.dot(xs, tile(w_ref), preferred_element_type=jnp.float32)
    return tuple(a + dot(w) for a, w in zip(acc, (w1_ref, w2_ref)[:len(acc)]))

  zeros = tuple(jnp.zeros((bt, bf), jnp.float32) for _ in range(2 if spec.glu else 1))
  acc = lax.fori_loop(0, x_ref.shape[1] // bk, step, zeros)
  rounded = [a.astype(x_ref.dtype) for a in acc]  # as the XLA einsum rounds h and u
  for ref, a in zip(saved, rounded):
    ref[...] = a
  h, u = (a.astype(jnp.float32) for a in rounded) if spec.glu else (
      rounded[0].astype(jnp.float32), None)
  cols = columns(c_ref, len(spec.names), lanes)
  cols_u = columns(cu_ref, len(spec.names_u), lanes) if spec.bi else None
  y_ref[...] = mix.forward_block(spec, h, cols, u, cols_u, lanes).astype(y_ref.dtype)


def _gpu_columns(c_ref, k, lanes):  # Triton blocks hold one group
  return triton._columns(c_ref, k)


def _forward(spec: mix.Spec, bk: int, save: bool, x, w1, w2, gates, gates_u):
  """y (T, F), and with save also h[, u] (T, F) for the backward."""
  layout = spec.layout
  (t, d), f, groups = x.shape, w1.shape[1], gates.shape[0]
  fg = f // groups
  if layout.name == "tpu":
    tl = layout.tiling(t, fg, groups, False, spec.block_t, spec.block_f)
    columns, gate_groups = tpu._columns, tl.groups_per_block
    params = layout.compiler_params(spec, tl, False)
  else:
    tl = layout.tiling(t, fg, False, spec.block_t, spec.block_f)
    columns, gate_groups, params = _gpu_columns, None, layout.compiler_params()
  if tl.f_pad != fg:
    raise ValueError(f"model.ffn.impl='fused' needs channel blocks that tile F/G = {fg} on "
                     f"{layout.name}; got block_f = {tl.bf}: choose block_f dividing {fg}")
  n, nf = tl.groups_per_block, tl.f_blocks
  x_spec = pl.BlockSpec((tl.bt, d), lambda i, g, j: (i, 0))
  w_spec = pl.BlockSpec((d, tl.bf), lambda i, g, j: (0, g * nf + j))
  y_spec = pl.BlockSpec((tl.bt, tl.bf), lambda i, g, j: (i, g * nf + j))
  kp = layout.kpad
  gate_spec = lambda c: pl.BlockSpec((gate_groups, kp(c.shape[1]), tl.bt), lambda i, g, j: (g, 0, i))
  xp = jnp.pad(x, ((0, tl.t_pad - t), (0, 0)))
  args = [xp, w1, mix.pad_gates(gates, kp(gates.shape[1]), tl.t_pad)]
  in_specs = [x_spec, w_spec, gate_spec(gates)]
  if spec.glu:
    args.append(w2)
    in_specs.append(w_spec)
  if spec.bi:
    args.append(mix.pad_gates(gates_u, kp(gates_u.shape[1]), tl.t_pad))
    in_specs.append(gate_spec(gates_u))
  y_shape = jax.ShapeDtypeStruct((tl.t_pad, f), x.dtype)
  outs = [y_shape] * (1 + ((2 if spec.glu else 1) if save else 0))
  cost = mix.cost_estimate(spec, [y_shape], y_shape, False)
  matmul_flops = 2 * tl.t_pad * d * f * (2 if spec.glu else 1)
  nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in args) + len(outs) * tl.t_pad * f * x.dtype.itemsize
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, spec=spec, lanes=mix.GroupLanes(n, fg), columns=columns,
                        bk=bk, save=save),
      out_shape=outs, grid=(tl.t_pad // tl.bt, groups // n, nf), in_specs=in_specs,
      out_specs=[y_spec] * len(outs), compiler_params=params, interpret=spec.interpret,
      cost_estimate=pl.CostEstimate(flops=cost.flops + matmul_flops,
                                    transcendentals=cost.transcendentals, bytes_accessed=nbytes),
      name="fused_up_mix_fwd",
  )(*args)
  return [o[:t] for o in outs] if tl.t_pad != t else outs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(spec: mix.Spec, bk: int, x, w1, w2, gates, gates_u):
  return _forward(spec, bk, False, x, w1, w2, gates, gates_u)[0]


def _fused_fwd(spec, bk, x, w1, w2, gates, gates_u):
  y, h, *u = _forward(spec, bk, True, x, w1, w2, gates, gates_u)
  return y, (x, w1, w2, h, u[0] if u else None, gates, gates_u)


def _fused_bwd(spec, bk, residuals, dy):
  x, w1, w2, h, u, gates, gates_u = residuals  # h, u (T, F): saved, as XLA saves SwiGLU's
  dh, dc, du, dcu = spec.layout.backward(spec, h, gates, u, gates_u, dy)
  dx = dh @ w1.T + (du @ w2.T if spec.glu else 0)
  dw1 = x.T @ dh
  dw2 = x.T @ du if spec.glu else None
  return dx.astype(x.dtype), dw1, dw2, dc, dcu


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_mix_product(x: Array, w1: Array, coef: Array, names: Sequence[str],
                      w2: Array | None = None, coef_u: Array | None = None,
                      names_u: Sequence[str] | None = None, *, interpret: bool | None = None,
                      block_t: int | None = None, block_f: int | None = None,
                      block_d: int | None = None, backend: str | None = None,
                      precision: str | None = None) -> Array:
  """`entry.mix_product(x·W1, coef, names, x·W2, coef_u, names_u)` with the matmuls fused.

  x: (..., D); w1, w2: (D, F) in x's dtype; coef, coef_u: (..., G, K) as for mix_product.
  block_d: the D slice per matmul step (None: 256, or D when it does not divide)."""
  names = entry._names(names, "names")
  names_u = entry._names(names_u, "names_u") if coef_u is not None else None
  if coef_u is not None and w2 is None:
    raise ValueError("coef_u is given without w2; the bi-sided product needs both")
  layout, interpret, precision = entry._resolve(backend, interpret, precision)
  spec = mix.Spec(names, names_u, w2 is not None, layout, interpret, precision, block_t, block_f)
  d = x.shape[-1]
  bk = block_d or (256 if d % 256 == 0 else d)
  if d % bk:
    raise ValueError(f"block_d = {bk} does not divide D = {d}; pass a divisor of D")
  return _fused_jit(x, w1, w2, coef, coef_u, spec=spec, bk=bk)


@functools.partial(jax.jit, static_argnames=("spec", "bk"))
def _fused_jit(x, w1, w2, coef, coef_u, *, spec: mix.Spec, bk: int):
  lead, f = x.shape[:-1], w1.shape[1]
  groups = entry._groups(coef, spec.names, lead, f, "coef")
  if coef_u is not None:
    groups = math.lcm(groups, entry._groups(coef_u, spec.names_u, lead, f, "coef_u"))
  gates = entry._lane_dense_gates(coef, lead, groups)
  gates_u = None if coef_u is None else entry._lane_dense_gates(coef_u, lead, groups)
  y = _fused(spec, bk, x.reshape(-1, x.shape[-1]), w1, w2, gates, gates_u)
  return y.reshape(*lead, f)
