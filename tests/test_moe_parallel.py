"""Expert parallelism on 8 fake CPU devices: experts sharded over mesh.expert = 4 or 8, tokens exchanged
by all-to-all inside shard_map, give the outputs, losses and gradients of mesh.expert = 1 over a few
training steps, on both paths. Runs in a subprocess (the device count is fixed at jax import)."""

import os
import subprocess
import sys

import numpy as np
import pytest

# name: (data, fsdp, tensor, expert), path. data8 / data8_capacity: the expert = 1 references.
FAST = {
    "data8": ((8, 1, 1, 1), "dropless"),
    "expert8": ((1, 1, 1, 8), "dropless"),
}
SLOW = {
    "data2_expert4": ((2, 1, 1, 4), "dropless"),
    "tensor2_expert4": ((1, 1, 2, 4), "dropless"),
    "data8_capacity": ((8, 1, 1, 1), "capacity"),
    "expert8_capacity": ((1, 1, 1, 8), "capacity"),
}
STEPS, LR = 2, 0.5


def _config(mesh, path):
  from moa_jax import presets, sharding
  c = presets.lm_config("debug_moe", "bimoa")
  c.model.dtype = "float32"            # exact comparisons: only reduction order differs between meshes
  c.model.moe.path, c.model.moe.capacity_factor = path, 1.0
  for axis, size in zip(sharding.MESH_AXES, mesh):
    c.mesh[axis] = size
  return c


def _worker(out_dir: str, group: str) -> None:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from flax.core import meta
  from moa_jax import sharding, train
  assert jax.device_count() == 8
  data = np.random.default_rng(0).integers(0, 512, (8, 65))
  host_params = None
  for name, (mesh, path) in (FAST if group == "fast" else SLOW).items():
    c = _config(mesh, path)
    run = train.build(c, with_data=False)
    if host_params is None:  # one initialisation (on one device), placed on every mesh as its rules say
      host_params = jax.device_get(meta.unbox(jax.jit(run.model.init)(jax.random.key(0), data[:1, :-1]))["params"])
    params = jax.device_put(host_params, run.state_shardings.params)
    batch = train.global_batch(run, {"inputs": data[:, :-1], "targets": data[:, 1:]})

    def step(params, batch):  # plain SGD, so each step's gradients show in the next step's parameters
      def loss_fn(p):
        logits, inter = run.model.apply({"params": p}, batch["inputs"], mutable=["intermediates"])
        losses = {"lm_loss": train.cross_entropy(logits, batch["targets"]), **train.sown_losses(inter)}
        total = losses["lm_loss"] + 0.01 * losses["aux_loss"] + 0.001 * losses["z_loss"]
        return total, (losses, logits, inter["intermediates"])
      (loss, (losses, logits, inter)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      return jax.tree.map(lambda p, g: p - LR * g, params, grads), {"loss": loss, **losses}, grads, logits, inter

    with sharding.mesh_context(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      fn = jax.jit(step, in_shardings=(run.state_shardings.params, run.batch_sharding),
                   out_shardings=(run.state_shardings.params, None, run.state_shardings.params, None, None))
      out = {}
      for i in range(STEPS):
        params, losses, grads, logits, inter = jax.device_get(fn(params, batch))
        out.update({f"{i}/{k}": v for k, v in losses.items()})
        out.update({f"{i}/grad{jax.tree_util.keystr(p)}": g for p, g in jax.tree_util.tree_leaves_with_path(grads)})
        out[f"{i}/logits"] = logits
        out[f"{i}/load"] = np.concatenate([v for p, v in jax.tree_util.tree_leaves_with_path(inter)
                                           if "load" in jax.tree_util.keystr(p)])
      if name == "expert8":  # one sequence (sampling): the batch does not split over `expert`
        one = run.model.apply({"params": params}, batch["inputs"][:1])
        out["one_sequence"] = np.asarray(jax.device_get(one))
    if name == "expert8":
      out["one_sequence_ref"] = np.asarray(run.model.apply({"params": jax.device_get(params)},
                                                           jnp.asarray(data[:1, :-1])))
    np.savez(os.path.join(out_dir, f"{name}.npz"), **out)
  if group == "slow":
    return
  bad = _config((1, 1, 1, 4), "dropless")
  bad.model.moe.num_experts, bad.mesh.data = 6, 2
  try:
    train.build(bad, with_data=False)
    message = "built"
  except ValueError as e:
    message = str(e)
  with open(os.path.join(out_dir, "error.txt"), "w") as f:
    f.write(message)


def _run(tmp_path_factory, group: str):
  out = str(tmp_path_factory.mktemp(f"moe_parallel_{group}"))
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__, out, group], env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  runs = {name: dict(np.load(os.path.join(out, f"{name}.npz"))) for name in (FAST if group == "fast" else SLOW)}
  if group == "fast":
    with open(os.path.join(out, "error.txt")) as f:
      runs["error"] = f.read()
  return runs


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
  return _run(tmp_path_factory, "fast")


@pytest.fixture(scope="module")
def slow(tmp_path_factory, fast):
  return {**fast, **_run(tmp_path_factory, "slow")}


def _close(a, b, key):
  # fp32 throughout; meshes reduce in different orders (psums over devices vs local sums).
  scale = max(float(np.max(np.abs(a))), 1e-6)
  np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale, err_msg=key)


def _assert_equal_runs(ref: dict, got: dict) -> None:
  assert set(ref) <= set(got)
  for key in ref:
    _close(ref[key], got[key], key)
  assert ref["0/aux_loss"] > 0 and ref["0/z_loss"] > 0
  assert ref["0/lm_loss"] != ref[f"{STEPS - 1}/lm_loss"]
  # Every expert of every layer got tokens, so every expert's gradient was compared.
  assert np.abs(ref["0/grad['layers']['moe']['experts']['w1']"]).reshape(2, 8, -1).sum(-1).min() > 0


def test_expert8_equals_expert1(fast):
  _assert_equal_runs(fast["data8"], fast["expert8"])


@pytest.mark.slow
@pytest.mark.parametrize("name,reference", [("data2_expert4", "data8"), ("tensor2_expert4", "data8"),
                                            ("expert8_capacity", "data8_capacity")])
def test_expert_parallel_equals_expert1_on_other_meshes_and_the_capacity_path(slow, name, reference):
  _assert_equal_runs(slow[reference], slow[name])


@pytest.mark.slow
def test_capacity_one_drops_assignments(slow):
  assert not np.allclose(slow["data8"]["0/logits"], slow["data8_capacity"]["0/logits"])


def test_one_sequence_falls_back_to_the_partitioned_program(fast):
  np.testing.assert_allclose(fast["expert8"]["one_sequence"], fast["expert8"]["one_sequence_ref"],
                             rtol=1e-4, atol=1e-4)


def test_experts_not_divisible_by_the_expert_axis(fast):
  assert "model.moe.num_experts = 6 does not divide over mesh.expert = 4" in fast["error"]
  assert "use a multiple of mesh.expert experts" in fast["error"]


if __name__ == "__main__":
  _worker(*sys.argv[1:])
