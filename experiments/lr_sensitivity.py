"""Learning-rate sensitivity: each arm's loss over a wide lr grid, and each arm's best against the others'.

Run (0.12B at 20 tokens per parameter; pass a corpus of a few billion tokens):
  python -m moa_jax.study experiments/lr_sensitivity.py --workdir=runs/lr_sensitivity \
      --config.data.source='jsonl:/data/*.jsonl'
Plan (--plan): 39 runs (up to 51 if every search widens twice), 2.2-2.4B tokens each; 7.6e19 training
FLOPs, ~53 H200-hours at 40% MFU (~70 at most), evals on top.
On a CPU (debug model; --plan at 16k tokens/s: ~1.7 h of training, ~2.3 h at most):
  python -m moa_jax.study experiments/lr_sensitivity.py --workdir=/tmp/lr --study.sizes=debug
Each arm (SwiGLU, the GELU MLP, bi-MoA-7) runs 0.25×-4× its size's base peak lr on two tuning seeds
(100, 101: the lr curves of lr_sensitivity.png, with CIs), widened while the best is at an edge; then
seeds 0-2 at each arm's best, compared best against best (primary: bi-MoA − SwiGLU). A run whose loss
turns NaN is a failure (a cross in lr_sensitivity.png), not retried.
Expect (paper: MoA tolerates 1.5-2× larger peak lrs): bi-MoA's curve flatter at the high end, its
best lr at or above SwiGLU's.
"""

from moa_jax.study import Study


def get_study() -> Study:
  return Study(
      name="lr_sensitivity",
      sizes=("0.12b",),
      arms={"swiglu": "swiglu", "gelu_mlp": "gelu_mlp", "bimoa": "bimoa"},
      baseline="swiglu",
      seeds=(0, 1, 2),
      tune_seeds=(100, 101),
      lr_multipliers=(0.25, 0.5, 1.0, 2.0, 4.0),
      final_evals=3,
      primary=("bimoa", "swiglu"),
  )
