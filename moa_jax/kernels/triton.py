"""GPU layout of the fused mixing kernel (Pallas Triton), around `mix.forward_block` / `backward_block`.

Forward: grid (T/bt, G, Fg/bf), one (bt, bf) block per program.
Backward: grid (T/bt, G); each program loops over its group's Fg/bf channel blocks, writing dh
and du per block and accumulating dm·b_j per basis elementwise in registers (one FMA per basis
and element); the channel sums happen once, after the loop, so dc leaves the kernel finished:
no per-F-block partial sums, no second reduction, no cross-thread shuffles inside the loop.

Blocks are powers of two (Triton). Block sizes are set by elements per thread, the quantity that
decides register spills (experiments/kernel_static.py compiles every variant for sm_90a and
reads ptxas' spill bytes): the targets below are the largest that compile spill-free.
Shapes the blocks do not tile are zero-padded outside the kernel to the power-of-two block that
pads least (Triton loads through `ref[...]` are unmasked).
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


def _pl_triton():
  from jax.experimental.pallas import triton as pl_triton  # deprecated upstream: import lazily
  return pl_triton


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str = "gpu"
  fwd_elems_per_thread: int = 16
  bwd_elems_per_thread: int = 4
  num_warps: int = 4
  target_f: int = 512

  def fast_tanh(self, x: Array) -> Array:
    return _pl_triton().approx_tanh(x)  # tanh.approx.f32: one MUFU op

  def kpad(self, k: int) -> int:
    return mix.next_pow2(k)

  def tiling(self, t: int, fg: int, backward: bool, block_t, block_f) -> mix.Tiling:
    mix.check_block(block_t, "block_t", 1, True, self.name)
    mix.check_block(block_f, "block_f", 1, True, self.name)
    bf, f_pad = mix.pow2_tile(fg, block_f or self.target_f, floor=min(64, block_f or 64))
    per_thread = self.bwd_elems_per_thread if backward else self.fwd_elems_per_thread
    elems = per_thread * 32 * self.num_warps
    bt, t_pad = mix.pow2_tile(t, block_t or max(1, elems // bf))
    return mix.Tiling(bt, bf, t_pad, f_pad)

  def compiler_params(self):
    return _pl_triton().CompilerParams(num_warps=self.num_warps)

  def forward(self, spec: mix.Spec, h, gates, u, gates_u) -> Array:
    (t, f), groups = h.shape, gates.shape[0]
    tl = self.tiling(t, f // groups, False, spec.block_t, spec.block_f)
    nf = tl.f_blocks
    x_spec = pl.BlockSpec((tl.bt, tl.bf), lambda i, g, j: (i, g * nf + j))
    args, in_specs = mix.block_inputs(spec, tl, self.kpad, h, gates, u, gates_u, x_spec,
                                      lambda i, g, j: (g, 0, i))
    y_shape = jax.ShapeDtypeStruct(args[0].shape, h.dtype)
    y = pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec), out_shape=y_shape,
        grid=(tl.t_pad // tl.bt, groups, nf), in_specs=in_specs, out_specs=x_spec,
        compiler_params=self.compiler_params(), interpret=spec.interpret,
        cost_estimate=mix.cost_estimate(spec, args, y_shape, False), name="mix_product_fwd",
    )(*args)
    return mix.unpad_x(y, groups, t, f // groups, tl)

  def backward(self, spec: mix.Spec, h, gates, u, gates_u, dy):
    (t, f), groups = h.shape, gates.shape[0]
    k, k_u = gates.shape[1], None if gates_u is None else gates_u.shape[1]
    tl = self.tiling(t, f // groups, True, spec.block_t, spec.block_f)
    row_spec = pl.BlockSpec((tl.bt, tl.f_pad), lambda i, g: (i, g))  # one group's channels
    args, in_specs = mix.block_inputs(spec, tl, self.kpad, h, gates, u, gates_u, row_spec,
                                      lambda i, g: (g, 0, i))
    args.append(mix.pad_x(dy, groups, tl))
    in_specs.append(row_spec)
    dc_spec = lambda kp: pl.BlockSpec((None, kp, tl.bt), lambda i, g: (g, 0, i))
    dc_shape = lambda kp: jax.ShapeDtypeStruct((groups, kp, tl.t_pad), jnp.float32)
    x_shape = jax.ShapeDtypeStruct(args[0].shape, h.dtype)
    out_shape, out_specs = [x_shape, dc_shape(self.kpad(k))], [row_spec, dc_spec(self.kpad(k))]
    if spec.glu:
      out_shape.append(jax.ShapeDtypeStruct(args[0].shape, u.dtype))
      out_specs.append(row_spec)
    if spec.bi:
      out_shape.append(dc_shape(self.kpad(k_u)))
      out_specs.append(dc_spec(self.kpad(k_u)))
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, spec=spec, bf=tl.bf, nf=tl.f_blocks),
        out_shape=out_shape, grid=(tl.t_pad // tl.bt, groups), in_specs=in_specs,
        out_specs=out_specs, compiler_params=self.compiler_params(), interpret=spec.interpret,
        cost_estimate=mix.cost_estimate(spec, args, out_shape, True), name="mix_product_bwd",
    )(*args)
    fg = f // groups
    dh = mix.unpad_x(outs[0], groups, t, fg, tl)
    dc = outs[1][:, :k, :t]  # (G, K, T)
    du = mix.unpad_x(outs[2], groups, t, fg, tl) if spec.glu else None
    dcu = outs[3][:, :k_u, :t] if spec.bi else None
    return dh, dc, du, dcu


LAYOUT = Layout()
CUSTOM_CALL = "__gpu$xla.gpu.triton"  # how Pallas Triton kernels appear in lowered modules


def export_for_gpu(fn, *args, device_kind: str = "NVIDIA H200"):
  """`jax.export` of fn for CUDA on a machine without a GPU (the Triton kernels are lowered to
  Triton IR, not compiled). jax ≥ 0.12 reads the GPU's compute capability while lowering, so the
  target is given as an abstract device; older jax falls back to sm_90 by itself."""
  device_cls = getattr(jax.sharding, "AbstractDevice", None)
  checks = [jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALL)]
  export = lambda: jax.export.export(fn, platforms=("cuda",), disabled_checks=checks)(*args)
  if device_cls is None:
    return export()
  device = device_cls(device_kind=device_kind, num_cores=None, platform="gpu")
  with jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
    return export()


def _columns(c_ref, k: int) -> list[Array]:
  return [c_ref[i][:, None] for i in range(k)]  # (bt, 1) each; no slicing of loaded values


def _split_refs(refs, spec: mix.Spec):
  refs = list(refs)
  h_ref, c_ref = refs.pop(0), refs.pop(0)
  u_ref = refs.pop(0) if spec.glu else None
  cu_ref = refs.pop(0) if spec.bi else None
  return h_ref, c_ref, u_ref, cu_ref, refs


def _forward_kernel(*refs, spec: mix.Spec):
  h_ref, c_ref, u_ref, cu_ref, (y_ref,) = _split_refs(refs, spec)
  cols = _columns(c_ref, len(spec.names))
  cols_u = _columns(cu_ref, len(spec.names_u)) if spec.bi else None
  u = u_ref[...].astype(jnp.float32) if spec.glu else None
  y = mix.forward_block(spec, h_ref[...].astype(jnp.float32), cols, u, cols_u)
  y_ref[...] = y.astype(y_ref.dtype)


def _backward_kernel(*refs, spec: mix.Spec, bf: int, nf: int):
  h_ref, c_ref, u_ref, cu_ref, rest = _split_refs(refs, spec)
  dy_ref, dh_ref, dc_ref, *rest = rest
  du_ref = rest.pop(0) if spec.glu else None
  dcu_ref = rest.pop(0) if spec.bi else None
  cols = _columns(c_ref, len(spec.names))
  cols_u = _columns(cu_ref, len(spec.names_u)) if spec.bi else None
  bases = forms.fn_bases(spec.names)
  bases_u = forms.fn_bases(spec.names_u) if spec.bi else ()
  bt = h_ref.shape[0]

  def step(j, sums):
    cols_j = (slice(None), pl.ds(pl.multiple_of(j * bf, bf), bf))
    load = lambda ref: ref[cols_j].astype(jnp.float32)
    u = load(u_ref) if spec.glu else None
    dh, du, s, s_u = mix.backward_block(spec, load(h_ref), cols, u, cols_u, load(dy_ref),
                                        lambda x: x)  # summed over channels after the loop
    dh_ref[cols_j] = dh.astype(dh_ref.dtype)
    if spec.glu:
      du_ref[cols_j] = du.astype(du_ref.dtype)
    new = [s[b] for b in bases] + ([s_u[b] for b in bases_u] if spec.bi else [])
    return tuple(a + b for a, b in zip(sums, new))

  zeros = tuple(jnp.zeros((bt, bf), jnp.float32) for _ in range(len(bases) + len(bases_u)))
  sums = [jnp.sum(acc, axis=1) for acc in lax.fori_loop(0, nf, step, zeros)]  # (bt,) each
  for k, dc in enumerate(forms.coef_grads(spec.names, dict(zip(bases, sums)))):
    dc_ref[k] = dc
  if spec.bi:
    for k, dc in enumerate(forms.coef_grads(spec.names_u, dict(zip(bases_u, sums[len(bases):])))):
      dcu_ref[k] = dc
