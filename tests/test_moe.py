"""The MoE layer on one device: dropless and capacity paths against a dense reference that runs every
expert's FFN module, router losses by hand, configs, presets, summary and a short training run.
Expert parallelism on 8 fake devices: tests/test_moe_parallel.py."""

import functools
import json
import math
import os
import re
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from moa_jax import presets, sharding, summary, train
from moa_jax.ffn import FFN, FFNSpec
from moa_jax.moe import MoE, MoESpec
from moa_jax.moe.reference import dense_reference
from moa_jax.transformer import Decoder, model_spec

D, F = 16, 32


def ffn_spec(variant: str, d_ff: int = F) -> FFNSpec:
  preset = presets.FFN_PRESETS[variant]
  return FFNSpec(**{**preset, "activations": tuple(preset["activations"])}, d_ff=d_ff)


def make(variant="bimoa", experts=4, top_k=2, **moe):
  return MoE(MoESpec(num_experts=experts, top_k=top_k, **moe), ffn_spec(variant), jnp.float32, jnp.float32)


def init(layer, x, seed=0):
  """Parameters with every leaf perturbed, so gates and mixing coefficients differ between experts."""
  p = meta.unbox(layer.init(jax.random.key(seed), x))["params"]
  leaves, tree = jax.tree_util.tree_flatten(p)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [v + 0.3 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])


def tokens(shape=(2, 12), seed=2):
  return jax.random.normal(jax.random.key(seed), (*shape, D), jnp.float32)


def apply(layer, params, x):
  y, inter = layer.apply({"params": params}, x, mutable=["intermediates"])
  return y, inter["intermediates"]


def reference(layer, params, x, keep=None):
  return dense_reference(layer.spec, layer.ffn, params, x, keep)


