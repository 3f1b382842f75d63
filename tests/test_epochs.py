"""The epochs line every run prints, and its warning when a run repeats its corpus."""

from moa_jax.data import epochs


def test_one_line_below_one_epoch():
  lines = epochs.describe(train_tokens=100_000_000, steps=1000, batch_size=32, seq_len=1024, source="parquet:/d/*")
  assert lines == ["data: 1000 steps × 32 × 1024 = 32.8M tokens over a training split of 100M tokens = 0.328 epochs"]


def test_the_2b_default_on_the_stdlib_warns_and_names_data_source():
  lines = epochs.describe(train_tokens=8_000_000, steps=20_000, batch_size=256, seq_len=2048, source="stdlib")
  assert len(lines) == 2 and "= 1.31e+03 epochs" in lines[0]
  assert lines[1].startswith("warning: 1.31e+03 passes over data.source = 'stdlib'") and "10.5B tokens" in lines[1]
