"""The experts' FFNs on rows grouped by expert (dropless) and on (E, C, D) buffers (capacity).

Grouped matmuls (`model.moe.gmm`): `y[rows of group e] = x[rows of group e] @ w[e]`, for groups given
by their sizes, rows past Σ sizes left out. XLA's `jax.lax.ragged_dot` is the reference; on CPU (and by
default on NVIDIA GPUs) it lowers to a dense dot over a masked (E, rows, D) copy of its input: E× the
FLOPs and an O(E·rows·D) buffer. On accelerators the layer uses a kernel made for it:

    auto        tokamax on GPU and TPU (megablox on TPU without tokamax), ragged_dot on CPU
    tokamax     tokamax.ragged_dot (Mosaic GPU / Triton on GPU, Mosaic on TPU; XLA elsewhere);
                `pip install -e ".[kernels]"`
    megablox    jax's own TPU kernel (jax.experimental.pallas.ops.tpu.megablox.gmm): TPU only, and what
                the tests export for TPU from a CPU to show the accelerator path has no dense expansion
    ragged_dot  jax.lax.ragged_dot
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
from absl import flags, logging
from jax.ad_checkpoint import checkpoint_name

from moa_jax import ffn as ffn_lib, platforms
from moa_jax.ffn import FFNSpec

Array = jax.Array


def resolve_gmm(name: str) -> str:
  """`auto` -> the implementation for the default backend: tokamax where it is installed (the `kernels`
  extra), else megablox on TPU; ragged_dot on CPU, or (with a warning) on a GPU without tokamax."""
  has_tokamax = importlib.util.find_spec("tokamax") is not None
  if name == "tokamax" and not has_tokamax:
    raise ValueError("model.moe.gmm = 'tokamax' but tokamax is not installed; pip install -e '.[kernels]', "
                     "or set model.moe.gmm=auto")
  if name != "auto":
    return name
  backend = platforms.current()  # the platform compiled for (moa_jax.aot), else the host's
  if backend == "cpu":
    return "ragged_dot"
  if has_tokamax:
    return "tokamax"
  if backend == "tpu":
    return "megablox"
  logging.warning("model.moe.gmm=auto: tokamax is not installed, so grouped matmuls use jax.lax.ragged_dot, "
                  "which XLA may run as a dense masked matmul (E× the FLOPs); pip install -e '.[kernels]'")
  return "ragged_dot"


def _megablox(x: Array, w: Array, sizes: Array, out_dtype=None, interpret: bool = False) -> Array:
  """Mosaic TPU kernel (custom VJP: gmm for the input gradient, tgmm for the weights'). interpret=True
  runs the kernel body on any backend (tests)."""
  from jax.experimental.pallas.ops.tpu import megablox
  m, k = x.shape
  n = w.shape[-1]
  tm = min(128, -(-m // 8) * 8)
  xp = jnp.pad(x, ((0, -m % tm), (0, 0)))               # the kernel needs m divisible by its tile
  wp = jnp.pad(w, ((0, 0), (0, 0), (0, 128 - n))) if n < 128 else w   # narrow n (gate logits: G·K) to one tile
  tiling = (tm, min(128, k), 128)
  out = megablox.gmm(xp, wp, sizes.astype(jnp.int32), out_dtype or x.dtype, tiling, None, None, False, interpret)
  return out[:m, :n]


def _tokamax(x: Array, w: Array, sizes: Array, out_dtype=None) -> Array:
  import tokamax
  if not flags.FLAGS.is_parsed():  # tokamax reads its absl flags, parsing sys.argv (a foreign CLI's) if unparsed
    flags.FLAGS.mark_as_parsed()
  return tokamax.ragged_dot(x, w, sizes.astype(jnp.int32), preferred_element_type=out_dtype)


def _ragged_dot(x: Array, w: Array, sizes: Array, out_dtype=None) -> Array:
  return jax.lax.ragged_dot(x, w, sizes.astype(jnp.int32), preferred_element_type=out_dtype)


GMM_FNS = {"tokamax": _tokamax, "megablox": _megablox, "ragged_dot": _ragged_dot}


def gmm(x: Array, w: Array, sizes: Array, impl: str, out_dtype=None) -> Array:
  """x (M, K) rows grouped by expert, w (G, K, N), sizes (G,) -> (M, N) in out_dtype (default x's); rows
  past Σ sizes are zero, and so are their input gradients (kernels leave those rows unwritten, forward and
  backward)."""
  valid = (jnp.arange(x.shape[0]) < jnp.sum(sizes))[:, None]
  out = GMM_FNS[resolve_gmm(impl)](jnp.where(valid, x, jnp.zeros((), x.dtype)), w, sizes, out_dtype)
  return jnp.where(valid, out, jnp.zeros((), out.dtype))


def branches(spec: FFNSpec) -> tuple[str, ...]:
  return () if spec.mix == "fixed" else (("mix", "mix_u") if spec.bi_sided else ("mix",))


# Gate logits as a grouped matmul once E·G·K columns against every expert's kernel cost more than one tile
# of a grouped kernel (megablox pads G·K to 128 columns); below that, the plain matmul is cheaper.
GROUPED_GATE_COLUMNS = 128


def _row_coefs(rows: Array, ids: Array, sizes: Array, p: dict, spec: FFNSpec, impl: str) -> dict:
  """Each row's mixing coefficients (M, G, K) fp32 under its expert's LA coefficients or MoA gates. MoA
  gate logits, with many experts: a grouped matmul of the rows with their own expert's gate kernel (G·K
  columns, fp32 out), 2·D·G·K FLOPs a row; with few (E·G·K < GROUPED_GATE_COLUMNS): one plain matmul
  against every expert's kernel, then each row's own expert is picked."""
  coefs = {}
  for b in branches(spec):
    if spec.mix == "la":
      coefs[b] = p[b]["coef"][ids]                                              # (M, G, K)
      continue
    kernel = p[b]["gate_kernel"].astype(rows.dtype)                             # (E, D, G, K)
    e, d, g, k = kernel.shape
    if e * g * k >= GROUPED_GATE_COLUMNS:
      logits = gmm(rows, kernel.reshape(e, d, g * k), sizes, impl, jnp.float32).reshape(-1, g, k)
    else:
      logits = jnp.einsum("MD,EDGK->MEGK", rows, kernel, preferred_element_type=jnp.float32)
      logits = jnp.take_along_axis(logits, ids[:, None, None, None], axis=1)[:, 0]  # (M, G, K)
    bias = p[b]["gate_bias"][ids] if "gate_bias" in p[b] else None
    coefs[b] = ffn_lib.gates(spec, logits, bias)
  return coefs


def grouped_ffn(rows: Array, ids: Array, sizes: Array, p: dict, spec: FFNSpec, impl: str):
  """The experts' FFNs on rows sorted by expert: group e is the next sizes[e] rows; rows past Σ sizes
  come out zero. ids (M,): each row's expert (any valid index for padding rows). The hidden
  activations are named `moe_hidden` for the remat policies. p may hold a slice of F (w1, w2 columns,
  w3 rows): the output is then this slice's partial sum (unsorted_ffn).
  Returns (M, D) and the per-row coefficients."""
  dt = rows.dtype
  h = checkpoint_name(gmm(rows, p["w1"].astype(dt), sizes, impl), "moe_hidden")           # (M, F)
  u = checkpoint_name(gmm(rows, p["w2"].astype(dt), sizes, impl), "moe_hidden") if spec.type == "glu" else None
  coefs = _row_coefs(rows, ids, sizes, p, spec, impl)
  y = ffn_lib.mix_hidden(spec, h, u, coefs.get("mix"), coefs.get("mix_u"))
  out = gmm(y, p["w3"].astype(dt), sizes, impl)
  return out, coefs


def inverse_permutation(order: Array) -> Array:
  """The permutation that undoes `order`: x[order][inverse_permutation(order)] == x."""
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def unsorted_ffn(rows: Array, ids: Array, n_groups: int, p: dict, spec: FFNSpec, impl: str, tensor_axis=None):
  """grouped_ffn on rows in any order: ids (M,) each row's local expert, n_groups marking padding (its
  rows come out zero). The rows are sorted by expert, run, and put back in their order.

  With `tensor_axis` (T ranks), the tokens and F are both split over it: every rank's rows are
  all-gathered, run through this rank's slice of F, and the partial outputs reduce-scattered, so each
  rank gets the full output for its own rows: the FLOPs of M rows through F per rank, instead of every
  rank repeating all of them. Returns (M, D) and the rows' coefficients, both in the rows' order."""
  m = rows.shape[0]
  if tensor_axis is not None:
    rows = jax.lax.all_gather(rows, tensor_axis, tiled=True)               # (T·M, D)
    ids = jax.lax.all_gather(ids, tensor_axis, tiled=True)
  order = jnp.argsort(ids, stable=True)                                    # by expert, padding last
  sizes = jnp.bincount(ids, length=n_groups)                               # padding (n_groups) not counted
  out, coefs = grouped_ffn(rows[order], jnp.minimum(ids[order], n_groups - 1), sizes, p, spec, impl)
  back = inverse_permutation(order)
  out, coefs = out[back], {b: c[back] for b, c in coefs.items()}
  if tensor_axis is None:
    return out, coefs
  mine = jax.lax.axis_index(tensor_axis) * m
  return (jax.lax.psum_scatter(out, tensor_axis, scatter_dimension=0, tiled=True),
          {b: jax.lax.dynamic_slice_in_dim(c, mine, m) for b, c in coefs.items()})


def batched_ffn(xe: Array, p: dict, spec: FFNSpec, tensor_axis=None):
  """The experts' FFNs on capacity buffers xe (E, C, D) -> (E, C, D), and per-slot coefficients
  (`tensor_axis`: as grouped_ffn)."""
  dt = xe.dtype
  h = jnp.einsum("ECD,EDF->ECF", xe, p["w1"].astype(dt))
  u = jnp.einsum("ECD,EDF->ECF", xe, p["w2"].astype(dt)) if spec.type == "glu" else None
  coefs = {}
  for b in branches(spec):
    if spec.mix == "la":
      coefs[b] = p[b]["coef"][:, None]                                          # (E, 1, G, K)
      continue
    logits = jnp.einsum("ECD,EDGK->ECGK", xe, p[b]["gate_kernel"].astype(dt), preferred_element_type=jnp.float32)
    bias = p[b]["gate_bias"][:, None] if "gate_bias" in p[b] else None
    coefs[b] = ffn_lib.gates(spec, logits, bias)                                # (E, C, G, K)
  y = ffn_lib.mix_hidden(spec, h, u, coefs.get("mix"), coefs.get("mix_u"))
  out = jnp.einsum("ECF,EFD->ECD", y, p["w3"].astype(dt))
  return (out if tensor_axis is None else jax.lax.psum(out, tensor_axis)), coefs


def gate_sums(coefs: dict, valid: Array, moa: bool) -> dict:
  """Σ over valid rows of the MoA gates (mean over groups): (K,) per branch, for the gate metrics."""
  if not moa:
    return {}
  return {b: jnp.einsum("...GK,...->K", c, valid.astype(jnp.float32)) / c.shape[-2] for b, c in coefs.items()}

