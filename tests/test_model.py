"""The decoder, the size presets and `python -m moa_jax.summary`."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from moa_jax import presets, summary
from moa_jax.transformer import Decoder, model_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSE = {"0.12b": 0.12e9, "0.35b": 0.35e9, "0.77b": 0.77e9, "1.3b": 1.3e9, "2b": 2.0e9}


@pytest.mark.parametrize("size", sorted(DENSE))
def test_every_preset_is_within_ten_percent_and_variants_share_matmuls(size):
  counts = {f: summary.summarize(model_spec(presets.lm_config(size, f).model), 2048) for f in presets.FFN_PRESETS}
  for ffn, s in counts.items():
    assert abs(s["total_params"] / DENSE[size] - 1) <= 0.10, (ffn, s["total_params"])
  c = presets.lm_config(size, "moa").model
  d, layers, k = c.d_model, c.n_layers, len(c.ffn.activations)
  glu = {f: s for f, s in counts.items() if presets.FFN_PRESETS[f]["type"] == "glu"}
  base = counts["swiglu"]
  for ffn, s in glu.items():  # fixed / LA / MoA of one size differ only by mixing parameters
    assert s["total_params"] - s["mix_params"] == base["total_params"], ffn
  assert counts["la"]["mix_params"] == layers * k
  assert counts["bila"]["mix_params"] == 2 * layers * k
  assert counts["moa"]["mix_params"] == layers * k * (d + 1)       # U (d×K) and b (K) per layer
  assert counts["bimoa"]["mix_params"] == 2 * layers * k * (d + 1)
  assert counts["gelu_mlp"]["total_params"] - counts["moa_mlp"]["total_params"] == -layers * k * (d + 1)


def test_quickstart_and_debug_sizes():
  assert 8e6 < summary.summarize(model_spec(presets.lm_config("quickstart", "bimoa").model), 256)["total_params"] < 12e6
  assert summary.summarize(model_spec(presets.lm_config("debug", "bimoa").model), 64)["total_params"] < 1e6


def test_1_3b_matches_the_spec_reference_shape():
  s = summary.summarize(model_spec(presets.lm_config("1.3b", "swiglu").model), 2048)
  assert abs(s["matmul_params"] / 1.30e9 - 1) < 0.01  # the H200 reference step's 1.30B matmul parameters
  assert s["flops_per_token"] == 6 * s["matmul_params"] + 12 * 24 * 2048 * 2048 + s["mix_flops_per_token"]


@pytest.mark.parametrize("ffn,tie", [("bimoa", True), ("moa_mlp", False), ("swiglu", False)])
def test_decoder_shapes_dtypes_and_causality(ffn, tie):
  c = presets.lm_config("debug", ffn).model
  c.tie_embeddings = tie
  model = Decoder(model_spec(c))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, c.vocab_size)
  params = meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  assert ("unembed" in params["params"]) != tie
  apply = jax.jit(model.apply)
  logits = apply(params, tokens)
  assert logits.shape == (2, 16, c.vocab_size) and logits.dtype == jnp.float32
  changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % c.vocab_size)
  logits2 = apply(params, changed)
  np.testing.assert_array_equal(logits[:, :10], logits2[:, :10])  # the future does not leak back
  assert not np.allclose(logits[:, 10:], logits2[:, 10:])


def test_remat_policies_agree():
  c = presets.lm_config("debug", "bimoa").model
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, c.vocab_size)
  grads, params = {}, None
  for policy in ("none", "full", "save_dots_no_batch"):
    c.remat = policy
    model = Decoder(model_spec(c))
    if params is None:  # remat changes no parameter: one init (one compile) serves every policy
      params = meta.unbox(jax.jit(model.init)(jax.random.key(1), tokens))
    grads[policy] = jax.jit(jax.grad(lambda p: model.apply(p, tokens).mean()))(params)
  for policy in ("full", "save_dots_no_batch"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads["none"], grads[policy])


@pytest.mark.parametrize("field,value,message", [
    ("n_heads", 5, r"model.n_heads = 5 does not divide model.d_model = 64"),
    ("n_kv_heads", 3, r"model.n_kv_heads = 3 must divide model.n_heads = 4"),
    ("remat", "some", r"model.remat = 'some'; allowed: none, full, save_dots, save_dots_no_batch"),
    ("dtype", "fp8", r"model.dtype = 'fp8'; allowed: float32, bfloat16, float16"),
])
def test_bad_model_config(field, value, message):
  c = presets.lm_config("debug", "swiglu").model
  c[field] = value
  with pytest.raises(ValueError, match=message):
    model_spec(c)


def test_unknown_preset_names():
  with pytest.raises(ValueError, match=r"size = '3b'; known: debug, quickstart, 0.12b"):
    presets.lm_config("3b", "moa")
  with pytest.raises(ValueError, match=r"ffn = 'mystery'; known: gelu_mlp"):
    presets.from_string("size=2b,ffn=mystery")


def test_summary_cli_on_moa_2b():
  out = subprocess.run([sys.executable, "-m", "moa_jax.summary", "--config=configs/moa_2b.py", "--json",
                        "--config.model.ffn.groups=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  s = json.loads(out.stdout.strip().splitlines()[-1])
  assert {"total_params", "ffn_params", "mix_params", "flops_per_token"} <= set(s)
  assert abs(s["total_params"] / 2e9 - 1) < 0.1
  assert s["mix_params"] == 2 * 24 * 7 * 4 * (2560 + 1)  # groups=4: gates per group
  table = subprocess.run([sys.executable, "-m", "moa_jax.summary", "--config=configs/lm.py:size=0.12b,ffn=swiglu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert table.returncode == 0 and "total parameters" in table.stdout and "0.110B" in table.stdout
