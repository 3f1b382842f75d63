"""Collectives in the compiled train step with Muon under FSDP: optax's Muon as is (Newton–Schulz on
FSDP-sharded matrices, so XLA all-gathers each (L, d, d) matrix at every iteration) against moa_jax's
Muon, which reshards each stacked matrix over its layer axis first (optim.muon_layouts). AdamW is the
floor: its all-gathers are FSDP's parameter gathers for the forward and backward passes.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/muon_collectives.py \
      --size=0.12b --fsdp=8 [--tensor=1] [--json]

Static: it compiles on fake CPU devices and counts ops in the optimized HLO; nothing runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re

import jax

from moa_jax import optim, presets, profiling, train


def count(hlo: str) -> dict:
  """Collective ops in an optimized HLO text, and the f32 all-gathers of ≥3-d arrays (stacked matrices)."""
  stacked = re.findall(r"= f32\[\d+,\d+,\d+[^\]]*\]\S* all-gather(?:-start)?\(", hlo)
  return {**profiling.collective_counts(hlo), "f32 stacked all-gathers": len(stacked)}


def compile_step(config, plain_muon: bool) -> str:
  run = train.build(config, with_data=False)
  if plain_muon:  # no mesh: optax's Muon as is
    params, logical = train.abstract_model(run.model, config.train.batch_size, config.train.seq_len)
    run = dataclasses.replace(run, tx=optim.make_optimizer(config.optim, config.train.steps, params, logical))
  return train.compile_train_step(run).as_text()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="0.12b", help=f"presets.SIZES: {', '.join(presets.SIZES)}")
  p.add_argument("--ffn", default="swiglu")
  p.add_argument("--fsdp", type=int, default=8)
  p.add_argument("--tensor", type=int, default=1)
  p.add_argument("--batch_size", type=int, default=0, help="default: the device count")
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--json", action="store_true")
  args = p.parse_args()
  n = jax.device_count()
  if n % (args.fsdp * args.tensor):
    raise SystemExit(f"error: fsdp × tensor = {args.fsdp * args.tensor} does not divide the {n} devices; "
                     "set XLA_FLAGS=--xla_force_host_platform_device_count=8")
  rows = {}
  for label, name, plain in (("adamw", "adamw", False), ("muon, optax as is", "muon", True),
                             ("muon, resharded (moa_jax)", "muon", False)):
    c = presets.lm_config(size=args.size, ffn=args.ffn)
    c.optim.name = name
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = n // (args.fsdp * args.tensor), args.fsdp, args.tensor, 1
    c.train.batch_size, c.train.seq_len = args.batch_size or n, args.seq_len
    rows[label] = count(compile_step(c, plain))
  if args.json:
    print(json.dumps({"size": args.size, "fsdp": args.fsdp, "tensor": args.tensor, "rows": rows}, indent=1))
    return
  cols = list(next(iter(rows.values())))
  print(f"{args.size} {args.ffn}, mesh data={n // (args.fsdp * args.tensor)} fsdp={args.fsdp} tensor={args.tensor}: "
        "collectives in one compiled train step")
  print("| optimizer | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
  for label, r in rows.items():
    print(f"| {label} | " + " | ".join(str(r[k]) for k in cols) + " |")


if __name__ == "__main__":
  main()
