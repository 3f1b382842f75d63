"""~10M-parameter bi-MoA model on the default corpus (Python's standard-library source, 8.0M tokens).

Run:
  python -m moa_jax.train --config=configs/quickstart.py --workdir=runs/quickstart
Expect: the first run trains a byte-level BPE tokenizer and tokenizes the corpus (~30 s before the
first step), then 200 steps of 8 × 256 tokens. The loss falls from ~9.2 (ln 8192 ≈ 9.0) to ~6.9 by step
30 and ~5.4 by step 200 (eval ~5.1); a sample printed every 50 steps turns from noise into Python-looking
fragments (`self.assertEqual(`, `def test`). Measured (2026-11-29, unloaded 2-core machine, fresh cache):
~880 tokens/s (2.3 s/step), 8 min 12 s in all, loss 5.39 and eval 5.11 at step 200, in bf16; a laptop's
8 cores are a few times faster, a GPU takes seconds.
The baseline at the same size: --config=configs/lm.py:size=quickstart,ffn=swiglu.
"""

from moa_jax import presets


def get_config():
  return presets.lm_config(size="quickstart", ffn="bimoa")
