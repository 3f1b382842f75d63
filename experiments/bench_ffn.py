"""FFN forward+backward time and memory: fixed, MoA-7 and bi-MoA-7, XLA vs the Pallas kernels.

Reproduces the H200 anchors of docs/kernel.md on whatever device is present (there: T=16384, d=2048, F=5632, bf16, K=7):

    python experiments/bench_ffn.py                       # H200 / TPU, the anchor shape
    python experiments/bench_ffn.py --skip kernel,copy    # the FFN table only (xla, pallas, fused)
    python experiments/bench_ffn.py --tokens=256 --d_model=128 --d_ff=256 --iters=2   # CPU

Prints three markdown tables and writes JSON to --out ($OUT/bench_ffn.json when OUT is set):
  1. each FFN variant's fwd+bwd step (grads for weights and input): median ms and XLA temp memory
     for impl "xla", "pallas" (separate mixing pass) and "fused" (mixing in the W1/W2 matmul
     epilogue), each × its family's XLA baseline (GELU MLP, SwiGLU);
  2. the mixing alone (fwd, fwd+bwd) against the HBM bytes it must move, in GB/s;
  3. a large device copy: the bandwidth ceiling.
Every measurement is wrapped: a failing lowering prints its error and the run continues.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import traceback

import jax
import jax.numpy as jnp

from moa_jax import activations, kernels
from moa_jax.kernels import entry
from bench_timing import fmt, median_ms, temp_mb  # experiments/bench_timing.py, beside this script

MOA = activations.PAPER_DICTIONARY  # the paper's seven functions, GELU in its tanh form


# ---------------------------------------------------------------------------------------------
# FFN variants: plain functions of (params, x); x (T, d), W1, W2 (d, F), W3 (F, d), U (d, K).


def _gates(x, w, b):
  return jax.nn.sigmoid((x @ w).astype(jnp.float32) + b)[:, None, :]  # (T, G=1, K)


def _hidden(p, x, impl, coef, names, glu=False, coef_u=None):
  """m(x·W1) [⊙ x·W2 | ⊙ m_u(x·W2)]: matmuls then the mixing, or both in one kernel (fused)."""
  names_u = None if coef_u is None else names
  if impl == "fused":
    return kernels.fused_mix_product(x, p["w1"], coef, names, p["w2"] if glu else None, coef_u,
                                     names_u)
  h = x @ p["w1"]  # (T, F)
  u = x @ p["w2"] if glu else None
  return kernels.mix_product(h, coef, names, u, coef_u, names_u, impl=impl)


def gelu_mlp(p, x, impl):
  if impl == "xla":
    return jax.nn.gelu(x @ p["w1"], approximate=True) @ p["w3"]
  return _hidden(p, x, impl, jnp.ones((1, 1)), ("gelu_tanh",)) @ p["w3"]


def moa_type1(p, x, impl):
  return _hidden(p, x, impl, _gates(x, p["u"], p["b"]), MOA) @ p["w3"]


def swiglu(p, x, impl):
  if impl == "xla":
    return (jax.nn.silu(x @ p["w1"]) * (x @ p["w2"])) @ p["w3"]
  return _hidden(p, x, impl, jnp.ones((1, 1)), ("silu",), glu=True) @ p["w3"]


def moa_one_sided(p, x, impl):
  return _hidden(p, x, impl, _gates(x, p["u"], p["b"]), MOA, glu=True) @ p["w3"]


def bi_moa(p, x, impl):
  a = _hidden(p, x, impl, _gates(x, p["u"], p["b"]), MOA, glu=True,
              coef_u=_gates(x, p["u2"], p["b2"]))
  return a @ p["w3"]


# (name, function, family baseline, GLU)
VARIANTS = [
    ("Type-I GELU MLP (baseline)", gelu_mlp, "Type-I GELU MLP (baseline)", False),
    ("Type-I MoA-7", moa_type1, "Type-I GELU MLP (baseline)", False),
    ("Type-II SwiGLU (baseline)", swiglu, "Type-II SwiGLU (baseline)", True),
    ("Type-II MoA-7 one-sided", moa_one_sided, "Type-II SwiGLU (baseline)", True),
    ("Type-II bi-MoA-7", bi_moa, "Type-II SwiGLU (baseline)", True),
]


def init(key, t, d, f, k, dtype):
  ks = jax.random.split(key, 8)
  normal = lambda key, shape, fan_in: (jax.random.normal(key, shape) / math.sqrt(fan_in)).astype(dtype)
  params = {"w1": normal(ks[0], (d, f), d), "w2": normal(ks[1], (d, f), d),
            "w3": normal(ks[2], (f, d), f), "u": normal(ks[3], (d, k), d),
            "b": jnp.zeros((k,), jnp.float32), "u2": normal(ks[4], (d, k), d),
            "b2": jnp.zeros((k,), jnp.float32)}
  x = jax.random.normal(ks[5], (t, d)).astype(dtype)
  dy = jax.random.normal(ks[6], (t, d)).astype(dtype)
  return params, x, dy


def train_step(fn, impl):
  """Forward + backward: gradients for every weight and for the input."""
  def step(params, x, dy):
    _, vjp = jax.vjp(lambda p, x: fn(p, x, impl), params, x)
    return vjp(dy)
  return jax.jit(step)


# ---------------------------------------------------------------------------------------------
# Measurement.


def attempt(label, errors, thunk):
  """Runs thunk(); on failure prints and records the error and returns None."""
  try:
    return thunk()
  except Exception as e:  # a failing lowering must not end the run
    message = f"{type(e).__name__}: {e}"
    print(f"[{label}] FAILED: {message[:2000]}")
    traceback.print_exc(limit=3)
    errors.append({"what": label, "error": message[:4000]})
    return None


def ratio(a, b):
  return None if a is None or b in (None, 0) else a / b


def bench_ffn(args, params, x, dy, errors, rows, save):
  for name, fn, _, _ in VARIANTS:
    row = {"variant": name}
    for impl in args.impls:
      step = train_step(fn, impl)
      row[f"{impl}_ms"] = attempt(f"{name} / {impl}", errors,
                                  lambda: median_ms(step, (params, x, dy), args.iters, args.warmup))
      row[f"{impl}_temp_mb"] = attempt(f"{name} / {impl} memory", errors,
                                       lambda: temp_mb(step, (params, x, dy)))
    rows.append(row)
    save()
    print(f"  {name}: " + ", ".join(f"{k}={fmt(v)}" for k, v in row.items() if k != "variant"),
          flush=True)
  by_name = {r["variant"]: r for r in rows}
  flops_per_matmul = 2 * args.tokens * args.d_model * args.d_ff * 3  # fwd + two bwd matmuls
  for (name, _, base, glu), row in zip(VARIANTS, rows):
    base_row = by_name[base]
    for impl in args.impls:
      row[f"{impl}_x_time"] = ratio(row[f"{impl}_ms"], base_row["xla_ms"])
      row[f"{impl}_x_mem"] = ratio(row[f"{impl}_temp_mb"], base_row["xla_temp_mb"])
      ms = row[f"{impl}_ms"]
      row[f"{impl}_tflops"] = None if ms is None else (3 if glu else 2) * flops_per_matmul / ms / 1e9


def print_ffn_table(rows, impls):
  head = (["variant"] + [f"{i} ms" for i in impls] + [f"{i} × base" for i in impls]
          + [f"{i} temp MB" for i in impls] + [f"{i} mem × base" for i in impls]
          + [f"{i} TFLOP/s" for i in impls])
  print("| " + " | ".join(head) + " |")
  print("|" + "---|" * len(head))
  for r in rows:
    cells = ([r["variant"]] + [fmt(r[f"{i}_ms"]) for i in impls]
             + [fmt(r[f"{i}_x_time"], ".2f") for i in impls]
             + [fmt(r[f"{i}_temp_mb"], ".0f") for i in impls]
             + [fmt(r[f"{i}_x_mem"], ".2f") for i in impls]
             + [fmt(r[f"{i}_tflops"], ".1f") for i in impls])
    print("| " + " | ".join(cells) + " |")


def bench_kernel(args, errors, dtype, rows, save):
  """The mixing alone, T×F operands, against the bytes it must move through HBM."""
  t, f, k = args.tokens, args.d_ff, len(MOA)
  ks = jax.random.split(jax.random.PRNGKey(1), 5)
  h, u, dy = (jax.random.normal(key, (t, f)).astype(dtype) for key in ks[:3])
  gates = jax.nn.sigmoid(jax.random.normal(ks[3], (t, 1, k)))
  gates_u = jax.nn.sigmoid(jax.random.normal(ks[4], (t, 1, k)))
  elem = t * f * jnp.dtype(dtype).itemsize
  # (name, operands, HBM bytes of fwd (read inputs, write y), of bwd (read inputs + dy, write grads))
  cases = [("Type-I MoA-7", (h, gates), 2 * elem, 3 * elem),
           ("one-sided MoA-7", (h, gates, u), 3 * elem, 5 * elem),
           ("bi-MoA-7", (h, gates, u, gates_u), 3 * elem, 5 * elem)]
  configs = [("xla", {}), ("pallas", {}), ("pallas exact tanh", {"precision": "exact"})] + [
      (f"pallas {bt}x{bf}", {"block_t": bt, "block_f": bf}) for bt, bf in args.sweep]
  for name, operands, fwd_bytes, bwd_bytes in cases:
    gate_bytes = sum(g.size * 4 for g in operands[1::2])
    for label, blocks in configs:
      if label == "xla":
        mixer = functools.partial(activations.mix_product_reference, names=MOA)
      else:
        mixer = functools.partial(entry.mix_product, names=MOA, **blocks)
      call = lambda h, c, u=None, cu=None: mixer(h, c, u=u, coef_u=cu,
                                                 names_u=None if cu is None else MOA)
      forward = jax.jit(call)

      @jax.jit
      def forward_backward(*ops):
        y, vjp = jax.vjp(call, *ops)
        return y, vjp(dy)

      fwd_ms = attempt(f"kernel {name} / {label} fwd", errors,
                       lambda: median_ms(forward, operands, args.iters, args.warmup))
      both_ms = attempt(f"kernel {name} / {label} fwd+bwd", errors,
                        lambda: median_ms(forward_backward, operands, args.iters, args.warmup))
      gbps = lambda nbytes, ms: None if ms is None else nbytes / ms / 1e6
      row = {"case": name, "impl": label, "fwd_ms": fwd_ms,
             "fwd_gbps": gbps(fwd_bytes + gate_bytes, fwd_ms), "fwd_bwd_ms": both_ms,
             "fwd_bwd_gbps": gbps(fwd_bytes + bwd_bytes + 3 * gate_bytes, both_ms)}
      rows.append(row)
      save()
      print(f"  {name} / {label}: fwd {fmt(fwd_ms)} ms, fwd+bwd {fmt(both_ms)} ms", flush=True)


def print_kernel_table(rows):
  print("| mixing | impl | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['case']} | {r['impl']} | {fmt(r['fwd_ms'])} | {fmt(r['fwd_gbps'], '.0f')} | "
          f"{fmt(r['fwd_bwd_ms'])} | {fmt(r['fwd_bwd_gbps'], '.0f')} |")


def bench_copy(args, errors, dtype):
  n = args.copy_mib * 2**20 // jnp.dtype(dtype).itemsize
  x = jnp.ones((n,), dtype)
  negate = jax.jit(jnp.negative)  # reads and writes every byte; not simplified away
  ms = attempt("device copy", errors, lambda: median_ms(negate, (x,), args.iters, args.warmup))
  gbps = None if ms is None else 2 * x.nbytes / ms / 1e6
  print(f"| device copy (read + write {args.copy_mib} MiB) | {fmt(ms)} ms | {fmt(gbps, '.0f')} GB/s |")
  return {"mib": args.copy_mib, "ms": ms, "gbps": gbps}


def parse_blocks(text):
  return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=16384)
  parser.add_argument("--d_model", type=int, default=2048)
  parser.add_argument("--d_ff", type=int, default=5632)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--impls", default="xla,pallas,fused",
                      help="comma-separated: xla, pallas, fused")
  parser.add_argument("--sweep", type=parse_blocks, default=None,
                      help="extra kernel blocks to time alone, e.g. 2x512,4x512 (block_t x "
                           "block_f); default: a few on GPU, none elsewhere")
  parser.add_argument("--copy_mib", type=int, default=None,
                      help="device-copy size (default 1024 MiB on accelerators, 64 on CPU)")
  parser.add_argument("--skip", default="", help="comma-separated sections to skip: ffn,kernel,copy")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  args.impls = [i for i in args.impls.split(",") if i]
  platform = jax.default_backend()
  if args.sweep is None:
    args.sweep = [(1, 512), (2, 512), (4, 512), (8, 512)] if platform == "gpu" else []
  if args.copy_mib is None:
    args.copy_mib = 64 if platform == "cpu" else 1024
  out = args.out or os.path.join(os.environ.get("OUT", "."), "bench_ffn.json")
  skip = set(args.skip.split(","))
  dtype = jnp.dtype(args.dtype)

  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({platform}), jax {jax.__version__}; T={args.tokens}, "
        f"d={args.d_model}, F={args.d_ff}, K={len(MOA)}, {dtype.name}, median of {args.iters}")
  errors: list[dict] = []
  result = {"device": device.device_kind, "platform": platform, "jax": jax.__version__,
            "tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff, "k": len(MOA),
            "dtype": dtype.name, "iters": args.iters, "errors": errors}

  def save():
    with open(out, "w") as fh:
      json.dump(result, fh, indent=1)

  if "ffn" not in skip:
    params, x, dy = init(jax.random.PRNGKey(0), args.tokens, args.d_model, args.d_ff, len(MOA),
                         dtype)
    result["ffn"] = []
    bench_ffn(args, params, x, dy, errors, result["ffn"], save)
    save()
    print()
    print_ffn_table(result["ffn"], args.impls)
    print()
    save()
  if "kernel" not in skip:
    result["kernel"] = []
    bench_kernel(args, errors, dtype, result["kernel"], save)
    print()
    print_kernel_table(result["kernel"])
    print()
    save()
  if "copy" not in skip:
    result["copy"] = bench_copy(args, errors, dtype)
  save()
  print(f"\nwrote {out}; {len(errors)} error(s)")


if __name__ == "__main__":
  main()
