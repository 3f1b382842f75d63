"""A prepared set already in the cache: whether it is complete for its key, and the line a run prints
when it reuses a set of files the user may have edited since (moa_jax.data.prepare writes the sets)."""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath
import numpy as np

from moa_jax.data import corpus, shards


def reuse_note(directory: epath.Path, source: str, meta: dict[str, Any]) -> str:
  """The line a run prints when it reuses a prepared set of files the user may have edited since: the
  set is keyed by the source spec, not the files' contents."""
  files = corpus.source_files(source).files
  held = meta.get("n_files")
  count = f"{held} files" if held is not None else f"{sum(s['n_docs'] for s in meta['splits'].values())} documents"
  changed = []
  if held is not None and held != len(files):
    changed.append(f"{source!r} now matches {len(files)} files")
  if shards.is_local(directory):
    since = os.path.getmtime(directory / "meta.json")
    newer = sum(os.path.getmtime(f) > since for f in files if os.path.exists(f))
    if newer:
      changed.append(f"{newer} of them changed since it was prepared")
  if changed:
    return (f"warning: reusing the prepared set {directory} ({count}), but {' and '.join(changed)}; it is keyed by "
            f"the source spec, not the files: delete {directory} to prepare the files as they are now")
  return f"note: reusing the prepared set {directory} ({count} of {source!r}; delete it to prepare again)"


def complete_meta(directory: epath.Path, key: dict[str, Any]) -> dict[str, Any] | None:
  """The cached meta.json when it matches `key` (and, locally, every shard has its full size)."""
  try:
    meta = json.loads((directory / "meta.json").read_text())
  except FileNotFoundError:
    return None
  if meta.get("key") != key:
    return None
  if shards.is_local(directory):
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, info in meta["splits"].items():
      for index, n_tokens in enumerate(info["shards"]):
        path = directory / shards.token_file(split, index, len(info["shards"]))
        if not path.exists() or os.path.getsize(path) != n_tokens * itemsize:
          return None
  return meta
