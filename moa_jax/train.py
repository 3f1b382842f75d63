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
import time
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

from moa_jax import checkpoint, optim, runtime, sharding, summary
from moa_jax.data import make_datasets
from moa_jax.metrics import MetricsWriter, mix_record, moe_record, peak_flops
from moa_jax.sample import continue_text
from moa_jax.transformer import Decoder, model_spec


class TrainingError(RuntimeError):
  """A run that cannot start or cannot go on; the message says why and what to do."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean next-token loss. logits (B, T, V) float32, targets (B, T) int32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def sown_losses(intermediates) -> dict[str, jax.Array]:
  """Auxiliary losses that layers sow as `self.sow("intermediates", "aux_losses", {name: value})`
  (MoE router losses), summed over layers and sow calls."""
  out = {}
  for path, value in jax.tree_util.tree_leaves_with_path(intermediates):
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    if "aux_losses" in keys[:-1]:
      out[keys[-1]] = out.get(keys[-1], 0.0) + jnp.sum(value)
  return out


def make_train_step(model: Decoder, tx: optax.GradientTransformation, lr_schedule, aux_weights: dict):
  def loss_fn(params, batch):
    logits, inter = model.apply({"params": params}, batch["inputs"], mutable=["intermediates"])
    losses = {"lm_loss": cross_entropy(logits, batch["targets"]), **sown_losses(inter)}
    total = losses["lm_loss"] + sum(aux_weights.get(k, 0.0) * v for k, v in losses.items() if k != "lm_loss")
    return total, (losses, inter)

  def train_step(state: TrainState, batch):
    (loss, (losses, inter)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, **losses, "lr": lr_schedule(state.step), "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "update_norm": optax.tree.norm(updates),
               "intermediates": inter}
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def jit_train_step(run: Run):
  """The sharded, donating jit of train_step that both training and --compile_only use."""
  aux_weights = {k: float(v) for k, v in run.config.get("loss_weights", {}).items()}
  return jax.jit(make_train_step(run.model, run.tx, run.lr_schedule, aux_weights),
                 in_shardings=(run.state_shardings, run.batch_sharding),
                 out_shardings=(run.state_shardings, None), donate_argnums=0)


def make_eval_step(model: Decoder):
  def eval_step(params, batch):
    return cross_entropy(model.apply({"params": params}, batch["inputs"]), batch["targets"])
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


def build(config, with_data: bool = True) -> Run:
  spec = model_spec(config.model)
  if config.train.steps <= 0:
    raise TrainingError(f"train.steps = {config.train.steps}; must be positive")
  mesh = sharding.make_mesh(config.mesh)
  divisor = sharding.batch_divisor(mesh)
  if config.train.batch_size % divisor:
    raise TrainingError(f"train.batch_size = {config.train.batch_size} does not divide over the mesh's data axes "
                        f"(data × fsdp × expert = {divisor}); use a multiple of {divisor}")
  if config.train.batch_size % jax.process_count():
    raise TrainingError(f"train.batch_size = {config.train.batch_size} does not divide over "
                        f"{jax.process_count()} processes")
  model = Decoder(spec)
  tokens = jax.ShapeDtypeStruct((config.train.batch_size, config.train.seq_len), jnp.int32)
  boxed = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]
  logical = nn.get_partition_spec(boxed)
  abstract_params = meta.unbox(boxed)
  sharding.check_divisible(abstract_params, logical, mesh)
  param_shardings = sharding.logical_shardings(logical, mesh)
  lr_schedule = optim.schedule(config.optim, config.train.steps)
  tx = optim.make_optimizer(config.optim, config.train.steps, abstract_params, logical)
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


def restore_or_init(run: Run, ckpt: checkpoint.Checkpoints, data_iter) -> TrainState:
  """Restores the newest readable checkpoint (unreadable ones are set aside with a warning), or inits."""
  for step in ckpt.all_steps():
    try:
      saved = ckpt.read_meta(step)
    except Exception as e:  # a truncated or corrupted checkpoint: fall back to an older one
      _set_aside(ckpt, step, e)
      continue
    diff = checkpoint.config_diff(saved["config"]["model"], run.config.model.to_dict())
    if diff:
      raise TrainingError(f"{ckpt.directory} holds a checkpoint (step {step}) of a different model:\n  "
                          + "\n  ".join(diff) + "\nuse a new --workdir, or the checkpoint's model config")
    try:
      state, data_state = ckpt.restore(step, run.abstract_state)
    except Exception as e:
      _set_aside(ckpt, step, e)
      continue
    data_iter.set_state(data_state)
    return state
  return init_state(run)


def _set_aside(ckpt: checkpoint.Checkpoints, step: int, error: Exception) -> None:
  where = ckpt.set_aside(step)
  logging.warning("checkpoint step %d in %s is unreadable (%s: %s); moved it to %s and trying an older one",
                  step, ckpt.directory, type(error).__name__, str(error)[:200], where)


def evaluate(run: Run, eval_fn, params) -> float:
  losses = [eval_fn(params, global_batch(run, b)) for b in run.data.eval_batches(run.config.train.eval_batches)]
  return float(np.mean(jax.device_get(losses)))


def _sample_text(run: Run, params, prompt: str = "def ") -> str:
  ids = run.data.tokenizer.encode(prompt)
  return prompt + continue_text(run, params, ids, 48, temperature=0.8, top_k=40, seed=run.config.train.seed)


def _save(ckpt, step, state, data_iter, config) -> None:
  ckpt.save(step, state, data_iter.get_state(), {"step": step, "config": json.loads(config.to_json_best_effort())})


def train(config, workdir: str) -> dict:
  """Runs (or resumes) training in `workdir`; returns the last logged record. SIGTERM saves a
  checkpoint at the next step boundary and returns early (the record then has `preempted: True`)."""
  try:
    run = build(config)
  except ValueError as e:  # config validation: already a message naming the field and the fix
    raise TrainingError(str(e)) from e
  main_process = jax.process_index() == 0
  if main_process:  # epath: a local directory or an object store (gs://)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  ckpt = checkpoint.Checkpoints(workdir, config.checkpoint.every, config.checkpoint.keep)
  data_iter = run.data.train_iter()
  state = restore_or_init(run, ckpt, data_iter)
  start = int(jax.device_get(state.step))
  c = config.train
  names = run.model.spec.ffn.activations
  guard = runtime.PreemptionGuard()
  with sharding.mesh_context(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    step_fn = jit_train_step(run)
    eval_fn = jax.jit(make_eval_step(run.model), in_shardings=(run.state_shardings.params, run.batch_sharding))
    writer = MetricsWriter(workdir, c.steps, start, main_process)
    peak = peak_flops(jax.devices()[0])
    tokens_per_step = c.batch_size * c.seq_len
    writer.print(f"{config.get('name', 'run')}: {run.summary['total_params'] / 1e6:.2f}M parameters, "
                 f"{jax.device_count()} devices in {jax.process_count()} process(es), mesh {dict(run.mesh.shape)}, "
                 f"steps {start} -> {c.steps}" + (f" (resumed from {ckpt.directory}/{start})" if start else ""))
    last_good, record, window = ckpt.latest_step(), {}, []
    t0, t_step = time.perf_counter(), start
    try:
      for step in range(start + 1, c.steps + 1):
        state, metrics = step_fn(state, global_batch(run, next(data_iter)))
        window.append(metrics)
        if step == start + 1:  # exclude compilation from the throughput
          jax.block_until_ready(metrics["loss"])
          t0, t_step = time.perf_counter(), step
        preempted = guard.stop_requested(step)
        log_now = step % c.log_every == 0 or step == c.steps or preempted
        save_now = ckpt.due(step) or step == c.steps or preempted
        if not (log_now or save_now):
          continue
        last_intermediates = jax.device_get(window[-1]["intermediates"])
        fetched = jax.device_get([{k: v for k, v in m.items() if k != "intermediates"} for m in window])
        window = []
        bad = [i for i, m in enumerate(fetched) if not np.isfinite(m["loss"])]
        if bad:
          raise TrainingError(f"loss is {fetched[bad[0]]['loss']} at step {step - len(fetched) + bad[0] + 1}; "
                              f"stopped without saving. Last good checkpoint: "
                              f"{'step ' + str(last_good) if last_good is not None else 'none'} in "
                              f"{ckpt.directory}. Lower optim.lr or raise optim.warmup_steps and rerun "
                              "(it resumes from there).")
        if save_now:
          _save(ckpt, step, state, data_iter, config)
          last_good = step
        if log_now:
          elapsed = time.perf_counter() - t0
          tok_s = tokens_per_step * (step - t_step) / elapsed
          record = {"step": step, "tokens": step * tokens_per_step,
                    **{k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]},
                    "tokens_per_sec": tok_s,
                    "mfu": run.summary["flops_per_token"] * tok_s / (peak * jax.device_count()) if peak else None}
          gates = mix_record(last_intermediates, names)
          if gates:
            record["gates"] = gates
          record.update(moe_record(last_intermediates))
          if c.eval_every and step % c.eval_every == 0 or step == c.steps:
            record["eval_loss"] = evaluate(run, eval_fn, state.params)
          writer.write(record)
          eta = (c.steps - step) * elapsed / max(step - t_step, 1)
          writer.progress(step, loss=f"{record['loss']:.4f}", eval=record.get("eval_loss") and
                          f"{record['eval_loss']:.4f}", tok_s=f"{tok_s:,.0f}", eta=f"{eta:,.0f}s")
          t0, t_step = time.perf_counter(), step
        if preempted:
          writer.print(f"SIGTERM: saved step {step} in {ckpt.directory}; rerun the same command to resume")
          record = {**record, "preempted": True}
          break
        if c.sample_every and step % c.sample_every == 0:
          text = _sample_text(run, state.params)  # every process joins the computation
          writer.print(f"step {step} sample: {text!r}")
    finally:
      ckpt.wait()
      ckpt.close()
      writer.close()
      guard.close()
  return record


def compile_only(config) -> dict:
  """Lowers and compiles the train step for the configured mesh from abstract shapes (no weights,
  no data) and returns XLA's per-device memory estimate in bytes."""
  try:
    run = build(config, with_data=False)
  except ValueError as e:
    raise TrainingError(str(e)) from e
  batch = {k: jax.ShapeDtypeStruct((config.train.batch_size, config.train.seq_len), jnp.int32,
                                   sharding=run.batch_sharding) for k in ("inputs", "targets")}
  with sharding.mesh_context(run.mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
    compiled = jit_train_step(run).lower(run.abstract_state, batch).compile()
  mem = compiled.memory_analysis()
  out = {name: int(getattr(mem, f"{name}_size_in_bytes", 0) or 0)
         for name in ("argument", "output", "temp", "generated_code", "alias")}
  out["total"] = out["argument"] + out["output"] + out["temp"] + out["generated_code"] - out["alias"]
  stats = jax.devices()[0].memory_stats() or {}
  out["device_limit"] = int(stats.get("bytes_limit", 0))
  return out


def format_memory(config, mem: dict) -> str:
  gib = lambda b: f"{b / 2**30:8.3f} GiB"
  rows = [("arguments (params, optimizer state, batch)", mem["argument"]), ("outputs", mem["output"]),
          ("  of which aliased to arguments (donated)", mem["alias"]), ("temporaries (activations)", mem["temp"]),
          ("generated code", mem["generated_code"]), ("total per device", mem["total"])]
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
  f = flags.FLAGS
  try:
    runtime.initialize(f.coordinator_address, f.num_processes, f.process_id)
    if f.compile_only:
      print(format_memory(f.config, compile_only(f.config)))
      return
    if not f.workdir:
      raise TrainingError("--workdir is required to train (only --compile_only runs without one)")
    train(f.config, f.workdir)
  except (TrainingError, ValueError) as e:
    raise SystemExit(f"error: {e}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, tb/ (a gs:// path works).")
  flags.DEFINE_bool("compile_only", False, "Compile the train step for the mesh, print memory per device, exit.")
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
  flags.mark_flags_as_required(["config"])
  app.run(main)
