"""Training: TrainState, the jitted sharded train step, evaluation, and the resumable loop.

    python -m moa_jax.train --config=configs/quickstart.py --workdir=runs/quickstart [--config.k=v ...]

Everything the run needs is checked before anything compiles: the config, the mesh against the
devices, the batch against the mesh, the corpus and tokenizer against the vocabulary, and a resumed
checkpoint's model config against this one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from etils import epath
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from moa_jax import actions, checkpoint, cli, loss, optim, profiling, runtime, sharding, startup, summary
from moa_jax import wandb_log, workdir as workdir_lock
from moa_jax.errors import Diverged, TrainingError
from moa_jax.health import Health
from moa_jax.loss import cross_entropy
from moa_jax.data import epochs, make_datasets
from moa_jax.metrics import MetricsWriter
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


def build(config, with_data: bool = True) -> Run:
  spec = model_spec(config.model)
  if config.train.steps <= 0:
    raise TrainingError(f"train.steps = {config.train.steps}; must be positive")
  profiling.check_config(config.train, jax.process_count())
  mesh = sharding.make_mesh(config.mesh)
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


def eval_batch_count(run: Run) -> int:
  """Validation batches per evaluation: ⌈train.eval_tokens / tokens per batch⌉ when eval_tokens > 0,
  else train.eval_batches; never more than the whole split holds."""
  c = run.config.train
  tokens = c.get("eval_tokens", 0)
  wanted = math.ceil(tokens / (c.batch_size * c.seq_len)) if tokens > 0 else c.eval_batches
  return min(wanted, run.data.eval_subset_batches)


def evaluate_with_error(run: Run, eval_fn, params) -> dict:
  """{eval_loss, eval_loss_se, eval_tokens}: mean next-token loss over the fixed shuffled eval subset
  (data.eval_subset) and its standard error over sequences, sd / √sequences."""
  batches = jax.device_get([eval_fn(params, global_batch(run, b)) for b in run.data.eval_subset(eval_batch_count(run))])
  mean = float(np.mean([b["loss"] for b in batches]))
  n = len(batches) * run.config.train.batch_size
  var = max(float(np.mean([b["loss_sq"] for b in batches])) - mean * mean, 0.0) * n / max(n - 1, 1)
  return {"eval_loss": mean, "eval_loss_se": math.sqrt(var / n),
          "eval_tokens": n * run.config.train.seq_len}


def evaluate(run: Run, eval_fn, params) -> float:
  return evaluate_with_error(run, eval_fn, params)["eval_loss"]


def train(config, workdir: str) -> dict:
  """Runs (or resumes) training in `workdir`; returns the last logged record. SIGTERM saves a
  checkpoint at the next step boundary and returns early (the record then has `preempted: True`)."""
  try:
    startup.check_config(config)
    startup.check_object_store(workdir=workdir, **{f"data.{k}": config.data[k] for k in ("cache_dir", "tokenizer")})
    startup.check_workdir(workdir)
    wandb_log.check(config)
    run = build(config)
  except (ValueError, startup.StartupError) as e:  # config validation: a message naming the field and the fix
    raise TrainingError(str(e)) from e
  main_process = jax.process_index() == 0
  lock = workdir_lock.WorkdirLock(workdir) if main_process else None  # one run per workdir
  if main_process:  # epath: a local directory or an object store (gs://)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    try:
      lock.acquire()
    except workdir_lock.LockedError as e:
      raise TrainingError(str(e)) from None
  try:
    return _train(config, workdir, run, main_process)
  finally:
    if lock is not None:
      lock.release()


def _train(config, workdir: str, run: Run, main_process: bool) -> dict:
  ckpt = checkpoint.Checkpoints(workdir, config.checkpoint.every, config.checkpoint.keep)
  data_iter = run.data.train_iter()
  try:
    resumed = startup.resume(run, ckpt, data_iter, init_state)
  except startup.StartupError as e:  # refused: nothing in the workdir was changed
    ckpt.close()
    raise TrainingError(str(e)) from None
  state, start, c = resumed.state, resumed.step, config.train
  say = print if main_process else (lambda *a, **k: None)
  for line in resumed.notes:
    say(line)
  if start >= c.steps:  # rewrite nothing
    ckpt.close()
    say(f"{workdir} is already done: its checkpoint is at step {start} and train.steps = {c.steps}; nothing to "
        f"do (raise --config.train.steps to train on)")
    return {"step": start, "done": True}
  for step in resumed.supersede:
    say(f"note: train.resume_step = {start}: moved the later checkpoint step {step} to "
        f"{ckpt.set_aside(step, 'checkpoints_superseded')}")
  if main_process:  # only now that every resume check has passed
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  guard = runtime.PreemptionGuard()
  with sharding.mesh_context(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    step_fns = {due: jit_train_step(run, with_stats=due) for due in (False, True)}  # statistics at log steps
    eval_fn = jax.jit(make_eval_step(run.model, c.get("loss_chunk", 0)),
                      in_shardings=(run.state_shardings.params, run.batch_sharding))
    writer = MetricsWriter(workdir, c.steps, start, main_process, config)
    writer.print(f"{config.get('name', 'run')}: {run.summary['total_params'] / 1e6:.2f}M parameters, "
                 f"{jax.device_count()} devices in {jax.process_count()} process(es), mesh {dict(run.mesh.shape)}, "
                 f"steps {start} -> {c.steps}" + (f" (resumed from {ckpt.directory}/{start})" if start else ""))
    for line in epochs.describe(run.data.train_tokens, c.steps, c.batch_size, c.seq_len, config.data.source):
      writer.print(line)
    timer, record = profiling.StepTimer(), {}
    profiler = profiling.Profiler(c, workdir, writer.print if main_process else print, timer.other)
    window = actions.Window(Health(resumed.meta.get("health") if resumed.meta else None), ckpt, say)
    save = actions.Saver(ckpt, data_iter, config, timer, window)
    log = actions.Logger(run, writer, timer, start, lambda params: evaluate_with_error(run, eval_fn, params),
                         run.model.spec.ffn.activations)
    sample = actions.Sampler(run, timer, writer.print)
    tokens_at = lambda step: startup.tokens_at(resumed.meta, start) + (step - start) * c.batch_size * c.seq_len
    try:
      for step in range(start + 1, c.steps + 1):
        with profiler.step(step):
          with timer.data():
            batch = global_batch(run, next(data_iter))
          step_fn = step_fns[log.due(step)]  # the gate and MoE statistics only where they are logged
          state, metrics = timer.step(step_fn, state, batch, timed=step > start + 1 and log.due(step))
        profiler.after(step, metrics)
        window.add(metrics)
        if step == start + 1:
          log.first_step(step, step_fn, state, batch, metrics)
        preempted = guard.stop_requested(step)
        log_now, save_now = log.due(step) or preempted, save.due(step) or preempted
        if not (log_now or save_now):
          continue
        fetched, intermediates = window.flush(step)
        if save_now:
          save(step, state, tokens_at(step), final=step == c.steps or preempted)
        if log_now:
          record = log(step, tokens_at(step), fetched, intermediates, state.params)
        if preempted:
          writer.print(f"{guard.signal_name}: saved step {step} in {ckpt.directory}; rerun the same command to resume")
          return {**record, "preempted": True}
        if sample.due(step):
          sample(step, state.params)
    finally:
      profiler.stop()
      ckpt.wait()
      ckpt.close()
      writer.close()
      guard.close()
  return record


def compile_train_step(run: Run):
  """The train step lowered and compiled from abstract shapes (no weights, no data)."""
  c = run.config.train
  batch = {k: jax.ShapeDtypeStruct((c.batch_size, c.seq_len), jnp.int32, sharding=run.batch_sharding)
           for k in ("inputs", "targets")}
  with sharding.mesh_context(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    return jit_train_step(run).lower(run.abstract_state, batch).compile()


def compile_only(config) -> dict:
  """Lowers and compiles the train step for the configured mesh from abstract shapes (no weights,
  no data) and returns XLA's per-device memory estimate in bytes."""
  try:
    run = build(config, with_data=False)
  except ValueError as e:
    raise TrainingError(str(e)) from e
  out = profiling.compiled_memory(compile_train_step(run))
  stats = jax.devices()[0].memory_stats() or {}
  out["device_limit"] = int(stats.get("bytes_limit", 0))
  return out


