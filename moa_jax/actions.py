"""The training loop's periodic actions, in the manner of clu's `periodic_actions`: each owns its cadence
and its state, and has its own tests (tests/test_actions.py). The loop in train.py is: next batch → step →
the actions that are due.

  Window   the step metrics since the last log or save; at one, it fetches them from the devices and
           runs the save rule (moa_jax/health.py) on each step: a non-finite loss stops the run, an
           exploded one holds back checkpoints until the run recovers.
  Saver    a checkpoint every checkpoint.every steps, at the last step and at a preemption, when the
           window is fit to save.
  Logger   a metrics.jsonl record every train.log_every steps and at the last: loss and norms averaged
           over the window, tokens/s and MFU, the step-time breakdown, memory, MoA gates, MoE load and
           drops (a warning line above 1%), and the evaluation when train.eval_every is due; then the
           progress line.
  Sampler  a text sample every train.sample_every steps.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import jax
import numpy as np

from moa_jax import checkpoint, profiling
from moa_jax.errors import Diverged
from moa_jax.generate import continue_text
from moa_jax.health import Health
from moa_jax.metrics import mix_record, moe_record, peak_flops
from moa_jax.moe import step as moe_step


def every(n: int, step: int, last: int) -> bool:
  """Due every n steps (n = 0: never) and at the last step."""
  return bool(n) and step % n == 0 or step == last


class Window:
  """The metrics of the steps since the last flush, and the save rule's verdict on them."""

  def __init__(self, health: Health, ckpt, say: Callable[[str], None]):
    self.health, self.ckpt, self.say = health, ckpt, say
    self.last_good, self.spike, self._metrics = ckpt.latest_step(), None, []  # spike: (step, why) or None

  def add(self, metrics: dict) -> None:
    self._metrics.append(metrics)

  def flush(self, step: int) -> tuple[list[dict], Any]:
    """Fetches the window (scalars of every step, intermediates of the last) and checks each step."""
    last_intermediates = jax.device_get(self._metrics[-1].get("intermediates", {}))  # none off the log cadence
    fetched = jax.device_get([{k: v for k, v in m.items() if k != "intermediates"} for m in self._metrics])
    self._metrics = []
    for i, m in enumerate(fetched):
      at, why = step - len(fetched) + i + 1, self.health.check(float(m["loss"]), float(m["param_norm"]))
      if not (np.isfinite(m["loss"]) and np.isfinite(m["param_norm"])):
        what = "loss" if not np.isfinite(m["loss"]) else "param_norm"
        raise self.diverged(f"{what} is {m[what]} at step {at}")
      if why and self.spike is None:
        self.spike = (at, why)
        self.say(f"warning: step {at}: {why}; no checkpoint is saved until the run recovers")
      elif not why:
        self.spike = None
    return fetched, last_intermediates

  def fit_to_save(self, step: int, final: bool) -> bool:
    """Whether step may be saved; a final step (the last, or a preemption) that may not stops the run."""
    if self.spike is not None and final:
      raise self.diverged(f"step {step} is not fit to save")
    return self.spike is None

  def diverged(self, what: str) -> Diverged:
    """The stop message for a run whose loss or parameters blew up: which checkpoint to go back to, and how."""
    if self.last_good is None:
      return Diverged(f"{what}; stopped without saving. Last good checkpoint: none in {self.ckpt.directory}. "
                           "Lower optim.lr or raise optim.warmup_steps and rerun (it starts over).")
    before = f" (the last one before step {self.spike[0]}: {self.spike[1]})" if self.spike else ""
    return Diverged(f"{what}; stopped without saving. Last good checkpoint: step {self.last_good} in "
                         f"{self.ckpt.directory}{before}. Lower optim.lr or raise optim.warmup_steps and rerun with "
                         f"--config.train.resume_step={self.last_good} (later checkpoints, if any, are moved to "
                         "checkpoints_superseded/)")


class Saver:
  """Saves {state, data iterator, metadata} when checkpoint.every is due, at the last step and at a
  preemption; the metadata carries tokens consumed, the health history and the resume_step."""

  def __init__(self, ckpt, data_iter, config, timer: profiling.StepTimer, window: Window):
    self.ckpt, self.data_iter, self.config, self.timer, self.window = ckpt, data_iter, config, timer, window

  def due(self, step: int) -> bool:
    return self.ckpt.due(step) or step == self.config.train.steps

  def __call__(self, step: int, state, tokens: int, final: bool) -> None:
    if not self.window.fit_to_save(step, final):
      return
    with self.timer.checkpoint():
      save_checkpoint(self.ckpt, step, state, self.data_iter, self.config, tokens=tokens,
                      health=self.window.health.state(), resume_step=self.config.train.get("resume_step", 0))
    self.window.last_good = step


