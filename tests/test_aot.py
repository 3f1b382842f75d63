"""Compile-for-target (moa_jax.aot): target names and error lines (fast), the trip-count correction of
XLA's cost analysis, attention and kernel choice by the target's platform, splash attention against
XLA's; and (slow, needs `pip install .[aot]`) the debug step and the kernels compiled by libtpu and
XLA:GPU for TPU and H100 targets."""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moa_jax import attention, platforms, presets, sharding
from moa_jax.aot import compiled, hlo, targets
from moa_jax.aot.targets import TargetError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TPU = importlib.util.find_spec("libtpu") is not None
HAS_CUDA = targets.missing_extra(targets.parse("h100:1")) is None
needs_tpu = pytest.mark.skipif(not HAS_TPU, reason="libtpu absent: pip install .[aot] (the aot extra)")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="CUDA plugin/nvcc/cuDNN absent: pip install .[aot] (the aot extra)")


@pytest.mark.parametrize("name, platform, chips, topology", [
    ("v5e:1x1", "tpu", 1, "v5e:1x1"), ("v5p:2x2x2", "tpu", 8, "v5p:2x2x2"), ("V6E:2x4", "tpu", 8, "v6e:2x4"),
    ("h100:1", "gpu", 1, "1x1x1"), ("h100:8", "gpu", 8, "1x1x8"), ("b200:16", "gpu", 16, "1x2x8")])
def test_parse_targets(name, platform, chips, topology):
  t = targets.parse(name)
  assert (t.platform, t.chips, t.topology) == (platform, chips, topology)


@pytest.mark.parametrize("name, says", [("v9:2x2", "not a known target"), ("h100", "not a known target"),
                                        ("", "not a known target"), ("v5p:2", "2 (v5e, v6e) or 3 (v5p)"),
                                        ("h100:12", "multiple of 8"), ("h100:2x4", "number of GPUs")])
def test_bad_targets_get_one_line_naming_what_works(name, says):
  with pytest.raises(TargetError) as e:
    targets.parse(name)
  assert says in str(e.value) and "\n" not in str(e.value) and repr(name) in str(e.value)


def test_mesh_that_does_not_match_the_chips_names_one_that_does():
  c = presets.lm_config(size="debug", ffn="bimoa")
  c.mesh.data, c.mesh.fsdp = 1, 4
  with pytest.raises(TargetError, match=r"has 8 chips.*--config.mesh.fsdp=8"):
    targets.check_mesh(targets.parse("v5p:2x2x2"), c.mesh, sharding.mesh_shape)
  c.mesh.data = -1  # fills the rest
  assert targets.check_mesh(targets.parse("v5p:2x2x2"), c.mesh, sharding.mesh_shape) == (2, 4, 1, 1)


def test_missing_compiler_says_what_to_install(monkeypatch):
  monkeypatch.setattr(targets, "_find", lambda module: None)
  for name, module in (("v5p:2x2x1", "libtpu"), ("h100:8", "jax_cuda12_plugin")):
    line = targets.missing_extra(targets.parse(name))
    assert module in line and "moa_jax[aot]" in line and "\n" not in line


def test_gpu_target_configs_agree_with_the_hbm_table():
  for kind, chip in targets.CHIPS.items():
    if chip.platform == "gpu":
      text = targets.gpu_target_config(targets.parse(f"{kind}:1"))
      assert f"device_memory_size: {chip.hbm_bytes}" in text and "#" not in text


