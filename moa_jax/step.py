"""The train step and everything built before it compiles: TrainState, the jitted sharded step (with
microbatch accumulation), the eval step, and `build`, which checks the config, the mesh against the
devices and the batch against the mesh, and lays out the state. The loop that runs it: moa_jax/train.py;
compiling it for other hardware: moa_jax/aot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec as P

from moa_jax import loss, optim, profiling, sharding, summary
from moa_jax.data import make_datasets
from moa_jax.errors import TrainingError
from moa_jax.moe import step as moe_step
from moa_jax.transformer import Decoder, cast_matrices, model_spec


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def sown_losses(intermediates) -> dict[str, jax.Array]:
  """Auxiliary losses that layers sow as `self.sow("intermediates", "aux_losses", {name: value})`
  (MoE router losses), averaged over layers and sow calls: a mean over MoE layers, so a loss weight
  means the same at any depth (balanced routing gives aux_loss = 1)."""
  sums, counts = {}, {}
  for path, value in jax.tree_util.tree_leaves_with_path(intermediates):
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    if "aux_losses" in keys[:-1]:
      sums[keys[-1]] = sums.get(keys[-1], 0.0) + jnp.sum(value)
      counts[keys[-1]] = counts.get(keys[-1], 0) + value.size
  return {k: v / counts[k] for k, v in sums.items()}


def _batch_constraint(x: jax.Array, lead: int = 0) -> jax.Array:
  """Keeps dimension `lead` of a batch array split over the mesh's batch axes (inside the microbatch scan,
  where XLA would otherwise lose the layout); a no-op without a mesh."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, P(*(None,) * lead, sharding.BATCH_AXES))


def _whole_batch_intermediates(stacked):
  """Intermediates stacked over equal microbatches (M, ...) -> the whole batch's: means average, and the
  MoA gates' std over tokens (`mix_std`) adds the spread of the microbatch means (`mix_mean`): the law of
  total variance, exact for one channel group."""
  if not isinstance(stacked, Mapping):
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)
  out = {k: _whole_batch_intermediates(v) for k, v in stacked.items()}
  if "mix_std" in stacked and "mix_mean" in stacked:
    out["mix_std"] = jax.tree.map(lambda sd, m: jnp.sqrt(jnp.mean(sd * sd, axis=0) + jnp.var(m, axis=0)),
                                  stacked["mix_std"], stacked["mix_mean"])
  return out


def make_train_step(model: Decoder, tx: optax.GradientTransformation, lr_schedule, aux_weights: dict,
                    microbatches: int = 1, loss_chunk: int = 0, param_shardings=None, with_stats: bool = True):
  """(state, batch) -> (state, metrics). with_stats=False leaves the sown statistics (MoA gate means and
  spreads, MoE loads) out of the metrics, so XLA computes none of them: the step for steps that are not
  logged (the sown auxiliary losses still count). With microbatches = M > 1 the batch (B, T) runs as M microbatches
  of B/M sequences in a jax.lax.scan, gradients summed in fp32: loss, gradients and the logged
  intermediates are the means over microbatches, equal to the unsplit step's (tests/test_accum.py)
  except the MoE balance loss, which is computed per microbatch. Microbatch j holds rows j, M + j, ...,
  so each device keeps its own rows when B is a multiple of M × the batch axes; param_shardings (the
  params' NamedShardings) lay out the gradient sums like the parameters."""
  def loss_fn(params, batch):
    (hidden, unembed), inter = model.apply({"params": cast_matrices(params, model.spec)}, batch["inputs"],
                                           return_hidden=True, mutable=["intermediates"])
    lm_loss = loss.chunked_token_losses(hidden, unembed, batch["targets"], loss_chunk).mean()
    losses = {"lm_loss": lm_loss, **sown_losses(inter)}
    total = losses["lm_loss"] + sum(aux_weights.get(k, 0.0) * v for k, v in losses.items() if k != "lm_loss")
    return total, (losses, inter)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def accumulated_grads(params, batch):
    if microbatches == 1:
      return grad_fn(params, batch)
    split = {k: _batch_constraint(v.reshape(v.shape[0] // microbatches, microbatches, *v.shape[1:]).swapaxes(0, 1),
                                  lead=1) for k, v in batch.items()}       # (M, B/M, T)

    def body(grad_sum, micro):
      out, grads = grad_fn(params, {k: _batch_constraint(v) for k, v in micro.items()})
      return jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads), out

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    if param_shardings is not None:
      zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
    grad_sum, (total, (losses, inter)) = jax.lax.scan(body, zeros, split)
    grads = jax.tree.map(lambda g, p: (g / microbatches).astype(p.dtype), grad_sum, params)
    mean = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
    return (mean(total), (mean(losses), _whole_batch_intermediates(inter))), grads

  def train_step(state: TrainState, batch):
    (total, (losses, inter)), grads = accumulated_grads(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = moe_step.update_router_bias(model.spec.moe, state.params, optax.apply_updates(state.params, updates),
                                         inter)
    metrics = {"loss": total, **losses, "lr": lr_schedule(state.step), "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates),
               **moe_step.step_outputs(inter)}
    if with_stats:
      metrics["intermediates"] = inter
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def jit_train_step(run: Run, with_stats: bool = True):
  """The sharded, donating jit of train_step that both training and --compile_only use; with_stats: as in
  make_train_step (training compiles both: the statistics only at log steps)."""
  aux_weights = {k: float(v) for k, v in run.config.get("loss_weights", {}).items()}
  c = run.config.train
  return jax.jit(make_train_step(run.model, run.tx, run.lr_schedule, aux_weights, c.get("microbatches", 1),
                                 c.get("loss_chunk", 0), run.state_shardings.params, with_stats),
                 in_shardings=(run.state_shardings, run.batch_sharding),
                 out_shardings=(run.state_shardings, None), donate_argnums=0)


def make_eval_step(model: Decoder, loss_chunk: int = 0):
  """params, batch -> {loss, loss_sq}: the batch's mean next-token loss and the mean of its squared
  per-sequence losses (for the standard error over sequences; scalars, so every process can read them).
  loss_chunk: as train.loss_chunk, the logits are built that many positions at a time."""
  def eval_step(params, batch):
    hidden, unembed = model.apply({"params": cast_matrices(params, model.spec)}, batch["inputs"], return_hidden=True)
    per_sequence = loss.chunked_token_losses(hidden, unembed, batch["targets"], loss_chunk).mean(axis=-1)  # (B,)
    return {"loss": per_sequence.mean(), "loss_sq": jnp.square(per_sequence).mean()}
  return eval_step


@dataclasses.dataclass
class Run:
  """Everything built (and checked) before the first compile."""
  config: Any
  model: Decoder
  mesh: Any
  tx: optax.GradientTransformation
  lr_schedule: Any
  state_shardings: Any
  abstract_state: Any
  batch_sharding: NamedSharding
  data: Any
  summary: dict


def abstract_model(model: Decoder, batch_size: int, seq_len: int):
  """The parameters' shapes (ShapeDtypeStructs, nothing allocated) and their logical PartitionSpecs."""
  tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
  boxed = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]
  return meta.unbox(boxed), nn.get_partition_spec(boxed)


