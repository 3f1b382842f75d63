"""Where a run's time and memory go: a jax.profiler trace of chosen steps, the step-time breakdown of
each log window, and device memory.

- `Profiler` traces steps `train.profile_steps = (start, count)` on the processes `train.profile_processes`
  into `WORKDIR/profile` (TensorBoard / XProf layout: `plugins/profile/<run>/<host>.xplane.pb`, plus
  `perfetto_trace.json.gz` for ui.perfetto.dev on local disks); every step is a `StepTraceAnnotation`.
- `StepTimer` splits a log window's wall time into input waiting, checkpoint blocking, other host work
  (sampling) and training, and times one step with the device otherwise idle (one sync per window).
- `device_memory` reads the backends' allocator statistics; `compiled_memory` is XLA's estimate for a
  compiled step (what `--compile_only` prints and the first record of a run repeats).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from typing import Callable

import jax

GIB = 2**30
OFF = (0, 0)  # train.profile_steps default: no trace


def _ints(value) -> bool:
  return isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def check_config(train_cfg, process_count: int) -> None:
  """Raises ValueError (one line: the value and the fix) for bad profile_steps / profile_processes."""
  steps = train_cfg.get("profile_steps", OFF)
  if not (_ints(steps) and len(steps) == 2 and steps[1] >= 0 and steps[0] >= (1 if steps[1] else 0)):
    raise ValueError(f"train.profile_steps = {steps!r}; must be (start, count): the first step to trace (≥ 1; "
                     f"step 1 compiles, so 2 or later is usual) and how many (0: off), "
                     f"e.g. --config.train.profile_steps=10,3")
  if steps[1] and steps[0] + steps[1] - 1 > train_cfg.steps:
    raise ValueError(f"train.profile_steps = {tuple(steps)} traces past train.steps = {train_cfg.steps}; "
                     f"choose start + count - 1 ≤ {train_cfg.steps}")
  processes = train_cfg.get("profile_processes", (0,))
  if not (_ints(processes) and processes and all(0 <= p < process_count for p in processes)):
    raise ValueError(f"train.profile_processes = {processes!r}; must be process indices in "
                     f"[0, {process_count}), e.g. --config.train.profile_processes=0 or =0,1")


class Profiler:
  """Starts a trace before step `start`, stops it once step `start + count - 1` has finished on the
  device (the only sync it adds), and says where the trace is. A run resumed inside the window traces
  the rest of it; one resumed after it traces nothing."""

  def __init__(self, train_cfg, workdir: str, say: Callable[[str], None],
               pause: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
    start, count = train_cfg.get("profile_steps", OFF)
    self._first, self._last = start, start + count - 1
    self._on = count > 0 and jax.process_index() in tuple(train_cfg.get("profile_processes", (0,)))
    self._local = "://" not in workdir  # perfetto_trace.json.gz is written with pathlib: local disks only
    self.log_dir = os.path.join(workdir, "profile") if self._local else workdir.rstrip("/") + "/profile"
    self._say, self._pause = say, pause  # pause: excludes writing the trace from the step timing
    self._active, self._seen = False, 0

  @contextlib.contextmanager
  def step(self, step: int):
    """Wraps loading and dispatching one step: starts the trace at the window and names the step."""
    if self._on and not self._active and self._first <= step <= self._last:
      if self._local:
        os.makedirs(self.log_dir, exist_ok=True)
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace=self._local)
      self._active, self._traced_from = True, step
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      yield

  def after(self, step: int, outputs) -> None:
    """Call after each step with its outputs; ends the trace after the window's last step."""
    self._seen = step
    if self._active and step >= self._last:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    """Ends a trace still running (the loop stopped early); a no-op otherwise."""
    if not self._active:
      return
    with self._pause():
      jax.profiler.stop_trace()
    self._active, self._on = False, False
    where = self.log_dir
    if self._local:
      runs = os.path.join(self.log_dir, "plugins", "profile")
      where = max((os.path.join(runs, d) for d in os.listdir(runs)), key=os.path.getmtime)
    perfetto = f", or load {where}/perfetto_trace.json.gz at https://ui.perfetto.dev" if self._local else ""
    self._say(f"profile of steps {self._traced_from}-{self._seen} (process {jax.process_index()}) in {where}; "
              f"open it with `xprof --logdir {self.log_dir}` (pip install xprof){perfetto}")


