"""Fixed vs LA vs MoA, Type-I vs Type-II, one- vs bi-sided: the paper's main comparison, under the protocol.

Run (0.12B at 20 tokens per parameter = 2.4B tokens per run; the stdlib holds ~8M, so pass a corpus):
  python -m moa_jax.study experiments/mixing_variants.py --workdir=runs/mixing_variants \
      --config.data.source='jsonl:/data/*.jsonl'
Plan (python -m moa_jax.study experiments/mixing_variants.py --workdir=/tmp/m --plan): 48 runs (up to 64
with lr widening) of 4,545 steps × 256 × 2048 tokens; 9.3e19 training FLOPs, ~65 H200-hours at 40% MFU
(~87 at most), evals on top.
On a CPU (debug model, 20 tokens per parameter; --plan --tokens_per_sec=16000, the unloaded 2-core mean
of tiny_mixing's arms: ~2.1 h of training, ~2.9 h at most, evals and compiles on top):
  python -m moa_jax.study experiments/mixing_variants.py --workdir=/tmp/mix --study.sizes=debug
Arms, at equal matmul parameters:
  Type-I:  GELU MLP, LA-7 MLP, MoA-7 MLP
  Type-II: SwiGLU, one-sided LA-7 and MoA-7 (mix σ(W1x) only), bi-LA-7 and bi-MoA-7 (mix both branches)
Each arm's lr is tuned on seed 100 (grid 0.5×, 1×, 2×, widened at an edge), then seeds 0-2 run at each
arm's best. Primary comparison: bi-MoA − SwiGLU; the others (Holm-corrected together) test the paper's
ordering MoA < LA < fixed within each type and bi- over one-sided.
Expect (paper): MoA < LA < fixed within each type, bi-MoA the best of all, the Type-I variants behind
the Type-II ones; gates (gates.png) move away from their SwiGLU start and vary over tokens (gates_std.png).
"""

from moa_jax.study import Study


def get_study() -> Study:
  return Study(
      name="mixing_variants",
      sizes=("0.12b",),
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
      tune_seeds=(100,),
      lr_multipliers=(0.5, 1.0, 2.0),
      final_evals=3,
      primary=("bimoa", "swiglu"),
      comparisons=(("bimoa", "bila"), ("bila", "swiglu"), ("moa", "la"), ("la", "swiglu"),
                   ("bimoa", "moa"), ("moa_mlp", "la_mlp"), ("la_mlp", "gelu_mlp")),
  )