def assert_tree_close(a, b, rtol=2e-4, atol=2e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("variant,router,shared,grouped_gates", [
    ("swiglu", "softmax", 0, False), ("moa_mlp", "sigmoid", 0, False), ("bimoa", "softmax", 1, False),
    ("la", "sigmoid", 0, False), ("bimoa", "sigmoid", 0, True)])
def test_dropless_output_and_gradients_equal_the_dense_reference(variant, router, shared, grouped_gates,
                                                                  monkeypatch):
  """grouped_gates: MoA gate logits as a grouped matmul of the routed rows (what many experts use)."""
  from moa_jax.moe import grouped
  monkeypatch.setattr(grouped, "GROUPED_GATE_COLUMNS", 0 if grouped_gates else 10**9)
  layer = make(variant, experts=4, top_k=2, router=router, shared_experts=shared)
  x = tokens()
  params = init(layer, x)
  probe = jax.random.normal(jax.random.key(9), x.shape)

  def vjp(fn):  # output and the gradient of <output, probe> for parameters and input
    y, pullback = jax.vjp(lambda p, x: fn(layer, p, x)[0], params, x)
    return y, pullback(probe)
  (y_fast, g_fast), (y_slow, g_slow) = jax.jit(lambda: (vjp(apply), vjp(reference)))()
  np.testing.assert_allclose(y_fast, y_slow, rtol=1e-4, atol=1e-5)
  assert_tree_close(g_fast, g_slow)
  # Each expert has its own gates / coefficients, and every one of them receives gradient.
  if variant != "swiglu":
    for v in jax.tree.leaves(g_fast[0]["experts"]["mix"]):
      assert np.abs(v).reshape(4, -1).sum(1).min() > 0


def test_capacity_with_a_large_factor_equals_dropless():
  x = tokens((2, 16))
  dropless = make("bimoa", experts=4, top_k=2)
  capacity = make("bimoa", experts=4, top_k=2, path="capacity", capacity_factor=4.0)  # E/k: never full
  params = init(dropless, x)
  y_a, inter_a = jax.jit(lambda p, x: apply(dropless, p, x))(params, x)
  y_b, inter_b = jax.jit(lambda p, x: apply(capacity, p, x))(params, x)
  np.testing.assert_allclose(y_a, y_b, rtol=1e-5, atol=1e-6)
  assert float(inter_b["moe_stats"][0]["dropped"]) == 0.0
  assert_tree_close(inter_a["aux_losses"], inter_b["aux_losses"], rtol=1e-6, atol=0)
  assert_tree_close(inter_a["mix_mean"], inter_b["mix_mean"], rtol=1e-5, atol=1e-7)


def test_capacity_with_a_small_factor_drops_what_it_reports():
  e, k = 4, 2
  x = tokens((2, 16))
  layer = make("moa", experts=e, top_k=k, path="capacity", capacity_factor=0.5)
  params = init(layer, x)
  y, inter = jax.jit(lambda p, x: apply(layer, p, x))(params, x)
  _, chosen = reference(layer, params, x)
  n = x.shape[0] * x.shape[1]
  cap = math.ceil(0.5 * n * k / e)
  # Priority: every token's first choice, then second choices, each in token order.
  chosen = np.asarray(chosen).reshape(n, k)
  keep, used = np.zeros((n, k)), np.zeros(e, int)
  for j in range(k):
    for t in range(n):
      if used[chosen[t, j]] < cap:
        keep[t, j], used[chosen[t, j]] = 1, used[chosen[t, j]] + 1
  counts = np.bincount(chosen.reshape(-1), minlength=e)
  dropped = float(inter["moe_stats"][0]["dropped"])
  assert dropped > 0.1
  assert dropped == pytest.approx(np.maximum(counts - cap, 0).sum() / (n * k))
  assert dropped == pytest.approx(1 - keep.mean())
  expected, _ = reference(layer, params, x, keep=jnp.asarray(keep).reshape(*x.shape[:2], k))
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_router_losses_and_weights_by_hand(router):
  """Three 2-d tokens, two experts, top-1, router kernel chosen so the logits are [0, ln3], [0, 0], [0, ln3]."""
  layer = MoE(MoESpec(num_experts=2, top_k=1, router=router), ffn_spec("swiglu", 4), jnp.float32, jnp.float32)
  x = jnp.asarray([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
  params = meta.unbox(layer.init(jax.random.key(0), x))["params"]
  params["router"] = jnp.asarray([[0.0, math.log(3)], [0.0, 0.0]])
  _, inter = apply(layer, params, x)
  losses, stats = inter["aux_losses"][0], inter["moe_stats"][0]
  # top-1 picks expert 1, expert 0 (tie -> lower index), expert 1: f = (1/3, 2/3).
  np.testing.assert_allclose(stats["load"], [1 / 3, 2 / 3], rtol=1e-6)
  if router == "softmax":   # s = (1/4, 3/4), (1/2, 1/2), (1/4, 3/4)
    mean_scores = [(0.25 + 0.5 + 0.25) / 3, (0.75 + 0.5 + 0.75) / 3]
  else:                     # sigmoid (1/2, 3/4) -> normalised (2/5, 3/5); (1/2, 1/2)
    mean_scores = [(0.4 + 0.5 + 0.4) / 3, (0.6 + 0.5 + 0.6) / 3]
  aux = 2 * (1 / 3 * mean_scores[0] + 2 / 3 * mean_scores[1])
  z = (2 * math.log(4) ** 2 + math.log(2) ** 2) / 3                   # logsumexp: ln 4, ln 2, ln 4
  np.testing.assert_allclose(losses["aux_loss"], aux, rtol=1e-6)
  np.testing.assert_allclose(losses["z_loss"], z, rtol=1e-6)
  # top-1 (Switch): the output is the chosen expert's FFN times its raw score.
  y, _ = apply(layer, params, x)
  np.testing.assert_allclose(y, reference(layer, params, x)[0], rtol=1e-6)


def test_balanced_routing_gives_aux_loss_one():
  layer = MoE(MoESpec(num_experts=2, top_k=1), ffn_spec("swiglu", 4), jnp.float32, jnp.float32)
  x = jnp.asarray([[[1.0, 0.0], [0.0, 1.0]]])
  params = meta.unbox(layer.init(jax.random.key(0), x))["params"]
  params["router"] = jnp.asarray([[2.0, 0.0], [0.0, 2.0]])  # token 0 -> expert 0, token 1 -> expert 1, mirrored
  _, inter = apply(layer, params, x)
  np.testing.assert_allclose(inter["aux_losses"][0]["aux_loss"], 1.0, rtol=1e-6)


def test_expert_parameters_are_the_ffn_tree_with_an_expert_axis():
  layer = make("bimoa", experts=4, top_k=2, shared_experts=1)
  x = tokens()
  boxed = layer.init(jax.random.key(0), x)["params"]
  ffn_tree = meta.unbox(FFN(ffn_spec("bimoa")).init(jax.random.key(0), x))["params"]
  experts = meta.unbox(boxed["experts"])
  assert jax.tree.structure(experts) == jax.tree.structure(ffn_tree)
  jax.tree.map(lambda e, f: assert_shape(e.shape, (4, *f.shape)), experts, ffn_tree)
  names = {jax.tree_util.keystr(p): v.names for p, v in jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda v: isinstance(v, meta.Partitioned))}
  assert names["['experts']['w1']"] == ("experts", "embed", "mlp")
  assert names["['experts']['w3']"] == ("experts", "mlp", "embed")
  assert names["['experts']['mix']['gate_kernel']"] == ("experts", "embed", "mix_groups", "activations")
  assert names["['router']"] == ("embed", None)
  assert names["['shared']['w1']"] == ("embed", "mlp")


def assert_shape(a, b):
  assert tuple(a) == tuple(b), (a, b)


@pytest.mark.parametrize("field,value,message", [
    ("top_k", 3, r"model.moe.top_k = 3 > model.moe.num_experts = 2; route each token"),
    ("top_k", 0, r"model.moe.top_k = 0; must be ≥ 1"),
    ("router", "relu", r"model.moe.router = 'relu'; allowed: softmax, sigmoid"),
    ("path", "dense", r"model.moe.path = 'dense'; allowed: dropless, capacity"),
    ("gmm", "cuda", r"model.moe.gmm = 'cuda'; allowed: auto, tokamax, megablox, ragged_dot"),
    ("buffer_factor", 0.0, r"model.moe.buffer_factor = 0.0; use a negative value \(never drop"),
    ("transport", "nccl", r"model.moe.transport = 'nccl'; allowed: auto, ragged, padded"),
    ("every", 3, r"model.n_layers = 2 is not a multiple of model.moe.every = 3"),
    ("d_ff_expert", 100, r"model.ffn.groups = 3 must divide the expert width model.moe.d_ff_expert = 100"),
    ("colour", "red", r"model.moe has unknown fields \['colour'\]; known: num_experts, top_k"),
])
def test_bad_moe_configs_fail_clearly(field, value, message):
  c = presets.lm_config("debug_moe", "bimoa").model
  c.moe.num_experts = 2
  if field == "d_ff_expert":
    c.ffn.groups = 3
  with pytest.raises(ValueError, match=message):
    c.moe[field] = value
    model_spec(c)


def test_experts_not_divisible_by_the_expert_axis():
  c = presets.lm_config("debug_moe", "bimoa")
  c.model.moe.num_experts = 6
  model = Decoder(model_spec(c.model))
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((8, 16), jnp.int32))["params"]
  fake_mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1, "expert": 4})
  with pytest.raises(ValueError, match=r"model.moe.num_experts = 6 does not divide over mesh.expert = 4"):
    sharding.check_divisible(meta.unbox(boxed), nn.get_partition_spec(boxed), fake_mesh)


