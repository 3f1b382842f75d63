"""Per-device memory of the compiled train step against train.microbatches and train.loss_chunk.

    python experiments/memory_accum.py --config=configs/moa_2b.py                      # the 2B table
    python experiments/memory_accum.py --config=configs/debug.py --settings=1:0,4:0    # seconds, on a CPU

Each setting M:C compiles the step with microbatches=M and loss_chunk=C from shapes alone, as
`python -m moa_jax.train --config=... --compile_only --config.train.microbatches=M --config.train.loss_chunk=C`
does (no weights, no data), and reports XLA's memory analysis for the device it compiled for. The
`loss head` column compiles only what train.loss_chunk changes: the gradient of the cross-entropy from
one microbatch's final hidden states (B/M, T, D) and the unembedding (D, V). In the whole step the peak
can lie elsewhere (on XLA:CPU, attention materialises (B, H, T, T) scores, larger than the logits at
T = 2048), so the step's total falls by less than the head's. Prints a markdown table and writes JSON (--out).
"""

import json
import time

from absl import app, flags
from ml_collections import config_flags

import jax
import jax.numpy as jnp

from moa_jax import loss, train
from moa_jax.transformer import DTYPES

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=False)
flags.DEFINE_string("settings", "1:0,1:512,2:512,4:512,8:512,8:0", "microbatches:loss_chunk pairs, comma-separated")
flags.DEFINE_string("out", "memory_accum.json", "Where to write the JSON rows.")

GIB = 2**30


def loss_head_temp(c, microbatches: int, chunk: int) -> int:
  """Temp bytes of d(mean loss)/d(hidden, unembed) for one microbatch, alone."""
  b, t, d, v = c.train.batch_size // microbatches, c.train.seq_len, c.model.d_model, c.model.vocab_size
  shapes = (jax.ShapeDtypeStruct((b, t, d), DTYPES[c.model.dtype]),
            jax.ShapeDtypeStruct((d, v), DTYPES[c.model.param_dtype]), jax.ShapeDtypeStruct((b, t), jnp.int32))
  grad = jax.grad(lambda h, w, y: loss.chunked_token_losses(h, w, y, chunk).mean(), argnums=(0, 1))
  return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def main(argv):
  del argv
  c = flags.FLAGS.config
  rows = []
  print(f"{c.get('name', 'run')}: batch {c.train.batch_size} × {c.train.seq_len} tokens, vocab {c.model.vocab_size}")
  print("| microbatches | loss_chunk | temporaries GiB | arguments GiB | total GiB | loss head GiB | compile s |")
  print("|---|---|---|---|---|---|---|")
  for setting in flags.FLAGS.settings.split(","):
    m, chunk = (int(v) for v in setting.split(":"))
    c.train.microbatches, c.train.loss_chunk = m, chunk
    t0 = time.perf_counter()
    mem = train.compile_only(c)
    row = {"microbatches": m, "loss_chunk": chunk, **mem, "compile_sec": time.perf_counter() - t0}
    row["loss_head_temp"] = loss_head_temp(c, m, chunk)
    rows.append(row)
    print(f"| {m} | {chunk} | {mem['temp'] / GIB:.2f} | {mem['argument'] / GIB:.2f} | {mem['total'] / GIB:.2f} "
          f"| {row['loss_head_temp'] / GIB:.2f} | {row['compile_sec']:.0f} |", flush=True)
  with open(flags.FLAGS.out, "w") as f:
    json.dump({"config": c.get("name"), "batch_size": c.train.batch_size, "seq_len": c.train.seq_len,
               "rows": rows}, f, indent=2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
