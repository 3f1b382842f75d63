"""MoE layer forward+backward: dropless (ragged_dot) vs capacity (einsum dispatch), fixed vs MoA experts.

    python experiments/bench_moe.py                                        # H200 / TPU: 8 experts top-2
    python experiments/bench_moe.py --tokens=512 --d_model=64 --d_ff_expert=128 --iters=3   # CPU

One device, no mesh (expert parallelism is checked for correctness in tests/test_moe_parallel.py).
Each row times `moa_jax.moe.MoE` (router, top-k, experts, combine) forward + backward (gradients for
every parameter and the input), median of --iters, and reports tokens/s, TFLOP/s over the active
matmul FLOPs (6 · (D·E + k · matmul params of one expert) per token) and XLA's temp memory. Dense
rows run one FFN of width k·F on every token: the same matmul FLOPs as the routed experts, so
"× dense" is the MoE's overhead (routing, sorting, grouped matmuls) over a plain FFN of equal
compute. Note the capacity path's one-hot dispatch is O(tokens²) in memory and FLOPs: a reference.
On XLA:CPU, `jax.lax.ragged_dot` lowers to a dense dot over a masked (E, rows, D) copy of its input
(E× the FLOPs; read the HLO), so dropless trails capacity there. Whether XLA:GPU takes a grouped-GEMM
path at the installed jaxlib is what this bench measures (public reports for jaxlib 0.10: dense there too).
Prints a markdown table and writes JSON to --out ($OUT/bench_moe.json when OUT is set).
Imports only jax/flax/numpy and moa_jax modules that need no ml_collections / grain.
"""

from __future__ import annotations

import argparse
import json
import os
import traceback

import jax
import jax.numpy as jnp
from flax.core import meta

from moa_jax.activations import PAPER_DICTIONARY
from moa_jax.ffn import FFN, FFNSpec
from moa_jax.moe import MoE, MoESpec
from bench_timing import fmt, median_ms, temp_mb  # experiments/bench_timing.py, beside this script

EXPERTS = {  # expert FFN variants: fixed SwiGLU, one-sided MoA-7, bi-MoA-7 (the paper's best)
    "swiglu": dict(type="glu", mix="fixed", activations=("silu",), primary="silu"),
    "moa": dict(type="glu", mix="moa", activations=PAPER_DICTIONARY, primary="silu"),
    "bimoa": dict(type="glu", mix="moa", activations=PAPER_DICTIONARY, primary="silu", sides="bi"),
}


def layers(args):
  """(name, expert variant, path or 'dense', module)."""
  dtype = jnp.dtype(args.dtype)
  out = []
  for variant in args.experts:
    expert = FFNSpec(**EXPERTS[variant], d_ff=args.d_ff_expert, impl=args.impl)
    dense = FFNSpec(**EXPERTS[variant], d_ff=args.top_k * args.d_ff_expert, impl=args.impl)
    out.append((f"dense {variant} F={dense.d_ff}", variant, "dense", FFN(dense, dtype)))
    for path in args.paths:
      spec = MoESpec(num_experts=args.num_experts, top_k=args.top_k, path=path,
                     capacity_factor=args.capacity_factor)
      out.append((f"MoE {variant} {path}", variant, path, MoE(spec, expert, dtype)))
  return out


def step_fn(module):
  """Forward + backward: gradients for every parameter and for the input."""
  def step(params, x, dy):
    def f(p, x):
      return module.apply({"params": p}, x, mutable=["intermediates"])[0]
    _, vjp = jax.vjp(f, params, x)
    return vjp(dy)
  return jax.jit(step)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--d_model", type=int, default=2048)
  parser.add_argument("--d_ff_expert", type=int, default=5632)
  parser.add_argument("--num_experts", type=int, default=8)
  parser.add_argument("--top_k", type=int, default=2)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--experts", default="swiglu,moa,bimoa", help="comma-separated: " + ",".join(EXPERTS))
  parser.add_argument("--paths", default="dropless,capacity", help="comma-separated: dropless, capacity")
  parser.add_argument("--impl", default="xla", help="mixing implementation: xla | pallas")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  args.experts = [e for e in args.experts.split(",") if e]
  args.paths = [p for p in args.paths.split(",") if p]
  out = args.out or os.path.join(os.environ.get("OUT", "."), "bench_moe.json")
  device = jax.devices()[0]
  d, f, e, k = args.d_model, args.d_ff_expert, args.num_experts, args.top_k
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; tokens={args.tokens}, "
        f"d={d}, F_expert={f}, E={e}, top_k={k}, capacity_factor={args.capacity_factor}, {args.dtype}, "
        f"mixing {args.impl}, median of {args.iters}", flush=True)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (1, args.tokens, d)).astype(args.dtype)
  dy = jax.random.normal(keys[1], (1, args.tokens, d)).astype(args.dtype)
  rows, errors = [], []
  result = {"device": device.device_kind, "jax": jax.__version__, **{k_: v for k_, v in vars(args).items()},
            "rows": rows, "errors": errors}
  for name, variant, path, module in layers(args):
    row = {"layer": name, "experts": variant, "path": path}
    try:
      params = meta.unbox(jax.jit(module.init)(keys[2], x)["params"])
      step = step_fn(module)
      ms = median_ms(step, (params, x, dy), args.iters, args.warmup)
      matmul_per_token = (3 if EXPERTS[variant]["type"] == "glu" else 2) * d * f * k + (0 if path == "dense" else d * e)
      row.update(ms=ms, tokens_per_s=args.tokens / ms * 1e3,
                 tflops=6 * matmul_per_token * args.tokens / ms / 1e9, temp_mb=temp_mb(step, (params, x, dy)))
    except Exception as err:  # a failing lowering must not end the run
      print(f"[{name}] FAILED: {type(err).__name__}: {str(err)[:2000]}")
      traceback.print_exc(limit=3)
      errors.append({"what": name, "error": f"{type(err).__name__}: {err}"[:4000]})
    rows.append(row)
    print(f"  {name}: " + ", ".join(f"{k_}={fmt(v) if isinstance(v, float) else v}" for k_, v in row.items()
                                    if k_ not in ("layer", "experts", "path")), flush=True)
  dense = {r["experts"]: r.get("ms") for r in rows if r["path"] == "dense"}
  for r in rows:
    r["x_dense"] = None if r.get("ms") is None or not dense.get(r["experts"]) else r["ms"] / dense[r["experts"]]
  print("\n| layer | ms | tokens/s | TFLOP/s (active) | × dense of equal FLOPs | temp MB |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['layer']} | {fmt(r.get('ms'))} | {fmt(r.get('tokens_per_s'), ',.0f')} | "
          f"{fmt(r.get('tflops'), '.2f')} | {fmt(r.get('x_dense'), '.2f')} | {fmt(r.get('temp_mb'), '.0f')} |")
  with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
  print(f"\nwrote {out}; {len(errors)} error(s)")


if __name__ == "__main__":
  main()
