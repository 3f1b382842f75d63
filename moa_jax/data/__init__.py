"""Data: text sources, tokenizer, cached token files and the Grain pipeline.

`make_datasets(config.data, ...)` is all a trainer needs; `python -m moa_jax.data.prepare` prepares
a source ahead of time. `prepare()` itself lives in `moa_jax.data.prepare` (re-exporting it here
would shadow that module's name).
"""

from moa_jax.data.config import default_data_config
from moa_jax.data.corpus import Document, documents
from moa_jax.data.pipeline import Batch, Data, TokenWindows, make_datasets
from moa_jax.data.prepare import PreparedData, default_cache_root
from moa_jax.data.tokenizer import EOS, Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "Batch",
    "Data",
    "Document",
    "EOS",
    "PreparedData",
    "TokenWindows",
    "Tokenizer",
    "default_cache_root",
    "default_data_config",
    "documents",
    "load_tokenizer",
    "make_datasets",
    "train_bpe",
]
