"""Mixture-of-Experts FFN layer; design notes in docs/moe.md.

    spec.py      the `model.moe` config group
    router.py    scores, top-k weights, balance and z losses
    grouped.py   the experts' FFNs on grouped rows: grouped-matmul kernels (tokamax, megablox) and
                 jax.lax.ragged_dot as the reference; capacity buffers
    exchange.py  expert parallelism: ragged or padded all-to-all; never-drop buffers, or a cap per receiver
                 with fair-share and priority drops
    paths.py     dropless and capacity paths on one device's tokens
    layer.py     parameters, shard_map placement, the Flax module
    reference.py every token through every expert: the dense reference the tests compare with
    step.py      what the train step does for MoE layers: the overflow flag and warning, the loss-free
                 balancing update of the router bias
"""

from moa_jax.moe.layer import EXPERT_AXIS, MoE, Experts, moe_apply
from moa_jax.moe.paths import moe_tokens
from moa_jax.moe.router import route, router_losses
from moa_jax.moe.spec import GMMS, PATHS, ROUTERS, MoESpec

__all__ = ["EXPERT_AXIS", "GMMS", "PATHS", "ROUTERS", "Experts", "MoE", "MoESpec", "moe_apply", "moe_tokens",
           "route", "router_losses"]
