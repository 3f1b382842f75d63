"""Per-device memory of the compiled train step against train.microbatches and train.loss_chunk.

    python experiments/memory_accum.py --config=configs/moa_2b.py                      # the 2B table
    python experiments/memory_accum.py --config=configs/debug.py --settings=1:0,4:0    # seconds, on a CPU

Each setting M:C compiles the step with microbatches=M and loss_chunk=C from shapes alone, as
`python -m moa_jax.train --config=... --compile_only --config.train.microbatches=M --config.train.loss_chunk=C`
does (no weights, no data), and reports XLA's memory analysis for the device it compiled for. Prints a
markdown table and writes JSON (--out).
"""

import json
import time

from absl import app, flags
from ml_collections import config_flags

from moa_jax import train

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=False)
flags.DEFINE_string("settings", "1:0,1:512,2:512,4:512,8:512,8:0", "microbatches:loss_chunk pairs, comma-separated")
flags.DEFINE_string("out", "memory_accum.json", "Where to write the JSON rows.")

GIB = 2**30


def main(argv):
  del argv
  c = flags.FLAGS.config
  rows = []
  print(f"{c.get('name', 'run')}: batch {c.train.batch_size} × {c.train.seq_len} tokens, vocab {c.model.vocab_size}")
  print("| microbatches | loss_chunk | temporaries GiB | arguments GiB | total GiB | compile s |")
  print("|---|---|---|---|---|---|")
  for setting in flags.FLAGS.settings.split(","):
    m, chunk = (int(v) for v in setting.split(":"))
    c.train.microbatches, c.train.loss_chunk = m, chunk
    t0 = time.perf_counter()
    mem = train.compile_only(c)
    row = {"microbatches": m, "loss_chunk": chunk, **mem, "compile_sec": time.perf_counter() - t0}
    rows.append(row)
    print(f"| {m} | {chunk} | {mem['temp'] / GIB:.2f} | {mem['argument'] / GIB:.2f} | {mem['total'] / GIB:.2f} "
          f"| {row['compile_sec']:.0f} |", flush=True)
  with open(flags.FLAGS.out, "w") as f:
    json.dump({"config": c.get("name"), "batch_size": c.train.batch_size, "seq_len": c.train.seq_len,
               "rows": rows}, f, indent=2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
