"""The FFN variants compiled by libtpu for a TPU without one: HBM bytes, FLOPs and temporaries.

    python experiments/ffn_tpu_static.py [--chip v5e:1x1] [--tokens 2048]    # jax[tpu] needed

For each FFN of experiments/bench_ffn.py (forward + backward, gradients for weights and input)
and each impl (xla, pallas, fused), prints libtpu's cost analysis of the compiled step: bytes
accessed (the HBM traffic the compiler schedules, Pallas calls counted by their CostEstimate),
FLOPs and the temporary memory. (The cost model's optimal_seconds comes out negative once a
module holds custom calls, so it is not shown.) Compile only, ~15 s per entry on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
from jax.experimental import topologies

sys.path.insert(0, os.path.dirname(__file__))
import bench_ffn  # noqa: E402  (beside this script)
from moa_jax.kernels import entry  # noqa: E402


def compile_only(fn, impl, abstract, device):
  mesh = jax.sharding.Mesh([device], ("x",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)
  compiled = bench_ffn.train_step(fn, impl).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost, compiled.memory_analysis()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--chip", default="v5e:1x1")
  parser.add_argument("--tokens", type=int, default=2048)
  parser.add_argument("--d_model", type=int, default=2048)
  parser.add_argument("--d_ff", type=int, default=5632)
  parser.add_argument("--impls", default="xla,pallas,fused")
  args = parser.parse_args()
  device = topologies.get_topology_desc(args.chip, platform="tpu").devices[0]
  # The kernels pick their backend from the host's platform (entry._resolve; CPU here): ask for
  # the compiled TPU variant instead.
  resolve = entry._resolve
  entry._resolve = lambda backend, interpret, precision: resolve("tpu", False, precision)
  abstract = jax.eval_shape(lambda: bench_ffn.init(jax.random.PRNGKey(0), args.tokens,
                                                   args.d_model, args.d_ff, 7, jnp.bfloat16))
  print(f"{device.device_kind}, jax {jax.__version__}; T={args.tokens}, d={args.d_model}, "
        f"F={args.d_ff}, bf16, fwd+bwd")
  print("| variant | impl | HBM GB | GFLOP | temp MB |")
  print("|---|---|---|---|---|")
  for name, fn, _, _ in bench_ffn.VARIANTS:
    for impl in args.impls.split(","):
      cost, mem = compile_only(fn, impl, abstract, device)
      print(f"| {name} | {impl} | {cost['bytes accessed'] / 1e9:.3f} | {cost['flops'] / 1e9:.1f} "
            f"| {mem.temp_size_in_bytes / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
  main()
