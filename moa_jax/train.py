"""Training: the resumable loop, evaluation, and the CLI (the step itself: moa_jax/step.py).

    python -m moa_jax.train --config=configs/quickstart.py --workdir=runs/quickstart [--config.k=v ...]

Everything the run needs is checked before anything compiles: the config, the mesh against the
devices, the batch against the mesh, the corpus and tokenizer against the vocabulary, and a resumed
checkpoint's model config against this one.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from moa_jax import actions, checkpoint, cli, profiling, runtime, sharding, startup, wandb_log
from moa_jax import workdir as workdir_lock
from moa_jax.aot import compiled as aot_compiled
from moa_jax.data import epochs
from moa_jax.health import Health
from moa_jax.metrics import MetricsWriter
# The step and the build, re-exported: callers (tests, experiments, eval, study) know them as train.*
from moa_jax.errors import Diverged, TrainingError  # noqa: F401
from moa_jax.loss import cross_entropy  # noqa: F401
from moa_jax.step import (Run, TrainState, abstract_model, build, compile_train_step, global_batch,  # noqa: F401
                          init_state, jit_train_step, make_eval_step, make_train_step, sown_losses)


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
  cli.raise_if_interrupted()  # a Ctrl-C whose raise was lost (inside a gc callback) stops here, not never
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
  if f.target:
    if not f.compile_only:
      raise TrainingError(f"--target={f.target} compiles for other hardware without running; add --compile_only")
    print(aot_compiled.report(f.config, f.target))
    return
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
  flags.DEFINE_string("target", None, "With --compile_only: compile for a TPU slice (v5p:2x2x2) or GPUs (h100:8) "
                      "on this machine, no device needed (pip install moa_jax[aot]; moa_jax/aot).")
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
  flags.mark_flags_as_required(["config"])
  app.run(cli.funnel(main, workdir=lambda: flags.FLAGS.workdir, then=cli.TRAIN_RERUN,
                     interrupted="stopped without saving (before training began, or a second one); the "
                                 "checkpoints already saved are intact, and rerunning the same command resumes "
                                 "from the newest"),
          flags_parser=cli.parse_flags)