def test_decoder_trees_dense_unchanged_and_moe_every_n_layers():
  def tree(**moe):
    c = presets.lm_config("debug_moe", "moa").model
    c.n_layers = 4
    for k, v in moe.items():
      c.moe[k] = v
    spec = model_spec(c)
    p = summary.param_shapes(spec)["layers"]
    return spec, p
  _, dense = tree(num_experts=0)
  assert dense["ffn"]["w1"].shape == (4, 64, 192) and dense["attention"]["wq"].shape[0] == 4 and "moe" not in dense
  _, every = tree(every=1)
  assert every["moe"]["experts"]["w1"].shape == (4, 8, 64, 192) and "ffn" not in every
  _, second = tree(every=2, shared_experts=1, d_ff_expert=64)
  assert set(second) == {"block_0", "block_1"}
  assert second["block_0"]["ffn"]["w1"].shape == (2, 64, 192)                 # layers 0, 2: dense
  assert second["block_1"]["moe"]["experts"]["w1"].shape == (2, 8, 64, 64)   # layers 1, 3: MoE
  assert second["block_1"]["moe"]["shared"]["w1"].shape == (2, 64, 64)


def test_summary_counts_active_parameters_and_flops():
  spec = model_spec(presets.lm_config("debug_moe", "bimoa").model)
  s = summary.summarize(spec, 64)
  e, k, layers, d, f = 8, 2, 2, 64, 192
  per_expert_matmul, per_expert_mix = 3 * d * f, 2 * 7 * (d + 1)
  assert s["expert_params"] == layers * e * (per_expert_matmul + per_expert_mix)
  assert s["total_params"] - s["active_params"] == layers * (e - k) * (per_expert_matmul + per_expert_mix)
  assert s["matmul_params"] - s["active_matmul_params"] == layers * (e - k) * (per_expert_matmul + 2 * 7 * d)
  assert s["active_flops_per_token"] == s["flops_per_token"] == (6 * s["active_matmul_params"] + 12 * layers * d * 64
                                                                + s["mix_flops_per_token"])
  dense = summary.summarize(model_spec(presets.lm_config("debug", "bimoa").model), 64)
  assert dense["active_params"] == dense["total_params"] and dense["expert_params"] == 0


