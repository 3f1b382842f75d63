"""2B-total / 0.6B-active MoE decoder with SwiGLU experts: the baseline for configs/moe_moa_2b.py.

Run:
  python -m moa_jax.train --config=configs/moe_swiglu_2b.py --workdir=gs://bucket/moe_swiglu_2b
Expect: 1.97B parameters, 0.63B active per token, 4.2 GFLOP per training token at T=2048 (8 experts,
top-2, every layer; 26 layers, d=1024, expert width 2816).
Data: FineWeb-Edu as Parquet (data.source = FINEWEB_EDU); the default 20,000 steps × 256 × 2048 read 10.5B
tokens, about 0.1 epoch of it. Fetch and prepare it first: docs/data.md, "A real corpus".
"""

from moa_jax import presets
from moa_jax.data.config import FINEWEB_EDU


def get_config():
  c = presets.lm_config(size="moe_2b_a0.6b", ffn="swiglu")
  c.data.source = FINEWEB_EDU
  return c
