"""bi-MoA's gate choices on the debug model: the bias margin at init (`gate_bias_init`: σ(±4) = 0.98 /
0.02 by default, so gates start saturated) and a learning-rate multiplier on the gate parameters U and b
(`optim.gate_lr_multiplier`), against the sigmoid-LA control (U frozen at zero).

Run (CPU, ~1 h at 2 tokens per parameter on an idle 2-core machine; --plan --tokens_per_sec=8000):
  python -m moa_jax.study experiments/gate_ablations.py --workdir=runs/gate_ablations --study.budgets=2
Test split, two tuning seeds on a √2 grid, five evaluation seeds, as debug_protocol_v2.py.
"""

from moa_jax.study import Arm, Study


def get_study() -> Study:
  return Study(
      name="gate_ablations",
      sizes=("debug",),
      arms={"bimoa": "bimoa",
            "margin1": Arm("bimoa", {"model.ffn.gate_bias_init": 1.0}),
            "margin2": Arm("bimoa", {"model.ffn.gate_bias_init": 2.0}),
            "gate_lr_x0.3": Arm("bimoa", {"optim.gate_lr_multiplier": 0.3}),
            "gate_lr_x3": Arm("bimoa", {"optim.gate_lr_multiplier": 3.0}),
            "sigla": Arm("bimoa", {"optim.gate_kernel_trainable": False})},
      baseline="bimoa",
      seeds=(0, 1, 2, 3, 4),
      tune_seeds=(100, 101),
      lr_multipliers=(2.828, 4.0, 5.657),
      widen=1,
      effect=0.01,
      margin=0.05,
      overrides={"data.val_percent": 4.0, "data.test_percent": 4.0, "data.heldout_max_bytes": 10_000},
  )
