"""Multi-process training (2 processes × 4 CPU devices over gloo), preemption by SIGTERM, unreadable
checkpoints, and --compile_only. Every run is a real `python -m moa_jax.train` subprocess."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from moa_jax import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flags(cache, **overrides):
  base = {"train.steps": 10, "train.log_every": 1, "train.eval_every": 0, "train.sample_every": 0,
          "checkpoint.every": 4, "data.cache_dir": cache, "data.max_bytes": 400_000}
  return [f"--config.{k}={v}" for k, v in {**base, **overrides}.items()]


def _env(devices):
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def _train(workdir, cache, devices=1, extra=(), **overrides):
  return [sys.executable, "-m", "moa_jax.train", "--config=configs/debug.py", f"--workdir={workdir}",
          *_flags(cache, **overrides), *extra]


def _losses(workdir):
  """step -> loss, one per step, the newest record winning (a resumed run appends after a restart marker)."""
  return {r["step"]: r["loss"] for r in rundir.records(workdir)}


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir, cache):
  port = _free_port()
  procs = [subprocess.Popen(_train(workdir, cache, extra=(f"--coordinator_address=localhost:{port}",
                                                          "--num_processes=2", f"--process_id={i}")),
                            cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
  return outs


@pytest.mark.slow  # three train runs (~350 s on 2 busy cores); test_sigterm_on_one_host_stops_both_at_the_same_step keeps a 2-process run in the default set
def test_two_processes_match_one_process_and_resume_together(tmp_path, data_cache):
  one = str(tmp_path / "one")
  out = subprocess.run(_train(one, data_cache), cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  two = str(tmp_path / "two")
  outs = _run_two_processes(two, data_cache)
  assert "8 devices in 2 process(es)" in outs[0]
  a, b = _losses(one), _losses(two)
  assert sorted(a) == sorted(b) == list(range(1, 11))
  for step in a:  # same global batches; rows sit in another order, so the sums differ by rounding
    assert abs(a[step] - b[step]) <= 2e-3 * a[step], (step, a[step], b[step])
  # Lose the last checkpoint as if both hosts died before saving it; both resume from step 8 together.
  shutil.rmtree(os.path.join(two, "checkpoints", "10"))
  _run_two_processes(two, data_cache)
  resumed = _losses(two)
  assert sorted(resumed) == list(range(1, 11))
  for step in (9, 10):
    assert abs(resumed[step] - b[step]) <= 1e-5 * b[step], (step, resumed[step], b[step])


@pytest.mark.slow  # ~130 s on 2 busy cores; test_faults covers the unreadable checkpoint in process
def test_sigterm_saves_and_exits_zero_then_an_unreadable_checkpoint_is_skipped(tmp_path, data_cache):
  workdir = str(tmp_path / "run")
  ckpts = os.path.join(workdir, "checkpoints")
  proc = subprocess.Popen(_train(workdir, data_cache, **{"train.steps": 100000, "train.log_every": 50,
                                                         "checkpoint.every": 20}),
                          cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.isdir(ckpts) and "20" in os.listdir(ckpts)):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-3000:]
  assert "SIGTERM: saved step" in out
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  preempted_at = steps[-1]
  assert preempted_at > 20
  assert max(_losses(workdir)) == preempted_at  # the last record is the step that was saved

  # Corrupt the newest checkpoint: the next run warns, sets it aside (kept), resumes from the one before.
  for root, _, files in os.walk(os.path.join(ckpts, str(preempted_at), "state")):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.truncate(7)
  previous = steps[-2]
  out = subprocess.run(_train(workdir, data_cache, **{"train.steps": preempted_at + 2, "train.log_every": 1,
                                                      "checkpoint.every": 20}),
                       cwd=ROOT, env=_env(1), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  assert f"checkpoint step {preempted_at}" in out.stderr and "is unreadable" in out.stderr
  assert os.path.isdir(os.path.join(workdir, "checkpoints_unreadable", str(preempted_at)))
  assert f"resumed from {ckpts}/{previous}" in out.stdout + out.stderr
  assert max(_losses(workdir)) == preempted_at + 2


def test_compile_only_reports_memory_per_device_without_weights(tmp_path):
  out = subprocess.run([sys.executable, "-m", "moa_jax.train", "--config=configs/lm.py:size=0.35b,ffn=bimoa",
                        "--compile_only", "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
                        "--config.train.batch_size=8", "--config.train.seq_len=256"],
                       cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 2, 'expert': 1} on 8 cpu devices" in out.stdout
  line = next(l for l in out.stdout.splitlines() if "arguments (params, optimizer state" in l)
  per_device_gib = float(line.split()[-2])
  # 0.34B params × (4 B param + 8 B Adam) ≈ 4.1 GB over 8 devices (fsdp × tensor) ≈ 0.5 GiB each.
  assert 0.3 < per_device_gib < 0.8, out.stdout
  assert "total per device" in out.stdout


def test_sigterm_on_one_host_stops_both_at_the_same_step(tmp_path, data_cache):
  workdir = str(tmp_path / "run")
  ckpts = os.path.join(workdir, "checkpoints")
  port = _free_port()
  procs = [subprocess.Popen(_train(workdir, data_cache, extra=(f"--coordinator_address=localhost:{port}",
                                                               "--num_processes=2", f"--process_id={i}"),
                                   **{"train.steps": 100000, "train.log_every": 50, "checkpoint.every": 20}),
                            cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.isdir(ckpts) and "20" in os.listdir(ckpts)):
    assert all(p.poll() is None for p in procs), procs[0].stdout.read()[-3000:]
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # only the second host is told
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
  assert steps[-1] > 20 and f"SIGTERM: saved step {steps[-1]}" in outs[0]
