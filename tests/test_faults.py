"""Runs never lose or corrupt data, and each user mistake gets one line instead of a traceback.

Most cases start from copies of one short debug run (`base`: 8 steps, checkpoints at 4 and 8) and
check, besides the error or note, that nothing already written was lost or changed.
"""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moa_jax import checkpoint, health, metrics, presets, rundir, train
from moa_jax import eval as evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_cache):
  c = presets.lm_config(size="debug", ffn="bimoa")
  c.data.cache_dir = data_cache
  c.data.max_bytes = 400_000
  c.train.steps = 8
  c.train.log_every = 2
  c.train.eval_every = 0
  c.train.eval_batches = 1
  c.train.sample_every = 0
  c.checkpoint.every = 4
  return c


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Most cases compile the same debug train step: compile it once for the module."""
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  for k, v in saved.items():
    jax.config.update(k, v)


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_cache):
  workdir = str(tmp_path_factory.mktemp("base") / "run")
  train.train(_config(data_cache), workdir)
  return workdir


@pytest.fixture
def config(data_cache):
  return _config(data_cache)


@pytest.fixture
def run(base, tmp_path):
  """A private copy of the base run."""
  workdir = str(tmp_path / "run")
  shutil.copytree(base, workdir)
  return workdir


def snapshot(workdir):
  """Every file under workdir (but the lock) -> its bytes."""
  out = {}
  for root, _, files in os.walk(workdir):
    for name in files:
      path = os.path.join(root, name)
      if name != "lock":
        with open(path, "rb") as f:
          out[os.path.relpath(path, workdir)] = f.read()
  return out


def saved_steps(workdir, where="checkpoints"):
  path = os.path.join(workdir, where)
  return sorted(int(d.split(".")[0]) for d in os.listdir(path) if d.split(".")[0].isdigit()) \
      if os.path.isdir(path) else []


# 1. checkpoint.keep

@pytest.mark.parametrize("keep", [0, -1])
def test_keep_below_one_is_refused_before_anything_is_written(config, tmp_path, keep):
  config.checkpoint.keep = keep
  with pytest.raises(train.TrainingError, match=rf"checkpoint.keep = {keep}; must be ≥ 1"):
    train.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


# 2. a changed optimizer is a config mismatch, not corruption

@pytest.mark.parametrize("field,value,message", [
    ("name", "muon", r"optim.name: 'adamw' in the checkpoint, 'muon' now"),
    ("clip_norm", 0.0, r"optim.clip_norm: 1.0 in the checkpoint, 0.0 now"),
])
def test_changed_optimizer_is_refused_and_nothing_is_touched(config, run, field, value, message):
  before = snapshot(run)
  config.train.steps = 12
  config.optim[field] = value
  with pytest.raises(train.TrainingError, match=r"optimizer state has another structure(.|\n)*" + message):
    train.train(config, run)
  assert snapshot(run) == before
  assert not os.path.exists(os.path.join(run, "checkpoints_unreadable"))


def test_setting_aside_never_collides(run):
  os.makedirs(os.path.join(run, "checkpoints_unreadable", "8", "earlier"))
  ckpt = checkpoint.Checkpoints(run, 4, 3)
  try:
    where = ckpt.set_aside(8)
  finally:
    ckpt.close()
  assert where.endswith("checkpoints_unreadable/8.1") and os.path.isdir(where)
  assert os.path.isdir(os.path.join(run, "checkpoints_unreadable", "8", "earlier"))
  assert saved_steps(run) == [4]


# 3. metrics.jsonl keeps every earlier record; readers see one record per step, the newest

def test_a_fresh_start_over_old_metrics_keeps_them(config, run):
  with open(os.path.join(run, "metrics.jsonl")) as f:
    old = f.read()
  shutil.rmtree(os.path.join(run, "checkpoints"))  # nothing to restore: starts at step 0
  config.train.steps = 4
  train.train(config, run)
  with open(os.path.join(run, "metrics.jsonl")) as f:
    text = f.read()
  assert text.startswith(old)  # nothing of the earlier run lost
  assert [r["step"] for r in rundir.records(run)] == [2, 4]  # its steps 6 and 8 are superseded


def test_resume_supersedes_later_records_and_newest_wins(config, run):
  path = os.path.join(run, "metrics.jsonl")
  lines = open(path).read().splitlines()
  fake = [json.dumps({**json.loads(line), "loss": 999.0}) for line in lines[-2:]]  # steps 6 and 8, marked
  with open(path, "w") as f:
    f.write("\n".join(lines[:-2] + fake) + '\n{"step": 9, "lo')  # and a line cut short by a crash
  shutil.rmtree(os.path.join(run, "checkpoints", "8"))
  train.train(config, run)  # resumes from 4
  got = rundir.records(run)
  assert [r["step"] for r in got] == [2, 4, 6, 8]
  assert all(r["loss"] < 100 for r in got)
  text = open(path).read()
  assert text.count("999.0") == 2 and '"restart": true' in text


def test_parse_records_rules():
  lines = ['{"step": 2, "loss": 1}', '{"step": 4, "loss": 2}', '{"step": 6, "loss": 3}',
           '{"restart": true, "step": 2}', '{"step": 4, "loss": 5}', 'garbage', '{"step": 4, "loss": 6}']
  assert [(r["step"], r["loss"]) for r in metrics.parse_records(lines)] == [(2, 1), (4, 6)]


# 4. one run per workdir

_HOLD = ("import sys, time; from moa_jax import workdir; lock = workdir.WorkdirLock(sys.argv[1]); "
         "lock.acquire(); print('held', flush=True); time.sleep(120)")


def test_workdir_lock_refuses_a_second_run_and_takes_over_a_stale_one(config, run, capsys):
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, run], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    before = snapshot(run)
    with pytest.raises(train.TrainingError, match=rf"is in use by pid {holder.pid} on host \S+ \(started"):
      train.train(config, run)
    assert snapshot(run) == before
  finally:
    holder.kill()
    holder.wait()
  config.train.steps = 8  # done already: takes the lock, says so, writes nothing
  train.train(config, run)
  out = capsys.readouterr().out
  assert f"took over the lock of pid {holder.pid}" in out and "already done" in out


def test_remote_style_lock_judges_by_pid_and_host(tmp_path):
  from moa_jax import workdir
  lock = workdir.WorkdirLock(str(tmp_path))
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  held = {"pid": int(dead.stdout), "host": os.uname().nodename, "started": "then"}
  (tmp_path / "lock").write_text(json.dumps(held))
  notes = []
  lock._note = notes.append
  lock._acquire_remote()  # the fallback used on gs:// and filesystems without flock
  assert "no longer running" in notes[0]
  lock.release()
  (tmp_path / "lock").write_text(json.dumps({**held, "host": "elsewhere"}))
  with pytest.raises(workdir.LockedError, match="in use by pid .* on host elsewhere"):
    lock._acquire_remote()


# 5. a refused resume writes nothing; eval and sample take the model from the checkpoint

def test_refused_resume_keeps_config_json_and_eval_uses_the_checkpoint_config(config, run):
  before = snapshot(run)
  config.model.d_model = 96
  with pytest.raises(train.TrainingError, match="model.d_model: 64 in the checkpoint, 96 now"):
    train.train(config, run)
  assert snapshot(run) == before
  with open(os.path.join(run, "config.json"), "w") as f:  # even a config.json of another model
    f.write(config.to_json_best_effort())
  result = evaluate.evaluate_checkpoint(run)
  assert result["step"] == 8 and np.isfinite(result["eval_loss"])


# 6. blown-up parameters are never saved, the NaN advice works, flipped bits are caught

def test_health_rule():
  h = health.Health()
  for loss, norm in [(6.0, 40.0), (5.9, 40.1), (5.8, 40.2), (5.7, 40.3)]:
    assert h.check(loss, norm) is None
  assert "param_norm" in h.check(5.6, 1e7)                 # exploded parameters
  assert "loss" in h.check(20.0, 40.4)                     # exploded loss
  assert "not finite" in h.check(float("nan"), 40.0)
  assert h.check(5.6, 40.4) is None and len(h.loss) == 5   # the bad steps never joined the history
  assert health.Health(h.state()).check(5.6, 1e7)          # the history survives a checkpoint


def test_exploded_parameters_are_not_saved_and_the_advice_works(config, run):
  config.train.steps = 12
  config.checkpoint.every = 1  # a save right after the blow-up, if it were allowed
  lr = config.optim.lr
  config.optim.lr = 1e6
  with pytest.raises(train.TrainingError, match=r"is nan at step \d+; stopped without saving\. Last good checkpoint: "
                                                 r"step 8 .*--config.train.resume_step=8") as e:
    train.train(config, run)
  assert saved_steps(run) == [4, 8]
  config.optim.lr = lr / 2  # the advice: a lower lr, from the named step
  config.train.resume_step = int(str(e.value).split("resume_step=")[1].split()[0])
  out = train.train(config, run)
  assert out["step"] == 12 and np.isfinite(out["loss"])
  assert all(np.isfinite(r["loss"]) for r in rundir.records(run))


@pytest.mark.slow
def test_resume_step_rolls_back_once_and_keeps_the_later_checkpoints(config, run):
  config.train.resume_step = 4
  config.train.steps = 8
  train.train(config, run)  # goes back to 4 and trains to 8 again
  assert saved_steps(run) == [4, 8] and saved_steps(run, "checkpoints_superseded") == [8]
  config.train.steps = 10
  train.train(config, run)  # the same flag again: resumes the newest (8), no second rollback
  assert saved_steps(run) == [4, 8, 10] and saved_steps(run, "checkpoints_superseded") == [8]


def _flip_a_bit_in_the_largest_array_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.seek(os.path.getsize(biggest) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_bit_sends_the_restore_to_an_older_checkpoint(config, run, capsys):
  _flip_a_bit_in_the_largest_array_file(os.path.join(run, "checkpoints", "8"))
  config.train.steps = 8
  train.train(config, run)  # 8 is unreadable: resumes 4 and trains to 8 again
  assert saved_steps(run, "checkpoints_unreadable") == [8] and saved_steps(run) == [4, 8]
  assert "resumed from" in capsys.readouterr().out


# Resume rules

def test_batch_shape_change_counts_tokens_on(config, run, capsys):
  config.train.steps = 10
  config.train.batch_size = 16
  train.train(config, run)
  assert "train.batch_size 8 -> 16 since the checkpoint: tokens count on from the 4,096" in capsys.readouterr().out
  tokens = {r["step"]: r["tokens"] for r in rundir.records(run)}
  assert tokens[8] == 8 * 8 * 64 and tokens[10] == tokens[8] + 2 * 16 * 64


def test_fewer_steps_is_done_and_rewrites_nothing(config, run, capsys):
  before = snapshot(run)
  config.train.steps = 6
  assert train.train(config, run) == {"step": 8, "done": True}
  assert "already done" in capsys.readouterr().out
  assert snapshot(run) == before


def test_compute_only_and_data_changes_resume_with_a_note(config, run, capsys):
  before = snapshot(run)
  config.model.remat = "full"
  config.model.attention_impl = "xla"
  config.model.ffn.impl = "pallas"
  config.model.dtype = "bfloat16"
  config.optim.lr = 1e-3
  config.train.seed = 3
  config.data.max_bytes = 300_000  # another BPE: allowed only when asked for (the next test)
  config.train.allow_new_tokenizer = True
  train.train(config, run)  # train.steps = 8: done; every check ran, nothing was refused
  out = capsys.readouterr().out
  for field in ("model.remat", "model.attention_impl", "model.ffn.impl", "model.dtype", "optim.lr", "train.seed",
                "data.max_bytes"):
    assert field in out, field
  assert snapshot(run) == before


@pytest.mark.parametrize("field", ["source", "max_bytes"])
def test_a_tokenizer_change_on_resume_is_refused_unless_asked_for(config, run, tmp_path, field):
  if field == "source":  # another corpus: a few stdlib modules, copied
    os.makedirs(tmp_path / "corpus")
    for name in sorted(os.listdir(os.path.dirname(os.__file__))):
      if name.endswith(".py"):
        shutil.copy(os.path.join(os.path.dirname(os.__file__), name), tmp_path / "corpus")
    config.data.source = f"glob:{tmp_path}/corpus/*.py"
  else:
    config.data.max_bytes = 300_000  # the BPE is trained on the capped text: another tokenizer
  before = snapshot(run)
  config.train.steps = 12
  with pytest.raises(train.TrainingError, match=rf"trained with another tokenizer:\n  data.{field}: (.|\n)*"
                                                 r"--config.train.allow_new_tokenizer=true"):
    train.train(config, run)
  assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["metrics a directory", "binary metrics", "config.json a directory"])
def test_a_refused_resume_does_not_rewrite_config_json(config, run, damage):
  metrics = os.path.join(run, "metrics.jsonl")
  if damage == "metrics a directory":
    os.rename(metrics, metrics + ".moved")
    os.makedirs(metrics)
  elif damage == "binary metrics":
    with open(metrics, "ab") as f:
      f.write(bytes(range(128, 256)))
  else:
    os.rename(os.path.join(run, "config.json"), os.path.join(run, "config.moved"))
    os.makedirs(os.path.join(run, "config.json"))
  before = snapshot(run)
  config.train.steps = 12
  config.optim.lr = config.optim.lr / 2  # a changed config: config.json would differ if rewritten
  with pytest.raises(train.TrainingError, match=r"(is a directory where|is not text).*move it aside"):
    train.train(config, run)
  assert snapshot(run) == before


def _truncate_the_largest_array_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  biggest = max(files, key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)


@pytest.mark.parametrize("damage", ["truncated", "deleted underneath"])
def test_eval_sample_and_export_fall_back_from_an_unreadable_newest_checkpoint(run, tmp_path, damage, capsys):
  from moa_jax import export_hf, sample
  step_dir = os.path.join(run, "checkpoints", "8")
  if damage == "truncated":
    _truncate_the_largest_array_file(step_dir)
  else:  # what a live run's checkpoint.keep does between eval listing the steps and restoring one
    shutil.rmtree(os.path.join(step_dir, "state"))
  before = snapshot(run)
  assert evaluate.evaluate_checkpoint(run)["step"] == 4
  assert "passed over unreadable checkpoints" in capsys.readouterr().err
  assert len(sample.sample_text(run, "def ", max_new_tokens=4)) == 1
  if importlib.util.find_spec("safetensors"):  # the hf extra; without it, eval and sample were checked
    assert export_hf.export(run, str(tmp_path / "hf"), None, "float32")["step"] == 4
  with pytest.raises(rundir.RunDirError, match=r"no readable checkpoint .*step 8.*try another --step of \[4, 8\]"):
    rundir.restore(run, 8)
  assert snapshot(run) == before  # a reader moves nothing: the run may be live


def test_more_steps_says_the_schedule_changes(config, run, capsys):
  config.train.steps = 10
  train.train(config, run)
  assert "train.steps 8 -> 10: the learning-rate schedule is rebuilt" in capsys.readouterr().out


# One line per mistake

@pytest.mark.parametrize("field,value,message", [
    ("train.seq_len", 0, r"train.seq_len = 0; must be ≥ 1"),
    ("train.log_every", 0, r"train.log_every = 0; must be ≥ 1"),
    ("train.eval_batches", 0, r"train.eval_batches = 0; must be ≥ 1"),
    ("model.dtype", "float16", r"model.dtype = 'float16' is not supported on CPU"),
])
def test_bad_values_stop_before_anything_is_written(config, tmp_path, field, value, message):
  group, key = field.split(".")
  config[group][key] = value
  with pytest.raises(train.TrainingError, match=message):
    train.train(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def _cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args,message", [
    (["--config=configs/debug.py", "--config.train.step=5"],
     "error: --config.train.step: the config has no such field; did you mean --config.train.steps?"),
    (["--config=configs/nope.py"], "error: --config=configs/nope.py: no such file"),
])
def test_cli_config_mistakes_are_one_line(tmp_path, args, message):
  out = _cli("moa_jax.train", f"--workdir={tmp_path}/run", *args)
  assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("text,message", [
    ("def get_config(\n", r"error: --config=\S+broken.py does not load: SyntaxError at line 1: '\(' was never closed"),
    ("def get_config():\n  return undefined_name\n",
     r"error: --config=\S+broken.py does not load: NameError: name 'undefined_name' is not defined"),
])
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, text, message):
  (tmp_path / "broken.py").write_text(text)
  out = _cli("moa_jax.train", f"--workdir={tmp_path}/run", f"--config={tmp_path}/broken.py")
  assert out.returncode != 0 and re.search(message, out.stderr) and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run")


def test_plot_on_a_directory_that_is_not_a_run(tmp_path):
  from moa_jax import plot
  with pytest.raises(SystemExit, match=r"error: .*metrics.jsonl does not exist; is .* a run directory"):
    plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")])


def _mount(*args):
  done = subprocess.run(["mount", *map(str, args)], capture_output=True)
  if done.returncode:
    pytest.skip(f"cannot mount here (needs root): {done.stderr.decode().strip()}")


@pytest.mark.slow
def test_full_disk_is_one_line_and_loses_nothing(config, base, tmp_path):
  disk = tmp_path / "disk"
  os.makedirs(disk)
  size = int(subprocess.run(["du", "-sk", base], capture_output=True, text=True).stdout.split()[0]) + 900
  _mount("-t", "tmpfs", "-o", f"size={size}k", "tmpfs", disk)  # the copied run and half a checkpoint more
  try:
    workdir = str(disk / "run")
    shutil.copytree(base, workdir)
    before = {k: v for k, v in snapshot(workdir).items() if k.startswith("checkpoints/4/")}
    out = _cli("moa_jax.train", "--config=configs/debug.py", f"--workdir={workdir}", "--config.train.steps=40",
               "--config.train.log_every=2", "--config.train.eval_every=0", "--config.train.eval_batches=1",
               "--config.train.sample_every=0", "--config.checkpoint.every=4", "--config.checkpoint.keep=9",
               f"--config.data.cache_dir={config.data.cache_dir}", "--config.data.max_bytes=400000", timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: cannot write") and "No space left" in out.stderr
    after = snapshot(workdir)
    assert all(after[k] == v for k, v in before.items())  # an older checkpoint is intact
    assert [r["step"] for r in rundir.records(workdir)][:4] == [2, 4, 6, 8]
  finally:
    subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.slow
def test_read_only_workdir_is_one_line(config, base, tmp_path):
  ro = tmp_path / "ro"
  shutil.copytree(base, ro / "run")
  _mount("--bind", ro, ro)
  _mount("-o", "remount,bind,ro", ro)
  try:
    out = _cli("moa_jax.train", "--config=configs/debug.py", f"--workdir={ro}/run", "--config.train.steps=12",
               f"--config.data.cache_dir={config.data.cache_dir}", "--config.data.max_bytes=400000")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "error: cannot write" in out.stderr and "Read-only file system" in out.stderr
  finally:
    subprocess.run(["umount", "-l", str(ro)])


def test_second_ctrl_c_aborts_at_once(monkeypatch):
  from moa_jax import runtime
  guard = runtime.PreemptionGuard()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert guard.stop_requested(1) and guard.signal_name == "Ctrl-C"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  finally:
    guard.close()


@pytest.mark.slow
def test_ctrl_c_saves_and_exits_cleanly(config, tmp_path):
  workdir = str(tmp_path / "run")
  args = [sys.executable, "-m", "moa_jax.train", "--config=configs/debug.py", f"--workdir={workdir}",
          "--config.train.steps=100000", "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.eval_batches=1", "--config.train.sample_every=0", "--config.checkpoint.every=1000",
          f"--config.data.cache_dir={config.data.cache_dir}", "--config.data.max_bytes=400000"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and not (os.path.exists(path) and os.path.getsize(path)):
    time.sleep(0.1)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
  assert "Ctrl-C: saved step" in out
  assert saved_steps(workdir) == [rundir.records(workdir)[-1]["step"]]


def test_train_imports_neither_sample_nor_rundir():
  code = ("import sys, moa_jax.train; "
          "print([m for m in ('moa_jax.sample', 'moa_jax.rundir', 'moa_jax.eval') if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def test_the_checksum_sees_a_flipped_bit_and_swapped_elements_and_reads_old_checkpoints():
  import numpy as np
  from moa_jax import checkpoint
  x = np.arange(12, dtype=np.float32).reshape(3, 4) + 0.5
  swapped = x.copy()
  swapped[0, 1], swapped[2, 3] = x[2, 3], x[0, 1]
  flipped = x.view(np.uint32).copy()
  flipped[1, 2] ^= 1 << 7
  base = checkpoint.checksums({"w": x})
  assert base["kind"] == "weighted_sum"
  assert checkpoint.checksums({"w": swapped}) != base and checkpoint.checksums({"w": flipped.view(np.float32)}) != base
  assert checkpoint.checksums({"w": swapped}, "sum")["values"] == checkpoint.checksums({"w": x}, "sum")["values"]
