"""What the benchmark scripts share: median wall time of a jitted call, XLA's temp memory, formatting."""

from __future__ import annotations

import statistics
import time

import jax


def median_ms(fn, args, iters, warmup):
  """Median milliseconds of `fn(*args)` over `iters` runs after `warmup` runs (compilation included there)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def temp_mb(fn, args):
  """XLA's temporary buffer size for the jitted `fn` at these arguments, in MiB (None if unknown)."""
  stats = fn.lower(*args).compile().memory_analysis()
  return None if stats is None else stats.temp_size_in_bytes / 2**20


def fmt(v, spec=".3f"):
  return "—" if v is None else format(v, spec)
