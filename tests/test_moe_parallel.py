"""Expert parallelism on 8 fake CPU devices, against a run with no mesh at all (one program, no shard_map):
losses and every gradient agree on (expert=8), (data=2, expert=4) and (fsdp=4, tensor=2); a receive buffer
too small for the routing drops exactly the assignments it should (fair share per expert, then priority)
and reports them, with both transports (ragged emulated on CPU); a study's two arms drop nothing on either
mesh by default, and about the same fraction on both with a cap; the compiled train
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


def _config(mesh, path, buffer_factor=None, ffn="bimoa"):
  from moa_jax import presets, sharding
  c = presets.lm_config("debug_moe", ffn)
  c.model.dtype = "float32"            # exact comparisons: only reduction order differs between meshes
  # Capacity E/k: C = N, so no mesh drops anything and each must equal the run without one (with a
  # smaller factor each device caps its own N tokens, as GShard's groups do, and drops differ by mesh).
  capacity = c.model.moe.num_experts / c.model.moe.top_k
  c.model.moe.path, c.model.moe.capacity_factor = path, capacity
  if buffer_factor is not None:        # default: never drop
    c.model.moe.buffer_factor = buffer_factor
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


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                                axis_name):
  """jax.lax.ragged_all_to_all's documented semantics from all-gathers (XLA:CPU has no ragged all-to-all):
  sender s's rows [input_offsets[s][r], + send_sizes[s][r]) land in receiver r's output at
  output_offsets[s][r]; the rest of the output keeps its values."""
  import jax
  import jax.numpy as jnp
  del recv_sizes
  me = jax.lax.axis_index(axis_name)
  rows = jax.lax.all_gather(operand, axis_name)                                  # (P, A, D)
  start, size, at = (jax.lax.all_gather(v, axis_name)[:, me] for v in (input_offsets, send_sizes, output_offsets))
  q = jnp.arange(output.shape[0])[:, None]
  hit = (q >= at[None]) & (q < (at + size)[None])                                # (R, P): who writes row q
  src = jnp.argmax(hit, axis=1)
  row = jnp.clip(start[src] + q[:, 0] - at[src], 0, operand.shape[0] - 1)
  return jnp.where(hit.any(axis=1)[:, None], rows[src, row], output)


def _expected_keep(chosen, weights, n_experts, shards, budget):
  """The kept mask (S, A) of one exchange group by hand: per receiving device a max-min fair share of its
  budget per expert, then within an expert first choices before second, higher weight, source, position."""
  n_src, a = chosen.shape
  e_loc = n_experts // shards
  count = np.bincount(chosen.reshape(-1), minlength=n_experts)
  share = np.zeros(n_experts, int)
  for dev in range(shards):
    want = count[dev * e_loc:(dev + 1) * e_loc]
    got = np.zeros_like(want)
    for _ in range(budget):                        # one row at a time to the least-served hungry expert
      hungry = np.flatnonzero(want > got)
      if not hungry.size:
        break
      got[hungry[np.argmin(got[hungry])]] += 1
    share[dev * e_loc:(dev + 1) * e_loc] = got
  keep = np.zeros((n_src, a), bool)
  for x in range(n_experts):
    queue = sorted((i % 2, -weights[s, i], s, i) for s in range(n_src) for i in range(a) if chosen[s, i] == x)
    for _, _, s, i in queue[:share[x]]:
      keep[s, i] = True
  return keep


def _overflow(out_dir):
  """One MoE layer with receive budgets too small for the routing, on expert=8 (one expert per device)
  and (data=2, expert=4) (two per device): values and gradients against the dense reference with the
  dropped assignments masked, the mask computed here from the routing; both transports."""
  import jax
  real, jax.lax.ragged_all_to_all = jax.lax.ragged_all_to_all, _emulated_ragged_all_to_all
  try:
    _overflow_cases(out_dir)
  finally:
    jax.lax.ragged_all_to_all = real


def _overflow_cases(out_dir):
  import jax
  import jax.numpy as jnp
  from flax.core import meta
  from moa_jax import sharding
  from moa_jax.activations import PAPER_DICTIONARY
  from moa_jax.ffn import FFNSpec
  from moa_jax.moe import MoE, MoESpec, route
  from moa_jax.moe.exchange import receive_rows
  from moa_jax.moe.reference import dense_reference
  e, k, b, t, d = 8, 2, 8, 16, 32
  ffn = FFNSpec(type="glu", mix="moa", activations=PAPER_DICTIONARY, primary="silu", d_ff=64)
  x = jax.random.normal(jax.random.key(3), (b, t, d)) + 0.5     # a mean, so router columns shift scores
  dy = jax.random.normal(jax.random.key(6), (b, t, d))
  for name, mesh_shape, factor in (("expert8", (1, 1, 1, 8), 0.5), ("data2_expert4", (2, 1, 1, 4), 0.75)):
    shards = mesh_shape[3]
    for transport in ("padded", "ragged"):
      spec = MoESpec(num_experts=e, top_k=k, buffer_factor=factor, transport=transport)
      layer = MoE(spec, ffn, jnp.float32, jnp.float32)
      params = meta.unbox(layer.init(jax.random.key(4), x))["params"]
      params["router"] = params["router"] + 0.3 * jax.random.normal(jax.random.key(5), params["router"].shape)
      params["router"] = params["router"].at[:, 0].add(0.1).at[:, 1].add(-0.1)   # 0 popular, 1 not: one device
      fwd = lambda p, x: layer.apply({"params": p}, x, mutable=["intermediates"])
      mesh = sharding.make_mesh(dict(zip(("data", "fsdp", "tensor", "expert"), mesh_shape)))
      with sharding.mesh_context(mesh):
        y, inter = jax.jit(fwd)(params, x)
        grads = jax.jit(lambda p, x: jax.vjp(lambda p, x: fwd(p, x)[0], p, x)[1](dy))(params, x)
      weights, chosen, _, _ = route(x.reshape(-1, d), params["router"], spec)
      chosen = np.asarray(chosen).reshape(b, t * k)     # one sequence per device; data replicas outermost
      weights = np.asarray(weights).reshape(b, t * k)
      budget = receive_rows(t, shards, k, e // shards, factor)
      keep = np.concatenate([_expected_keep(chosen[g:g + shards], weights[g:g + shards], e, shards, budget)
                             for g in range(0, b, shards)])
      mask = jnp.asarray(keep.reshape(b, t, k).astype(np.float32))
      expected, ref_vjp = jax.vjp(lambda p, x: dense_reference(spec, ffn, p, x, mask)[0], params, x)
      stats = inter["intermediates"]["moe_stats"][0]
      np.savez(os.path.join(out_dir, f"overflow_{name}_{transport}.npz"),
               y=np.asarray(y), expected=np.asarray(expected), keep=keep, chosen=chosen, budget=budget,
               shards=shards, overflow=np.asarray(stats["ep_overflow"]),
               per_expert=np.asarray(stats["ep_overflow_expert"]), counts=np.bincount(chosen.reshape(-1), minlength=e),
               **{f"grad_{i}": np.asarray(g) for i, g in enumerate(jax.tree_util.tree_leaves(grads))},
               **{f"ref_grad_{i}": np.asarray(g) for i, g in enumerate(jax.tree_util.tree_leaves(ref_vjp(dy)))})


def _drops(out_dir):
  """A study's two arms (SwiGLU and bi-MoA experts, same init) on (expert=8) and (data=2, expert=4): the
  fraction of assignments each MoE layer drops, by default (never) and with a receive cap of 1.0."""
  import jax
  from flax.core import meta
  from moa_jax import sharding, train
  data = np.random.default_rng(1).integers(0, 512, (32, 65))
  out = {}
  for arm in ("swiglu", "bimoa"):
    params = None
    for name, mesh in (("expert8", (1, 1, 1, 8)), ("data2_expert4", (2, 1, 1, 4))):
      for factor in (None, 1.0):
        run = train.build(_config(mesh, "dropless", factor, arm), with_data=False)
        if params is None:
          params = jax.device_get(meta.unbox(jax.jit(run.model.init)(jax.random.key(0), data[:1, :-1]))["params"])
        batch = train.global_batch(run, {"inputs": data[:, :-1], "targets": data[:, 1:]})
        with sharding.mesh_context(run.mesh), nn_rules():
          _, inter = jax.jit(lambda p, x: run.model.apply({"params": p}, x, mutable=["intermediates"]),
                             in_shardings=(run.state_shardings.params, run.batch_sharding))(
              jax.device_put(params, run.state_shardings.params), batch["inputs"])
        out[f"{arm}_{name}_{'cap' if factor else 'never'}"] = np.asarray(
            inter["intermediates"]["layers"]["moe"]["moe_stats"][0]["ep_overflow"])
  np.savez(os.path.join(out_dir, "drops.npz"), **out)


def nn_rules():
  import flax.linen as nn
  from moa_jax import sharding
  return nn.logical_axis_rules(sharding.LOGICAL_RULES)


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
  from moa_jax.moe import MoE, MoESpec
  ffn = FFNSpec(type="glu", mix="moa", activations=PAPER_DICTIONARY, primary="silu", sides="bi", d_ff=256)
  layer = MoE(MoESpec(num_experts=8, top_k=2, gmm="megablox", transport="ragged"), ffn, jnp.bfloat16)
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
    _drops(out_dir)
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


@pytest.mark.parametrize("transport", ["padded", "ragged"])
@pytest.mark.parametrize("mesh", ["expert8", "data2_expert4"])
def test_a_full_receive_buffer_drops_what_it_reports(fast, mesh, transport):
  """Values and gradients equal the dense reference with exactly the assignments the policy drops masked;
  the unpopular expert sharing a device with a popular one keeps all its rows (fair share)."""
  o = fast[f"overflow_{mesh}_{transport}"]
  assert 0 < float(o["overflow"]) == pytest.approx(1 - o["keep"].mean())
  np.testing.assert_allclose(o["y"], o["expected"], rtol=1e-4, atol=1e-5)
  for i in range(sum(k.startswith("ref_grad_") for k in o)):
    g, r = o[f"grad_{i}"], o[f"ref_grad_{i}"]
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * max(float(np.abs(r).max()), 1e-6))
  # Fair share: in each exchange group an expert asking for at most budget / (experts per device) rows
  # keeps them all, however popular the expert beside it is.
  shards, budget, chosen, keep = int(o["shards"]), int(o["budget"]), o["chosen"], o["keep"]
  e_loc = 8 // shards
  protected = 0
  for g in range(0, chosen.shape[0], shards):
    c, kk = chosen[g:g + shards], keep[g:g + shards]
    for x in range(8):
      if 0 < (c == x).sum() <= budget // e_loc:
        assert kk[c == x].all(), (g, x)
        protected += int(((c // e_loc) == x // e_loc).sum() > budget)   # its device was over budget
  assert protected or shards == 8
  np.testing.assert_allclose(float((o["per_expert"] * o["counts"]).sum()) / o["counts"].sum(),
                             float(o["overflow"]), rtol=1e-6)


DROP_TOLERANCE = 0.02  # |drop fraction on (expert=8) - on (data=2, expert=4)|, per MoE layer, with a cap


@pytest.mark.slow
@pytest.mark.parametrize("arm", ["swiglu", "bimoa"])
def test_a_study_arm_drops_alike_on_two_meshes(slow, arm):
  """Default (buffer_factor < 0): nothing dropped on either mesh. With buffer_factor 1.0: both meshes
  drop, within DROP_TOLERANCE of each other per layer."""
  d = slow["drops"]
  assert (d[f"{arm}_expert8_never"] == 0).all() and (d[f"{arm}_data2_expert4_never"] == 0).all()
  e8, e4 = d[f"{arm}_expert8_cap"], d[f"{arm}_data2_expert4_cap"]
  assert (e8 > 0).all() and (e4 > 0).all(), (e8, e4)
  assert np.abs(e8 - e4).max() <= DROP_TOLERANCE, (e8, e4)


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
