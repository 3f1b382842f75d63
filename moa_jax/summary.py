"""Parameter and FLOP accounting, built abstractly (`jax.eval_shape`: no weights allocated).

    python -m moa_jax.summary --config=configs/moa_2b.py [--config.model.ffn.groups=4] [--json]

FLOPs per token count a training step (forward + backward): 6 per matmul parameter (including the
output projection and the MoA gate matmuls), plus attention scores 12·L·H·T (the convention of
the H200 reference step in docs/kernel.md, full T×T, no causal discount), plus the FFN's elementwise work (the activations, their LA/MoA
mixing and the GLU product, 3× the forward count for forward + backward), which is what sets
bi-MoA apart from SwiGLU at equal matmul parameters (8.6% of bi-MoA's FLOPs at debug size).

MoE: a token uses top_k of the E routed experts, so active parameters count the routed experts'
parameters at top_k/E (router and shared experts in full), and every FLOP count (flops_per_token
included, which the trainer's MFU uses) is of active parameters.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax.core import meta
from ml_collections import config_flags

from moa_jax import cli
from moa_jax.activations import ACTIVATIONS
from moa_jax.transformer import Decoder, ModelSpec, model_spec

def param_shapes(spec: ModelSpec, seq_len: int = 8):
  """The model's parameter tree as ShapeDtypeStructs (logical-partitioning boxes removed)."""
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  variables = jax.eval_shape(lambda t: Decoder(spec).init(jax.random.key(0), t), tokens)
  return meta.unbox(variables["params"])


def _count(tree, keep=lambda path: True) -> int:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return sum(math.prod(x.shape) for path, x in leaves if keep(jax.tree_util.keystr(path)))


def mix_flops_per_element(spec: ModelSpec) -> int:
  """Forward elementwise FLOPs per hidden element: K activations, K multiply-adds, the GLU product."""
  f = spec.ffn
  if f.mix == "fixed":
    return ACTIVATIONS[f.activations[0]].flops + (1 if f.type == "glu" else 0)
  one = sum(ACTIVATIONS[n].flops for n in f.activations) + 2 * len(f.activations)
  return one * f.mixed_branches + (1 if f.type == "glu" else 0)


def summarize(spec: ModelSpec, seq_len: int) -> dict:
  params = param_shapes(spec)
  total = _count(params)
  embedding = _count(params, lambda p: "embedding" in p)
  ffn = _count(params, lambda p: "'ffn'" in p or "'moe'" in p)
  mix = _count(params, lambda p: "'mix" in p)
  attention = _count(params, lambda p: "'attention'" in p)
  norms = _count(params, lambda p: "norm" in p)
  not_mixing_matmul = lambda p: "'coef'" not in p and "gate_bias" not in p
  # Matmul parameters: everything but norms, LA coefficients and gate biases, and the embedding
  # lookup (which is a matmul only as the tied output projection).
  not_matmul = norms + _count(params, lambda p: not not_mixing_matmul(p))
  matmul = total - not_matmul - embedding + (embedding if spec.tie_embeddings else 0)
  # Routed experts (all E): a token runs top_k of them.
  m = spec.moe
  experts = _count(params, lambda p: "'experts'" in p)
  experts_matmul = _count(params, lambda p: "'experts'" in p and not_mixing_matmul(p))
  idle = (lambda n: n * (m.num_experts - m.top_k) // m.num_experts) if m.num_experts else (lambda n: 0)
  active, active_matmul = total - idle(experts), matmul - idle(experts_matmul)
  attn_dim = spec.n_heads * spec.resolved_head_dim
  attention_flops = 12 * spec.n_layers * attn_dim * seq_len
  moe_layers = spec.n_layers // m.every if m.num_experts else 0
  hidden = ((spec.n_layers - moe_layers) * spec.ffn.d_ff
            + moe_layers * (m.top_k + m.shared_experts) * spec.expert_ffn.d_ff)  # active hidden units / token
  mix_flops = 3 * mix_flops_per_element(spec) * hidden
  bytes_per_param = np.dtype(spec.param_dtype).itemsize
  return {
      "total_params": total,
      "active_params": active,
      "embedding_params": embedding,
      "attention_params": attention,
      "ffn_params": ffn,
      "expert_params": experts,
      "mix_params": mix,
      "matmul_params": matmul,
      "active_matmul_params": active_matmul,
      "seq_len": seq_len,
      "matmul_flops_per_token": 6 * active_matmul,
      "attention_flops_per_token": attention_flops,
      "mix_flops_per_token": mix_flops,
      "flops_per_token": 6 * active_matmul + attention_flops + mix_flops,
      "active_flops_per_token": 6 * active_matmul + attention_flops + mix_flops,
      "param_bytes": total * bytes_per_param,
  }


def format_summary(name: str, s: dict) -> str:
  g = lambda n: f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
  moe = lambda row: [row] if s["expert_params"] else []  # rows shown for MoE models only
  rows = [
      ("total parameters", g(s["total_params"])),
      ("  embedding", g(s["embedding_params"])),
      ("  attention", g(s["attention_params"])),
      ("  ffn" + (" (MoE included)" if s["expert_params"] else ""), g(s["ffn_params"])),
      *moe(("    routed experts", g(s["expert_params"]))),
      ("    mixing (coefficients / gates)", f"{s['mix_params']:,}"),
      *moe(("active parameters (per token)", g(s["active_params"]))),
      ("matmul parameters", g(s["matmul_params"])),
      *moe(("active matmul parameters", g(s["active_matmul_params"]))),
      (f"training FLOPs / token (T={s['seq_len']})", f"{s['flops_per_token'] / 1e9:.3f} GFLOP"),
      ("  matmuls (6N, N active)" if s["expert_params"] else "  matmuls (6N)",
       f"{s['matmul_flops_per_token'] / 1e9:.3f} GFLOP"),
      ("  attention scores", f"{s['attention_flops_per_token'] / 1e9:.3f} GFLOP"),
      ("  activations and mixing (elementwise)", f"{s['mix_flops_per_token'] / 1e6:.2f} MFLOP"),
      ("parameter memory", f"{s['param_bytes'] / 2**30:.2f} GiB"),
  ]
  width = max(len(r[0]) for r in rows)
  return "\n".join([name] + [f"  {k:<{width}}  {v}" for k, v in rows])


@cli.command()
def main(argv):
  del argv
  config = flags.FLAGS.config
  s = summarize(model_spec(config.model), config.train.seq_len)
  if flags.FLAGS.json:
    print(json.dumps({"name": config.name, **s}))
  else:
    print(format_summary(config.name, s))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=cli.parse_flags)