def test_cli_unknown_target_is_one_error_line():
  out = subprocess.run([sys.executable, "-m", "moa_jax.train", "--config=configs/debug.py", "--compile_only",
                        "--target=v9:2x2"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 1
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --target='v9:2x2' is not a known target") and "v5p:2x2x2" in last


def test_does_not_fit_suggests_microbatches_that_divide_the_batch():
  c = presets.lm_config(size="2b", ffn="bimoa")  # 256 sequences; fsdp 8: 32 per chip
  c.mesh.data, c.mesh.fsdp = 1, 8
  t = targets.parse("v5p:2x2x2")
  hbm = t.chip.hbm_bytes
  # 0.8 HBM free for temporaries of 2.2 HBM: 3 microbatches would do, but 3 does not divide 32: 4
  line = compiled.suggestion(c, t, total=2.3 * hbm, temp=2.2 * hbm)
  assert "--config.train.microbatches=4" in line and "--config.model.remat=full" in line
  assert "v5p:<topology with 16 chips>" in line


def test_loop_flops_count_every_trip():
  """A scan of L matmuls inside a loop of M trips: cost_analysis counts one trip of each body; the
  HLO walk counts them all, and cost_analysis + (trips - once) comes to the exact total."""
  n, layers, trips = 64, 3, 4

  def step(x, w):  # x (n, n), w (layers, n, n)
    def micro(i, acc):
      y, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x + i, w)
      return acc + y
    return jax.lax.fori_loop(0, trips, micro, jnp.zeros_like(x))

  spec = jax.ShapeDtypeStruct((n, n), jnp.float32), jax.ShapeDtypeStruct((layers, n, n), jnp.float32)
  c = jax.jit(step).lower(*spec).compile()
  once, every, unknown = hlo.dot_flops(c.as_text())
  exact = 2 * n**3 * layers * trips
  assert (every, once, unknown) == (exact, 2 * n**3, 0)
  cost = c.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert cost["flops"] < exact / 4  # the undercount being corrected
  assert abs(cost["flops"] + every - once - exact) / exact < 0.05


# libtpu's loops carry no known_trip_count; their conditions compare the counter with a constant, s32 for
# scans and u32 for the windowed (collective) matmuls of FSDP. Shapes as libtpu prints them, with tiling.
LIBTPU_LOOP = """
%body (p: (u32[], bf16[4,64,128])) -> (u32[], bf16[4,64,128]) {
  %p = (u32[]{:T(128)}, bf16[4,64,128]{2,1,0:T(8,128)(2,1)}) parameter(0)
  %x = bf16[4,64,128]{2,1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %w = bf16[128,128]{1,0:T(8,128)(2,1)} constant({...})
  %d = bf16[4,64,128]{2,1,0:T(8,128)(2,1)} dot(%x, %w), lhs_contracting_dims={2}, rhs_contracting_dims={0}
  %i = u32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %t = (u32[]{:T(128)}, bf16[4,64,128]{2,1,0:T(8,128)(2,1)}) tuple(%i, %d)
}
%cond (q: (u32[], bf16[4,64,128])) -> pred[] {
  %c = u32[]{:T(128)} constant(%BOUND%), metadata={op_name="windowed"}
  %q = (u32[]{:T(128)}, bf16[4,64,128]{2,1,0:T(8,128)(2,1)}) parameter(0)
  %j = u32[]{:T(128)} get-tuple-element(%q), index=0
  ROOT %lt = pred[]{:T(512)} compare(%j, %c), direction=LT
}
ENTRY %main (a: (u32[], bf16[4,64,128])) -> (u32[], bf16[4,64,128]) {
  %a = (u32[]{:T(128)}, bf16[4,64,128]{2,1,0:T(8,128)(2,1)}) parameter(0)
  ROOT %loop = (u32[]{:T(128)}, bf16[4,64,128]{2,1,0:T(8,128)(2,1)}) while(%a), condition=%cond, body=%body
}
"""


@pytest.mark.parametrize("bound", [1, 4, 24])
def test_loop_trips_read_from_libtpu_conditions(bound):
  once, every, unknown = hlo.dot_flops(LIBTPU_LOOP.replace("%BOUND%", str(bound)))
  assert (once, every, unknown) == (2 * 4 * 64 * 128 * 128, bound * 2 * 4 * 64 * 128 * 128, 0)


def test_attention_and_kernels_follow_the_target_platform():
  from moa_jax.kernels import entry

  assert attention.resolve_impl("auto", "bfloat16", 2048, "cpu") == "xla"
  assert attention.resolve_impl("xla", "bfloat16", 2048, "tpu") == "xla"
  with platforms.target("tpu"):
    assert attention.resolve_impl("auto", "bfloat16", 2048) == "splash"
    assert attention.resolve_impl("auto", "bfloat16", 100) == "xla"  # splash blocks need T % 128 == 0
    layout, interpret, _ = entry._resolve(None, None, None)
    assert (layout.name, interpret) == ("tpu", False)
  with platforms.target("cuda"):
    assert attention.resolve_impl("auto", "bfloat16", 2048) == "cudnn"
    assert attention.resolve_impl("auto", "float32", 2048) == "xla"  # cuDNN attention takes 16-bit inputs
    layout, interpret, precision = entry._resolve(None, None, None)
    assert (layout.name, interpret, precision) == ("gpu", False, "fast")
  assert entry._resolve(None, None, None)[1] is (jax.default_backend() not in ("gpu", "tpu"))


def test_splash_attention_equals_xla_attention_forward_and_backward():
  """Interpreted on CPU, fp32, grouped heads (2 query heads on 1 kv head), two 128-token blocks: outputs and
  gradients equal XLA's causal attention to 1e-5 (observed ~1e-6)."""
  b, t, n, kv, h = 1, 256, 2, 1, 32
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k, v = jax.random.normal(ks[1], (b, t, kv, h)), jax.random.normal(ks[2], (b, t, kv, h))
  dy = jax.random.normal(ks[3], (b, t, n, h))
  xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  old_block, attention.SPLASH_BLOCK = attention.SPLASH_BLOCK, 128
  try:
    with jax.default_matmul_precision("highest"):
      np.testing.assert_allclose(attention.splash_attention(q, k, v), xla(q, k, v), atol=1e-5)
      grads = [jax.grad(lambda *a: jnp.vdot(f(*a), dy), argnums=(0, 1, 2))(q, k, v)
               for f in (attention.splash_attention, xla)]
  finally:
    attention.SPLASH_BLOCK = old_block
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, atol=1e-5)


