"""The `model.moe` config group, validated."""

from __future__ import annotations

import dataclasses

from moa_jax import ffn as ffn_lib

ROUTERS = ("softmax", "sigmoid")
PATHS = ("dropless", "capacity")
GMMS = ("auto", "tokamax", "megablox", "ragged_dot")
TRANSPORTS = ("auto", "ragged", "padded")


@dataclasses.dataclass(frozen=True)
class MoESpec:
  """num_experts = 0 is a dense model."""
  num_experts: int = 0           # routed experts E (0: dense FFNs everywhere)
  top_k: int = 2                 # experts per token
  every: int = 1                 # MoE in every N-th layer (layers N-1, 2N-1, ...), dense FFNs between
  router: str = "softmax"        # softmax | sigmoid scores
  normalize_topk: bool = True    # top_k > 1: renormalise the k chosen scores to sum to 1 (top-1: never)
  shared_experts: int = 0        # always-on experts, run as one FFN of width shared_experts · d_ff_expert
  d_ff_expert: int = 0           # expert hidden width (0: model.ffn.d_ff)
  path: str = "dropless"         # dropless (grouped matmuls) | capacity (fixed (E, C, D) buffers, drops overflow)
  capacity_factor: float = 1.25  # capacity path: slots per expert = ⌈factor · tokens · top_k / E⌉
  gmm: str = "auto"              # grouped matmul: auto (tokamax on GPU/TPU, ragged_dot on CPU) | tokamax |
                                 # megablox (jax's TPU kernel) | ragged_dot (XLA; dense masked on CPU and GPU)
  buffer_factor: float = -1.0    # expert parallelism: rows a device may receive in all, as a multiple of the
                                 # balanced count; < 0 (default): the worst case, nothing is ever dropped. With a
                                 # cap, overflow is dropped by fair share per expert, then priority (exchange.py)
  bias_rate: float = 0.0         # γ of DeepSeek-V3's auxiliary-loss-free balancing: a per-layer, per-expert
                                 # router bias for the top-k choice, b += γ·sign(mean load − load) each
                                 # step (0: off; DeepSeek-V3 used 0.001)
  routed_scale: float = 1.0      # routed experts' output × this before the shared experts' is added
                                 # (DeepSeek-V3: 2.5)
  transport: str = "auto"        # expert-parallel exchange: auto (padded on CPU, ragged elsewhere) | ragged
                                 # (ragged_all_to_all: kept rows only) | padded (all_to_all of padded buffers)

  def __post_init__(self):
    ffn_lib._choice("model.moe.router", self.router, ROUTERS)
    ffn_lib._choice("model.moe.path", self.path, PATHS)
    ffn_lib._choice("model.moe.gmm", self.gmm, GMMS)
    ffn_lib._choice("model.moe.transport", self.transport, TRANSPORTS)
    if self.num_experts < 0:
      raise ValueError(f"model.moe.num_experts = {self.num_experts}; use 0 (dense) or a positive count")
    if not self.num_experts:
      return
    if self.top_k < 1:
      raise ValueError(f"model.moe.top_k = {self.top_k}; must be ≥ 1")
    if self.top_k > self.num_experts:
      raise ValueError(f"model.moe.top_k = {self.top_k} > model.moe.num_experts = {self.num_experts}; "
                       "route each token to at most num_experts experts")
    if self.every < 1:
      raise ValueError(f"model.moe.every = {self.every}; must be ≥ 1 (1: every layer is MoE)")
    for field in ("shared_experts", "d_ff_expert"):
      if getattr(self, field) < 0:
        raise ValueError(f"model.moe.{field} = {getattr(self, field)}; must be ≥ 0")
    if self.capacity_factor <= 0:
      raise ValueError(f"model.moe.capacity_factor = {self.capacity_factor}; must be positive")
    if self.bias_rate < 0 or self.routed_scale <= 0:
      raise ValueError(f"model.moe.bias_rate = {self.bias_rate}, routed_scale = {self.routed_scale}; bias_rate "
                       "must be ≥ 0 (0: off) and routed_scale positive (1.0: off)")
    if self.buffer_factor == 0:
      raise ValueError(f"model.moe.buffer_factor = {self.buffer_factor}; use a negative value (never drop: buffers for the worst "
                       "case) or a positive multiple of the balanced load, e.g. 2.0")
