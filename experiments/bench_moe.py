"""MoE layer forward+backward: dropless (grouped matmuls) vs capacity vs a dense FFN of equal FLOPs.

    python experiments/bench_moe.py                     # GPU / TPU: timed, 8 experts top-2, bi-MoA/MoA/SwiGLU
    python experiments/bench_moe.py --static            # no device: FLOPs and memory from compiled/exported HLO
    python experiments/bench_moe.py --tokens=512 --d_model=64 --d_ff_expert=128 --iters=3   # CPU smoke test
    python experiments/bench_moe.py --exchange          # every local device on mesh axis `expert`: the
                                                        # all-to-all exchange alone, ragged vs padded

One device, no mesh: N tokens, all E experts local (under balanced expert parallelism each device runs
the same N·k rows). Dense rows run one FFN of width k·F on every token: the matmul FLOPs of the routed
experts, so "× dense" is the MoE's overhead (routing, sorting, grouped matmuls) over a plain FFN.

Timed mode: median of --iters of forward + backward (gradients for every parameter and the input), with
tokens/s, TFLOP/s over the active matmul FLOPs (6 · (D·E + k · matmul params of one expert) per token) and
XLA's temp memory; `--gmms` picks the grouped-matmul implementations to compare (model.moe.gmm).

Static mode (--static) needs no accelerator. For each layer it reports
  cpu_gflop       XLA:CPU `cost_analysis()` of the compiled fwd+bwd (gmm=ragged_dot: the dense masked
                  lowering XLA uses on CPU and, by default, on NVIDIA GPUs)
  tpu_gflop       matmul FLOPs of the fwd+bwd exported for TPU with gmm=megablox: every dot_general in the
                  StableHLO (2 · output size · contracted size) plus each Mosaic kernel's own cost estimate
                  (2·m·k·n for a grouped matmul over m rows), functions counted once per call
  kernels         Mosaic custom calls in that export
  dense_expanded  tensors in that export shaped (E, ≥ N·k rows, ...): a dense masked expansion (want 0)
and writes JSON. Prints a markdown table and writes JSON to --out ($OUT/bench_moe.json when OUT is set).
Imports only jax/flax/numpy and moa_jax modules that need no ml_collections / grain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
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


def layers(args, gmms):
  """(name, expert variant, path or 'dense', module)."""
  dtype = jnp.dtype(args.dtype)
  out = []
  for variant in args.experts:
    expert = FFNSpec(**EXPERTS[variant], d_ff=args.d_ff_expert, impl=args.impl)
    dense = FFNSpec(**EXPERTS[variant], d_ff=args.top_k * args.d_ff_expert, impl=args.impl)
    out.append((f"dense {variant} F={dense.d_ff}", variant, "dense", FFN(dense, dtype)))
    for path in args.paths:
      for gmm in (gmms if path == "dropless" else ("auto",)):
        spec = MoESpec(num_experts=args.num_experts, top_k=args.top_k, path=path,
                       capacity_factor=args.capacity_factor, gmm=gmm)
        label = f"MoE {variant} {path}" + (f" gmm={gmm}" if path == "dropless" else "")
        out.append((label, variant, path, MoE(spec, expert, dtype)))
  return out


def step_fn(module):
  """Forward + backward: the output, the sown statistics (the losses a train step adds) and the gradients
  for every parameter and the input. Everything computed is returned, so jit deletes nothing that a
  training step would keep (`dead_matmuls` checks)."""
  def step(params, x, dy):
    def f(p, x):
      return module.apply({"params": p}, x, mutable=["intermediates"])
    y, vjp, inter = jax.vjp(f, params, x, has_aux=True)
    return y, inter, vjp(dy)
  return jax.jit(step)


_MATMULS = ("dot_general", "ragged_dot_general")


def _matmuls(jaxpr) -> int:
  """dot_general / ragged_dot_general equations in a jaxpr, through its sub-jaxprs (jit, custom_vjp, ...)."""
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name in _MATMULS
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        n += _matmuls(sub) if hasattr(sub, "eqns") else 0
  return n


def dead_matmuls(step, *args) -> int:
  """Matmuls in `step`'s jaxpr whose results reach no output: what jit would delete before compiling
  (a benchmark that returns too little measures less than the training step does)."""
  from jax.interpreters import partial_eval as pe
  jaxpr = jax.make_jaxpr(step)(*args).jaxpr
  live, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  return _matmuls(jaxpr) - _matmuls(live)


# ---- Static analysis of an exported StableHLO module -------------------------------------------------

_FUNC = re.compile(r"func\.func (?:public |private )?@([\w.$-]+)\(")
_CALL = re.compile(r"(?<!custom_)call @([\w.$-]+)\(")
_DOT = re.compile(r"stablehlo\.dot_general .*contracting_dims = \[([\d, ]*)\] x .*: \(tensor<([^>]*)>, tensor<[^>]*>\)"
                  r" -> tensor<([^>]*)>")
_KERNEL_FLOPS = re.compile(r"\\22flops\\22:\s*(\d+)")


def _dims(t: str) -> list[int]:
  return [int(v) for v in re.findall(r"(\d+)x", t)]  # "8x16xbf16" -> [8, 16]


def stablehlo_flops(text: str) -> tuple[float, int]:
  """Matmul FLOPs of an exported module's `main` (dot_generals + Mosaic kernels' cost estimates, through
  calls) and the number of Mosaic kernel launches."""
  starts = [(m.start(), m.group(1)) for m in _FUNC.finditer(text)] + [(len(text), None)]
  own, calls, kernels = {}, {}, {}
  for (begin, name), (end, _) in zip(starts, starts[1:]):
    body = text[begin:end]
    flops, n_kernels = 0, 0
    for line in body.splitlines():
      dot = _DOT.search(line)
      if dot:
        lhs, out = _dims(dot.group(2)), _dims(dot.group(3))
        contracted = math.prod(lhs[int(i)] for i in dot.group(1).split(",") if i.strip())
        flops += 2 * math.prod(out) * contracted
      if "tpu_custom_call" in line:
        n_kernels += 1
        flops += sum(int(v) for v in _KERNEL_FLOPS.findall(line))
    own[name], kernels[name] = flops, n_kernels
    calls[name] = _CALL.findall(body)

  def total(name, seen=()):
    sub = [total(c, seen + (name,)) for c in calls.get(name, []) if c not in seen]
    return own[name] + sum(s[0] for s in sub), kernels[name] + sum(s[1] for s in sub)
  return total("main")


def dense_expanded(text: str, experts: int, rows: int) -> int:
  """Tensor types in the module shaped (experts, ≥ rows, ...)."""
  return sum(1 for t in set(re.findall(r"tensor<([^>]*)>", text))
             if len(_dims(t)) >= 3 and _dims(t)[0] == experts and _dims(t)[1] >= rows)


def static_row(module, x, experts: int, rows: int, tpu_module=None) -> dict:
  params = meta.unbox(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
  step = step_fn(module)
  compiled = step.lower(params, x, x).compile()
  row = {"cpu_gflop": compiled.cost_analysis()["flops"] / 1e9,
         "cpu_temp_mib": compiled.memory_analysis().temp_size_in_bytes / 2**20}
  exported = jax.export.export(step_fn(tpu_module or module), platforms=("tpu",))(params, x, x)
  text = exported.mlir_module()
  flops, kernels = stablehlo_flops(text)
  row.update(tpu_gflop=flops / 1e9, kernels=kernels, dense_expanded=dense_expanded(text, experts, rows))
  return row


def run_static(args, out):
  dtype = jnp.dtype(args.dtype)
  x = jax.ShapeDtypeStruct((1, args.tokens, args.d_model), dtype)
  rows, rows_routed = [], args.tokens * args.top_k
  for variant in args.experts:
    expert = FFNSpec(**EXPERTS[variant], d_ff=args.d_ff_expert)
    dense = FFN(FFNSpec(**EXPERTS[variant], d_ff=args.top_k * args.d_ff_expert), dtype)
    moe = lambda gmm, path="dropless": MoE(MoESpec(num_experts=args.num_experts, top_k=args.top_k, path=path,
                                                   capacity_factor=args.capacity_factor, gmm=gmm), expert, dtype)
    for name, module, tpu in [(f"dense {variant} F={args.top_k * args.d_ff_expert}", dense, None),
                              (f"MoE {variant} dropless", moe("ragged_dot"), moe("megablox")),
                              (f"MoE {variant} capacity {args.capacity_factor}", moe("ragged_dot", "capacity"), None)]:
      row = {"layer": name, "experts": variant}
      try:
        row.update(static_row(module, x, args.num_experts, rows_routed, tpu))
      except Exception as err:
        traceback.print_exc(limit=3)
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
      rows.append(row)
      print(f"  {name}: {row}", flush=True)
  base = {r["experts"]: r for r in rows if r["layer"].startswith("dense")}
  for r in rows:
    for key in ("cpu_gflop", "tpu_gflop"):
      if key in r and key in base[r["experts"]]:
        r[f"{key}_x_dense"] = r[key] / base[r["experts"]][key]
  print("\n| layer | CPU GFLOP (cost_analysis) | × dense | CPU temp MiB | TPU-export matmul GFLOP | × dense |"
        " Mosaic kernels | (E, rows, ·) tensors |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['layer']} | {fmt(r.get('cpu_gflop'), '.2f')} | {fmt(r.get('cpu_gflop_x_dense'), '.2f')} | "
          f"{fmt(r.get('cpu_temp_mib'), '.0f')} | {fmt(r.get('tpu_gflop'), '.2f')} | "
          f"{fmt(r.get('tpu_gflop_x_dense'), '.2f')} | {r.get('kernels', '—')} | {r.get('dense_expanded', '—')} |")
  out_json = {"mode": "static", "jax": jax.__version__, **vars(args), "rows": rows}
  return out_json


def run_timed(args):
  device = jax.devices()[0]
  d, f, e, k = args.d_model, args.d_ff_expert, args.num_experts, args.top_k
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; tokens={args.tokens}, "
        f"d={d}, F_expert={f}, E={e}, top_k={k}, capacity_factor={args.capacity_factor}, {args.dtype}, "
        f"mixing {args.impl}, median of {args.iters}", flush=True)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (1, args.tokens, d)).astype(args.dtype)
  dy = jax.random.normal(keys[1], (1, args.tokens, d)).astype(args.dtype)
  rows, errors = [], []
  result = {"device": device.device_kind, "jax": jax.__version__, **vars(args), "rows": rows, "errors": errors}
  for name, variant, path, module in layers(args, args.gmms):
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
  return result


def run_exchange(args):
  """The expert-parallel exchange alone (model.moe.transport), forward + backward, on every local device
  as mesh axis `expert`: --tokens per device, uniform random top-k routing, experts replaced by the
  identity, so the time is the all-gathers of counts, the sort and the two all-to-alls each way."""
  from jax.sharding import PartitionSpec as P
  from moa_jax.moe.exchange import exchange
  shards, n, d, e, k = jax.device_count(), args.tokens, args.d_model, args.num_experts, args.top_k
  mesh = jax.make_mesh((shards,), ("expert",))
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (shards * n, d)).astype(args.dtype)
  weights, chosen = jax.lax.top_k(jax.random.uniform(keys[1], (shards * n, e)), k)
  flat, weights = chosen.reshape(-1).astype(jnp.int32), weights.reshape(-1)
  dy = jax.random.normal(keys[2], (shards * n * k, d)).astype(args.dtype)
  x, flat, weights, dy = jax.device_put((x, flat, weights, dy), jax.sharding.NamedSharding(mesh, P("expert")))
  print(f"device: {jax.devices()[0].device_kind} x {shards}, jax {jax.__version__}; {n} tokens/device, d={d}, "
        f"E={e}, top_k={k}, buffer_factor={args.buffer_factor}, {args.dtype}, median of {args.iters}", flush=True)
  rows = []
  for transport in args.transports:
    def local(x, flat, weights):
      out, _, _, dropped = exchange(x, flat, weights, k, e, lambda recv, ids: (recv, {}), axis="expert",
                                    shards=shards, buffer_factor=args.buffer_factor, transport=transport)
      return out, jnp.sum(dropped)[None]
    fn = jax.shard_map(local, mesh=mesh, in_specs=(P("expert"),) * 3, out_specs=(P("expert"), P("expert")),
                       check_vma=False)

    def step(x, flat, weights, dy):
      (y, dropped), vjp = jax.vjp(lambda x: fn(x, flat, weights), x)
      return y, dropped, vjp((dy, jnp.zeros_like(dropped)))
    step = jax.jit(step)
    row = {"transport": transport}
    try:
      ms = median_ms(step, (x, flat, weights, dy), args.iters, args.warmup)
      moved = 4 * n * k * d * jnp.dtype(args.dtype).itemsize        # rows out and back, forward and backward
      row.update(ms=ms, gb_s=moved / ms / 1e6, dropped=int(step(x, flat, weights, dy)[1].sum()))
    except Exception as err:
      row["error"] = f"{type(err).__name__}: {err}"[:2000]
    rows.append(row)
    print(f"  {row}", flush=True)
  print("\n| transport | ms (fwd+bwd) | GB/s per device (kept rows) | dropped |")
  print("|---|---|---|---|")
  for r in rows:
    print(f"| {r['transport']} | {fmt(r.get('ms'))} | {fmt(r.get('gb_s'), '.1f')} | {r.get('dropped', '—')} |")
  return {"mode": "exchange", "device": jax.devices()[0].device_kind, "jax": jax.__version__, **vars(args),
          "rows": rows}


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
  parser.add_argument("--gmms", default="auto,ragged_dot", help="dropless rows: model.moe.gmm values to compare")
  parser.add_argument("--impl", default="xla", help="mixing implementation: xla | pallas")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--static", action="store_true", help="no device: FLOPs from compiled / exported HLO")
  parser.add_argument("--exchange", action="store_true", help="time the expert-parallel exchange alone")
  parser.add_argument("--transports", default="ragged,padded", help="--exchange: model.moe.transport values")
  parser.add_argument("--buffer_factor", type=float, default=-1.0, help="--exchange: model.moe.buffer_factor")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  args.experts = [e for e in args.experts.split(",") if e]
  args.paths = [p for p in args.paths.split(",") if p]
  args.gmms = [g for g in args.gmms.split(",") if g]
  args.transports = [t for t in args.transports.split(",") if t]
  name = "bench_moe_static.json" if args.static else "bench_moe_exchange.json" if args.exchange else "bench_moe.json"
  out = args.out or os.path.join(os.environ.get("OUT", "."), name)
  result = run_static(args, out) if args.static else run_exchange(args) if args.exchange else run_timed(args)
  with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
