"""MoA gate nonlinearity φ in π = φ(Ux + b): sigmoid vs softmax vs tanh, on bi-MoA-7.

Run (0.12B at 20 tokens per parameter; pass a corpus of a few billion tokens):
  python -m moa_jax.study experiments/gate_nonlinearity.py --workdir=runs/gate_nonlinearity \
      --config.data.source='jsonl:/data/*.jsonl'
Plan (--plan): 24 runs (up to 32 with lr widening), 2.2B tokens each; 4.7e19 training FLOPs, ~33
H200-hours at 40% MFU (~44 at most), evals on top.
On a CPU (debug model; --plan at 16k tokens/s: ~1.1 h of training, ~1.5 h at most):
  python -m moa_jax.study experiments/gate_nonlinearity.py --workdir=/tmp/gates --study.sizes=debug
Compares: bi-MoA with sigmoid gates (the default, and the baseline of the paired differences), softmax
gates (the gates of a token sum to 1) and tanh gates (signed), with SwiGLU as the fixed reference;
each arm at its own tuned lr (seed 100), seeds 0-2. Every variant starts with the primary activation
dominant (gate_bias_init = 4: sigmoid ≈ 0.98 vs 0.02, softmax ≈ 0.90 vs 0.02, tanh ≈ 1.00 vs 0).
Primary: softmax − sigmoid.
Expect (paper): sigmoid < softmax < tanh in final loss.
"""

from moa_jax.study import Arm, Study


def get_study() -> Study:
  return Study(
      name="gate_nonlinearity",
      sizes=("0.12b",),
      arms={
          "sigmoid": Arm("bimoa", {"model.ffn.gate": "sigmoid"}),
          "softmax": Arm("bimoa", {"model.ffn.gate": "softmax"}),
          "tanh": Arm("bimoa", {"model.ffn.gate": "tanh"}),
          "swiglu": Arm("swiglu"),
      },
      baseline="sigmoid",
      seeds=(0, 1, 2),
      tune_seeds=(100,),
      lr_multipliers=(0.5, 1.0, 2.0),
      final_evals=3,
      primary=("softmax", "sigmoid"),
      comparisons=(("tanh", "sigmoid"), ("sigmoid", "swiglu")),
  )
