"""Source -> tokenizer -> flat token files, cached and reused.

    python -m moa_jax.data.prepare --source=stdlib --vocab_size=8192 --cache_dir=/tmp/moa_cache

One prepared set is a subdirectory of the cache root, named for its key (source, tokenizer,
vocab size when a BPE is trained, val_percent, max_bytes, text_field):

    <cache_root>/stdlib-bpe8192-<hash>/
      tokenizer.json   the trained BPE (absent when data.tokenizer names a file)
      train.bin        token ids, every document followed by eos; uint16 if vocab_size <= 2**16
      val.bin          else uint32
      meta.json        written last and atomically: a set is complete iff its meta.json is

The key names the source spec, not the files' contents: after editing a glob / JSONL / Parquet
source in place, delete its directory to prepare it again. Every file is written under a unique
temporary name and renamed, so processes preparing the same set at once never see partial files.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import time
import uuid
from typing import Any, Callable, Iterable, Iterator

from absl import logging
import numpy as np
import tqdm

from moa_jax.data import corpus
from moa_jax.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

VERSION = 2  # 2: the stdlib corpus leaves out encodings/
_ENCODE_CHUNK_BYTES = 2**20  # text per encode_batch call: big enough to use every core


@dataclasses.dataclass(frozen=True)
class PreparedData:
  directory: str
  tokenizer: Tokenizer
  meta: dict[str, Any]

  def tokens(self, split: str) -> np.ndarray:
    """The split's token stream (N,), memory-mapped read-only."""
    if self.meta["splits"][split]["n_tokens"] == 0:
      return np.zeros(0, self.meta["dtype"])
    return np.memmap(os.path.join(self.directory, f"{split}.bin"), self.meta["dtype"], mode="r")


def default_cache_root() -> str:
  return os.environ.get("MOA_JAX_CACHE") or os.path.expanduser("~/.cache/moa_jax")


def prepare(source: str, vocab_size: int, cache_dir: str, tokenizer: str | None = None,
            text_field: str = "text", val_percent: float = 2.0,
            max_bytes: int | None = None) -> PreparedData:
  """Trains or loads the tokenizer and tokenizes both splits, unless the set is already cached.

  vocab_size: the model's vocabulary; the size of the BPE to train, or the bound a given
    tokenizer must fit in. cache_dir: the cache root ('' = $MOA_JAX_CACHE or ~/.cache/moa_jax).
    max_bytes: caps the text read (None or 0 = all): about max_bytes * (1 - val_percent / 100)
    for train and max_bytes * val_percent / 100 for val, each keeping at least one document.
  """
  given = load_tokenizer(tokenizer) if tokenizer else None
  key = {
      "version": VERSION,
      "source": corpus.source_fingerprint(source),
      "tokenizer": _file_digest(tokenizer) if tokenizer else f"bpe{vocab_size}",
      "val_percent": val_percent,
      "max_bytes": max_bytes or 0,
      "text_field": text_field,
  }
  kind, _ = corpus.parse_source(source)
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  name = f"{kind}-{'tok' if tokenizer else f'bpe{vocab_size}'}-{digest}"
  directory = os.path.join(cache_dir or default_cache_root(), name)
  os.makedirs(directory, exist_ok=True)

  def split_documents(split: str) -> Iterator[corpus.Document]:
    return corpus.documents(source, split, val_percent=val_percent, text_field=text_field,
                            max_bytes=_split_budget(max_bytes or 0, val_percent, split))

  meta = _complete_meta(directory, key)
  if meta is None and next(split_documents("train"), None) is None:
    raise ValueError(f"data.source = {source!r} has no non-empty training documents (with "
                     f"data.val_percent = {val_percent}); give a source with text, or lower "
                     f"data.val_percent")
  tok = given or _trained_bpe(directory, vocab_size, split_documents("train"))
  if tok.vocab_size > vocab_size:
    raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but model.vocab_size = "
                     f"{vocab_size}; set --config.model.vocab_size={tok.vocab_size} or larger")
  if meta is None:
    meta = _write_set(directory, key, source, tok, split_documents)
  return PreparedData(directory, tok, meta)


def _trained_bpe(directory: str, vocab_size: int,
                 train_documents: Iterable[corpus.Document]) -> Tokenizer:
  """The set's BPE: loaded when an earlier run trained it, else trained now."""
  path = os.path.join(directory, "tokenizer.json")
  if os.path.exists(path):
    return load_tokenizer(path)
  logging.info("training a %d-token byte-level BPE -> %s", vocab_size, path)
  return train_bpe((d.text for d in train_documents), vocab_size, path)


