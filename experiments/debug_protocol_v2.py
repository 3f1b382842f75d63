"""SwiGLU, bi-LA, sigmoid-LA and bi-MoA on the debug model under the second protocol (issue 22): a
three-way split by file (lr chosen on validation, arms compared on test), the sigmoid-LA control, lr
tuned on two seeds on a √2 grid with equal points per arm, five paired evaluation seeds, Holm over
four declared comparisons, a power table with the paired SD's CI, and a TOST at a margin declared here.

Run (CPU):
  python -m moa_jax.study experiments/debug_protocol_v2.py --workdir=runs/debug_protocol_v2 \\
      --out=experiments/results/debug_protocol_v2
Cost: --plan --tokens_per_sec=8000 (a 2-core CPU shared with other work). What was cut to fit a
40-minute slot on a shared 2-core machine is listed in the result's README.
Data: 8 MB of the stdlib; 4% of files in validation and 4% in test, files over 10 KB always train,
so no file is more than ~10% of a held-out split (sizes in the report).
Arms: sigmoid-LA is bi-MoA with its gate weights U frozen at zero (optim.gate_kernel_trainable =
False): gates σ(b) per layer. Only U separates it from bi-MoA, so bi-MoA − sigmoid-LA isolates token
adaptivity; sigmoid-LA − bi-LA is the parametrisation (bounded sigmoid gates vs signed coefficients).
Expect: differences of hundredths of a nat at most; a protocol exercise at toy scale, not evidence
about MoA at 0.1B+.
"""

from moa_jax.study import Arm, Study

SIGMOID_LA = Arm("bimoa", {"optim.gate_kernel_trainable": False})


def get_study() -> Study:
  return Study(
      name="debug_protocol_v2",
      sizes=("debug",),
      arms={"swiglu": "swiglu", "bila": "bila", "sigla": SIGMOID_LA, "bimoa": "bimoa"},
      baseline="swiglu",
      seeds=(0, 1, 2, 3, 4),
      tune_seeds=(100, 101),
      tokens_per_param=TOKENS_PER_PARAM,
      lr_multipliers=(2.828, 4.0, 5.657),  # √2 apart around 4× = 0.012, the optimum at 2 tokens/param
      widen=1,
      final_evals=1,
      primary=("bimoa", "swiglu"),
      comparisons=(("bimoa", "swiglu"), ("bimoa", "sigla"), ("sigla", "bila"), ("bila", "swiglu")),
      effect=0.01,
      margin=0.05,  # declared before the run: within ±0.05 nats counts as equivalent at this scale
      pilot_sd=0.029,  # bi-MoA − SwiGLU's paired SD in tiny_mixing's 2026-11-29 rerun
      overrides={"data.val_percent": 4.0, "data.test_percent": 4.0, "data.heldout_max_bytes": 10_000,
                 "train.eval_every": EVAL_EVERY, "checkpoint.every": 1000},
  )


TOKENS_PER_PARAM = 1.0  # cut from 20 to fit a 40-minute slot (see the result's README)
EVAL_EVERY = 33  # two evals per run: halfway and at the end
