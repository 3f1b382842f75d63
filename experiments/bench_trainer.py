"""The trainer's train step against a minimal pure-JAX step of the same model, at the quickstart shape.

    python experiments/bench_trainer.py                  # ~5 min on 2 quiet CPU cores
    python experiments/bench_trainer.py --rounds 9 --json experiments/results/bench_trainer.json

For SwiGLU and bi-MoA-7 at configs/quickstart.py's shape (8 × 256 tokens, d = 320, 6 layers, bf16
compute, fp32 params, AdamW): the trainer's step as `python -m moa_jax.train` runs it (train.build,
train.jit_train_step, the state donated, with every `log_every`-th step a log step that also
computes the logged statistics) against a minimal step written here: the same `Decoder` and the same
optax optimizer (`run.tx`), `jax.value_and_grad` of the mean cross-entropy, `tx.update`,
`optax.apply_updates`, nothing else.

Each round times, for every FFN in turn, `--steps` of the trainer's plain steps, one log step and
`--steps` + 1 minimal steps, so load on a shared machine hits all alike. The trainer's step time is its
mean over a log interval, ((log_every - 1) · plain + log) / log_every, from the round's medians; the
table shows the median over rounds, by wall clock and by the process's CPU time (steadier on a shared
machine). "× minimal" is the minimal step's time over the trainer's: the trainer's throughput relative to
the minimal step's (< 1: the trainer costs something).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moa_jax import presets, sharding, train  # noqa: E402


def minimal_step(model, tx):
  """(params, opt_state, batch) -> (params, opt_state, loss): the step with no framework around it."""
  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["inputs"])                    # (B, T, V) fp32
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))


class Bench:
  """One FFN's trainer step and minimal step, each with its own state, timed a few steps at a time."""

  def __init__(self, ffn: str):
    config = presets.lm_config("quickstart", ffn)
    self.log_every = config.train.log_every
    self.run = train.build(config, with_data=False)
    c = config.train
    tokens = jax.random.randint(jax.random.key(1), (c.batch_size, c.seq_len + 1), 0, config.model.vocab_size)
    self.batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}           # (B, T) int32
    with self._context():
      self.state = train.init_state(self.run)
      self.trainer = {due: train.jit_train_step(self.run, with_stats=due) for due in (False, True)}
    fresh = train.init_state(self.run)
    self.params, self.opt_state = fresh.params, fresh.opt_state
    self.minimal = minimal_step(self.run.model, self.run.tx)

  def _context(self):
    return _Both(sharding.mesh_context(self.run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES))

  def trainer_step(self, log_due: bool):
    with self._context():
      self.state, metrics = self.trainer[log_due](self.state, self.batch)
      jax.block_until_ready(metrics)

  def minimal_step(self):
    self.params, self.opt_state, loss = self.minimal(self.params, self.opt_state, self.batch)
    jax.block_until_ready(loss)


class _Both:
  def __init__(self, *contexts):
    self.contexts = contexts

  def __enter__(self):
    for c in self.contexts:
      c.__enter__()

  def __exit__(self, *exc):
    for c in reversed(self.contexts):
      c.__exit__(*exc)


def timed(fn, n: int) -> tuple[float, float]:
  """Median wall and process CPU seconds of n calls of fn()."""
  wall, cpu = [], []
  for _ in range(n):
    w, c = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
  return statistics.median(wall), statistics.median(cpu)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the table shows their median)")
  parser.add_argument("--steps", type=int, default=4, help="steps per (FFN, step) pair per round")
  parser.add_argument("--ffns", default="swiglu,bimoa")
  parser.add_argument("--json", default="", help="write the rows here")
  args = parser.parse_args(argv)
  benches = {ffn: Bench(ffn) for ffn in args.ffns.split(",")}
  for b in benches.values():  # compile every step before timing
    b.trainer_step(False)
    b.trainer_step(True)
    b.minimal_step()
  # per round: (wall, cpu) seconds per step of the trainer's plain step, its log step, and the minimal step
  rounds = {ffn: {"plain": [], "log": [], "minimal": []} for ffn in benches}
  for _ in range(args.rounds):
    for ffn, b in benches.items():
      rounds[ffn]["plain"].append(timed(lambda: b.trainer_step(False), args.steps))
      rounds[ffn]["log"].append(timed(lambda: b.trainer_step(True), 1))
      rounds[ffn]["minimal"].append(timed(b.minimal_step, args.steps + 1))
  rows = []
  for ffn, r in rounds.items():
    every = benches[ffn].log_every
    row = dict(ffn=ffn, log_every=every)
    for i, clock in enumerate(("wall", "cpu")):
      # the trainer's mean step over a log interval: log_every - 1 plain steps and one log step
      trainer = [((every - 1) * p[i] + g[i]) / every for p, g in zip(r["plain"], r["log"])]
      ratios = [m[i] / t for m, t in zip(r["minimal"], trainer)]
      row[clock] = dict(trainer_ms=1e3 * statistics.median(trainer),
                        minimal_ms=1e3 * statistics.median(m[i] for m in r["minimal"]),
                        log_step_ms=1e3 * statistics.median(g[i] for g in r["log"]),
                        ratio=statistics.median(ratios), ratios=[round(x, 4) for x in ratios])
    rows.append(row)
  c = presets.lm_config("quickstart", "bimoa").train
  print(f"train step, quickstart shape (B={c.batch_size}, T={c.seq_len}), bf16, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}; {args.rounds} interleaved rounds of {args.steps} steps\n")
  print("| FFN | clock | trainer ms/step | of which log step | minimal ms/step | × minimal | per round |")
  print("|---|---|---|---|---|---|---|")
  for row in rows:
    for clock in ("wall", "cpu"):
      r = row[clock]
      print(f"| {row['ffn']} | {clock} | {r['trainer_ms']:.0f} | {r['log_step_ms']:.0f} | {r['minimal_ms']:.0f} | "
            f"{r['ratio']:.3f} | {', '.join(f'{x:.3f}' for x in r['ratios'])} |")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(dict(batch=c.batch_size, seq_len=c.seq_len, jax=jax.__version__, device=jax.devices()[0].device_kind,
                     rounds=args.rounds, steps=args.steps, rows=rows), fh, indent=1)


if __name__ == "__main__":
  main()
