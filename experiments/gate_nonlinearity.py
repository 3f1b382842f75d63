"""MoA gate nonlinearity φ in π = φ(Ux + b): sigmoid vs softmax vs tanh, on bi-MoA-7.

Run (one GPU, 12 runs of a few minutes each):
  python -m moa_jax.study experiments/gate_nonlinearity.py --workdir=runs/gate_nonlinearity
On a CPU (debug model, ~2 minutes):
  python -m moa_jax.study experiments/gate_nonlinearity.py --workdir=/tmp/gates --study.sizes=debug \
      --study.steps=300 --study.seeds=0,1 --config.train.batch_size=8 --config.train.seq_len=64 \
      --config.data.max_bytes=2000000
Compares: bi-MoA with sigmoid gates (the default, and the baseline of the paired differences), softmax
gates (the gates of a token sum to 1) and tanh gates (signed), with SwiGLU as the fixed reference;
quickstart size, 2000 steps, seeds 0-2. Every variant starts with the primary activation dominant
(gate_bias_init = 4: sigmoid ≈ 0.98 vs 0.02, softmax ≈ 0.90 vs 0.02, tanh ≈ 1.00 vs 0).
Expect (paper): sigmoid < softmax < tanh in final loss.
"""

from moa_jax.study import QUICKSTART_ONE_PASS, Arm, Study


def get_study() -> Study:
  return Study(
      name="gate_nonlinearity",
      sizes=("quickstart",),
      arms={
          "sigmoid": Arm("bimoa", {"model.ffn.gate": "sigmoid"}),
          "softmax": Arm("bimoa", {"model.ffn.gate": "softmax"}),
          "tanh": Arm("bimoa", {"model.ffn.gate": "tanh"}),
          "swiglu": Arm("swiglu"),
      },
      baseline="sigmoid",
      seeds=(0, 1, 2),
      steps=2000,
      overrides=QUICKSTART_ONE_PASS,
  )
