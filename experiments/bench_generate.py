"""Sampling speed: the uncached loop (the whole prefix rerun per token) vs the KV cache, in tokens/s.

    python experiments/bench_generate.py                                  # quickstart bi-MoA, 256 new tokens
    python experiments/bench_generate.py --size=0.12b --ffn=swiglu --new_tokens=128

Random parameters (speed does not depend on them), greedy decoding, one sequence, compute in --dtype
(float32 by default, where the two paths give the same tokens; in bfloat16 rounding differs and near-tied
random logits can part ways). Each path runs once to compile, then --repeats times alternating; the best
is reported. The table says how many leading tokens agree. Prints a markdown table and writes JSON to --out
($OUT/bench_generate.json when OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moa_jax import generate, presets
from moa_jax.transformer import Decoder, model_spec


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--size", default="quickstart")
  parser.add_argument("--ffn", default="bimoa")
  parser.add_argument("--prompt_tokens", type=int, default=16)
  parser.add_argument("--new_tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", help="model.dtype: float32 | bfloat16")
  parser.add_argument("--out", default=os.path.join(os.environ["OUT"], "bench_generate.json") if "OUT" in os.environ
                      else "")
  args = parser.parse_args()
  c = presets.lm_config(args.size, args.ffn)
  c.model.dtype = args.dtype
  model = Decoder(model_spec(c.model))
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  prompt = list(range(1, args.prompt_tokens + 1))
  paths = {"uncached": lambda: generate.generate(model.apply, params, prompt, args.new_tokens, temperature=0.0),
           "kv_cache": lambda: generate.generate_cached(model, params, prompt, args.new_tokens, temperature=0.0)}
  outputs = {name: run() for name, run in paths.items()}  # compiles
  a, b = outputs["uncached"], outputs["kv_cache"]
  agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
  best = {name: float("inf") for name in paths}
  for _ in range(args.repeats):
    for name, run in paths.items():
      start = time.perf_counter()
      run()
      best[name] = min(best[name], time.perf_counter() - start)
  rows = {name: {"seconds": t, "tokens_per_sec": args.new_tokens / t} for name, t in best.items()}
  print(f"{args.size} {args.ffn} ({args.dtype}), prompt {args.prompt_tokens}, {args.new_tokens} new tokens, greedy, "
        f"{jax.devices()[0].platform}, best of {args.repeats}; leading tokens that agree: {agree} of {len(a)}\n")
  print("| path | seconds | tokens/s | × uncached |\n|---|---|---|---|")
  for name, r in rows.items():
    print(f"| {name} | {r['seconds']:.3f} | {r['tokens_per_sec']:.1f} | "
          f"{r['tokens_per_sec'] / rows['uncached']['tokens_per_sec']:.2f} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "platform": jax.devices()[0].platform, "agree": agree, "paths": rows}, f,
                indent=2)


if __name__ == "__main__":
  main()
