"""Scale ladder 0.12B → 2B at 20 tokens per parameter, SwiGLU vs bi-MoA-7: power-law fits of final loss
against training compute, with seed-bootstrap CIs and a shared-exponent comparison.

Run (the 2B rung alone reads 41B tokens per run; the stdlib default holds ~8M, so pass your own corpus):
  python -m moa_jax.study experiments/scale_ladder.py --workdir=runs/scale_ladder \
      --config.data.source='jsonl:/data/*.jsonl'
Plan (--plan): 60 runs (up to 70 with lr widening): per rung and arm, 3 tuning runs (seed 100, 0.5×,
1×, 2×) and 3 evaluation seeds; 1.1e22 training FLOPs, ~7,600 H200-hours at 40% MFU (~8,900 at most),
most of it the 1.3B and 2B rungs. The first rungs alone (0.12B, 0.35B: 2.4e20 FLOPs, ~170 H200-hours):
  python -m moa_jax.study experiments/scale_ladder.py --workdir=runs/ladder_small --study.sizes=0.12b,0.35b \
      --config.data.source='jsonl:/data/*.jsonl'
A CPU has no ladder to climb (debug and quickstart are the only sizes it trains). This exercises the
code path on two badly undertrained rungs (a 2-point fit: no R², wide CIs):
  python -m moa_jax.study experiments/scale_ladder.py --workdir=/tmp/ladder --study.sizes=debug,quickstart \
      --study.tokens_per_param=0.02 --study.tune_seeds= --config.model.vocab_size=8192
Steps per run: ceil(20 × parameters / tokens per step), parameters counted with the embeddings and
without the mixing gates (so both arms of a size see the same tokens). Compute C = training FLOPs per
token (6·matmul parameters + attention + the activation mixing, moa_jax.summary) × tokens.
Expect: L ≈ a·C^-b with b of a few hundredths for both arms; the paper reports bi-MoA's gain persisting
across 0.25B-2B (MoE models): with the exponent shared, a(bi-MoA)/a(SwiGLU) below 1 at every rung.
"""

from moa_jax.study import Study


def get_study() -> Study:
  return Study(
      name="scale_ladder",
      sizes=("0.12b", "0.35b", "0.77b", "1.3b", "2b"),
      arms={"swiglu": "swiglu", "bimoa": "bimoa"},
      baseline="swiglu",
      seeds=(0, 1, 2),
      tune_seeds=(100,),
      lr_multipliers=(0.5, 1.0, 2.0),
      widen=1,
      final_evals=3,
      primary=("bimoa", "swiglu"),
  )
