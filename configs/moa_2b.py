"""2B-parameter dense decoder with bi-sided MoA-7 FFNs (the paper's best variant), sigmoid gates.

Run on a TPU v5p-8 (batch 256 × 2048 as 2 microbatches, FSDP over the 8 chips):
  python -m moa_jax.train --config=configs/moa_2b.py --config.mesh.fsdp=8 --workdir=gs://bucket/moa_2b
  python -m moa_jax.summary --config=configs/moa_2b.py
Fits: libtpu puts it at 52.0 GiB per chip of v5p's 95.7 GiB (49.0 GiB of it temporaries, which about
halve with each doubling of the microbatches). On 8 H100s add --config.train.microbatches=4; on other hardware check
first, e.g. --compile_only --target=h200:8 --config.mesh.fsdp=8 (docs/hardware.md: the table, the commands).
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
  c.train.microbatches = 2  # 256 sequences in two halves: fits a v5p-8 (docs/hardware.md)
  return c
