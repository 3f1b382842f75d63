"""Process start-up: a CPU-only jax meeting an accelerator mesh, and jax.distributed started from a simulated
Slurm job and a simulated TPU VM slice (2 real processes each, talking over gloo on localhost)."""

import http.server
import importlib.util
import os
import socket
import subprocess
import sys
import threading

import jax
import pytest

from moa_jax import runtime, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prints what one process sees after moa_jax.runtime.initialize(). jax sets TPU_SKIP_MDS_QUERY at import on
# a machine without TPU chips; a real TPU VM has chips, so the simulated one (GCE_METADATA_IP) removes it.
PROBE = """
import os, jax
if "GCE_METADATA_IP" in os.environ:
  os.environ.pop("TPU_SKIP_MDS_QUERY", None)
from moa_jax import runtime
runtime.initialize()
print(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
      jax.config.read("jax_cuda_visible_devices"))
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "MEGASCALE_", "JAX_"))}
  return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
          "PYTHONPATH": ROOT, **extra}


def _probe_two(envs):
  procs = [subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for env in envs]
  outs = [p.communicate(timeout=180) for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(err[-3000:] for _, err in outs)
  return [out.split() for out, _ in outs]


def test_a_mesh_larger_than_a_cpu_only_jax_names_the_install_command(monkeypatch):
  monkeypatch.setattr(runtime, "cuda_plugin_installed", lambda: False)
  devices = jax.devices()[:1]
  with pytest.raises(ValueError) as e:
    sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}, devices)
  message = str(e.value)
  assert "\n" not in message and "1 CPU device" in message
  assert 'pip install -e ".[cuda12]"' in message and '".[tpu]"' in message
  assert "--xla_force_host_platform_device_count=8" in message
  with pytest.raises(ValueError) as e:
    sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 16, "expert": 1}, devices)
  assert "count=16" in str(e.value)
  monkeypatch.setattr(runtime, "cuda_plugin_installed", lambda: True)  # CUDA jax on a machine without a GPU
  assert "found no GPU" in runtime.accelerator_hint(8, devices)
  assert runtime.accelerator_hint(8, jax.devices()[:1] * 8) == ""




@pytest.mark.slow
def test_the_cli_says_it_in_one_line_before_compiling():
  env = _clean_env(XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-m", "moa_jax.train", "--config=configs/debug.py", "--compile_only",
                        "--config.mesh.fsdp=8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: ")
  hint = "found no GPU" if runtime.cuda_plugin_installed() else 'pip install -e ".[cuda12]"'
  assert hint in out.stderr and "CPU device" in out.stderr


def _slurm(port, **task):
  return _clean_env(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                    JAX_COORDINATOR_PORT=str(port), **task)


def test_slurm_one_task_per_node_sees_every_gpu_of_its_node():
  port = _free_port()
  seen = _probe_two([_slurm(port, SLURM_STEP_NUM_NODES="2", SLURM_NNODES="2", SLURM_PROCID=str(i),
                            SLURM_LOCALID="0", SLURM_NODEID=str(i)) for i in range(2)])
  # process index, processes, local devices, devices, the GPUs jax may open on this node
  assert seen == [["0", "2", "8", "16", "all"], ["1", "2", "8", "16", "all"]]


@pytest.mark.slow
def test_slurm_one_task_per_gpu_keeps_one_gpu_per_task():
  port = _free_port()
  seen = _probe_two([_slurm(port, SLURM_STEP_NUM_NODES="1", SLURM_NNODES="1", SLURM_PROCID=str(i),
                            SLURM_LOCALID=str(i), SLURM_NODEID="0") for i in range(2)])
  assert [s[1] for s in seen] == ["2", "2"] and [s[4] for s in seen] == ["0", "1"]


@pytest.mark.slow
def test_a_single_process_starts_nothing():
  seen = _probe_two([_clean_env(), _clean_env(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost",
                                              SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0")])
  assert seen == [["0", "1", "8", "8", "all"]] * 2


class _Metadata(http.server.BaseHTTPRequestHandler):
  """A GCE metadata server for one TPU VM worker: the attributes jax's GceTpuCluster reads."""
  worker = "0"

  def do_GET(self):
    attributes = {"agent-worker-number": self.worker, "worker-network-endpoints": "127.0.0.1,127.0.0.1",
                  "tpu-env": "ACCELERATOR_TYPE: 'v5p-16'\n"}
    key = self.path.rsplit("/", 1)[-1]
    body = attributes.get(key)
    self.send_response(200 if body is not None else 404)
    self.end_headers()
    self.wfile.write((body or "").encode())

  def log_message(self, *args):
    del args


@pytest.mark.skipif(importlib.util.find_spec("requests") is None,
                    reason="jax reads the TPU metadata server with requests (installed by the tpu extra)")
def test_a_gcloud_tpu_vm_slice_is_found_through_the_metadata_server():
  """Plain `gcloud compute tpus tpu-vm create` workers have no TPU_WORKER_HOSTNAMES: only the metadata server
  says there are two of them."""
  servers = []
  for worker in ("0", "1"):
    handler = type("Worker", (_Metadata,), {"worker": worker})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    servers.append(server)
  port = _free_port()
  try:
    seen = _probe_two([_clean_env(JAX_FORCE_TPU_INIT="1", GCE_METADATA_IP=f"127.0.0.1:{s.server_address[1]}",
                                  JAX_COORDINATOR_PORT=str(port)) for s in servers])
  finally:
    for server in servers:
      server.shutdown()
  assert [s[:4] for s in seen] == [["0", "2", "8", "16"], ["1", "2", "8", "16"]]


@pytest.mark.slow
def test_a_gke_tpu_slice_is_found_from_its_environment():
  port = _free_port()
  seen = _probe_two([_clean_env(JAX_FORCE_TPU_INIT="1", TPU_WORKER_HOSTNAMES="localhost,localhost",
                                TPU_WORKER_ID=str(i), MEGASCALE_COORDINATOR_ADDRESS="localhost",
                                MEGASCALE_NUM_SLICES="1", MEGASCALE_SLICE_ID="0", JAX_COORDINATOR_PORT=str(port))
                     for i in range(2)])
  assert [s[:4] for s in seen] == [["0", "2", "8", "16"], ["1", "2", "8", "16"]]


def test_a_gs_workdir_without_gcsfs_is_one_line_before_anything_runs(monkeypatch, debug_config):
  from moa_jax import train
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gcsfs" else find_spec(name, *a))
  with pytest.raises(train.TrainingError) as e:
    train.train(debug_config, "gs://bucket/run")
  assert str(e.value) == ('workdir=gs://bucket/run is on Google Cloud Storage, which needs gcsfs; install it with '
                          'pip install -e ".[gcs]" (or ".[tpu]" on a TPU VM)')
