"""Data: text sources, tokenizer, sharded token files and the Grain pipeline.

`make_datasets(config.data, ...)` is all a trainer needs; `python -m moa_jax.data.prepare` prepares
a source ahead of time. `prepare()` itself lives in `moa_jax.data.prepare` (re-exporting it here
would shadow that module's name). Names are imported on first use, so `moa_jax.data.prepare` and
the tokenizer do not pay for importing Grain.
"""

import importlib

_EXPORTS = {
    "Batch": "pipeline",
    "Data": "pipeline",
    "Document": "corpus",
    "EOS": "tokenizer",
    "PreparedData": "prepare",
    "TokenWindows": "pipeline",
    "Tokenizer": "tokenizer",
    "default_cache_root": "prepare",
    "default_data_config": "config",
    "documents": "corpus",
    "load_tokenizer": "tokenizer",
    "make_datasets": "pipeline",
    "train_bpe": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'moa_jax.data' has no attribute {name!r}")
  return getattr(importlib.import_module(f"moa_jax.data.{_EXPORTS[name]}"), name)