def _split_budget(max_bytes: int, val_percent: float, split: str) -> int:
  if not max_bytes:
    return 0
  share = val_percent / 100 if split == "val" else 1 - val_percent / 100
  return max(1, int(max_bytes * share))


def _file_digest(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _complete_meta(directory: str, key: dict[str, Any]) -> dict[str, Any] | None:
  """The cached meta.json when it matches `key` and every token file has its full size."""
  try:
    with open(os.path.join(directory, "meta.json")) as f:
      meta = json.load(f)
  except FileNotFoundError:
    return None
  if meta.get("key") != key:
    return None
  itemsize = np.dtype(meta["dtype"]).itemsize
  for split, info in meta["splits"].items():
    path = os.path.join(directory, f"{split}.bin")
    if not os.path.exists(path) or os.path.getsize(path) != info["n_tokens"] * itemsize:
      return None
  return meta


def _write_set(directory: str, key: dict[str, Any], source: str, tok: Tokenizer,
               split_documents: Callable[[str], Iterator[corpus.Document]]) -> dict[str, Any]:
  dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
  splits = {split: _write_split(tok, split_documents(split), os.path.join(directory, f"{split}.bin"),
                                dtype, desc=f"tokenize {split}")
            for split in corpus.SPLITS}
  meta = {
      "version": VERSION,
      "key": key,
      "source": source,
      "tokenizer": tok.path,
      "vocab_size": tok.vocab_size,
      "eos_id": tok.eos_id,
      "dtype": np.dtype(dtype).name,
      "splits": splits,
  }
  _atomic_write(os.path.join(directory, "meta.json"), json.dumps(meta, indent=2).encode())
  return meta


def _write_split(tok: Tokenizer, documents: Iterable[corpus.Document], path: str,
                 dtype: type, desc: str) -> dict[str, int]:
  """Appends every document's ids and eos to `path`; returns the split's counts."""
  counts = {"n_tokens": 0, "n_docs": 0, "n_bytes": 0}
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "wb") as f, tqdm.tqdm(desc=desc, unit="B", unit_scale=True) as bar:
    for texts in _chunks(documents, _ENCODE_CHUNK_BYTES):
      ids = [doc_ids + [tok.eos_id] for doc_ids in tok.encode_batch(texts)]
      flat = np.fromiter((i for doc_ids in ids for i in doc_ids), dtype,
                         count=sum(map(len, ids)))
      f.write(flat.tobytes())
      n_bytes = sum(len(t.encode("utf-8")) for t in texts)
      counts["n_tokens"] += flat.size
      counts["n_docs"] += len(texts)
      counts["n_bytes"] += n_bytes
      bar.update(n_bytes)
  os.replace(tmp, path)
  return counts


def _chunks(documents: Iterable[corpus.Document], n_bytes: int) -> Iterator[list[str]]:
  texts, size = [], 0
  for doc in documents:
    texts.append(doc.text)
    size += len(doc.text)
    if size >= n_bytes:
      yield texts
      texts, size = [], 0
  if texts:
    yield texts


def _atomic_write(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", default="stdlib",
                      help="'stdlib', 'glob:PATTERN', 'jsonl:PATTERN' or 'parquet:PATTERN'")
  parser.add_argument("--vocab_size", type=int, default=8192,
                      help="model vocabulary: the BPE size to train, or the bound a given "
                           "tokenizer must fit in")
  parser.add_argument("--cache_dir", default="",
                      help="cache root ('' = $MOA_JAX_CACHE or ~/.cache/moa_jax)")
  parser.add_argument("--tokenizer", default="",
                      help="tokenizer.json or sentencepiece .model ('' = train a byte-level BPE)")
  parser.add_argument("--text_field", default="text",
                      help="JSONL field / Parquet column holding the text")
  parser.add_argument("--val_percent", type=float, default=2.0,
                      help="percent of documents held out for validation")
  parser.add_argument("--max_bytes", type=int, default=0, help="cap on the text read (0 = all)")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  start = time.perf_counter()
  prepared = prepare(args.source, args.vocab_size, args.cache_dir, args.tokenizer or None,
                     args.text_field, args.val_percent, args.max_bytes)
  print(f"prepared {prepared.directory} in {time.perf_counter() - start:.1f} s "
        f"(vocab_size {prepared.meta['vocab_size']}, {prepared.meta['dtype']})")
  for split, info in prepared.meta["splits"].items():
    print(f"  {split}: {info['n_tokens']:,} tokens, {info['n_docs']:,} documents, "
          f"{info['n_bytes']:,} bytes ({info['n_bytes'] / max(info['n_tokens'], 1):.2f} bytes/token)")


if __name__ == "__main__":
  main()
