"""2B-parameter dense decoder with SwiGLU FFNs: the baseline for configs/moa_2b.py.

Run on a TPU v5p-8, as configs/moa_2b.py (2 microbatches; its bi-MoA activations are a superset of these,
so what fits it fits this; on 8 H100s add --config.train.microbatches=4):
  python -m moa_jax.train --config=configs/swiglu_2b.py --config.mesh.fsdp=8 --workdir=gs://bucket/swiglu_2b
Expect: 2.07B parameters, 13.4 GFLOP per training token at T=2048.
Data: FineWeb-Edu as Parquet (data.source = FINEWEB_EDU); the default 20,000 steps × 256 × 2048 read 10.5B
tokens, about 0.1 epoch of it. Fetch and prepare it first: docs/data.md, "A real corpus".
"""

from moa_jax import presets
from moa_jax.data.config import FINEWEB_EDU


def get_config():
  c = presets.lm_config(size="2b", ffn="swiglu")
  c.data.source = FINEWEB_EDU
  c.train.microbatches = 2  # as configs/moa_2b.py: fits a v5p-8 (docs/hardware.md)
  return c
