"""Tiny bi-MoA model that trains in seconds on a CPU; what the tests run.

Run:
  python -m moa_jax.train --config=configs/debug.py --workdir=/tmp/moa_debug
Expect: about 0.13M parameters; the loss falls from ~6.2 (ln 512) to below 5 within 200 steps,
a few seconds per 100 steps on a laptop CPU (the first run also prepares a 2 MB slice of the corpus).
"""

from moa_jax import presets


def get_config():
  return presets.lm_config(size="debug", ffn="bimoa")
