"""Held-out loss and perplexity of a run's checkpoint.

    python -m moa_jax.eval --workdir=runs/quickstart [--step=N] [--batches=N] [--json]

Evaluates exactly as training does (`train.evaluate`: a fixed shuffled subset of the validation split,
train.eval_tokens or train.eval_batches large), so at the final step it reproduces the eval_loss in
metrics.jsonl; raise --batches for a tighter estimate.
"""

from __future__ import annotations

import json
import math

import flax.linen as nn
import jax

from moa_jax import cli, rundir, sharding, train


def evaluate_checkpoint(workdir: str, step: int | None = None, batches: int | None = None) -> dict:
  """{step, eval_loss, perplexity, batches, tokens, val_tokens}: mean next-token loss (nats) over batches."""
  run, params, step = rundir.restore(workdir, step)
  if batches is not None:
    if batches <= 0:
      raise ValueError(f"batches = {batches}; must be positive")
    run.config.train.eval_batches = batches
    run.config.train.eval_tokens = 0
  with sharding.mesh_context(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    eval_fn = jax.jit(train.make_eval_step(run.model, run.config.train.get("loss_chunk", 0)),
                      in_shardings=(run.state_shardings.params, run.batch_sharding))
    loss = train.evaluate(run, eval_fn, params)
  n = train.eval_batch_count(run)
  return {"step": step, "eval_loss": loss, "perplexity": math.exp(loss), "batches": n,
          "tokens": n * run.config.train.batch_size * run.config.train.seq_len, "val_tokens": run.data.val_tokens}


@cli.command()
def main(argv: list[str] | None = None) -> None:
  parser = cli.ArgumentParser(
      prog="python -m moa_jax.eval", description="Held-out loss and perplexity of a run's checkpoint.")
  parser.add_argument("--workdir", required=True, help="a directory written by moa_jax.train")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
  parser.add_argument("--batches", type=int, default=None,
                      help="validation batches (default: the run's train.eval_batches)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  args = parser.parse_args(argv)
  cli.check_range("--batches", args.batches, 1)
  cli.check_range("--step", args.step, 1)
  r = evaluate_checkpoint(args.workdir, args.step, args.batches)
  if args.json:
    print(json.dumps(r))
    return
  repeats = " (the validation split is smaller: batches repeat)" if r["tokens"] > r["val_tokens"] else ""
  print(f"{args.workdir} step {r['step']}: eval loss {r['eval_loss']:.4f} nats/token, "
        f"perplexity {r['perplexity']:.2f}, over {r['batches']} batches = {r['tokens']:,} tokens{repeats}")


if __name__ == "__main__":
  main()
