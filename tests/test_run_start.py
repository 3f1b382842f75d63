"""What a run says before it trains: the epochs line (and its warning when a run repeats its corpus), and
--print_config."""

import os
import subprocess
import sys

from moa_jax.data import epochs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_one_line_below_one_epoch():
  lines = epochs.describe(train_tokens=100_000_000, steps=1000, batch_size=32, seq_len=1024, source="parquet:/d/*")
  assert lines == ["data: 1000 steps × 32 × 1024 = 32.8M tokens over a training split of 100M tokens = 0.328 epochs"]


def test_the_2b_default_on_the_stdlib_warns_and_names_data_source():
  lines = epochs.describe(train_tokens=8_000_000, steps=20_000, batch_size=256, seq_len=2048, source="stdlib")
  assert len(lines) == 2 and "= 1.31e+03 epochs" in lines[0]
  assert lines[1].startswith("warning: 1.31e+03 passes over data.source = 'stdlib'") and "10.5B tokens" in lines[1]


def test_print_config_shows_the_resolved_config_and_runs_nothing():
  out = subprocess.run([sys.executable, "-m", "moa_jax.train", "--config=configs/moa_2b.py", "--print_config",
                        "--config.train.steps=5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "\n  steps: 5\n" in out.stdout and "source: parquet:~/data/fineweb-edu/sample/100BT/*.parquet" in out.stdout
  assert "name: 2b_bimoa" in out.stdout and "parameters" not in out.stdout
