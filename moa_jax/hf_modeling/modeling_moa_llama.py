"""Hugging Face custom code for moa_jax models that `LlamaForCausalLM` cannot express: Type-I MLPs
(`W3·σ(W1x)`, no gate branch) and FFNs that mix activations (LA coefficients, MoA per-token gates,
one- or bi-sided, G channel groups). Everything but the FFN is Llama's own code.

`python -m moa_jax.export_hf` copies this file next to config.json; load the directory with

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

The FFN (config.moa_ffn holds its fields, with moa_jax's names):

    Type-I : down(m(gate(x)))                 Type-II: down(m(gate(x)) ⊙ u),  u = up(x) or m_u(up(x))
    m(h)[f] = Σ_k c[g(f), k] · σ_k(h[f])      c: LA `coef` (G, K), or MoA gates φ(x·U + b) (B, T, G, K)

with channel f in group g(f) = f // (F / G). The mixing is computed in float32, as moa_jax does. This file
depends on torch and transformers only.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

_LEAKY_SLOPE = 0.01  # moa_jax.activations.LEAKY_SLOPE

# moa_jax's activation dictionary, by its names.
ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "relu2": lambda z: torch.square(torch.relu(z)),
    "leaky_relu": lambda z: torch.where(z >= 0, z, _LEAKY_SLOPE * z),
    "gelu": lambda z: 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0))),
    "gelu_tanh": lambda z: 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3))),
    "silu": F.silu,
    "tanh": torch.tanh,
}
GATES = {"sigmoid": torch.sigmoid, "softmax": lambda z: torch.softmax(z, dim=-1), "tanh": torch.tanh}


class MoaLlamaConfig(LlamaConfig):
  """LlamaConfig plus `moa_ffn`: {type, mix, activations, sides, gate, gate_bias, groups}."""
  model_type = "moa_llama"


class Mixer(nn.Module):
  """One mixed branch's coefficients: LA `coef` (G, K), or MoA gates from `gate_kernel` (D, G, K) and
  `gate_bias` (G, K). Returns float32 coefficients that broadcast against (B, T, G, K)."""

  def __init__(self, ffn: dict, d_model: int):
    super().__init__()
    g, k = ffn["groups"], len(ffn["activations"])
    self.la = ffn["mix"] == "la"
    self.gate = GATES[ffn["gate"]]
    if self.la:
      self.coef = nn.Parameter(torch.zeros(g, k))
    else:
      self.gate_kernel = nn.Parameter(torch.zeros(d_model, g, k))
      self.gate_bias = nn.Parameter(torch.zeros(g, k)) if ffn["gate_bias"] else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
    if self.la:
      return self.coef.float()
    logits = torch.einsum("btd,dgk->btgk", x.float(), self.gate_kernel.float())
    if self.gate_bias is not None:
      logits = logits + self.gate_bias.float()
    return self.gate(logits)


def mix(h: torch.Tensor, coef: torch.Tensor, names) -> torch.Tensor:
  """m(h) = Σ_k c_k σ_k(h) in float32, returned in h's dtype. h: (B, T, F); coef: (..., G, K)."""
  groups = coef.shape[-2]
  hg = h.float().reshape(*h.shape[:-1], groups, h.shape[-1] // groups)  # (B, T, G, F/G)
  out = sum(coef[..., k, None] * ACTIVATIONS[name](hg) for k, name in enumerate(names))
  return out.reshape(h.shape).to(h.dtype)


class MixedMLP(nn.Module):
  """The moa_jax FFN with Llama's projection names: gate_proj = W1, up_proj = W2 (GLU), down_proj = W3."""

  def __init__(self, config):
    super().__init__()
    ffn, d, f = config.moa_ffn, config.hidden_size, config.intermediate_size
    self.names = tuple(ffn["activations"])
    self.glu = ffn["type"] == "glu"
    self.fixed = ffn["mix"] == "fixed"
    self.gate_proj = nn.Linear(d, f, bias=False)
    self.up_proj = nn.Linear(d, f, bias=False) if self.glu else None
    self.down_proj = nn.Linear(f, d, bias=False)
    self.mix = None if self.fixed else Mixer(ffn, d)
    self.mix_u = Mixer(ffn, d) if self.glu and ffn["sides"] == "bi" and not self.fixed else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D)
    h = self.gate_proj(x)                                  # (B, T, F)
    if self.fixed:
      y = ACTIVATIONS[self.names[0]](h.float()).to(h.dtype)
    else:
      y = mix(h, self.mix(x), self.names)
    if self.glu:
      u = self.up_proj(x)
      if self.mix_u is not None:
        u = mix(u, self.mix_u(x), self.names)
      y = (y.float() * u.float()).to(h.dtype)
    return self.down_proj(y)


class MoaLlamaForCausalLM(LlamaForCausalLM):
  """LlamaForCausalLM whose every layer's MLP is a MixedMLP."""
  config_class = MoaLlamaConfig

  def __init__(self, config):
    super().__init__(config)
    for layer in self.model.layers:
      layer.mlp = MixedMLP(config)
    self.post_init()
