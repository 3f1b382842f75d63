"""Muon on a mesh orthogonalises each stacked matrix where it lives: on 8 fake CPU devices its update
equals the plain optax Muon's, and its compiled update gathers no matrix (FSDP used to all-gather every
(L, d, d) matrix at each Newton–Schulz step). One subprocess: the device count is fixed at jax import."""

import json
import os
import subprocess
import sys

import pytest

# (n_layers, fsdp, tensor): the layer count divides over the moved axes, does not (XLA pads), and two
# axes move (one all-to-all per axis).
CASES = {"fsdp8": (8, 8, 1), "fsdp4_uneven": (6, 4, 1), "fsdp2_tensor2": (4, 2, 2)}


def _worker() -> None:
  import jax
  import jax.numpy as jnp
  from moa_jax import optim, presets, profiling, sharding, train
  assert jax.device_count() == 8
  out = {}
  for name, (layers, fsdp, tensor) in CASES.items():
    c = presets.lm_config(size="debug", ffn="swiglu")
    c.model.n_layers, c.optim.name, c.optim.weight_decay = layers, "muon", 0.1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8 // (fsdp * tensor), fsdp, tensor
    c.train.batch_size, c.train.seq_len = 16, 64
    run = train.build(c, with_data=False)
    params_sharding, state_sharding = run.state_shardings.params, run.state_shardings.opt_state
    abstract, logical = train.abstract_model(run.model, c.train.batch_size, c.train.seq_len)
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    draw = lambda x: jax.random.normal(next(keys), x.shape, x.dtype)
    params = jax.device_put(jax.tree.map(draw, abstract), params_sharding)
    grads = [jax.device_put(jax.tree.map(draw, abstract), params_sharding) for _ in range(2)]
    plain = optim.make_optimizer(c.optim, c.train.steps, abstract, logical)  # no mesh: optax's Muon as is
    results = {}
    for label, tx in (("mesh", run.tx), ("plain", plain)):
      step = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p),
                     in_shardings=(params_sharding, state_sharding, params_sharding),
                     out_shardings=(params_sharding, state_sharding))
      with sharding.mesh_context(run.mesh):
        state = jax.jit(tx.init, out_shardings=state_sharding)(params)
        hlo = step.lower(grads[0], state, params).compile().as_text()
        updates = []
        for g in grads:  # two steps: the second has momentum
          u, state = step(g, state, params)
          updates.append(u)
      results[label] = (updates, profiling.collective_counts(hlo))
    diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
               for u_mesh, u_plain in zip(results["mesh"][0], results["plain"][0])
               for a, b in zip(jax.tree.leaves(u_mesh), jax.tree.leaves(u_plain)))
    out[name] = {"max_relative_difference": diff, "mesh": results["mesh"][1], "plain": results["plain"][1]}
  print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def results():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("case", CASES)
def test_muon_on_a_mesh_equals_plain_muon(results, case):
  assert results[case]["max_relative_difference"] < 1e-5, results[case]


@pytest.mark.parametrize("case", CASES)
def test_muon_on_a_mesh_gathers_no_matrix(results, case):
  """The plain Muon gathers at every Newton–Schulz step; the resharded one moves each matrix with
  all-to-alls and gathers nothing (the update alone: no forward pass here)."""
  mesh, plain = results[case]["mesh"], results[case]["plain"]
  assert plain.get("all-gather", 0) + plain.get("collective-permute", 0) >= 5, results[case]
  assert mesh.get("all-gather", 0) == 0 and mesh.get("all-to-all", 0) > 0, results[case]


if __name__ == "__main__":
  _worker()
