"""Fixed vs LA vs MoA, Type-I vs Type-II, one- vs bi-sided: the paper's main comparison at small scale.

Run (one GPU, 24 runs of a few minutes each):
  python -m moa_jax.study experiments/mixing_variants.py --workdir=runs/mixing_variants
Larger (0.12B, ~45 min per run on an H200; give it a corpus larger than the stdlib's ~9M tokens):
  python -m moa_jax.study experiments/mixing_variants.py --workdir=runs/mixing_0.12b --study.sizes=0.12b \
      --study.steps=2000 --config.data.source='jsonl:/data/*.jsonl'
On a CPU (debug model, ~5 minutes):
  python -m moa_jax.study experiments/mixing_variants.py --workdir=/tmp/mix --study.sizes=debug \
      --study.steps=300 --study.seeds=0,1 --config.train.batch_size=8 --config.train.seq_len=64 \
      --config.data.max_bytes=2000000
Compares, at equal matmul parameters, with seeds 0-2 paired against SwiGLU:
  Type-I:  GELU MLP, LA-7 MLP, MoA-7 MLP
  Type-II: SwiGLU, one-sided LA-7 and MoA-7 (mix σ(W1x) only), bi-LA-7 and bi-MoA-7 (mix both branches)
The dictionary is the paper's 7 activations; LA starts as the fixed FFN, MoA as that LA (U = 0).
Expect (paper): MoA < LA < fixed in loss within each type, bi-MoA the best of all; the Type-I
variants behind the Type-II ones. Gates (gates.png) move away from their SwiGLU start.
"""

from moa_jax.study import QUICKSTART_ONE_PASS, Study


def get_study() -> Study:
  return Study(
      name="mixing_variants",
      sizes=("quickstart",),
      arms={
          "gelu_mlp": "gelu_mlp",
          "la_mlp": "la_mlp",
          "moa_mlp": "moa_mlp",
          "swiglu": "swiglu",
          "la": "la",
          "moa": "moa",
          "bila": "bila",
          "bimoa": "bimoa",
      },
      baseline="swiglu",
      seeds=(0, 1, 2),
      steps=2000,
      overrides=QUICKSTART_ONE_PASS,
  )
