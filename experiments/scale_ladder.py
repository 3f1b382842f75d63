"""Scale ladder 0.12B → 2B at 20 tokens per parameter, SwiGLU vs bi-MoA-7, with a power-law fit
of final loss against training compute.

Run (the 2B rung alone reads 41B tokens; the stdlib default holds ~9M, so pass your own corpus):
  python -m moa_jax.study experiments/scale_ladder.py --workdir=runs/scale_ladder \
      --config.data.source='jsonl:/data/*.jsonl'
One GPU, the first rungs only (0.12B: 2.2B tokens, ~1.5 h per run on an H200 at ~40% MFU):
  python -m moa_jax.study experiments/scale_ladder.py --workdir=runs/ladder_small --study.sizes=0.12b,0.35b \
      --config.data.source='jsonl:/data/*.jsonl'
A CPU has no ladder to climb: debug and quickstart are the only sizes it trains, and quickstart trains at
~1,200 tokens/s on 2 cores. This exercises the code path (two badly undertrained points):
  python -m moa_jax.study experiments/scale_ladder.py --workdir=/tmp/ladder --study.sizes=debug,quickstart \
      --study.tokens_per_param=0.02 --config.model.vocab_size=8192 --config.train.batch_size=8 \
      --config.train.seq_len=64 --config.data.max_bytes=2000000
Steps per run: ceil(tokens_per_param × parameters / tokens per step), parameters counted with the
embeddings and without the mixing gates (so both arms of a size see the same tokens). Compute
C = training FLOPs per token (6·matmul parameters + attention, moa_jax.summary) × tokens.
Expect: L ≈ a·C^-b with b of a few hundredths for both arms; the paper reports bi-MoA's gain persisting
across 0.25B-2B (MoE models), i.e. a lower a at a similar b.
"""

from moa_jax.study import Study


def get_study() -> Study:
  return Study(
      name="scale_ladder",
      sizes=("0.12b", "0.35b", "0.77b", "1.3b", "2b"),
      arms={"swiglu": "swiglu", "bimoa": "bimoa"},
      baseline="swiglu",
      seeds=(0,),
      tokens_per_param=20.0,
      overrides={"train.eval_batches": 40, "train.sample_every": 0},
  )
