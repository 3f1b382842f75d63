"""Parameter and FLOP accounting, built abstractly (`jax.eval_shape`: no weights allocated).

    python -m moa_jax.summary --config=configs/moa_2b.py [--config.model.ffn.groups=4] [--json]

FLOPs per token count a training step (forward + backward): 6 per matmul parameter (including the
output projection and the MoA gate matmuls), plus attention scores 12·L·H·T (the convention of
SPEC §4, full T×T, no causal discount), and, separately, the elementwise activation mixing.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from flax.core import meta

from moa_jax.transformer import Decoder, ModelSpec, model_spec

# Forward FLOPs per element for each activation (σ and σ' share work; transcendental = 1 op).
_ACT_FLOPS = {"identity": 0, "relu": 1, "relu2": 2, "leaky_relu": 2, "gelu": 8, "gelu_tanh": 9,
              "silu": 4, "tanh": 1}


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
    return _ACT_FLOPS[f.activations[0]] + (1 if f.type == "glu" else 0)
  one = sum(_ACT_FLOPS[n] for n in f.activations) + 2 * len(f.activations)
  return one * f.mixed_branches + (1 if f.type == "glu" else 0)


def summarize(spec: ModelSpec, seq_len: int) -> dict:
  params = param_shapes(spec)
  total = _count(params)
  embedding = _count(params, lambda p: "embedding" in p)
  ffn = _count(params, lambda p: "'ffn'" in p)
  mix = _count(params, lambda p: "'mix" in p)
  attention = _count(params, lambda p: "'attention'" in p)
  norms = _count(params, lambda p: "norm" in p)
  # Matmul parameters: everything but norms, LA coefficients and gate biases, and the embedding
  # lookup (which is a matmul only as the tied output projection).
  not_matmul = norms + _count(params, lambda p: "'coef'" in p or "gate_bias" in p)
  matmul = total - not_matmul - embedding + (embedding if spec.tie_embeddings else 0)
  attn_dim = spec.n_heads * spec.resolved_head_dim
  attention_flops = 12 * spec.n_layers * attn_dim * seq_len
  mix_flops = 3 * mix_flops_per_element(spec) * spec.ffn.d_ff * spec.n_layers
  bytes_per_param = np.dtype(spec.param_dtype).itemsize
  return {
      "total_params": total,
      "active_params": total,
      "embedding_params": embedding,
      "attention_params": attention,
      "ffn_params": ffn,
      "mix_params": mix,
      "matmul_params": matmul,
      "seq_len": seq_len,
      "matmul_flops_per_token": 6 * matmul,
      "attention_flops_per_token": attention_flops,
      "mix_flops_per_token": mix_flops,
      "flops_per_token": 6 * matmul + attention_flops,
      "param_bytes": total * bytes_per_param,
  }


def format_summary(name: str, s: dict) -> str:
  g = lambda n: f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
  rows = [
      ("total parameters", g(s["total_params"])),
      ("  embedding", g(s["embedding_params"])),
      ("  attention", g(s["attention_params"])),
      ("  ffn", g(s["ffn_params"])),
      ("    mixing (coefficients / gates)", f"{s['mix_params']:,}"),
      ("matmul parameters", g(s["matmul_params"])),
      (f"training FLOPs / token (T={s['seq_len']})", f"{s['flops_per_token'] / 1e9:.3f} GFLOP"),
      ("  matmuls (6N)", f"{s['matmul_flops_per_token'] / 1e9:.3f} GFLOP"),
      ("  attention scores", f"{s['attention_flops_per_token'] / 1e9:.3f} GFLOP"),
      ("  activation mixing (elementwise, not in the total)", f"{s['mix_flops_per_token'] / 1e6:.2f} MFLOP"),
      ("parameter memory", f"{s['param_bytes'] / 2**30:.2f} GiB"),
  ]
  width = max(len(r[0]) for r in rows)
  return "\n".join([name] + [f"  {k:<{width}}  {v}" for k, v in rows])


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
  app.run(main)
