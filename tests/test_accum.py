"""Gradient accumulation (train.microbatches) and the chunked cross-entropy (train.loss_chunk, moa_jax.loss)
against their plain references, at fp32 debug size."""

import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.core import meta

from moa_jax import loss, presets, sharding, train

TOL = 1e-5


def _rel(a, b) -> float:
  """Largest relative difference ||a - b|| / ||b|| over the leaves of two equal-structured trees."""
  diffs = [float(jnp.linalg.norm(jnp.ravel(x - y)) / max(float(jnp.linalg.norm(jnp.ravel(y))), 1e-30))
           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
  return max(diffs)


# ---- moa_jax.loss --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [0, 4, 8, 32])
def test_chunked_cross_entropy_equals_full_logits(chunk):
  kh, kw, kt = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(kh, (3, 32, 16), jnp.float32)
  unembed = jax.random.normal(kw, (16, 50), jnp.float32) * 0.3
  targets = jax.random.randint(kt, (3, 32), 0, 50)
  weights = jnp.linspace(0.5, 1.5, 3 * 32).reshape(3, 32)  # a non-uniform cotangent for each token

  def full(h, w):
    return jnp.sum(weights * loss.token_losses(loss.logits(h, w), targets))

  def chunked(h, w):
    return jnp.sum(weights * loss.chunked_token_losses(h, w, targets, chunk))

  ref, ref_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, unembed)
  got, got_grads = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, unembed)
  assert abs(float(got - ref)) <= TOL * abs(float(ref))
  assert _rel(got_grads, ref_grads) <= TOL
  np.testing.assert_allclose(loss.chunked_token_losses(hidden, unembed, targets, chunk),
                             loss.token_losses(loss.logits(hidden, unembed), targets), rtol=TOL)


def test_chunked_cross_entropy_never_holds_the_full_logits():
  b, t, d, v, chunk = 4, 512, 64, 8192, 64
  logits_bytes = b * t * v * 4
  shapes = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((b, t), jnp.int32))

  def temp_bytes(c):
    grad = jax.grad(lambda h, w, y: loss.chunked_token_losses(h, w, y, c).mean(), argnums=(0, 1))
    return jax.jit(grad).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(0) >= logits_bytes  # the reference holds (B, T, V) logits (and their gradient)
  assert temp_bytes(chunk) < logits_bytes / 2  # chunks of (B, 64, V), 1/8 of them, and their gradient


# ---- train.microbatches ------------------------------------------------------------------------------------

def _capture_grads() -> optax.GradientTransformation:
  """An 'optimizer' that makes no update and keeps the gradients it was given as its state."""
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                      lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _config(size, ffn, batch=8, seq_len=32, **model):
  c = presets.lm_config(size=size, ffn=ffn)
  c.train.batch_size, c.train.seq_len = batch, seq_len
  for k, v in model.items():
    c.model[k] = v
  return c