def format_memory(config, mem: dict) -> str:
  gib = lambda b: f"{b / 2**30:8.3f} GiB"
  rows = [("arguments (params, optimizer state, batch)", mem["argument"]), ("outputs", mem["output"]),
          ("  of which aliased to arguments (donated)", mem["alias"]), ("temporaries (activations)", mem["temp"]),
          ("generated code", mem["generated_code"]), ("total per device = memory_estimate_gib", mem["total"])]
  lines = [f"{config.get('name', 'run')}: train step compiled for mesh "
           f"{dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, jax.device_count())))} "
           f"on {jax.device_count()} {jax.devices()[0].platform} devices; memory per device:"]
  lines += [f"  {name:<44}{gib(value)}" for name, value in rows]
  if mem["device_limit"]:
    verdict = "fits" if mem["total"] <= mem["device_limit"] else "DOES NOT FIT"
    lines.append(f"  {'device memory':<44}{gib(mem['device_limit'])}  ({verdict})")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines out of the progress bar
  cli.quiet_background_errors()  # a failed save ends in one line, not a traceback per background writer
  f = flags.FLAGS
  if f.print_config:  # the config after every --config.* override, as YAML; nothing runs
    print(f.config, end="")
    return
  runtime.initialize(f.coordinator_address, f.num_processes, f.process_id)
  if f.compile_only:
    print(format_memory(f.config, compile_only(f.config)))
    return
  if not f.workdir:
    raise TrainingError("--workdir is required to train (only --compile_only runs without one)")
  train(f.config, f.workdir)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tb/ (a gs:// path works).")
  flags.DEFINE_bool("compile_only", False, "Compile the train step for the mesh, print memory per device, exit.")
  flags.DEFINE_bool("print_config", False, "Print the resolved config (file plus overrides) and exit.")
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
  flags.mark_flags_as_required(["config"])
  app.run(cli.funnel(main, workdir=lambda: flags.FLAGS.workdir, then=cli.TRAIN_RERUN,
                     interrupted="stopped without saving (before training began, or a second one); the "
                                 "checkpoints already saved are intact, and rerunning the same command resumes "
                                 "from the newest"),
          flags_parser=cli.parse_flags)
