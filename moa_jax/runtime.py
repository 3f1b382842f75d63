"""Process start-up for multi-host runs, and preemption.

One process per host under JAX's multi-controller runtime. `initialize()` starts it when asked:
- explicitly: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (GPU clusters, tests);
- from the environment: JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES, JAX_PROCESS_ID), a Slurm job
  of several tasks, or a multi-host TPU slice — JAX detects these itself;
- otherwise a single process (nothing to do).
On CPU the processes talk over gloo.
"""

from __future__ import annotations

import os
import signal

import jax


def _multi_host_environment() -> bool:
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  explicit = coordinator_address is not None
  if not explicit and not _multi_host_environment():
    return
  if explicit and (num_processes is None or process_id is None):
    raise ValueError(f"--coordinator_address={coordinator_address} needs --num_processes and --process_id too")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()


class PreemptionGuard:
  """Turns SIGTERM (TPU preemption notice, Slurm, `kill`) and Ctrl-C (SIGINT) into a stop at a step
  boundary; a second Ctrl-C raises KeyboardInterrupt at once (no save).

  One process: a signal handler sets a flag, checked after each step. Several processes: JAX's
  preemption sync manager (started by jax.distributed.initialize) catches SIGTERM on any host and
  agrees with the others, through the coordination service and without a device sync, on the step at
  which all of them stop; `stop_requested(step)` is True on every process at that same step. There,
  Ctrl-C keeps its default meaning (abort).
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal_name is not None:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self.signal_name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    if signum == signal.SIGINT:
      print("\nCtrl-C: saving at the end of this step, then stopping (Ctrl-C again to abort without saving)",
            flush=True)

  def stop_requested(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.signal_name is not None
    from jax.experimental import multihost_utils
    if multihost_utils.reached_preemption_sync_point(step):
      self.signal_name = self.signal_name or "SIGTERM"
      return True
    return False

  def close(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
