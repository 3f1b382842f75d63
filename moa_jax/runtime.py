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
import numpy as np


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
  """Turns SIGTERM (TPU preemption notice, Slurm, `kill`) into a stop at the next step boundary.

  `stop_requested()` is collective when there are several processes: all of them stop at the same
  step if any one was signalled.
  """

  def __init__(self):
    self._signalled = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._signalled = True

  def stop_requested(self) -> bool:
    if jax.process_count() == 1:
      return self._signalled
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray(self._signalled, np.int32))
    return bool(np.any(flags))

  def close(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)
