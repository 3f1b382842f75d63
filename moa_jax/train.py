"""Training: TrainState, the jitted sharded train step, evaluation, and the resumable loop.

    python -m moa_jax.train --config=configs/quickstart.py --workdir=runs/quickstart [--config.k=v ...]

Everything the run needs is checked before anything compiles: the config, the mesh against the
devices, the batch against the mesh, the corpus and tokenizer against the vocabulary, and a resumed
checkpoint's model config against this one.
"""

from __future__ import annotations

import dataclasses
import json
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

from moa_jax import checkpoint, loss, optim, profiling, runtime, sharding, startup, summary, wandb_log
from moa_jax import workdir as workdir_lock
from moa_jax.health import Health
from moa_jax.loss import cross_entropy
from moa_jax.data import make_datasets
from moa_jax.metrics import MetricsWriter, mix_record, moe_record, peak_flops
from moa_jax.generate import continue_text
from moa_jax.transformer import Decoder, model_spec


class TrainingError(RuntimeError):
  """A run that cannot start or cannot go on; the message says why and what to do."""


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
                    microbatches: int = 1, loss_chunk: int = 0, param_shardings=None):
  """(state, batch) -> (state, metrics). With microbatches = M > 1 the batch (B, T) runs as M microbatches
  of B/M sequences in a jax.lax.scan, gradients summed in fp32: loss, gradients and the logged
  intermediates are the means over microbatches, equal to the unsplit step's (tests/test_accum.py)
  except the MoE balance loss, which is computed per microbatch. Microbatch j holds rows j, M + j, ...,
  so each device keeps its own rows when B is a multiple of M × the batch axes; param_shardings (the
  params' NamedShardings) lay out the gradient sums like the parameters."""
  def loss_fn(params, batch):
    (hidden, unembed), inter = model.apply({"params": params}, batch["inputs"], return_hidden=True,
                                           mutable=["intermediates"])
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
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": total, **losses, "lr": lr_schedule(state.step), "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates),
               "intermediates": inter}
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def jit_train_step(run: Run):
  """The sharded, donating jit of train_step that both training and --compile_only use."""
  aux_weights = {k: float(v) for k, v in run.config.get("loss_weights", {}).items()}
  c = run.config.train
  return jax.jit(make_train_step(run.model, run.tx, run.lr_schedule, aux_weights, c.get("microbatches", 1),
                                 c.get("loss_chunk", 0), run.state_shardings.params),
                 in_shardings=(run.state_shardings, run.batch_sharding),
                 out_shardings=(run.state_shardings, None), donate_argnums=0)


def make_eval_step(model: Decoder, loss_chunk: int = 0):
  """params, batch -> {loss, loss_sq}: the batch's mean next-token loss and the mean of its squared
  per-sequence losses (for the standard error over sequences; scalars, so every process can read them).
  loss_chunk: as train.loss_chunk, the logits are built that many positions at a time."""
  def eval_step(params, batch):
    hidden, unembed = model.apply({"params": params}, batch["inputs"], return_hidden=True)
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


def _sample_text(run: Run, params, prompt: str = "def ") -> str:
  ids = run.data.tokenizer.encode(prompt)
  return prompt + continue_text(run.model, run.data.tokenizer, params, ids, 48, temperature=0.8, top_k=40,
                                seed=run.config.train.seed)


def _save(ckpt, step, state, data_iter, config, **extra) -> None:
  """extra: tokens consumed, the health history, the resume_step this run descends from (startup.resume)."""
  meta = {"step": step, "config": json.loads(config.to_json_best_effort()), **extra,
          "structure": checkpoint.structure(state), "checksums": checkpoint.checksums(state)}
  ckpt.save(step, state, data_iter.get_state(), meta)


