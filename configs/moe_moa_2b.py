"""2B-total / 0.6B-active MoE decoder: 8 bi-MoA-7 experts per layer, top-2 (softmax router), dropless.

Run (one H200, or shard experts over devices with --config.mesh.expert=N, N dividing 8):
  python -m moa_jax.train --config=configs/moe_moa_2b.py --workdir=gs://bucket/moe_moa_2b
  python -m moa_jax.train --config=configs/moe_moa_2b.py --config.mesh.expert=8 --workdir=...
  python -m moa_jax.summary --config=configs/moe_moa_2b.py
Expect: 1.98B parameters, 0.63B active per token (3.0M of them expert gates: every expert has its own),
4.2 GFLOP per training token at T=2048; the same matmul shapes as configs/moe_swiglu_2b.py, so the two
compare at equal compute (the paper reports that the MoA gain persists in 0.25B–2B MoE models). metrics.jsonl adds
aux_loss (the mean over MoE layers: ≈ 1 when balanced), z_loss and per-layer
expert_load_max / expert_load_min (0.125 when balanced).
Data: FineWeb-Edu as Parquet (data.source = FINEWEB_EDU); the default 20,000 steps × 256 × 2048 read 10.5B
tokens, about 0.1 epoch of it. Fetch and prepare it first: docs/data.md, "A real corpus".
"""

from moa_jax import presets
from moa_jax.data.config import FINEWEB_EDU


def get_config():
  c = presets.lm_config(size="moe_2b_a0.6b", ffn="bimoa")
  c.data.source = FINEWEB_EDU
  return c