@pytest.mark.parametrize("size", [s for s in presets.MOE_SIZES if s != "debug_moe"])
def test_moe_presets_are_named_by_total_and_active_parameters(size):
  total, active = (float(v) * 1e9 for v in re.fullmatch(r"moe_([\d.]+)b_a([\d.]+)b", size).groups())
  for variant in ("swiglu", "bimoa"):
    s = summary.summarize(model_spec(presets.lm_config(size, variant).model), 2048)
    assert abs(s["total_params"] / total - 1) <= 0.10, (variant, s["total_params"])
    assert abs(s["active_params"] / active - 1) <= 0.10, (variant, s["active_params"])


def test_debug_moe_trains_and_logs_router_metrics(data_cache, tmp_path):
  """configs/debug_moe.py on the capacity path (so dropped tokens are reported), a few steps."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("debug_moe", os.path.join(os.path.dirname(__file__), "..",
                                                                          "configs", "debug_moe.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.cache_dir, c.data.max_bytes = data_cache, 400_000
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.sample_every = 20, 10, 20, 0
  c.checkpoint.every = 0
  c.model.moe.path, c.model.moe.capacity_factor = "capacity", 1.0
  workdir = str(tmp_path / "run")
  train.train(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rec = [json.loads(line) for line in f]
  assert [r["step"] for r in rec] == [10, 20]
  assert rec[-1]["lm_loss"] < rec[0]["lm_loss"] - 0.3
  for r in rec:
    assert r["loss"] == pytest.approx(r["lm_loss"] + 0.01 * r["aux_loss"] + 0.001 * r["z_loss"], rel=1e-5)
    assert len(r["expert_load_max"]) == len(r["expert_load_min"]) == c.model.n_layers
    assert all(1 / 8 <= hi <= 1 and 0 <= lo <= 1 / 8 for hi, lo in zip(r["expert_load_max"], r["expert_load_min"]))
    assert 0 <= r["dropped_fraction"] < 0.5 and r["aux_loss"] > 0 and r["z_loss"] > 0
  assert set(rec[-1]["gates"]) == {"moe.mix", "moe.mix_u"}
  assert "eval_loss" in rec[-1] and np.isfinite(rec[-1]["eval_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("path", ["dropless", "capacity"])
def test_experts_with_the_fused_mixing_kernel_match_xla(path):
  """model.ffn.impl = 'pallas' (interpreted on CPU) applies per routed row, unchanged."""
  x = tokens()
  fast = MoE(MoESpec(num_experts=4, top_k=2, path=path), FFNSpec(**{**ffn_spec("bimoa").__dict__, "impl": "pallas"}),
             jnp.float32, jnp.float32)
  slow = make("bimoa", experts=4, top_k=2, path=path)
  assert_same_loss_and_grads(fast, slow, x)


def assert_same_loss_and_grads(fast, slow, x):
  """Two MoE layers with the same parameters: Σ y² and its gradients agree."""
  params = init(slow, x)
  loss = lambda layer: jax.jit(jax.value_and_grad(lambda p: jnp.sum(apply(layer, p, x)[0] ** 2)))(params)
  (v_fast, g_fast), (v_slow, g_slow) = loss(fast), loss(slow)
  np.testing.assert_allclose(v_fast, v_slow, rtol=1e-5)
  assert_tree_close(g_fast, g_slow)


def test_top1_router_learns_from_the_lm_loss():
  """Top-1 keeps the raw router score (Switch): renormalising one weight would make it 1 and cut the
  router off from the loss."""
  x = tokens()
  layer = make("swiglu", experts=4, top_k=1)
  params = init(layer, x)
  probe = jax.random.normal(jax.random.key(9), x.shape)
  grads = jax.grad(lambda p: jnp.sum(apply(layer, p, x)[0] * probe))(params)
  router, w1 = (float(jnp.linalg.norm(grads["router"])), float(jnp.linalg.norm(grads["experts"]["w1"])))
  assert router > 0.05 * w1, (router, w1)


def test_megablox_kernel_equals_ragged_dot(monkeypatch):
  """jax's TPU grouped-matmul kernel (interpreted on CPU) through grouped.gmm: output and gradients; rows
  past Σ sizes, which the kernel leaves unwritten, come out zero forward and backward."""
  from moa_jax.moe import grouped
  monkeypatch.setitem(grouped.GMM_FNS, "megablox", functools.partial(grouped._megablox, interpret=True))
  kx, kw, kd = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, (40, 16)), jax.random.normal(kw, (3, 16, 24))
  sizes = jnp.asarray([9, 0, 25], jnp.int32)                          # 34 of 40 rows are valid
  dy = jax.random.normal(kd, (40, 24))
  (y_fast, back_fast), (y_ref, back_ref) = (jax.vjp(lambda x, w: grouped.gmm(x, w, sizes, impl), x, w)
                                            for impl in ("megablox", "ragged_dot"))
  np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-5)
  assert_tree_close(back_fast(dy), back_ref(dy), rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(y_fast[34:], 0.0)
  np.testing.assert_array_equal(back_fast(dy)[0][34:], 0.0)


def test_tokamax_on_cpu_equals_ragged_dot():
  pytest.importorskip("tokamax")
  x = tokens()
  fast, slow = make("bimoa", gmm="tokamax"), make("bimoa", gmm="ragged_dot")
  assert_same_loss_and_grads(fast, slow, x)


def test_accelerator_path_exports_grouped_kernels_without_a_dense_expansion():
  """The MoE layer's forward + backward exported for TPU with gmm=megablox: the grouped matmuls are Mosaic
  kernels (3 forward; gmm + tgmm for each in the backward) and no tensor is shaped (E, rows, ·), the dense
  masked expansion XLA makes of ragged_dot."""
  e, n, k, d, f = 8, 256, 2, 128, 256
  x = jax.ShapeDtypeStruct((1, n, d), jnp.bfloat16)
  texts = {}
  for gmm in ("megablox", "ragged_dot"):
    layer = MoE(MoESpec(num_experts=e, top_k=k, gmm=gmm), ffn_spec("bimoa", f), jnp.bfloat16)
    params = meta.unbox(jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
    step = jax.jit(lambda p, x: jax.vjp(lambda p, x: layer.apply({"params": p}, x, mutable=["intermediates"])[0],
                                        p, x)[1](x))
    texts[gmm] = jax.export.export(step, platforms=("tpu",))(params, x).mlir_module()
  expanded = lambda text: [t for t in re.findall(r"tensor<((?:\d+x){3,}\w+)>", text)
                           if int(t.split("x")[0]) == e and int(t.split("x")[1]) >= n * k]
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
  from bench_moe import stablehlo_flops
  assert stablehlo_flops(texts["megablox"])[1] == 9     # kernel launches, through function calls
  assert expanded(texts["megablox"]) == []
  # The reference path exports the ragged_dot op that XLA then lowers densely on CPU and GPU.
  assert "chlo.ragged_dot" in texts["ragged_dot"] and "chlo.ragged_dot" not in texts["megablox"]
