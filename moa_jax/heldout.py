"""Held-out loss per document, so that uncertainty counts documents rather than windows.

A held-out split is a few dozen files cut into hundreds of windows; windows of one file are not
independent draws, so an SE over windows understates the noise. `document_losses` evaluates a run's
final checkpoint on every window of its eval split (data.eval_split), in order, and sums the token
losses per document (a document ends at its eos). `ratio_se` is then the standard error of the
split's mean loss over documents (the cluster-robust SE of a ratio Σ loss / Σ tokens), and
`paired_ratio_se` the same for two runs' difference on the same documents.

    python -m moa_jax.heldout --workdir=RUN      # writes RUN/heldout.json and prints the summary
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

FILE = "heldout.json"


def document_losses(workdir: str, batch_size: int = 16) -> dict:
  """{step, split, doc_loss: [Σ token losses per document], doc_tokens: [targets per document]} for the
  run's final checkpoint; cached in workdir/heldout.json."""
  path = os.path.join(workdir, FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  import flax.linen as nn
  import jax

  from moa_jax import loss, rundir, sharding
  from moa_jax.data.prepare import prepare_for_job

  run, params, step = rundir.restore(workdir)
  d, seq_len = run.config.data, run.config.train.seq_len
  split = d.get("eval_split", "val")
  prepared = prepare_for_job(d.source, run.config.model.vocab_size, d.cache_dir, tokenizer=d.tokenizer or None,
                             text_field=d.text_field, val_percent=d.val_percent, max_bytes=d.max_bytes,
                             test_percent=d.get("test_percent", 0.0), heldout_max_bytes=d.get("heldout_max_bytes", 0),
                             process_index=0, process_count=1)
  tokens = np.asarray(prepared.tokens(split)[:], np.int32)  # (N,)
  doc = np.concatenate([[0], np.cumsum(tokens[:-1] == prepared.meta["eos_id"])])  # (N,) document of each token
  n_windows = (len(tokens) - 1) // seq_len
  starts = np.arange(n_windows) * seq_len

  def step_fn(params, inputs, targets):  # (B, T) -> (B, T) per-token losses
    hidden, unembed = run.model.apply({"params": params}, inputs, return_hidden=True)
    return loss.chunked_token_losses(hidden, unembed, targets, run.config.train.get("loss_chunk", 0))

  sums, counts = np.zeros(doc[-1] + 1), np.zeros(doc[-1] + 1)
  with sharding.mesh_context(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    fn = jax.jit(step_fn)
    for i in range(0, n_windows, batch_size):
      idx = starts[i:i + batch_size]
      pad = batch_size - len(idx)  # the last batch repeats its first window, then drops the copies
      idx = np.concatenate([idx, np.repeat(idx[:1], pad)])
      window = tokens[idx[:, None] + np.arange(seq_len + 1)]  # (B, T + 1)
      losses = np.asarray(jax.device_get(fn(params, window[:, :-1], window[:, 1:])))[:batch_size - pad]
      owner = doc[idx[:batch_size - pad, None] + 1 + np.arange(seq_len)]  # (B, T): the target's document
      sums += np.bincount(owner.ravel(), losses.ravel(), len(sums))
      counts += np.bincount(owner.ravel(), minlength=len(counts))
  keep = counts > 0
  out = {"step": int(step), "split": split, "doc_loss": sums[keep].tolist(), "doc_tokens": counts[keep].astype(int).tolist()}
  with open(path, "w") as f:
    json.dump(out, f)
  return out


def ratio_se(loss_sums, tokens) -> tuple[float, float]:
  """(Σ loss / Σ tokens, its SE over documents): √(n/(n−1) Σ_d (s_d − L t_d)²) / Σ t_d."""
  s, t = np.asarray(loss_sums, float), np.asarray(tokens, float)
  mean = s.sum() / t.sum()
  n = len(s)
  if n < 2:
    return float(mean), math.nan
  return float(mean), float(math.sqrt(n / (n - 1) * np.sum((s - mean * t) ** 2)) / t.sum())


def paired_ratio_se(a: dict, b: dict) -> tuple[float, float]:
  """Two runs' loss difference on the same documents, and its SE over documents."""
  if a["doc_tokens"] != b["doc_tokens"]:
    raise ValueError("the two runs were evaluated on different documents; compare runs of one split")
  return ratio_se(np.subtract(a["doc_loss"], b["doc_loss"]), a["doc_tokens"])


def report_lines(runs: dict, pairs: list, name, label) -> list[str]:
  """The report's section on document-level uncertainty.

  runs: variant key -> its finished evaluation runs (study_runs.RunResult); pairs: (comparison, its arm's
  variant key, the other's); name(comparison), label(key): labels. Runs without a checkpoint are left out."""
  docs = {}
  for key, results in runs.items():
    for r in results:
      try:
        docs[key + (r.ref.seed,)] = document_losses(r.ref.workdir)
      except Exception as e:  # pylint: disable=broad-except  (a missing or unreadable checkpoint)
        print(f"{r.ref.workdir}: no per-document eval ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
  if not docs:
    return []
  first = next(iter(docs.values()))
  lines = [f"## Uncertainty over documents (`{first['split']}` split)", "",
           f"Each evaluation run's final checkpoint evaluated on every window of its eval split, in order "
           f"({len(first['doc_tokens'])} documents, {sum(first['doc_tokens']):,} target tokens), its token "
           "losses summed per document (`python -m moa_jax.heldout`). SE over documents: the cluster-robust "
           "standard error of Σ loss / Σ tokens, which counts documents, not windows. It says how far a "
           "number would move on another held-out set of as many files; the seed CIs above say how far it "
           "moves with another training seed on this one.", "",
           "| arm | loss (mean over seeds) | SE over documents | SE over windows (last eval) |", "|---|---|---|---|"]
  for key, results in runs.items():
    got = [(ratio_se(d["doc_loss"], d["doc_tokens"]), r) for r in results
           if (d := docs.get(key + (r.ref.seed,)))]
    if got:
      window = [r.final_eval_se for _, r in got if math.isfinite(r.final_eval_se)]
      lines.append(f"| {label(key)} | {np.mean([m for (m, _), _ in got]):.4f} | {np.median([se for (_, se), _ in got]):.4f} | "
                   + (f"{np.median(window):.4f}" if window else "—") + " |")
  rows = []
  for c, key_a, key_b in pairs:
    both = [(docs.get(key_a + (s,)), docs.get(key_b + (s,))) for s in c.seeds] if key_a and key_b else []
    per_seed = [paired_ratio_se(a, b) for a, b in both if a and b and a["doc_tokens"] == b["doc_tokens"]]
    if per_seed:
      rows.append(f"| {name(c)} | {len(per_seed)} | {np.mean([d for d, _ in per_seed]):+.4f} | "
                  f"{np.median([se for _, se in per_seed]):.4f} | "
                  + (f"{np.std([d for d, _ in per_seed], ddof=1):.4f}" if len(per_seed) > 1 else "—") + " |")
  if rows:
    lines += ["", "| comparison | seeds | Δ on the whole split | one seed's Δ: SE over documents (median) | "
              "SD of Δ over seeds |", "|---|---|---|---|---|"] + rows
  return lines + [""]


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m moa_jax.heldout", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a finished run directory")
  args = parser.parse_args(argv)
  from moa_jax import rundir
  try:
    r = document_losses(args.workdir)
  except (rundir.RunDirError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  mean, se = ratio_se(r["doc_loss"], r["doc_tokens"])
  print(f"{args.workdir} step {r['step']} on {r['split']}: {mean:.4f} ± {se:.4f} nats/token (SE over "
        f"{len(r['doc_tokens'])} documents, {sum(r['doc_tokens']):,} tokens)")


if __name__ == "__main__":
  main()
