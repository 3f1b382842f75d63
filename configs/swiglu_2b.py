"""2B-parameter dense decoder with SwiGLU FFNs: the baseline for configs/moa_2b.py.

Run:
  python -m moa_jax.train --config=configs/swiglu_2b.py --workdir=gs://bucket/swiglu_2b
Expect: 2.07B parameters, 13.4 GFLOP per training token at T=2048.
"""

from moa_jax import presets


def get_config():
  return presets.lm_config(size="2b", ffn="swiglu")
