"""Progress as plain log lines where stderr is a file (Slurm, TPU logs), a tqdm bar on a terminal."""

import io
import os
import subprocess
import sys

import pytest

from moa_jax import progress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tty(io.StringIO):
  def isatty(self):
    return True


def test_a_file_is_not_interactive_and_a_terminal_is():
  assert not progress.interactive(io.StringIO()) or "ipykernel" in sys.modules
  assert progress.interactive(_Tty())


def test_lines_every_interval_and_at_close():
  out = io.StringIO()
  bar = progress.LineProgress(total=1000, initial=0, desc="tokenize", unit="B", unit_scale=True, every_s=3600,
                              file=out)
  bar.update(1500)
  bar.update(500)  # within the interval: nothing printed yet
  assert out.getvalue() == ""
  bar.close()
  lines = out.getvalue().splitlines()
  assert len(lines) == 1 and lines[0].startswith("tokenize: 2.00k/1.00k B (200%), ")
  out = io.StringIO()
  bar = progress.LineProgress(total=20, initial=10, unit="step", every_s=0, file=out)
  bar.n = 12
  bar.set_postfix({"loss": 5.12345, "tok_s": "1,826"})
  assert out.getvalue().startswith("12/20 step (60%), ") and out.getvalue().endswith(" loss=5.1235 tok_s=1,826\n")
  assert "\r" not in out.getvalue()


@pytest.mark.slow
def test_a_run_logging_to_a_file_writes_lines_not_redraws(tmp_path, data_cache):
  log = tmp_path / "train.log"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "MOA_JAX_CACHE": data_cache}
  with open(log, "w") as f:
    subprocess.run([sys.executable, "-m", "moa_jax.train", "--config=configs/debug.py", f"--workdir={tmp_path / 'w'}",
                    "--config.train.steps=2", "--config.train.eval_every=0", "--config.train.sample_every=0",
                    "--config.data.max_bytes=400000", f"--config.data.cache_dir={data_cache}"],
                   cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600, check=True)
  text = log.read_text()
  assert "\r" not in text
  assert "2/2 step (100%)" in text and "data: 2 steps × 8 × 64" in text