def build(config, with_data: bool = True, devices=None) -> Run:
  """devices: the mesh's devices (None: jax.devices(); moa_jax.aot passes a target's compile-only ones)."""
  spec = model_spec(config.model)
  if config.train.steps <= 0:
    raise TrainingError(f"train.steps = {config.train.steps}; must be positive")
  profiling.check_config(config.train, jax.process_count())
  mesh = sharding.make_mesh(config.mesh, devices)
  divisor = sharding.batch_divisor(mesh)
  if config.train.batch_size % divisor:
    raise TrainingError(f"train.batch_size = {config.train.batch_size} does not divide over the mesh's data axes "
                        f"(data × fsdp × expert = {divisor}); use a multiple of {divisor}")
  micro = config.train.get("microbatches", 1)
  if not isinstance(micro, int) or micro < 1:
    raise TrainingError(f"train.microbatches = {micro!r}; must be a positive integer (1: no accumulation)")
  if config.train.batch_size % (micro * divisor):
    raise TrainingError(f"train.batch_size = {config.train.batch_size} does not split into train.microbatches = "
                        f"{micro} microbatches over the mesh's data axes (data × fsdp × expert = {divisor}); use a "
                        f"batch_size that is a multiple of {micro * divisor}, or fewer microbatches")
  loss.check_chunk(config.train.get("loss_chunk", 0), config.train.seq_len)
  if config.train.batch_size % jax.process_count():
    raise TrainingError(f"train.batch_size = {config.train.batch_size} does not divide over "
                        f"{jax.process_count()} processes")
  model = Decoder(spec)
  abstract_params, logical = abstract_model(model, config.train.batch_size, config.train.seq_len)
  sharding.check_divisible(abstract_params, logical, mesh)
  param_shardings = sharding.logical_shardings(logical, mesh)
  lr_schedule = optim.schedule(config.optim, config.train.steps)
  tx = optim.make_optimizer(config.optim, config.train.steps, abstract_params, logical, mesh)
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  state_shardings = TrainState(replicated, param_shardings,
                               sharding.match_shardings(abstract_opt, abstract_params, param_shardings, replicated))
  abstract_state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract_params, abstract_opt)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract_state, state_shardings)
  data = make_datasets(config.data, vocab_size=spec.vocab_size, seq_len=config.train.seq_len,
                       global_batch_size=config.train.batch_size, seed=config.train.seed,
                       process_index=jax.process_index(), process_count=jax.process_count()) if with_data else None
  return Run(config, model, mesh, tx, lr_schedule, state_shardings, abstract_state,
             sharding.batch_sharding(mesh), data, summary.summarize(spec, config.train.seq_len))


def init_state(run: Run) -> TrainState:
  def init(key):
    tokens = jnp.zeros((1, run.config.train.seq_len), jnp.int32)
    params = meta.unbox(run.model.init(key, tokens)["params"])
    return TrainState(jnp.zeros((), jnp.int32), params, run.tx.init(params))
  with sharding.mesh_context(run.mesh):
    return jax.jit(init, out_shardings=run.state_shardings)(jax.random.key(run.config.train.seed))


def global_batch(run: Run, local: dict) -> dict:
  """Per-process numpy batch -> global jax arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(run.batch_sharding, np.asarray(v, np.int32))
          for k, v in local.items()}


def compile_train_step(run: Run):
  """The train step lowered and compiled from abstract shapes (no weights, no data)."""
  c = run.config.train
  batch = {k: jax.ShapeDtypeStruct((c.batch_size, c.seq_len), jnp.int32, sharding=run.batch_sharding)
           for k in ("inputs", "targets")}
  with sharding.mesh_context(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return jit_train_step(run).lower(run.abstract_state, batch).compile()
