"""The public entry of the fused mixing kernel: picks the backend layout and runs the custom VJP.

    mix_product(h, coef, names, u, coef_u, names_u, backend=..., precision=...)

Import arrows run one way: forms (the dictionary as bases) ← mix (block maths, tiling, custom
VJP) ← triton / tpu (the layouts and pallas_calls) ← entry (this module: which layout, the
jitted public call, the shard_map wrapper) ← kernels/__init__ (the xla | pallas seam).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moa_jax import activations, platforms
from moa_jax.kernels import mix, tpu, triton

Array = jax.Array
PRECISIONS = ("exact", "fast")


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
  spec = mix.Spec(names, names_u, u is not None, layout, interpret, precision, block_t, block_f)
  return _mix_product_jit(h, coef, u, coef_u, spec=spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _mix_product_jit(h, coef, u, coef_u, *, spec: mix.Spec):
  names, names_u = spec.names, spec.names_u
  lead, f = h.shape[:-1], h.shape[-1]
  groups = _groups(coef, names, lead, f, "coef")
  if coef_u is not None:
    groups = math.lcm(groups, _groups(coef_u, names_u, lead, f, "coef_u"))
  t = math.prod(lead)
  gates = _lane_dense_gates(coef, lead, groups)
  gates_u = None if coef_u is None else _lane_dense_gates(coef_u, lead, groups)
  u2 = None if u is None else u.reshape(t, f)
  y = mix.mix_product_vjp(spec, h.reshape(t, f), gates, u2, gates_u)
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