class StepTimer:
  """The step-time breakdown of one log window (from the end of the previous record to this one).

  data_wait_sec   host seconds blocked on the input pipeline (next batch + putting it on the devices),
                  averaged per step of the window.
  step_sec        seconds of one train step run alone: at the window's last step the loop waits for the
                  device to finish the steps queued before it, then times that step from dispatch to
                  its outputs being ready. One sync per window, none on other steps; None if the window
                  had no such step (a preemption record, or a window holding only the compile step).
  checkpoint_sec  seconds the loop was blocked starting checkpoint saves in the window, in total (the
                  write itself continues in the background).
  train_sec()     the window's wall time less checkpoint blocking and other host work (sampling): what
                  tokens/s and MFU are computed from.
  """

  def __init__(self):
    self.restart()

  def restart(self) -> None:
    self._t0 = time.perf_counter()
    self._data = self._checkpoint = self._other = 0.0
    self._steps, self._step_sec = 0, None

  @contextlib.contextmanager
  def _add(self, field: str):
    t = time.perf_counter()
    try:
      yield
    finally:
      setattr(self, field, getattr(self, field) + time.perf_counter() - t)

  def data(self):
    return self._add("_data")

  def checkpoint(self):
    return self._add("_checkpoint")

  def other(self):
    return self._add("_other")

  def step(self, step_fn, state, batch, timed: bool):
    """Runs step_fn(state, batch); with timed=True, alone and synchronously (see step_sec)."""
    self._steps += 1
    if not timed:
      return step_fn(state, batch)
    jax.block_until_ready((state, batch))
    t = time.perf_counter()
    out = jax.block_until_ready(step_fn(state, batch))
    self._step_sec = time.perf_counter() - t
    return out

  def train_sec(self) -> float:
    return time.perf_counter() - self._t0 - self._checkpoint - self._other

  def record(self) -> dict:
    return {"data_wait_sec": self._data / max(self._steps, 1), "step_sec": self._step_sec,
            "checkpoint_sec": self._checkpoint}


def device_memory() -> dict:
  """{memory_in_use_gib, memory_peak_gib}: the allocator's bytes in use now and at its peak, the
  maximum over this process's devices; None where the backend keeps no statistics (XLA:CPU)."""
  stats = [d.memory_stats() for d in jax.local_devices()]
  if not all(stats):
    return {"memory_in_use_gib": None, "memory_peak_gib": None}
  return {"memory_in_use_gib": max(s.get("bytes_in_use", 0) for s in stats) / GIB,
          "memory_peak_gib": max(s.get("peak_bytes_in_use", 0) for s in stats) / GIB}


def compiled_memory(compiled) -> dict:
  """XLA's per-device memory for a compiled step, in bytes: argument, output, alias (outputs reusing
  donated arguments), temp, generated_code, and total = argument + output - alias + temp + generated_code
  (memory_estimate_gib = total / 2**30)."""
  mem = compiled.memory_analysis()
  out = {name: int(getattr(mem, f"{name}_size_in_bytes", 0) or 0)
         for name in ("argument", "output", "temp", "generated_code", "alias")}
  out["total"] = out["argument"] + out["output"] + out["temp"] + out["generated_code"] - out["alias"]
  return out


COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter", "collective-permute")


def collective_counts(hlo: str) -> dict:
  """How many of each collective an optimized HLO text holds (async pairs counted once, by their start)."""
  ops = re.findall(r" (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo)
  return {op: ops.count(op) for op in COLLECTIVES}


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}
_RESULT = re.compile(r"= \(?((?:\w+\[[\d,]*\](?:\{[^}]*\})?(?:, )?)+)\)? (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def collective_bytes(hlo: str, dtypes: tuple[str, ...] | None = None) -> dict:
  """Bytes each kind of collective produces in an HLO text, summed over its instructions (a loop body's
  counted once), optionally only results of `dtypes` (e.g. ("f32", "bf16")). An async start's result
  tuple counts its last element (the output). Read it from HLO after SPMD partitioning to see what an
  accelerator would move: XLA:CPU later promotes bf16 collectives to f32 (its compiled HLO says f32)."""
  out = dict.fromkeys(COLLECTIVES, 0)
  for match in _RESULT.finditer(hlo):
    dtype, dims = re.findall(r"(\w+)\[([\d,]*)\]", match.group(1))[-1]
    if dtypes is None or dtype in dtypes:
      size = 1
      for d in filter(None, dims.split(",")):
        size *= int(d)
      out[match.group(2)] += size * _DTYPE_BYTES.get(dtype, 4)
  return out
