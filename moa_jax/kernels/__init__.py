"""The mixing seam between the FFN modules and its implementations, and the fused kernels.

    mix_product(h, coef, names, u, coef_u, names_u, impl="xla" | "pallas")

impl="xla" is `activations.mix_product_reference` (plain jnp, XLA fuses it; every backend);
impl="pallas" is the fused kernel (`kernels.entry`), run per device in shard_map under a
multi-device mesh. impl="fused" is the same kernel here; the dense FFN instead calls
`fused_mix_product` (`kernels.fused`: the mixing in the x·[W1|W2] matmul's epilogue). Layout: forms.py (the dictionary as shared bases) ← mix.py (block maths,
tiling, custom VJP) ← triton.py (GPU) / tpu.py (TPU; CPU interpreted) ← entry.py (picks the
layout; the public jitted call). Import arrows: activations ← kernels ← ffn, and one way inside
kernels; the Pallas modules are imported on first use.
"""

from __future__ import annotations

from typing import Sequence

import jax

from moa_jax import activations, platforms

Array = jax.Array
IMPLS = ("xla", "pallas", "fused")
# Logical axes of the hidden activations by rank: (B, T, F) from the FFN, (N, F) flattened tokens.
_LOGICAL_AXES = {3: ("batch", "length", "mlp"), 2: ("batch", "mlp")}


def mix_product(h: Array, coef: Array, names: Sequence[str], u: Array | None = None,
                coef_u: Array | None = None, names_u: Sequence[str] | None = None,
                *, impl: str = "xla") -> Array:
  """m(h), m(h) ⊙ u or m(h) ⊙ m_u(u) by `impl`; shapes as `activations.mix_product_reference`.

  Under a multi-device mesh of Auto axes (set by the trainer) the kernel runs per device in
  shard_map, h laid out as its logical axes say (`_LOGICAL_AXES`): mixing is per token, so each
  device mixes its own tokens and channels."""
  if impl == "xla":
    return activations.mix_product_reference(h, coef, names, u, coef_u, names_u)
  if impl not in IMPLS:
    raise ValueError(f"model.ffn.impl = {impl!r}; known: {', '.join(IMPLS)}")
  from moa_jax.kernels import entry  # imported lazily: the Pallas import is slow
  mesh = platforms.auto_mesh()
  if mesh is None:
    return entry.mix_product(h, coef, names, u, coef_u, names_u)
  if h.ndim not in _LOGICAL_AXES:
    raise ValueError(f"the pallas mixing kernel on a {mesh.size}-device mesh takes h of rank "
                     f"{' or '.join(map(str, _LOGICAL_AXES))}, got shape {h.shape}; reshape to "
                     "(batch, length, F) or use model.ffn.impl='xla'")
  import flax.linen as nn
  spec = nn.logical_to_mesh_axes(_LOGICAL_AXES[h.ndim])
  return entry.mix_product_sharded(h, coef, names, u, coef_u, names_u, mesh=mesh, spec=spec)



def fused_mix_product(x: Array, w1: Array, coef: Array, names: Sequence[str], w2: Array | None = None,
                      coef_u: Array | None = None, names_u: Sequence[str] | None = None) -> Array:
  """m(x·W1) [⊙ x·W2 | ⊙ m_u(x·W2)] with the matmuls and mixing fused (`kernels.fused`).
  One device only: under a multi-device mesh, model.ffn.impl='pallas' runs per device."""
  if platforms.auto_mesh() is not None:
    raise ValueError("model.ffn.impl = 'fused' runs on one device; on a multi-device mesh use "
                     "model.ffn.impl='pallas'")
  from moa_jax.kernels import fused  # imported lazily: the Pallas import is slow
  return fused.fused_mix_product(x, w1, coef, names, w2, coef_u, names_u)
