"""The impl="xla" mixing against a minimal pure-JAX FFN of the same maths, at the quickstart shape.

    nice python experiments/xla_mixing.py                  # ~2 min on 2 CPU cores
    python experiments/xla_mixing.py --iters 50 --json experiments/results/xla_mixing.json

One FFN forward+backward (gradients for every parameter and the input), jitted, median of
--iters: the trainer's `moa_jax.ffn.FFN` (bf16 compute, fp32 params) against a minimal bf16
implementation written here from scratch (jax.nn activations, gates φ(xU + b), no fp32 upcasts
beyond the gate logits), for SwiGLU (the control: should be ≈ 1.00) and bi-MoA-7.
"× minimal" is the FFN's time over the minimal one (> 1: the trainer's mixing costs more).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moa_jax import activations, presets  # noqa: E402
from moa_jax.ffn import FFN, FFNSpec  # noqa: E402
from bench_timing import fmt, median_ms  # noqa: E402  (experiments/, beside this script)

K7 = activations.PAPER_DICTIONARY
_MINIMAL_ACTS = {
    "identity": lambda z: z, "relu": jax.nn.relu, "relu2": lambda z: jnp.square(jax.nn.relu(z)),
    "leaky_relu": lambda z: jax.nn.leaky_relu(z, activations.LEAKY_SLOPE),
    "gelu_tanh": lambda z: jax.nn.gelu(z, approximate=True), "silu": jax.nn.silu, "tanh": jnp.tanh,
}


def minimal_ffn(kind: str):
  """(params, x) -> y in bf16, weights cast to bf16 as the trainer does."""
  def mix(z, gates):  # z (B, T, F), gates (B, T, K)
    return sum(gates[..., k, None] * _MINIMAL_ACTS[n](z) for k, n in enumerate(K7))

  def ffn(p, x):
    w = {k: v.astype(jnp.bfloat16) for k, v in p.items()}
    h, u = x @ w["w1"], x @ w["w2"]
    if kind == "swiglu":
      a = jax.nn.silu(h) * u
    else:
      g1 = jax.nn.sigmoid(x @ w["U1"] + w["b1"])
      g2 = jax.nn.sigmoid(x @ w["U2"] + w["b2"])
      a = mix(h, g1) * mix(u, g2)
    return a @ w["w3"]
  return ffn


def trainer_ffn(kind: str, d_ff: int):
  ffn = dict(presets.FFN_PRESETS["swiglu" if kind == "swiglu" else "bimoa"])
  spec = FFNSpec(**ffn, d_ff=d_ff, impl="xla")
  return FFN(spec, dtype=jnp.bfloat16)


def step(apply):
  def run(p, x, dy):
    _, vjp = jax.vjp(apply, p, x)
    return vjp(dy)
  return jax.jit(run)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--json", default="", help="write the rows here")
  args = parser.parse_args(argv)
  d, _, _, _, _, _, multiple, _ = presets.SIZES["quickstart"]
  config = presets.lm_config("quickstart", "bimoa")
  b, t = config.train.batch_size, config.train.seq_len
  f = presets.ffn_width("glu", d, multiple)
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  x = jax.random.normal(keys[0], (b, t, d), jnp.bfloat16)
  dy = jax.random.normal(keys[1], (b, t, d), jnp.bfloat16)
  rows = []
  for kind in ("swiglu", "bimoa"):
    module = trainer_ffn(kind, f)
    params = module.init(keys[2], x)
    trainer_ms = median_ms(step(module.apply), (params, x, dy), args.iters, 2)
    normal = lambda k, shape: (jax.random.normal(k, shape) / shape[0] ** 0.5).astype(jnp.float32)
    p = {"w1": normal(keys[3], (d, f)), "w2": normal(keys[4], (d, f)),
         "w3": normal(keys[5], (f, d)), "U1": normal(keys[6], (d, 7)),
         "U2": normal(keys[7], (d, 7)), "b1": jnp.zeros((7,)), "b2": jnp.zeros((7,))}
    minimal_ms = median_ms(step(minimal_ffn(kind)), (p, x, dy), args.iters, 2)
    rows.append(dict(ffn=kind, trainer_ms=trainer_ms, minimal_ms=minimal_ms,
                     ratio=trainer_ms / minimal_ms))
  print(f"FFN fwd+bwd, B={b}, T={t}, d={d}, F={f}, bf16, {jax.devices()[0].device_kind}, "
        f"median of {args.iters}\n")
  print("| FFN | trainer ms | minimal ms | × minimal |\n|---|---|---|---|")
  for r in rows:
    print(f"| {r['ffn']} | {fmt(r['trainer_ms'], '.2f')} | {fmt(r['minimal_ms'], '.2f')} | "
          f"{r['ratio']:.3f} |")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(dict(shape=dict(B=b, T=t, d=d, F=f), jax=jax.__version__, rows=rows), fh, indent=1)


if __name__ == "__main__":
  main()