def _batch(config, rows=None):
  c = config.train
  tokens = jax.random.randint(jax.random.key(1), (c.batch_size, c.seq_len + 1), 0, config.model.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  return batch if rows is None else {k: v[rows] for k, v in batch.items()}


def _token_dependent_gates(params):
  """MoA gate weights start at zero (gates equal for every token); random ones make the gates, their
  means and their spread over tokens depend on the batch, so the comparisons below can fail."""
  def perturb(path, x):
    key = jax.random.fold_in(jax.random.key(2), len(jax.tree_util.keystr(path)))
    return 0.5 * jax.random.normal(key, x.shape, x.dtype) if "gate_kernel" in jax.tree_util.keystr(path) else x
  return jax.tree_util.tree_map_with_path(perturb, params)


def _stepper(config, microbatches=1, loss_chunk=0):
  """batch -> (metrics, gradients) of one train step from a fixed init (one compile per stepper)."""
  run = train.build(config, with_data=False)
  aux_weights = {k: float(v) for k, v in config.loss_weights.items()}
  tx = _capture_grads()
  step = jax.jit(train.make_train_step(run.model, tx, run.lr_schedule, aux_weights, microbatches, loss_chunk))

  def run_step(batch):
    with sharding.mesh_context(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      params = _token_dependent_gates(meta.unbox(run.model.init(jax.random.key(0), batch["inputs"][:1])["params"]))
      state, metrics = step(train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), batch)
    return jax.device_get(metrics), jax.device_get(state.opt_state)

  return run_step


@pytest.mark.parametrize("ffn,microbatches,loss_chunk,tie", [
    ("bimoa", 4, 8, True), pytest.param("la", 2, 0, False, marks=pytest.mark.slow)])
def test_microbatched_step_equals_unsplit_step(ffn, microbatches, loss_chunk, tie):
  config = _config("debug", ffn, tie_embeddings=tie)
  batch = _batch(config)
  ref, ref_grads = _stepper(config)(batch)
  got, got_grads = _stepper(config, microbatches, loss_chunk)(batch)
  assert _rel(got_grads, ref_grads) <= TOL
  for k in ("loss", "lm_loss", "grad_norm", "intermediates"):  # intermediates: gate means and spreads, as logged
    assert _rel(got[k], ref[k]) <= TOL, k
  assert jax.tree.leaves(got["intermediates"])  # MoA/LA sow their gate means


def _sown(metrics, name: str) -> list:
  """The intermediates sown under `name` (e.g. moe_stats: expert loads per layer)."""
  return [v for path, v in jax.tree_util.tree_leaves_with_path(metrics["intermediates"])
          if name in jax.tree_util.keystr(path)]


@pytest.mark.slow
def test_microbatched_moe_step():
  """Token-wise quantities (lm_loss, z_loss, expert loads, gate means) equal the unsplit step's; the
  balance loss, made of per-batch statistics, is each microbatch's, so the step equals the mean of
  unsplit steps on the microbatches (rows j, M + j, ...)."""
  m = 2
  config = _config("debug_moe", "moa")
  batch = _batch(config)
  unsplit = _stepper(config)
  whole, _ = unsplit(batch)
  got, got_grads = _stepper(config, m, loss_chunk=16)(batch)
  tokenwise = lambda m: [m["lm_loss"], m["z_loss"], _sown(m, "moe_stats"), _sown(m, "mix_mean")]
  assert _sown(got, "moe_stats") and _sown(got, "mix_mean")
  assert _rel(tokenwise(got), tokenwise(whole)) <= TOL
  parts = [unsplit(_batch(config, slice(j, None, m))) for j in range(m)]
  mean = lambda *xs: sum(xs) / len(xs)
  ref = jax.tree.map(mean, *[p[0] for p in parts])
  ref_grads = jax.tree.map(mean, *[p[1] for p in parts])
  assert _rel(got_grads, ref_grads) <= TOL
  for k in ("loss", "lm_loss", "aux_loss", "z_loss", "intermediates"):
    assert _rel(got[k], ref[k]) <= TOL, k


@pytest.mark.slow
def test_microbatches_cut_activation_memory():
  config = _config("debug", "bimoa", batch=16, seq_len=256)
  temps = {}
  for m in (1, 4):
    config.train.microbatches = m
    temps[m] = train.compile_only(config)["temp"]
  assert temps[4] < 0.5 * temps[1], temps


def _mesh_worker() -> None:
  """On 8 fake devices, mesh data=2 × fsdp=2 × tensor=2: the sharded, jitted step of training
  (train.jit_train_step) with 2 microbatches and loss chunks against 1 microbatch; prints the differences."""
  assert jax.device_count() == 8
  config = _config("debug", "bimoa", batch=16)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  batch = _batch(config)
  out = {}
  for m, chunk in [(1, 0), (2, 16)]:
    config.train.microbatches, config.train.loss_chunk = m, chunk
    run = train.build(config, with_data=False)
    tx, shard = _capture_grads(), run.state_shardings
    run = dataclasses.replace(run, tx=tx, state_shardings=train.TrainState(shard.step, shard.params, shard.params))
    with sharding.mesh_context(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
      params = meta.unbox(run.model.init(jax.random.key(0), batch["inputs"][:1])["params"])
      state = jax.device_put(train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), run.state_shardings)
      state, metrics = train.jit_train_step(run)(state, jax.device_put(batch, run.batch_sharding))
    out[m] = jax.device_get((metrics["loss"], state.opt_state))
  print("RESULT", _rel(out[2][0], out[1][0]), _rel(out[2][1], out[1][1]))


@pytest.mark.slow
def test_microbatches_on_a_sharded_mesh_equal_one_batch():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
  loss_diff, grad_diff = map(float, lines[-1].split()[1:])
  assert loss_diff <= TOL and grad_diff <= TOL, lines[-1]


@pytest.mark.parametrize("field,value,message", [
    ("microbatches", 3, r"train.batch_size = 8 does not split into train.microbatches = 3 microbatches over the "
                        r"mesh's data axes \(data × fsdp × expert = 1\); use a batch_size that is a multiple of 3"),
    ("microbatches", 0, r"train.microbatches = 0; must be a positive integer"),
    ("loss_chunk", 7, r"train.loss_chunk = 7 does not divide train.seq_len = 32; use 0 \(no chunks\) or a divisor"),
])
def test_bad_microbatches_and_loss_chunk_stop_before_compiling(field, value, message):
  config = _config("debug", "swiglu")
  config.train[field] = value
  with pytest.raises(train.TrainingError, match=message):
    train.compile_only(config)


@pytest.mark.parametrize("chunk", [0, 32, 48, 512])
def test_a_chunk_at_least_the_sequence_is_the_whole_sequence(chunk):
  """A preset's loss_chunk (512) must not refuse a user's shorter --config.train.seq_len."""
  loss.check_chunk(chunk, 32)
  hidden = jax.random.normal(jax.random.key(0), (2, 32, 8))
  unembed = jax.random.normal(jax.random.key(1), (8, 16))
  targets = jax.random.randint(jax.random.key(2), (2, 32), 0, 16)
  np.testing.assert_allclose(loss.chunked_token_losses(hidden, unembed, targets, chunk),
                             loss.token_losses(loss.logits(hidden, unembed), targets), rtol=1e-6)


if __name__ == "__main__":
  _mesh_worker()