def _diverged(what: str, ckpt, last_good, spike) -> TrainingError:
  """The stop message for a run whose loss or parameters blew up: which checkpoint to go back to, and how."""
  if last_good is None:
    return TrainingError(f"{what}; stopped without saving. Last good checkpoint: none in {ckpt.directory}. "
                         "Lower optim.lr or raise optim.warmup_steps and rerun (it starts over).")
  before = f" (the last one before step {spike[0]}: {spike[1]})" if spike else ""
  return TrainingError(f"{what}; stopped without saving. Last good checkpoint: step {last_good} in "
                       f"{ckpt.directory}{before}. Lower optim.lr or raise optim.warmup_steps and rerun with "
                       f"--config.train.resume_step={last_good} (later checkpoints, if any, are moved to "
                       "checkpoints_superseded/)")


def train(config, workdir: str) -> dict:
  """Runs (or resumes) training in `workdir`; returns the last logged record. SIGTERM saves a
  checkpoint at the next step boundary and returns early (the record then has `preempted: True`)."""
  try:
    startup.check_config(config)
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
  health = Health(resumed.meta.get("health") if resumed.meta else None)
  tokens_at_start, spike = startup.tokens_at(resumed.meta, start), None
  names = run.model.spec.ffn.activations
  guard = runtime.PreemptionGuard()
  with sharding.mesh_context(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    step_fn = jit_train_step(run)
    eval_fn = jax.jit(make_eval_step(run.model, c.get("loss_chunk", 0)),
                      in_shardings=(run.state_shardings.params, run.batch_sharding))
    writer = MetricsWriter(workdir, c.steps, start, main_process, config)
    peak = peak_flops(jax.devices()[0])
    tokens_per_step = c.batch_size * c.seq_len
    writer.print(f"{config.get('name', 'run')}: {run.summary['total_params'] / 1e6:.2f}M parameters, "
                 f"{jax.device_count()} devices in {jax.process_count()} process(es), mesh {dict(run.mesh.shape)}, "
                 f"steps {start} -> {c.steps}" + (f" (resumed from {ckpt.directory}/{start})" if start else ""))
    last_good, record, window = ckpt.latest_step(), {}, []
    t_step, timer, estimate = start, profiling.StepTimer(), None
    profiler = profiling.Profiler(c, workdir, writer.print if main_process else print, timer.other)
    try:
      for step in range(start + 1, c.steps + 1):
        with profiler.step(step):
          with timer.data():
            batch = global_batch(run, next(data_iter))
          state, metrics = timer.step(step_fn, state, batch, timed=step > start + 1 and (
              step % c.log_every == 0 or step == c.steps))
        profiler.after(step, metrics)
        window.append(metrics)
        if step == start + 1:  # exclude compilation from the throughput
          jax.block_until_ready(metrics["loss"])
          estimate = profiling.compiled_memory(step_fn.lower(state, batch).compile())["total"] / profiling.GIB
          timer.restart()
          t_step = step
        preempted = guard.stop_requested(step)
        log_now = step % c.log_every == 0 or step == c.steps or preempted
        save_now = ckpt.due(step) or step == c.steps or preempted
        if not (log_now or save_now):
          continue
        last_intermediates = jax.device_get(window[-1]["intermediates"])
        fetched = jax.device_get([{k: v for k, v in m.items() if k != "intermediates"} for m in window])
        window = []
        for i, m in enumerate(fetched):  # the save rule: moa_jax/health.py
          at, why = step - len(fetched) + i + 1, health.check(float(m["loss"]), float(m["param_norm"]))
          if not (np.isfinite(m["loss"]) and np.isfinite(m["param_norm"])):
            what = "loss" if not np.isfinite(m["loss"]) else "param_norm"
            raise _diverged(f"{what} is {m[what]} at step {at}", ckpt, last_good, spike)
          if why and spike is None:
            spike = (at, why)
            say(f"warning: step {at}: {why}; no checkpoint is saved until the run recovers")
          elif not why:
            spike = None
        tokens = tokens_at_start + (step - start) * tokens_per_step
        if save_now and spike is not None and (step == c.steps or preempted):
          raise _diverged(f"step {step} is not fit to save", ckpt, last_good, spike)
        if save_now and spike is None:
          with timer.checkpoint():
            _save(ckpt, step, state, data_iter, config, tokens=tokens, health=health.state(),
                  resume_step=c.get("resume_step", 0))
          last_good = step
        if log_now:
          elapsed = timer.train_sec()  # less checkpoint blocking and sampling
          tok_s = tokens_per_step * (step - t_step) / elapsed
          record = {"step": step, "tokens": tokens,
                    **{k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]},
                    "tokens_per_sec": tok_s,
                    "mfu": run.summary["flops_per_token"] * tok_s / (peak * jax.device_count()) if peak else None,
                    **timer.record(), **profiling.device_memory()}
          if estimate is not None:  # the first record: XLA's estimate, as --compile_only prints it
            record["memory_estimate_gib"], estimate = estimate, None
          gates = mix_record(last_intermediates, names)
          if gates:
            record["gates"] = gates
          gates_std = mix_record(last_intermediates, names, "mix_std")
          if gates_std:
            record["gates_std"] = gates_std
          record.update(moe_record(last_intermediates))
          if c.eval_every and step % c.eval_every == 0 or step == c.steps:
            record.update(evaluate_with_error(run, eval_fn, state.params))
          writer.write(record)
          eta = (c.steps - step) * elapsed / max(step - t_step, 1)
          writer.progress(step, loss=f"{record['loss']:.4f}", eval=record.get("eval_loss") and
                          f"{record['eval_loss']:.4f}", tok_s=f"{tok_s:,.0f}", eta=f"{eta:,.0f}s")
          timer.restart()
          t_step = step
        if preempted:
          writer.print(f"{guard.signal_name}: saved step {step} in {ckpt.directory}; rerun the same command to resume")
          record = {**record, "preempted": True}
          break
        if c.sample_every and step % c.sample_every == 0:
          with timer.other():
            text = _sample_text(run, state.params)  # every process joins the computation
          writer.print(f"step {step} sample: {text!r}")
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
  startup.quiet_storage_logs()  # a full disk ends in one line, not a traceback per background writer
  f = flags.FLAGS
  try:
    runtime.initialize(f.coordinator_address, f.num_processes, f.process_id)
    if f.target:
      if not f.compile_only:
        raise TrainingError(f"--target={f.target} compiles for other hardware without running; add --compile_only")
      from moa_jax.aot import compiled as aot  # aot builds on this module: imported only for --target
      print(aot.report(f.config, f.target))
      return
    if f.compile_only:
      print(format_memory(f.config, compile_only(f.config)))
      return
    if not f.workdir:
      raise TrainingError("--workdir is required to train (only --compile_only runs without one)")
    train(f.config, f.workdir)
  except KeyboardInterrupt:
    raise SystemExit("error: interrupted (Ctrl-C before training began, or a second one): stopped without "
                     "saving; the checkpoints already saved are intact, and rerunning the same command resumes "
                     "from the newest") from None
  except Exception as e:
    full = startup.storage_error(e)  # a full disk or read-only workdir, however deep Orbax wrapped it
    if full is not None:
      raise SystemExit(startup.storage_message(full, f.workdir)) from None
    if isinstance(e, (TrainingError, ValueError)):
      raise SystemExit(f"error: {e}") from None
    raise


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tb/ (a gs:// path works).")
  flags.DEFINE_bool("compile_only", False, "Compile the train step for the mesh, print memory per device, exit.")
  flags.DEFINE_string("target", None, "With --compile_only: compile for a TPU slice (v5p:2x2x2) or GPUs (h100:8) "
                      "on this machine, no device needed (pip install moa_jax[aot]; moa_jax/aot).")
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=startup.parse_flags)
