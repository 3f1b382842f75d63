"""Process start-up for multi-host runs, and preemption.

One process per host under JAX's multi-controller runtime. `initialize()` starts it when asked:
- explicitly: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (GPU clusters, tests);
- from the environment: JAX_COORDINATOR_ADDRESS, or any cluster JAX's own detectors find (a Slurm job of
  several tasks; a TPU VM slice, found through the metadata server, or GKE; Open MPI; Kubernetes);
- otherwise a single process (nothing to do).
On CPU the processes talk over gloo. Under Slurm with one task per node, that task sees every GPU of its
node (JAX's Slurm detection would give it only GPU SLURM_LOCALID).
"""

from __future__ import annotations

import importlib.util
import os
import signal

import jax
from jax._src import clusters  # JAX's cluster detectors: there is no public "which cluster am I on"

_VISIBLE_DEVICE_OPTIONS = ("jax_cuda_visible_devices", "jax_rocm_visible_devices")


def detected_cluster(env=os.environ) -> str | None:
  """The environment jax.distributed.initialize() would start from, or None for a single process."""
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) == 1:
    return None  # a one-task Slurm job (e.g. an interactive srun) is a single process
  found = next((c for c in clusters.ClusterEnv._cluster_types if not c.opt_in_only_method and c.is_env_present()),
               None)
  return found.__name__ if found is not None else None


def one_task_per_node(env=os.environ) -> bool:
  """A Slurm step with as many tasks as nodes: each task should drive all the GPUs of its node."""
  nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
  return nodes is not None and env.get("SLURM_NTASKS") == nodes


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  explicit = coordinator_address is not None
  if explicit and (num_processes is None or process_id is None):
    raise ValueError(f"--coordinator_address={coordinator_address} needs --num_processes and --process_id too")
  cluster = None if explicit else detected_cluster()
  if not explicit and cluster is None:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return
  jax.distributed.initialize()
  if cluster == "SlurmCluster" and one_task_per_node():  # undo local_device_ids = [SLURM_LOCALID]
    for option in _VISIBLE_DEVICE_OPTIONS:
      jax.config.update(option, "all")


def cuda_plugin_installed() -> bool:
  if importlib.util.find_spec("jax_plugins") is None:
    return False
  return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))


def accelerator_hint(needed: int, devices) -> str:
  """When a config needs more devices than a CPU-only jax shows: how to install jax for the accelerator."""
  if needed <= len(devices) or devices[0].platform != "cpu":
    return ""
  if cuda_plugin_installed():
    return (f"; jax has CUDA support but found no GPU, only {len(devices)} CPU device(s): check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES")
  return (f"; jax sees only {len(devices)} CPU device(s), since the plain install has CPU jax: on GPUs run "
          "pip install -e \".[cuda12]\" (or \".[cuda13]\"), on TPU VMs pip install -e \".[tpu]\"; to rehearse "
          f"on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={needed}")


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
