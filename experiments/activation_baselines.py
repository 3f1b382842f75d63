"""Fixed-activation baselines: ReLU, GELU, SiLU and ReLU² MLPs (Type-I) and SwiGLU, GeGLU, ReGLU (Type-II).

Run (one GPU, ~21 runs of a few minutes each):
  python -m moa_jax.study experiments/activation_baselines.py --workdir=runs/activation_baselines
On a CPU (debug model, ~5 minutes):
  python -m moa_jax.study experiments/activation_baselines.py --workdir=/tmp/act --study.sizes=debug \
      --study.steps=300 --study.seeds=0,1 --config.train.batch_size=8 --config.train.seq_len=64 \
      --config.data.max_bytes=2000000
Compares: every fixed FFN of the quickstart size (~10M parameters; all variants have equal matmul
parameters: F = 4d for MLPs, F ≈ 8/3·d for GLUs), 2000 steps × 4096 tokens ≈ one pass over the whole
stdlib corpus, seeds 0-2, each against the GELU MLP (SPEC's Type-I baseline).
Expect: the GLUs beat the MLPs, ReLU² the best MLP and ReLU the worst (the usual ordering in the
literature), by a few hundredths of a nat. These are the fixed points LA and MoA must beat.
"""

from moa_jax.study import QUICKSTART_ONE_PASS, Study


def get_study() -> Study:
  return Study(
      name="activation_baselines",
      sizes=("quickstart",),
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
      steps=2000,
      overrides=QUICKSTART_ONE_PASS,
  )
