"""The recommended GPU study under the second protocol: SwiGLU, bi-LA, sigmoid-LA, bi-MoA and an
equal-compute SwiGLU at the quickstart size (~10M parameters), on a real corpus.

Run (one GPU; FineWeb-Edu's 10BT sample as Parquet files, or any `hf:` / `parquet:` source):
  python -m moa_jax.study experiments/gpu_protocol.py --workdir=runs/gpu_protocol \\
      --config.data.source='parquet:/data/fineweb-edu/sample/10BT/*.parquet'
Plan: python -m moa_jax.study experiments/gpu_protocol.py --workdir=/tmp/x --plan
  (--flops_per_sec=1e14 for ~10% MFU on an H200, nearer what a 10M model reaches).
Protocol: 20 tokens per parameter; lr tuned per arm on seeds 100 and 101 on a √2 grid (equal points per
arm, widened once beyond an edge optimum) on the validation split; five paired evaluation seeds
compared on the test split; Holm over the declared comparisons; TOST at ±0.02 nats (declared here);
per-document SEs on the test split.
Arms: sigmoid-LA is bi-MoA with U frozen at zero (gates σ(b) per layer): bi-MoA − sigmoid-LA is token
adaptivity alone, sigmoid-LA − bi-LA the parametrisation. `swiglu_eq` is SwiGLU given the steps bi-MoA's
FLOPs buy (Arm.compute_of): bi-MoA − swiglu_eq is the comparison at equal compute.
"""

from moa_jax.study import Arm, Study


def get_study() -> Study:
  return Study(
      name="gpu_protocol",
      sizes=("quickstart",),
      arms={"swiglu": "swiglu", "bila": "bila", "sigla": Arm("bimoa", {"optim.gate_kernel_trainable": False}),
            "bimoa": "bimoa", "swiglu_eq": Arm("swiglu", compute_of="bimoa")},
      baseline="swiglu",
      seeds=(0, 1, 2, 3, 4),
      tune_seeds=(100, 101),
      lr_multipliers=(0.707, 1.0, 1.414),
      widen=1,
      final_evals=2,
      primary=("bimoa", "swiglu_eq"),
      comparisons=(("bimoa", "swiglu_eq"), ("bimoa", "swiglu"), ("bimoa", "sigla"), ("sigla", "bila"),
                   ("bila", "swiglu")),
      effect=0.01,
      margin=0.02,
      overrides={"data.val_percent": 0.5, "data.test_percent": 0.5},
  )
