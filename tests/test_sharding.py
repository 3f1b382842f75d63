"""Multi-device training on 8 fake CPU devices: meshes agree on the losses, parameters are sharded as
the logical-axis rules say. Each mesh runs in a subprocess (the device count is fixed at jax import)."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import pytest
from jax.sharding import PartitionSpec as P

from moa_jax import sharding

MESHES = {"data8": (8, 1, 1, 1), "mixed": (2, 2, 2, 1), "fsdp8": (1, 8, 1, 1)}


def _worker(workdir: str, cache: str) -> None:
  """Trains the debug config on each mesh (and once with the Pallas kernel) in one 8-device process."""
  import jax
  from moa_jax import presets, train
  assert jax.device_count() == 8
  out = {}
  for mesh, impl in [*((m, "xla") for m in MESHES), ("mixed", "pallas")]:
    c = presets.lm_config(size="debug", ffn="bimoa")
    c.data.cache_dir, c.data.max_bytes = cache, 400_000
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.sample_every = 6, 1, 0, 0
    c.checkpoint.every = 0
    c.model.ffn.impl = impl
    for axis, size in zip(sharding.MESH_AXES, MESHES[mesh]):
      c.mesh[axis] = size
    run = train.build(c)
    specs = {k: list(v.spec) for k, v in [
        ("w1", run.state_shardings.params["layers"]["ffn"]["w1"]),
        ("wq", run.state_shardings.params["layers"]["attention"]["wq"]),
        ("embedding", run.state_shardings.params["embedding"]),
        ("adam_mu_w1", run.state_shardings.opt_state[1][0].mu["layers"]["ffn"]["w1"])]}
    rundir = os.path.join(workdir, f"{mesh}_{impl}")
    train.train(c, rundir)
    with open(os.path.join(rundir, "metrics.jsonl")) as f:
      losses = [json.loads(line)["loss"] for line in f]
    state = train.init_state(run)
    shard_shape = state.params["layers"]["ffn"]["w1"].addressable_shards[0].data.shape
    c.train.batch_size = 6
    try:
      train.build(c)
      batch_error = None
    except train.TrainingError as e:
      batch_error = str(e)
    out[f"{mesh}_{impl}" if impl != "xla" else mesh] = {
        "losses": losses, "specs": specs, "w1_shard": list(shard_shape), "batch_error": batch_error}
  print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def results(tmp_path_factory, data_cache):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  workdir = str(tmp_path_factory.mktemp("meshes"))
  proc = subprocess.run([sys.executable, __file__, workdir, data_cache], env=env,
                        capture_output=True, text=True, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
  return json.loads(lines[-1][len("RESULT "):])


def test_meshes_give_the_same_losses(results):
  # Tolerance: the meshes reduce in different orders (fp32), so losses agree to rounding, not bitwise;
  # 2e-3 relative also covers bf16 compute.
  ref = results["data8"]["losses"]
  assert len(ref) == 6
  for name in ("mixed", "fsdp8"):
    for a, b in zip(ref, results[name]["losses"]):
      assert abs(a - b) <= 2e-3 * abs(a), (name, ref, results[name]["losses"])


def test_parameters_are_sharded_as_the_rules_say(results):
  mixed = results["mixed"]["specs"]
  fsdp_expert = ["fsdp", "expert"]                        # embed: fsdp × expert (expert = 1 here)
  assert mixed["w1"] == [None, fsdp_expert, "tensor"]     # (layers, embed, mlp)
  assert mixed["wq"][:3] == [None, fsdp_expert, "tensor"]  # (layers, embed, heads, head_dim)
  assert mixed["embedding"] == ["tensor", fsdp_expert]    # (vocab, embed)
  assert mixed["adam_mu_w1"] == mixed["w1"]                               # optimizer state follows params
  assert results["mixed"]["w1_shard"] == [2, 32, 96]                     # (2, 64, 192) over fsdp=2, tensor=2
  assert results["fsdp8"]["w1_shard"] == [2, 8, 192]
  assert results["data8"]["w1_shard"] == [2, 64, 192]


def test_dense_parameters_shard_over_fsdp_and_expert_expert_weights_keep_their_axis():
  rules = sharding.LOGICAL_RULES
  assert nn.logical_to_mesh_axes(("layers", "embed", "mlp"), rules) == P(None, ("fsdp", "expert"), "tensor")
  assert nn.logical_to_mesh_axes(("vocab", "embed"), rules) == P("tensor", ("fsdp", "expert"))
  assert nn.logical_to_mesh_axes(("layers", "experts", "embed", "mlp"), rules) == P(None, "expert", "fsdp", "tensor")
  assert nn.logical_to_mesh_axes(("layers", "experts", "mlp", "embed"), rules) == P(None, "expert", "tensor", "fsdp")
  # Activations: the batch takes fsdp and expert, so the model dimension stays whole.
  assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == P(("data", "fsdp", "expert"), None, None)


def test_pallas_kernel_under_a_sharded_mesh_matches_xla(results):
  # The kernel runs per device in shard_map over (batch, length, mlp); fp32 compute.
  for a, b in zip(results["mixed"]["losses"], results["mixed_pallas"]["losses"]):
    assert abs(a - b) <= 1e-5 * abs(a), (results["mixed"]["losses"], results["mixed_pallas"]["losses"])


def test_batch_not_divisible_by_the_data_axes(results):
  assert "train.batch_size = 6 does not divide over the mesh's data axes" in results["data8"]["batch_error"]
  assert "use a multiple of 8" in results["data8"]["batch_error"]


if __name__ == "__main__":
  _worker(*sys.argv[1:])
