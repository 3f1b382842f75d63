"""How many passes over the training split a run makes, said at the start of every run.

A run reads steps × batch_size × seq_len tokens. A corpus smaller than that is repeated: past one epoch
the model starts to memorise, and the loss curve measures the corpus size rather than the model.
"""

from __future__ import annotations


def epochs(train_tokens: int, steps: int, batch_size: int, seq_len: int) -> float:
  return steps * batch_size * seq_len / max(train_tokens, 1)


def _count(n: float) -> str:
  for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= size:
      return f"{n / size:.3g}{unit}"
  return f"{n:.0f}"


def describe(train_tokens: int, steps: int, batch_size: int, seq_len: int, source: str) -> list[str]:
  """The line every run prints, then a warning naming data.source when the run repeats its corpus."""
  n = epochs(train_tokens, steps, batch_size, seq_len)
  needed = steps * batch_size * seq_len
  lines = [f"data: {steps} steps × {batch_size} × {seq_len} = {_count(needed)} tokens over a training split of "
           f"{_count(train_tokens)} tokens = {n:.3g} epochs"]
  if n > 1:
    lines.append(f"warning: {n:.3g} passes over data.source = {source!r} ({_count(train_tokens)} training tokens): "
                 f"past one epoch the model memorises its corpus; give data.source a corpus of at least "
                 f"{_count(needed)} tokens (docs/data.md: FineWeb-Edu), or fewer train.steps")
  return lines
