"""Grain pipeline: packed fixed windows of a split's token shards -> {inputs, targets} batches.

Packing: a split is one stream of documents, each followed by eos. Window i is
tokens[i*T : i*T + T + 1] (T = seq_len), so consecutive windows share one token and every token
but the first is a target exactly once; the last partial window (fewer than T + 1 tokens) is dropped.

    train: windows -> shuffle(seed) -> this process's slice -> repeat forever -> batch -> split
    eval:  windows ->                  this process's slice -> repeat forever -> batch -> split
    eval subset: windows -> shuffle(EVAL_SEED) -> this process's slice -> batch (the first n batches)

The shuffle is global and identical on every process, and each epoch is reshuffled (Grain folds
the epoch into the seed). Each process keeps windows process_index, process_index + P, ... of
the first (n // P) * P, so processes see disjoint windows, equally many. Batches run across epoch
boundaries. The train iterator is a Grain DatasetIterator: `get_state()` / `set_state()` resume it
exactly (a checkpoint stores the state).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import grain
import numpy as np

from moa_jax.data.prepare import PreparedData, prepare_for_job
from moa_jax.data.tokenizer import Tokenizer

# Batches are cheap memmap slices: two reader threads keep up, and a short buffer bounds memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)

# The eval subset's shuffle seed: one fixed subset for every run, whatever its train.seed.
EVAL_SEED = 20_241_129

Batch = dict[str, np.ndarray]  # {"inputs": (B, T) int32, "targets": (B, T) int32}


class TokenWindows:
  """Random access to the packed windows of a token stream: window i is (T + 1,) int32."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self._tokens = tokens  # (N,)
    self._seq_len = seq_len

  def __len__(self) -> int:
    return max(len(self._tokens) - 1, 0) // self._seq_len

  def __getitem__(self, i: int) -> np.ndarray:
    if not 0 <= i < len(self):
      raise IndexError(f"window {i} of {len(self)}")
    start = i * self._seq_len
    return np.asarray(self._tokens[start:start + self._seq_len + 1], np.int32)  # (T + 1,)


@dataclasses.dataclass(frozen=True)
class Data:
  tokenizer: Tokenizer
  meta: dict[str, Any]
  train_tokens: int
  val_tokens: int
  _train: grain.MapDataset = dataclasses.field(repr=False)
  _eval: grain.MapDataset = dataclasses.field(repr=False)
  _eval_shuffled: grain.MapDataset = dataclasses.field(repr=False)
  _eval_windows: int = 0  # this process's validation windows
  _batch_size: int = 1    # this process's batch size

  def train_iter(self) -> grain.DatasetIterator:
    """A fresh iterator over this process's training batches, forever; checkpoint its get_state()."""
    return iter(self._train.to_iter_dataset(_READ_OPTIONS))

  def eval_batches(self, n_batches: int) -> Iterator[Batch]:
    """The first n_batches of this process's validation windows, in order; the same every call.

    When n_batches * batch_size exceeds the process's validation windows, they repeat from the start.
    """
    return iter(self._eval[:n_batches].to_iter_dataset(_READ_OPTIONS))

  def eval_subset(self, n_batches: int) -> Iterator[Batch]:
    """A fixed, shuffled subset of this process's validation windows: the same n_batches batches on
    every call, in every run of every seed (shuffled with EVAL_SEED, not train.seed), so a prefix of
    the split (one part of one file) does not stand in for all of it. Capped at the whole split (all
    full batches; one batch, wrapping around, when the split holds fewer windows than a batch).
    """
    n = min(n_batches, self.eval_subset_batches)
    return iter(self._eval_shuffled[:n].to_iter_dataset(_READ_OPTIONS))

  @property
  def eval_subset_batches(self) -> int:
    """How many batches the whole shuffled validation split makes (at least one)."""
    return max(1, self._eval_windows // self._batch_size)


def make_datasets(data_config: Any, *, vocab_size: int, seq_len: int, global_batch_size: int,
                  seed: int, process_index: int = 0, process_count: int = 1) -> Data:
  """Prepares the source (cached after the first call) and builds this process's pipelines.

  data_config: `default_data_config()` or any object with its attributes.
  """
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size = {global_batch_size} is not divisible by "
                     f"process_count = {process_count}; make the batch size a multiple of it")
  prepared = prepare_for_job(data_config.source, vocab_size, data_config.cache_dir,
                             tokenizer=data_config.tokenizer or None,
                             text_field=data_config.text_field,
                             val_percent=data_config.val_percent, max_bytes=data_config.max_bytes,
                             test_percent=getattr(data_config, "test_percent", 0.0),
                             heldout_max_bytes=getattr(data_config, "heldout_max_bytes", 0),
                             process_index=process_index, process_count=process_count)
  batch_size = global_batch_size // process_count
  train = _windows(prepared, "train", seq_len, process_count)
  split = getattr(data_config, "eval_split", "val")
  if split not in ("val", "test") or split not in prepared.meta["splits"] or (
      not prepared.meta["splits"][split]["n_tokens"]):
    raise ValueError(f"data.eval_split = {split!r}: the prepared set has no such held-out split; use 'val', "
                     f"or 'test' with data.test_percent > 0")
  val = _windows(prepared, split, seq_len, process_count)
  return Data(
      tokenizer=prepared.tokenizer,
      meta=prepared.meta,
      train_tokens=prepared.meta["splits"]["train"]["n_tokens"],
      val_tokens=prepared.meta["splits"][split]["n_tokens"],
      _train=_batches(train.shuffle(seed), batch_size, process_index, process_count),
      _eval=_batches(val, batch_size, process_index, process_count),
      _eval_shuffled=_batches(val.shuffle(EVAL_SEED), batch_size, process_index, process_count),
      _eval_windows=len(val) // process_count,
      _batch_size=batch_size,
  )


def _windows(prepared: PreparedData, split: str, seq_len: int,
             process_count: int) -> grain.MapDataset:
  windows = TokenWindows(prepared.tokens(split), seq_len)
  if len(windows) < process_count:
    n_tokens = prepared.meta["splits"][split]["n_tokens"]
    raise ValueError(
        f"the {split} split has {n_tokens} tokens, {len(windows)} windows of seq_len + 1 = "
        f"{seq_len + 1}, fewer than process_count = {process_count} (each process needs one); "
        f"use a smaller seq_len or more data (a larger data.val_percent / data.max_bytes)")
  return grain.MapDataset.source(windows)


def _batches(windows: grain.MapDataset, batch_size: int, process_index: int,
             process_count: int) -> grain.MapDataset:
  usable = len(windows) - len(windows) % process_count
  shard = windows[process_index:usable:process_count]
  return shard.repeat().batch(batch_size, drop_remainder=True).map(_inputs_targets)


def _inputs_targets(windows: np.ndarray) -> Batch:
  return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}  # (B, T + 1) -> 2 x (B, T)
