"""~10M-parameter SwiGLU-sized bi-MoA model on the default corpus (Python's standard library source).

Run:
  python -m moa_jax.train --config=configs/quickstart.py --workdir=runs/quickstart
Expect: the first run trains a byte-level BPE tokenizer and tokenizes the corpus (a minute or two),
then the loss falls from ~9 (ln 8192) to about 4 within a few hundred steps; samples printed every
200 steps turn from noise into Python-looking code. Minutes on a laptop CPU, seconds on a GPU.
Compare with the baseline: --config.model.ffn=... is a group, so use configs/lm.py:size=quickstart,ffn=swiglu.
"""

from moa_jax import presets


def get_config():
  return presets.lm_config(size="quickstart", ffn="bimoa")
