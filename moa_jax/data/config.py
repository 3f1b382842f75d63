"""`default_data_config()`: the data fields a trainer config embeds as `config.data`."""

import ml_collections

# FineWeb-Edu's 100B-token sample (HuggingFaceFW/fineweb-edu, sample/100BT) as Parquet: the large presets'
# corpus. Fetch it with `hf download HuggingFaceFW/fineweb-edu --repo-type=dataset --include='sample/100BT/*'
# --local-dir=$HOME/data/fineweb-edu`, then prepare it (docs/data.md, "A real corpus").
FINEWEB_EDU = "parquet:~/data/fineweb-edu/sample/100BT/*.parquet"


def default_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.source = "stdlib"    # 'stdlib', 'glob:PATTERN', 'jsonl:PATTERN', 'parquet:PATTERN', 'hf:DIR' (corpus.py)
  c.tokenizer = ""       # '' = train a model.vocab_size byte-level BPE; else tokenizer.json / .model
  c.cache_dir = ""       # prepared sets live under it (local or gs://); '' = $MOA_JAX_CACHE or ~/.cache/moa_jax
  c.text_field = "text"  # the JSONL field / Parquet or datasets column holding each document's text
  c.val_percent = 2.0    # percent of documents (stdlib / glob: files) held out for validation
  c.test_percent = 0.0   # percent of documents held out as the test split (final comparisons only)
  c.heldout_max_bytes = 0  # > 0: a document longer than this always trains (no file dominates val/test)
  c.eval_split = "val"   # the split train's evals read: 'val' (choices: lr, early stopping) or 'test'
  c.max_bytes = 0        # cap on the text read, for tests and tiny runs; 0 = the whole source
  return c
