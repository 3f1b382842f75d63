"""Token shards: the file names of a prepared set, and a split's shards read as one token stream.

Shard i of n holds the tokens of one group of source files (prepare.py), split in two files:

    train-00003-of-00016.bin   val-00003-of-00016.bin    every document's ids, then eos; raw uint16
                                                         (vocab_size <= 2**16) or uint32, no header
    shard-00003-of-00016.json  both files' counts, written last: the shard is done iff it exists

meta.json is the index: each shard's token count per split. A split's stream is its shards in
order, so token t lives in the shard whose cumulative range holds t. Local shards are memory-mapped;
shards on an object store (gs://, through etils.epath) are read with one ranged read per piece.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Sequence

from etils import epath
import numpy as np


def token_file(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.bin"


def marker_file(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.json"


def is_local(path: str | os.PathLike) -> bool:
  return "://" not in os.fspath(path)


class TokenStream:
  """A split's shards as one (N,) token array: len() and contiguous slices, read on demand.

  Thread-safe (Grain reads with several threads). memory_map: None = local paths are memory-mapped
  and remote ones read by range; False forces ranged reads (what a gs:// path gets).
  """

  def __init__(self, directory: str | os.PathLike, split: str, counts: Sequence[int], dtype: Any,
               memory_map: bool | None = None):
    directory = epath.Path(directory)
    self._paths = [directory / token_file(split, i, len(counts)) for i in range(len(counts))]
    self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # (S + 1,)
    self.dtype = np.dtype(dtype)
    self._memory_map = is_local(directory) if memory_map is None else memory_map
    self._handles: dict[int, Any] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: slice) -> np.ndarray:
    if not isinstance(index, slice):
      raise TypeError(f"TokenStream takes slices, not {type(index).__name__}")
    start, stop, step = index.indices(len(self))
    if step != 1:
      raise ValueError("TokenStream slices must be contiguous (step 1)")
    pieces = []
    shard = int(np.searchsorted(self._starts, start, side="right")) - 1  # skips empty shards
    while start < stop:
      end = min(stop, int(self._starts[shard + 1]))
      base = int(self._starts[shard])
      if end > start:  # empty shards are never opened (an empty file cannot be memory-mapped)
        pieces.append(self._read(shard, start - base, end - base))
      start, shard = end, shard + 1
    if not pieces:
      return np.zeros(0, self.dtype)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

  def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
    del copy  # always a fresh array
    return np.asarray(self[:], dtype)

  def __getstate__(self) -> dict[str, Any]:  # open files and locks stay with the process
    return {**self.__dict__, "_handles": {}, "_lock": None}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _lock=threading.Lock())

  def _read(self, shard: int, lo: int, hi: int) -> np.ndarray:
    """Tokens [lo, hi) of one shard."""
    with self._lock:
      handle = self._handles.get(shard)
      if handle is None:
        path = self._paths[shard]
        handle = (np.memmap(os.fspath(path), self.dtype, mode="r") if self._memory_map
                  else path.open("rb"))
        self._handles[shard] = handle
      if self._memory_map:
        return handle[lo:hi]
      handle.seek(lo * self.dtype.itemsize)
      data = handle.read((hi - lo) * self.dtype.itemsize)
    return np.frombuffer(data, self.dtype)
