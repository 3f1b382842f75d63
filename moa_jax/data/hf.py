"""Hugging Face `datasets` directories: which of their files belong to which of the dataset's own splits.

A dataset that ships a validation split (a DatasetDict saved with `save_to_disk` holding `validation/`, or
the Hub's Parquet layout with `validation-*.parquet` files) is validated on that split, and trained on all
of `train`; one without is split by moa_jax (data.val_percent of its documents, by hash).
"""

from __future__ import annotations

import functools
import glob
import json
import os
import pathlib
import re

VAL_SPLITS = ("validation", "valid", "val", "dev")  # the dataset's own validation split, by these names


def split_of(relative_path: str) -> str | None:
  """'train', 'val' or None for a data file, from its split directory or file-name prefix.

  'validation/data-00000-of-00001.arrow', 'data/validation-00000-of-00001.parquet' and
  'default/validation/0000.parquet' are 'val'; the same with 'train' are 'train'.
  """
  parts = pathlib.PurePath(relative_path).parts
  names = [*parts[:-1], re.split(r"[-._]", parts[-1])[0]] if parts else []
  if any(name in VAL_SPLITS for name in names):
    return "val"
  return "train" if "train" in names else None


def dict_validation_split(directory: str) -> str | None:
  """The validation split named in a DatasetDict's dataset_dict.json, if it has one."""
  try:
    with open(os.path.join(directory, "dataset_dict.json"), encoding="utf-8") as f:
      splits = json.load(f)["splits"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return next((s for s in VAL_SPLITS if s in splits), None)


@functools.lru_cache(maxsize=64)
def has_validation(directory: str) -> bool:
  """Whether the dataset in `directory` ships both a train and a validation split."""
  if os.path.exists(os.path.join(directory, "dataset_dict.json")):
    return dict_validation_split(directory) is not None
  files = [os.path.relpath(p, directory)
           for p in glob.glob(os.path.join(directory, "**", "*.parquet"), recursive=True)]
  found = {split_of(p) for p in files}
  return {"train", "val"} <= found
