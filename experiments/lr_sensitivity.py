"""Learning-rate sensitivity: each arm at 0.5×, 1×, 1.5× and 2× its size's base peak LR.

Run (one GPU, 36 runs of a few minutes each):
  python -m moa_jax.study experiments/lr_sensitivity.py --workdir=runs/lr_sensitivity
Wider sweep, to find where each arm diverges:
  python -m moa_jax.study experiments/lr_sensitivity.py --workdir=runs/lr_wide --study.lr_multipliers=0.5,1,2,4,8
On a CPU (debug model, ~10 minutes):
  python -m moa_jax.study experiments/lr_sensitivity.py --workdir=/tmp/lr --study.sizes=debug \
      --study.steps=300 --study.seeds=0,1 --config.train.batch_size=8 --config.train.seq_len=64 \
      --config.data.max_bytes=2000000
Compares: SwiGLU, the GELU MLP and bi-MoA-7 at quickstart size (base lr 2e-3, cosine with warmup),
2000 steps, seeds 0-2; at each multiplier the paired difference is against SwiGLU at that multiplier.
A run whose loss turns NaN is reported as diverged (a cross in lr_sensitivity.png), not retried.
Expect (paper: MoA tolerates 1.5-2× larger peak LRs): bi-MoA's curve flatter at the high end, its
best LR at or above SwiGLU's.
"""

from moa_jax.study import QUICKSTART_ONE_PASS, Study


def get_study() -> Study:
  return Study(
      name="lr_sensitivity",
      sizes=("quickstart",),
      arms={"swiglu": "swiglu", "gelu_mlp": "gelu_mlp", "bimoa": "bimoa"},
      baseline="swiglu",
      seeds=(0, 1, 2),
      steps=2000,
      lr_multipliers=(0.5, 1.0, 1.5, 2.0),
      overrides=QUICKSTART_ONE_PASS,
  )
