"""Any size × any FFN variant, chosen on the command line.

Run:
  python -m moa_jax.train --config=configs/lm.py:size=0.12b,ffn=bimoa --workdir=runs/0.12b_bimoa
  python -m moa_jax.summary --config=configs/lm.py:size=1.3b,ffn=moa

Dense sizes: debug, quickstart, 0.12b, 0.35b, 0.77b, 1.3b, 2b (moa_jax/presets.py:SIZES).
MoE sizes (8 experts, top-2, named total_active): debug_moe, moe_0.25b_a0.09b, moe_0.5b_a0.17b,
moe_1b_a0.3b, moe_2b_a0.6b (moa_jax/presets.py:MOE_SIZES); the experts are the chosen FFN variant.
FFN variants: gelu_mlp relu_mlp relu2_mlp silu_mlp la_mlp moa_mlp swiglu geglu reglu la moa bila bimoa
(moa_jax/presets.py:FFN_PRESETS). Every field can then be overridden: --config.model.ffn.gate=softmax.
"""

from moa_jax import presets


def get_config(arg: str | None = None):
  return presets.from_string(arg)
