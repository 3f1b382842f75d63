"""Expert parallelism on 8 fake CPU devices, against a run with no mesh at all (one program, no shard_map):
losses and every gradient agree on (expert=8), (data=2, expert=4) and (fsdp=4, tensor=2); a receive buffer
too small for the routing drops exactly the assignments it should and reports them; the compiled train
step exchanges 4 activation all-to-alls per MoE layer (2 forward, 2 backward) under the default remat
policy; the GPU/TPU exchange (ragged all-to-all, megablox kernels) exports for TPU. One subprocess (the
device count is fixed at jax import)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

# name: (data, fsdp, tensor, expert), path
MESHES = {
    "expert8": ((1, 1, 1, 8), "dropless"),
    "data2_expert4": ((2, 1, 1, 4), "dropless"),
    "fsdp4_tensor2": ((1, 4, 2, 1), "dropless"),
}
SLOW_MESHES = {
    "expert8_capacity": ((1, 1, 1, 8), "capacity"),
    "tensor2_expert4": ((1, 1, 2, 4), "dropless"),
}


def _config(mesh, path, buffer_factor=8.0):
  from moa_jax import presets, sharding
  c = presets.lm_config("debug_moe", "bimoa")
  c.model.dtype = "float32"            # exact comparisons: only reduction order differs between meshes
  # Capacity E/k: C = N, so no mesh drops anything and each must equal the run without one (with a
  # smaller factor each device caps its own N tokens, as GShard's groups do, and drops differ by mesh).
  capacity = c.model.moe.num_experts / c.model.moe.top_k
  c.model.moe.path, c.model.moe.capacity_factor, c.model.moe.buffer_factor = path, capacity, buffer_factor
  for axis, size in zip(sharding.MESH_AXES, mesh):
    c.mesh[axis] = size
  return c


def _grads(run, params, batch, mesh=None):
  """Losses and gradients of lm + 0.01 aux + 0.001 z, with `mesh` current (None: no mesh at all)."""
  import contextlib
  import flax.linen as nn
  import jax
  from moa_jax import sharding, train

  def loss_fn(p):
    logits, inter = run.model.apply({"params": p}, batch["inputs"], mutable=["intermediates"])
    losses = {"lm_loss": train.cross_entropy(logits, batch["targets"]), **train.sown_losses(inter)}
    return losses["lm_loss"] + 0.01 * losses["aux_loss"] + 0.001 * losses["z_loss"], losses

  ctx = ((lambda: sharding.mesh_context(mesh)) if mesh is not None else contextlib.nullcontext)
  with ctx(), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    kw = {} if mesh is None else {"in_shardings": (run.state_shardings.params,)}
    (_, losses), grads = jax.device_get(jax.jit(jax.value_and_grad(loss_fn, has_aux=True), **kw)(params))
  out = {k: np.asarray(v) for k, v in losses.items()}
  out.update({f"grad{jax.tree_util.keystr(p)}": np.asarray(g) for p, g in jax.tree_util.tree_leaves_with_path(grads)})
  return out


def _overflow(out_dir):
  """One MoE layer on expert=8 with buffer_factor 0.5: the dense reference with the dropped assignments
  masked, computed here from the routing (per source device, per destination, in expert order, the
  first `cap` are kept)."""
  import jax
  import jax.numpy as jnp
  from flax.core import meta
  from moa_jax import sharding
  from moa_jax.moe import MoE, MoESpec
  from moa_jax.moe.exchange import per_pair_capacity
  from moa_jax.moe.reference import dense_reference
  from moa_jax.ffn import FFNSpec
  from moa_jax.activations import PAPER_DICTIONARY
  e, k, b, t, d = 8, 2, 8, 16, 32
  spec = MoESpec(num_experts=e, top_k=k, buffer_factor=0.5)
  ffn = FFNSpec(type="glu", mix="moa", activations=PAPER_DICTIONARY, primary="silu", d_ff=64)
  layer = MoE(spec, ffn, jnp.float32, jnp.float32)
  x = jax.random.normal(jax.random.key(3), (b, t, d))
  params = meta.unbox(layer.init(jax.random.key(4), x))["params"]
  params["router"] = params["router"] + 3 * jax.random.normal(jax.random.key(5), params["router"].shape)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 8})
  with sharding.mesh_context(mesh):
    y, inter = jax.jit(lambda p, x: layer.apply({"params": p}, x, mutable=["intermediates"]))(params, x)
  _, chosen = dense_reference(spec, ffn, params, x)
  chosen = np.asarray(chosen).reshape(8, t * k)                      # per source device (one sequence each)
  cap = per_pair_capacity(t * k, 8, k, 1, 0.5)
  keep = np.zeros_like(chosen, dtype=np.float32)
  for s in range(8):
    order = np.argsort(chosen[s], kind="stable")
    seen = np.zeros(8, int)
    for a in order:
      dest = chosen[s, a]                                            # one expert per device
      keep[s, a] = seen[dest] < cap
      seen[dest] += 1
  expected, _ = dense_reference(spec, ffn, params, x, jnp.asarray(keep.reshape(b, t, k)))
  np.savez(os.path.join(out_dir, "overflow.npz"), y=np.asarray(y), expected=np.asarray(expected),
           overflow=np.asarray(inter["intermediates"]["moe_stats"][0]["ep_overflow"]), keep=keep)


def _ragged_export():
  """The accelerator path under expert=8, exported for TPU from this CPU host: ragged all-to-alls (2 forward,
  their 2 transposes backward), megablox kernels, no padded all-to-all of activations."""
  import re
  import jax
  import jax.numpy as jnp
  from flax.core import meta
  from moa_jax import sharding
  from moa_jax.activations import PAPER_DICTIONARY
  from moa_jax.ffn import FFNSpec
  from moa_jax.moe import MoE, MoESpec, layer as moe_layer
  moe_layer.transport = lambda: "ragged"            # what a GPU/TPU backend picks
  ffn = FFNSpec(type="glu", mix="moa", activations=PAPER_DICTIONARY, primary="silu", sides="bi", d_ff=256)
  layer = MoE(MoESpec(num_experts=8, top_k=2, gmm="megablox"), ffn, jnp.bfloat16)
  x = jax.ShapeDtypeStruct((8, 128, 128), jnp.bfloat16)
  params = meta.unbox(jax.eval_shape(layer.init, jax.random.key(0), x)["params"])
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 8})
  with sharding.mesh_context(mesh):
    step = jax.jit(lambda p, x: jax.vjp(lambda p, x: layer.apply({"params": p}, x, mutable=["intermediates"])[0],
                                        p, x)[1](x))
    text = jax.export.export(step, platforms=("tpu",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")])(params, x).mlir_module()
  activations = [t for l in text.splitlines() if "stablehlo.all_to_all" in l for t in re.findall(r"tensor<([^>]*)>", l)
                 if "bf16" in t or "f32" in t]
  return len(re.findall(r"custom_call @ragged_all_to_all\(", text)), len(activations), text.count("tpu_custom_call")


def _moe_collectives(c) -> dict:
  """In the compiled train step, inside MoE layers: activation all-to-alls (2 MoE layers, scanned: one
  body each way), reduce-scatters, and all-reduces of (rows, d_model) activations."""
  from moa_jax import profiling, train
  text = train.compile_train_step(train.build(c, with_data=False)).as_text()
  moe = "\n".join(line for line in text.splitlines() if "/moe/" in line)
  counts = profiling.collective_counts(moe)
  row_all_reduce = re.findall(rf"= f32\[\d+,{c.model.d_model}\]\S* all-reduce(?:-start)?\(", moe)
  return {"all_to_all": counts["all-to-all"], "reduce_scatter": counts["reduce-scatter"],
          "row_all_reduce": len(row_all_reduce)}


def _worker(out_dir: str, group: str) -> None:
  import jax
  from flax.core import meta
  from moa_jax import sharding, train
  assert jax.device_count() == 8
  data = np.random.default_rng(0).integers(0, 512, (8, 65))
  host = {"inputs": data[:, :-1], "targets": data[:, 1:]}
  meshes = MESHES if group == "fast" else SLOW_MESHES
  params = None
  results = {}
  for name, (mesh, path) in meshes.items():
    c = _config(mesh, path)
    run = train.build(c, with_data=False)
    if params is None:  # one initialisation (on one device), placed on every mesh as its rules say
      params = jax.device_get(meta.unbox(jax.jit(run.model.init)(jax.random.key(0), data[:1, :-1]))["params"])
    ref_key = f"reference_{path}"
    if ref_key not in results:
      results[ref_key] = _grads(run, params, host)
    batch = train.global_batch(run, host)
    results[name] = _grads(run, jax.device_put(params, run.state_shardings.params), batch, run.mesh)
    if name == "expert8":  # one sequence (sampling): the batch does not split over `expert`
      with sharding.mesh_context(run.mesh):
        one = run.model.apply({"params": jax.device_put(params, run.state_shardings.params)}, data[:1, :-1])
      results["one_sequence"] = {"mesh": np.asarray(one), "none": np.asarray(run.model.apply({"params": params},
                                                                                            data[:1, :-1]))}
  for name, out in results.items():
    np.savez(os.path.join(out_dir, f"{name}.npz"), **out)
  if group == "slow":
    return
  _overflow(out_dir)
  counts = {}
  for remat in ("save_dots_no_batch", "full", "save_dots_moe_io"):
    c = _config((1, 1, 1, 8), "dropless")
    c.model.remat = remat
    counts[remat] = _moe_collectives(c)["all_to_all"]
  tp = _moe_collectives(_config((1, 4, 2, 1), "dropless"))
  bad = _config((1, 1, 1, 4), "dropless")
  bad.model.moe.num_experts, bad.mesh.data = 6, 2
  try:
    train.build(bad, with_data=False)
    message = "built"
  except ValueError as e:
    message = str(e)
  ragged = " ".join(map(str, _ragged_export()))
  with open(os.path.join(out_dir, "misc.txt"), "w") as f:
    f.write(f"{counts['save_dots_no_batch']} {counts['full']} {counts['save_dots_moe_io']}\n{message}\n{ragged}\n"
            f"{tp['reduce_scatter']} {tp['row_all_reduce']}")


def _run(tmp_path_factory, group: str):
  out = str(tmp_path_factory.mktemp(f"moe_parallel_{group}"))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__, out, group], env=env, capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return {f[:-4]: dict(np.load(os.path.join(out, f))) for f in os.listdir(out) if f.endswith(".npz")} | (
      {"misc": open(os.path.join(out, "misc.txt")).read()} if group == "fast" else {})


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
  return _run(tmp_path_factory, "fast")


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
  return _run(tmp_path_factory, "slow")


def _assert_equal(ref: dict, got: dict) -> None:
  assert set(ref) == set(got)
  for key in ref:
    # fp32 throughout; meshes reduce in different orders (psums over devices vs local sums).
    scale = max(float(np.max(np.abs(ref[key]))), 1e-6)
    np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-5 * scale, err_msg=key)
  assert ref["aux_loss"] > 0 and ref["z_loss"] > 0
  # Every expert of every layer got tokens, so every expert's gradient was compared.
  assert np.abs(ref["grad['layers']['moe']['experts']['w1']"]).reshape(2, 8, -1).sum(-1).min() > 0


@pytest.mark.parametrize("name", list(MESHES))
def test_meshes_equal_the_run_without_a_mesh(fast, name):
  _assert_equal(fast["reference_dropless"], fast[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW_MESHES))
def test_more_meshes_and_the_capacity_path_equal_the_run_without_a_mesh(slow, name):
  _assert_equal(slow[f"reference_{SLOW_MESHES[name][1]}"], slow[name])


def test_a_full_receive_buffer_drops_what_it_reports(fast):
  o = fast["overflow"]
  assert 0 < float(o["overflow"]) == pytest.approx(1 - o["keep"].mean())
  np.testing.assert_allclose(o["y"], o["expected"], rtol=1e-4, atol=1e-5)


def test_default_remat_repeats_no_all_to_all(fast):
  saved, full, io = map(int, fast["misc"].splitlines()[0].split())
  assert saved == 4, saved   # dispatch and return, forward and backward
  assert full == 6, full     # `full` remat recomputes the forward exchange in the backward
  assert io == 4, io         # save_dots_moe_io recomputes the experts' hidden rows, not the exchange


def test_tensor_parallel_experts_reduce_scatter_their_outputs(fast):
  """fsdp=4, tensor=2: the expert outputs are reduce-scattered over `tensor` (each rank keeps its own
  tokens' rows), not all-reduced as whole (rows, d_model) activations."""
  reduce_scatters, row_all_reduces = map(int, fast["misc"].splitlines()[3].split())
  assert reduce_scatters >= 2 and row_all_reduces == 0, (reduce_scatters, row_all_reduces)


def test_one_sequence_falls_back_to_the_partitioned_program(fast):
  np.testing.assert_allclose(fast["one_sequence"]["mesh"], fast["one_sequence"]["none"], rtol=1e-4, atol=1e-4)


def test_accelerator_exchange_is_ragged_and_exports_for_tpu(fast):
  ragged, padded, kernels = map(int, fast["misc"].splitlines()[2].split())
  assert ragged == 4 and padded == 0 and kernels > 0, (ragged, padded, kernels)


def test_experts_not_divisible_by_the_expert_axis(fast):
  message = fast["misc"].splitlines()[1]
  assert "model.moe.num_experts = 6 does not divide over mesh.expert = 4" in message
  assert "use a multiple of mesh.expert experts" in message


if __name__ == "__main__":
  _worker(*sys.argv[1:])
