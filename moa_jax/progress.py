"""Progress: a tqdm bar on a terminal or in a notebook, plain log lines where stderr is a file.

A Slurm or TPU log file would get tqdm's carriage-return redraws as one ever-growing line; there a line
every `every_s` seconds (and one at the end) says the same: position, rate and the postfix.
"""

from __future__ import annotations

import sys
import threading
import time


def interactive(stream=None) -> bool:
  stream = sys.stderr if stream is None else stream
  return "ipykernel" in sys.modules or bool(getattr(stream, "isatty", lambda: False)())


class LineProgress:
  """The part of tqdm's interface the trainer and `prepare` use (n, update, set_postfix, write, close)."""

  def __init__(self, total: int | None = None, initial: int = 0, desc: str = "", unit: str = "it",
               unit_scale: bool = False, every_s: float = 30.0, file=None, **unused):
    del unused  # tqdm's display options (dynamic_ncols, smoothing, ...)
    self.n, self.total, self.desc, self.unit, self.unit_scale = initial, total, desc, unit, unit_scale
    self._every_s, self._file = every_s, file
    self._start_n, self._start = initial, time.monotonic()
    self._last, self._postfix, self._lock = self._start, {}, threading.Lock()  # prepare updates from threads

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _amount(self, n: float) -> str:
    if not self.unit_scale:
      return f"{n:,.0f}"
    for prefix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
      if n >= size:
        return f"{n / size:.2f}{prefix}"
    return f"{n:.0f}"

  def line(self) -> str:
    elapsed = time.monotonic() - self._start
    done = f"{self._amount(self.n)}/{self._amount(self.total)}" if self.total else self._amount(self.n)
    percent = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
    rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
    postfix = "".join(f" {k}={v}" for k, v in self._postfix.items())
    return f"{self.desc + ': ' if self.desc else ''}{done} {self.unit}{percent}, {self._amount(rate)} {self.unit}/s{postfix}"

  def _maybe_log(self, force: bool = False) -> None:
    now = time.monotonic()
    if force or now - self._last >= self._every_s:
      print(self.line(), file=self._file or sys.stderr, flush=True)
      self._last = now

  def update(self, n: int = 1) -> None:
    with self._lock:
      self.n += n
      self._maybe_log()

  def set_postfix(self, postfix: dict, refresh: bool = True) -> None:
    del refresh
    self._postfix = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in postfix.items()}
    self._maybe_log()

  def write(self, text: str) -> None:
    print(text, flush=True)

  def close(self) -> None:
    self._maybe_log(force=True)


def bar(**kwargs):
  """tqdm (tqdm.auto in a notebook) where someone watches; LineProgress where stderr goes to a file."""
  if interactive():
    from tqdm.auto import tqdm
    return tqdm(**kwargs)
  return LineProgress(**kwargs)
