"""2B-parameter dense decoder with bi-sided MoA-7 FFNs (the paper's best variant), sigmoid gates.

Run (one H200 or a TPU slice; shard with --config.mesh.fsdp=N):
  python -m moa_jax.train --config=configs/moa_2b.py --workdir=gs://bucket/moa_2b
  python -m moa_jax.summary --config=configs/moa_2b.py
Expect: 2.07B parameters (0.86M of them gates), 13.4 GFLOP per training token at T=2048;
the same matmul shapes as configs/swiglu_2b.py, so the two compare at equal compute.
Data: FineWeb-Edu as Parquet (data.source = FINEWEB_EDU); the default 20,000 steps × 256 × 2048 read 10.5B
tokens, about 0.1 epoch of it. Fetch and prepare it first: docs/data.md, "A real corpus".
"""

from moa_jax import presets
from moa_jax.data.config import FINEWEB_EDU


def get_config():
  c = presets.lm_config(size="2b", ffn="bimoa")
  c.data.source = FINEWEB_EDU
  return c