def save_checkpoint(ckpt, step: int, state, data_iter, config, **extra) -> None:
  """A checkpoint as training writes it: the state, the data iterator's position, and metadata (step, config,
  extra: tokens consumed, the health history, the resume_step the run descends from; structure, checksums)."""
  meta = {"step": step, "config": json.loads(config.to_json_best_effort()), **extra,
          "structure": checkpoint.structure(state), "checksums": checkpoint.checksums(state)}
  ckpt.save(step, state, data_iter.get_state(), meta)


class Logger:
  """One record per train.log_every steps; throughput counts the steps since the last record (the first
  step, which compiles, is left out) and the time less checkpoint blocking and sampling."""

  def __init__(self, run, writer, timer: profiling.StepTimer, start: int,
               evaluate: Callable[[Any], dict], names: tuple[str, ...]):
    self.run, self.writer, self.timer, self.evaluate, self.names = run, writer, timer, evaluate, names
    self.c = run.config.train
    self.tokens_per_step = self.c.batch_size * self.c.seq_len
    self.peak, self.t_step, self.estimate = peak_flops(jax.devices()[0]), start, None

  def due(self, step: int) -> bool:
    return every(self.c.log_every, step, self.c.steps)

  def first_step(self, step: int, step_fn, state, batch, metrics) -> None:
    """After the first step: its compile left out of the throughput, XLA's memory estimate of the step it
    ran kept for the first record (--compile_only prints the logging step's, which adds only scalars)."""
    jax.block_until_ready(metrics["loss"])
    compiled = step_fn.lower(state, batch).compile()
    self.estimate = profiling.compiled_memory(compiled)["total"] / profiling.GIB
    self.timer.restart()
    self.t_step = step

  def __call__(self, step: int, tokens: int, fetched: list[dict], intermediates, params) -> dict:
    elapsed = self.timer.train_sec()
    tok_s = self.tokens_per_step * (step - self.t_step) / elapsed
    mfu = self.run.summary["flops_per_token"] * tok_s / (self.peak * jax.device_count()) if self.peak else None
    record = {"step": step, "tokens": tokens, **{k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]},
              "tokens_per_sec": tok_s, "mfu": mfu, **self.timer.record(), **profiling.device_memory()}
    if self.estimate is not None:
      record["memory_estimate_gib"], self.estimate = self.estimate, None
    for key, sown in (("gates", "mix_mean"), ("gates_std", "mix_std")):
      gates = mix_record(intermediates, self.names, sown)
      if gates:
        record[key] = gates
    record.update(moe_record(intermediates))
    warning = moe_step.overflow_warning(record)
    if warning:
      self.writer.print(warning)
    if self.c.eval_every and step % self.c.eval_every == 0 or step == self.c.steps:
      record.update(self.evaluate(params))
    self.writer.write(record)
    eta = (self.c.steps - step) * elapsed / max(step - self.t_step, 1)
    self.writer.progress(step, loss=f"{record['loss']:.4f}", eval=record.get("eval_loss") and
                         f"{record['eval_loss']:.4f}", tok_s=f"{tok_s:,.0f}", eta=f"{eta:,.0f}s")
    self.timer.restart()
    self.t_step = step
    return record


class Sampler:
  """Prints a continuation of `prompt` every train.sample_every steps (every process joins the computation)."""

  def __init__(self, run, timer: profiling.StepTimer, say: Callable[[str], None], prompt: str = "def "):
    self.run, self.timer, self.say, self.prompt = run, timer, say, prompt

  def due(self, step: int) -> bool:
    n = self.run.config.train.sample_every
    return bool(n) and step % n == 0

  def __call__(self, step: int, params) -> None:
    with self.timer.other():
      text = sample_text(self.run, params, self.prompt)
    self.say(f"step {step} sample: {text!r}")


def sample_text(run, params, prompt: str = "def ") -> str:
  ids = run.data.tokenizer.encode(prompt)
  return prompt + continue_text(run.model, run.data.tokenizer, params, ids, 48, temperature=0.8, top_k=40,
                                seed=run.config.train.seed)
