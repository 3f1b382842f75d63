"""2B-parameter dense decoder with bi-sided MoA-7 FFNs (the paper's best variant), sigmoid gates.

Run (one H200 or a TPU slice; shard with --config.mesh.fsdp=N):
  python -m moa_jax.train --config=configs/moa_2b.py --workdir=gs://bucket/moa_2b
  python -m moa_jax.summary --config=configs/moa_2b.py
Expect: 2.07B parameters (0.86M of them gates), 13.4 GFLOP per training token at T=2048;
the same matmul shapes as configs/swiglu_2b.py, so the two compare at equal compute.
"""

from moa_jax import presets


def get_config():
  return presets.lm_config(size="2b", ffn="bimoa")
