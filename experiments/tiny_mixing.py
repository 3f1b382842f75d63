"""SwiGLU vs LA vs bi-MoA on the debug model: the study that runs on a laptop CPU in a few minutes.

Run:
  python -m moa_jax.study experiments/tiny_mixing.py --workdir=/tmp/tiny_mixing --out=experiments/results/tiny_mixing
Compares: the Type-II baseline (SwiGLU), one-sided LA-7 and bi-sided MoA-7 (the paper's best), each with
seeds 0, 1, 2 (paired: seed s gives every arm the same init seed and data order), 400 steps of 8 × 64
tokens (205k tokens) on the 0.13M-parameter debug model.
Expect: ~3 minutes on 2 CPU cores (2 min 48 s measured on 2026-11-29, unloaded); the eval loss falls
from ln 512 ≈ 6.2 to ~4.0. At this size and
length the arms differ by hundredths of a nat at most, well inside the seed-to-seed spread: a smoke test
of the workflow, not evidence for or against MoA. Tokens/s on a CPU shared with other jobs is noise.
The real comparison is experiments/mixing_variants.py on a GPU.
"""

from moa_jax.study import Study


def get_study() -> Study:
  return Study(
      name="tiny_mixing",
      sizes=("debug",),
      arms={"swiglu": "swiglu", "la": "la", "bimoa": "bimoa"},
      baseline="swiglu",
      seeds=(0, 1, 2),
      steps=400,
      # Pinned, so the result does not move with the debug preset: float32 (XLA:CPU has no fast bf16).
      overrides={"model.dtype": "float32", "train.batch_size": 8, "train.seq_len": 64, "data.max_bytes": 2_000_000,
                 "train.eval_every": 100, "train.eval_batches": 8, "train.sample_every": 0},
  )
