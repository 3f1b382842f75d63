"""Tokenization throughput: `moa_jax.data.prepare` end to end vs the tokenizers library's encode_batch.

    python experiments/bench_tokenize.py                      # the stdlib corpus, an 8192-token BPE
    python experiments/bench_tokenize.py --source=jsonl:/data/*.jsonl --tokenizer=/path/tokenizer.json

Both sides see the same documents (train and val splits) and the same tokenizer.json:

- `encode_batch`: `tokenizers.Tokenizer.encode_batch` on the texts already in memory, in 1 MB batches
  (the library parallelises each batch over every core); `encode_batch_fast` likewise (no offsets).
- `prepare`: a cold `prepare()` into an empty cache with that tokenizer: listing and reading the
  files, splitting, encoding, converting ids, writing the token shards and the index.

Runs alternate (baseline, ours, baseline, ours, ...) so machine load hits both alike; the ratio is
prepare's best MB/s over encode_batch's best. MB = 10^6 bytes of UTF-8 text. Prints a markdown
table and writes JSON to --out ($OUT/bench_tokenize.json when OUT is set). Without --tokenizer a
BPE of --vocab_size is trained on the first --train_bytes of the training split first (not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import tokenizers

from moa_jax.data import corpus
import moa_jax.data.prepare as prepare_lib
from moa_jax.data.tokenizer import train_bpe

_BATCH_BYTES = 2**20


def _batches(texts: list[str]) -> list[list[str]]:
  batches, batch, size = [], [], 0
  for text in texts:
    batch.append(text)
    size += len(text)
    if size >= _BATCH_BYTES:
      batches.append(batch)
      batch, size = [], 0
  return batches + ([batch] if batch else [])


def _time(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", default="stdlib")
  parser.add_argument("--tokenizer", default="", help="tokenizer.json ('' = train a BPE first)")
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--train_bytes", type=int, default=8_000_000)
  parser.add_argument("--text_field", default="text")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  out = args.out or os.path.join(os.environ.get("OUT", "."), "bench_tokenize.json")

  with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as scratch:
    tokenizer = args.tokenizer
    if not tokenizer:
      tokenizer = os.path.join(scratch, "tokenizer.json")
      train_bpe((d.text for d in corpus.documents(args.source, "train", val_percent=2.0,
                                                  max_bytes=args.train_bytes,
                                                  text_field=args.text_field)),
                args.vocab_size, tokenizer)
    texts = [d.text for split in corpus.SPLITS
             for d in corpus.documents(args.source, split, val_percent=2.0,
                                       text_field=args.text_field)]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    batches = _batches(texts)
    hf = tokenizers.Tokenizer.from_file(tokenizer)
    fast = getattr(hf, "encode_batch_fast", None)

    def ours(i: int) -> None:
      prepared = prepare_lib.prepare(args.source, 2**32, os.path.join(scratch, f"cache{i}"),
                                     tokenizer=tokenizer, text_field=args.text_field)
      assert sum(info["n_bytes"] for info in prepared.meta["splits"].values()) == n_bytes

    runs: dict[str, list[float]] = {"encode_batch": [], "encode_batch_fast": [], "prepare": []}
    for i in range(args.repeats):
      runs["encode_batch"].append(_time(lambda: [hf.encode_batch(b, add_special_tokens=False)
                                                 for b in batches]))
      if fast is not None:
        runs["encode_batch_fast"].append(_time(lambda: [fast(b, add_special_tokens=False)
                                                        for b in batches]))
      runs["prepare"].append(_time(lambda: ours(i)))

  mb_s = {name: n_bytes / 1e6 / min(times) for name, times in runs.items() if times}
  result = {
      "source": args.source, "tokenizer": args.tokenizer or f"bpe{args.vocab_size} (trained)",
      "n_bytes": n_bytes, "n_documents": len(texts), "cpu_count": os.cpu_count(),
      "seconds": runs, "mb_per_s": mb_s,
      "ratio_prepare_vs_encode_batch": mb_s["prepare"] / mb_s["encode_batch"],
  }
  print(f"{args.source}: {n_bytes / 1e6:.1f} MB, {len(texts)} documents, {os.cpu_count()} CPUs, "
        f"best of {args.repeats}")
  print("| path | MB/s | seconds (each run) | × encode_batch |")
  print("|---|---|---|---|")
  for name, times in runs.items():
    if times:
      print(f"| {name} | {mb_s[name]:.2f} | {', '.join(f'{t:.1f}' for t in times)} | "
            f"{mb_s[name] / mb_s['encode_batch']:.2f} |")
  with open(out, "w") as fh:
    json.dump(result, fh, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