def _debug(seq_len: int = 256):
  c = presets.lm_config(size="debug", ffn="bimoa")  # batch 8
  c.train.seq_len = seq_len
  c.mesh.data, c.mesh.fsdp = 1, -1
  return c


@pytest.mark.slow
@needs_tpu
def test_debug_step_compiles_for_tpu_with_pallas_kernels_and_splash():
  c = _debug()
  c.model.ffn.impl = "pallas"
  r = compiled.compile_for_target(c, "v5p:2x2x2")
  assert r["fits"] and r["mesh"]["fsdp"] == 8
  assert r["custom_calls"].get("tpu_custom_call", 0) >= 4  # mixing fwd, bwd; splash fwd, dq, dkv
  assert r["roofline"]["step_seconds"] > 0 and r["roofline"]["splash_flops_per_chip"] > 0


@pytest.mark.slow
@needs_tpu
def test_trip_corrected_tpu_flops_match_the_model_summary():
  """libtpu's cost analysis counts the scanned layers and the microbatch loop once; corrected, the
  FLOPs per chip × chips come within 10% of moa_jax.summary's count (no remat, XLA attention)."""
  c = _debug()
  c.model.remat, c.model.attention_impl, c.train.microbatches = "none", "xla", 2
  r = compiled.compile_for_target(c, "v5e:2x2")
  roof = r["roofline"]
  expected = r["model_flops_per_chip"]
  assert roof["flops_reported"] < 0.6 * expected
  assert abs(roof["flops_per_chip"] - expected) / expected < 0.10


@pytest.mark.slow
@needs_tpu
def test_a_step_libtpu_cannot_fit_ends_in_one_line_saying_what_would():
  c = _debug(seq_len=2048)
  c.train.batch_size, c.model.attention_impl = 512, "xla"  # (B, N, T, T) fp32 scores: ~32 GiB per layer
  with pytest.raises(TargetError) as e:
    compiled.compile_for_target(c, "v5e:1x1")
  line = str(e.value)
  assert "does not fit --target=v5e:1x1" in line and "--config.train.microbatches=" in line and "\n" not in line


@pytest.mark.slow
@needs_cuda
def test_debug_step_compiles_for_h100s_with_triton_kernel_and_cudnn_attention():
  c = _debug()
  c.model.ffn.impl, c.model.dtype = "pallas", "bfloat16"
  r = compiled.compile_for_target(c, "h100:8")
  assert r["fits"] and r["device_kind"] == "NVIDIA H100 80GB HBM3"
  calls = " ".join(r["custom_calls"])
  assert "triton" in calls and "cudnn" in calls, r["custom_calls"]


@pytest.mark.slow
@needs_tpu
@pytest.mark.parametrize("target", ["v5e:1x1", "v5p:2x2x1"])
@pytest.mark.parametrize("groups", [1, 8])
def test_mixing_kernel_compiles_with_libtpu_at_the_anchor_shape(target, groups):
  """The bi-MoA-7 mixing kernel, forward and backward, at the SPEC anchor (T 16384, F 5632, bf16)."""
  from moa_jax.kernels import entry

  names = presets.ffn_config("bimoa", 2048, 256).activations
  t, f, k = 16384, 5632, len(names)
  spec = targets.parse(target)
  targets.use_host_cpu()
  device = targets.devices(spec)[0]
  on_chip = jax.sharding.SingleDeviceSharding(device)
  h = jax.ShapeDtypeStruct((t, f), jnp.bfloat16, sharding=on_chip)          # h and u: (T, F)
  c = jax.ShapeDtypeStruct((t, groups, k), jnp.float32, sharding=on_chip)   # gates: (T, G, K)

  def loss(h, c, u, cu):
    return entry.mix_product(h, c, names, u, cu, names).astype(jnp.float32).sum()

  with targets.trace_platform(spec):
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(h, c, h, c).compile().as_text()
  assert text.count('custom_call_target="tpu_custom_call"') >= 2  # forward and backward kernels
