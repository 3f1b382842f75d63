"""Fixed-activation baselines: ReLU, GELU, SiLU and ReLU² MLPs (Type-I) and SwiGLU, GeGLU, ReGLU (Type-II).

Run (0.12B at 20 tokens per parameter; pass a corpus of a few billion tokens):
  python -m moa_jax.study experiments/activation_baselines.py --workdir=runs/activation_baselines \
      --config.data.source='jsonl:/data/*.jsonl'
Plan (--plan): 42 runs (up to 56 with lr widening), 2.2-2.4B tokens each; 8.1e19 training FLOPs, ~57
H200-hours at 40% MFU (~76 at most), evals on top.
On a CPU (debug model; --plan at 16k tokens/s: ~1.9 h of training, ~2.5 h at most):
  python -m moa_jax.study experiments/activation_baselines.py --workdir=/tmp/act --study.sizes=debug
Every fixed FFN at equal matmul parameters (F = 4d for MLPs, F ≈ 8/3·d for GLUs), each at its own
tuned lr (seed 100, grid 0.5×, 1×, 2×, widened at an edge), seeds 0-2, each against the GELU MLP
(the paper's Type-I baseline); primary: SwiGLU − GELU MLP.
Expect: the GLUs beat the MLPs, ReLU² the best MLP and ReLU the worst (the usual ordering in the
literature), by a few hundredths of a nat. These are the fixed points LA and MoA must beat.
"""

from moa_jax.study import Study


def get_study() -> Study:
  return Study(
      name="activation_baselines",
      sizes=("0.12b",),
      arms={
          "gelu_mlp": "gelu_mlp",
          "relu_mlp": "relu_mlp",
          "silu_mlp": "silu_mlp",
          "relu2_mlp": "relu2_mlp",
          "swiglu": "swiglu",
          "geglu": "geglu",
          "reglu": "reglu",
      },
      baseline="gelu_mlp",
      seeds=(0, 1, 2),
      tune_seeds=(100,),
      lr_multipliers=(0.5, 1.0, 2.0),
      final_evals=3,
      primary=("swiglu", "gelu_mlp"),
  )
