"""Source -> tokenizer -> sharded token files, cached, resumable, split across processes and hosts.

    python -m moa_jax.data.prepare --source=stdlib --vocab_size=8192 --cache_dir=/tmp/moa_cache
    # a pod: every host runs its share into one shared cache (N hosts, this is host I)
    python -m moa_jax.data.prepare --source=jsonl:/data/*.jsonl --cache_dir=gs://bucket/cache \
        --num_shards=N --shard_index=I

One prepared set is a subdirectory of the cache root (local or gs://), named for its key (source,
tokenizer, vocab size when a BPE is trained, val_percent, max_bytes, text_field):

    <cache_root>/stdlib-bpe8192-<hash>/
      tokenizer.json                 the trained BPE (absent when data.tokenizer names a file)
      train-00003-of-00016.bin       shard 3's tokens (shards.py: raw uint16 / uint32, every
      val-00003-of-00016.bin         document followed by eos)
      shard-00003-of-00016.json      shard 3's counts, written last: the shard is done iff it exists
      meta.json                      the index (every shard's token counts), written once all
                                     shards are done: a set is complete iff its meta.json is

Shards. The source's files, in key-hash order, are cut into contiguous groups of about
_SHARD_BYTES (at least _MIN_SHARDS groups when there are that many files); the grouping depends on
the files alone, so every host computes the same one. Process I of N (--shard_index/--num_shards)
tokenizes shards I, I + N, ...; shards already done are skipped, so a killed run resumes where it
stopped. Within a process, _IN_FLIGHT shards run at once: the tokenizers library encodes each
1 MB batch on every core with the GIL released, while the other shard reads and writes. A
`max_bytes` cap (tests, tiny runs) makes one shard of the capped documents.

The key names the source spec, not the files' contents: a run that reuses a prepared glob / JSONL /
Parquet set says so, with its file count, and warns when files were added, removed or changed since;
delete its directory to prepare it again. Every file is written under a temporary
name and renamed (atomic.py), so processes preparing the same set at once never see partial files;
the temporaries of a killed run are removed by the next one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from absl import logging
from etils import epath
import numpy as np

from moa_jax import cli, progress
from moa_jax.data import atomic, cache, corpus, hf, shards
from moa_jax.data.tokenizer import Tokenizer, load_tokenizer, train_bpe

VERSION = 3  # 3: sharded token files with an index; 2: the stdlib corpus leaves out encodings/
_ENCODE_CHUNK_BYTES = 2**20   # text per encode_batch call: big enough to use every core
_SHARD_BYTES = 64 * 2**20     # source bytes per shard, about
_MIN_SHARDS = 16              # shards to cut a source into when it has that many files
_IN_FLIGHT = 2                # shards tokenized at once by one process
_TOKENIZER_WAIT_S = 3600      # how long processes other than shard 0's wait for its BPE
_EDITABLE = ("glob", "jsonl", "parquet")  # sources whose files a user may edit in place


@dataclasses.dataclass(frozen=True)
class PreparedData:
  directory: str
  tokenizer: Tokenizer
  meta: dict[str, Any]

  def tokens(self, split: str) -> shards.TokenStream:
    """The split's token stream (N,): its shards, memory-mapped (local) or read by range (gs://)."""
    info = self.meta["splits"][split]
    return shards.TokenStream(self.directory, split, info["shards"], self.meta["dtype"])


class _Shard(NamedTuple):
  index: int
  n_bytes: int                                     # source bytes, for progress
  documents: Callable[[], Iterator[corpus.Document]]  # both splits' documents, in order


def default_cache_root() -> str:
  return os.environ.get("MOA_JAX_CACHE") or os.path.expanduser("~/.cache/moa_jax")


def prepare(source: str, vocab_size: int, cache_dir: str, tokenizer: str | None = None,
            text_field: str = "text", val_percent: float = 2.0, max_bytes: int | None = None, *,
            shard_index: int = 0, num_shards: int = 1, test_percent: float = 0.0,
            heldout_max_bytes: int = 0) -> PreparedData | None:
  """Trains or loads the tokenizer and tokenizes both splits, unless the set is already cached.

  vocab_size: the model's vocabulary; the size of the BPE to train, or the bound a given
    tokenizer must fit in. cache_dir: the cache root ('' = $MOA_JAX_CACHE or ~/.cache/moa_jax).
    max_bytes: caps the text read (None or 0 = all): about max_bytes * (1 - val_percent / 100)
    for train and max_bytes * val_percent / 100 for val (test likewise), each keeping at least one
    document. test_percent, heldout_max_bytes: the test split and the held-out size cap
    (corpus.SplitRule); part of the set's key only when set, so sets prepared without them keep
    their key.
    shard_index, num_shards: this process tokenizes shards shard_index, shard_index + num_shards,
    ...; with num_shards > 1 the BPE is trained by shard_index 0 and the others wait for it.
  Returns the set, or None when shards of other processes are still missing.
  """
  if not 0 <= shard_index < num_shards:
    raise ValueError(f"--shard_index = {shard_index} with --num_shards = {num_shards}; give "
                     f"0 <= shard_index < num_shards (one index per process)")
  given = load_tokenizer(tokenizer) if tokenizer else None
  key = {
      "version": VERSION,
      "source": corpus.source_fingerprint(source),
      "tokenizer": _file_digest(tokenizer) if tokenizer else f"bpe{vocab_size}",
      "val_percent": val_percent,
      "max_bytes": max_bytes or 0,
      "text_field": text_field,
  }
  rule = corpus.SplitRule(val_percent, test_percent, heldout_max_bytes)
  rule.check()
  if test_percent or heldout_max_bytes:
    key.update(test_percent=test_percent, heldout_max_bytes=heldout_max_bytes)
  kind, pattern = corpus.parse_source(source)
  if kind == "hf" and hf.has_validation(os.path.expanduser(pattern)):
    key["own_splits"] = True  # validated on the dataset's own split, not data.val_percent of it
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
  name = f"{kind}-{'tok' if tokenizer else f'bpe{vocab_size}'}-{digest}"
  directory = epath.Path(cache_dir or default_cache_root()) / name

  def split_documents(split: str) -> Iterator[corpus.Document]:
    return corpus.documents(source, split, val_percent=val_percent, text_field=text_field,
                            max_bytes=_split_budget(max_bytes or 0, rule, split), rule=rule)

  meta = cache.complete_meta(directory, key)
  if meta is not None and kind in _EDITABLE:
    print(cache.reuse_note(directory, source, meta), flush=True)
  if meta is None and next(split_documents("train"), None) is None:
    raise ValueError(f"data.source = {source!r} has no non-empty training documents (with "
                     f"data.val_percent = {val_percent}); give a source with text, or lower "
                     f"data.val_percent")
  created = not directory.exists()
  directory.mkdir(parents=True, exist_ok=True)
  try:
    if meta is None:
      removed = atomic.remove_stale(directory)
      if removed:
        logging.info("removed %d temporary files left by a killed run in %s", len(removed), directory)
    tok = given or _trained_bpe(directory, vocab_size, split_documents("train"),
                                wait=meta is None and shard_index > 0)
    if tok.vocab_size > vocab_size:
      raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but model.vocab_size = "
                       f"{vocab_size}; set --config.model.vocab_size={tok.vocab_size} or larger")
    if meta is None:
      plan = _plan(source, text_field, max_bytes or 0, split_documents)
      _write_shards(directory, plan[shard_index::num_shards], len(plan), tok, rule)
      meta = _index(directory, key, source, tok, len(plan))
  except BaseException:
    if created and not any(directory.iterdir()):
      directory.rmdir()  # a failed first attempt leaves no empty set behind
    raise
  if meta is None:
    return None
  return PreparedData(os.fspath(directory), tok, meta)


def prepare_for_job(source: str, vocab_size: int, cache_dir: str, *, process_index: int,
                    process_count: int, poll_s: float = 5.0, **kwargs: Any) -> PreparedData:
  """prepare() for every process of a training job.

  A gs:// cache is shared by all hosts: process p tokenizes shards p, p + P, ... and waits for
  the others' (a pod prepares once). A local cache is each host's own: every host prepares it all.
  """
  shared = not shards.is_local(cache_dir or default_cache_root())
  index, count = (process_index, process_count) if shared else (0, 1)
  while (prepared := prepare(source, vocab_size, cache_dir, shard_index=index, num_shards=count,
                             **kwargs)) is None:
    logging.log_every_n_seconds(logging.INFO, "waiting for the other processes' shards", 60)
    time.sleep(poll_s)
  return prepared


def default_shard_count(n_files: int, n_bytes: int) -> int:
  """Shards for a source: about _SHARD_BYTES each, and at least _MIN_SHARDS if files allow."""
  return max(1, min(n_files, max(_MIN_SHARDS, -(-n_bytes // _SHARD_BYTES))))


def _plan(source: str, text_field: str, max_bytes: int,
          split_documents: Callable[[str], Iterator[corpus.Document]]) -> list[_Shard]:
  """The set's shards: contiguous groups of files of about equal size; one shard when capped."""
  if max_bytes:
    return [_Shard(0, max_bytes,
                   lambda: itertools.chain.from_iterable(split_documents(s) for s in corpus.SPLITS))]
  files = corpus.source_files(source)
  sizes = [os.path.getsize(path) for path in files.files]
  count = default_shard_count(len(sizes), sum(sizes))
  bounds = np.searchsorted(np.cumsum(sizes), np.arange(1, count) * sum(sizes) / count) + 1
  groups = np.split(np.arange(len(sizes)), np.minimum(bounds, len(sizes)))

  def documents(group: np.ndarray) -> Callable[[], Iterator[corpus.Document]]:
    return lambda: itertools.chain.from_iterable(
        corpus.file_documents(files.kind, files.files[i], files.root, text_field) for i in group)

  return [_Shard(index, sum(sizes[i] for i in group), documents(group))
          for index, group in enumerate(groups)]


def _write_shards(directory: epath.Path, mine: list[_Shard], count: int, tok: Tokenizer,
                  rule: corpus.SplitRule) -> None:
  todo = [s for s in mine if not (directory / shards.marker_file(s.index, count)).exists()]
  if len(todo) < len(mine):
    logging.info("%d of this process's %d shards are done already; tokenizing the other %d",
                 len(mine) - len(todo), len(mine), len(todo))
  if not todo:
    return
  dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
  with progress.bar(desc=f"tokenize {len(todo)} of {count} shards",
                 total=sum(s.n_bytes for s in todo), unit="B", unit_scale=True) as bar, \
       concurrent.futures.ThreadPoolExecutor(_IN_FLIGHT) as pool:
    futures = [pool.submit(_write_shard, directory, s, count, tok, dtype, rule, bar.update)
               for s in todo]
    try:
      for future in concurrent.futures.as_completed(futures):
        future.result()
    except BaseException:
      pool.shutdown(cancel_futures=True)  # a shard in flight finishes (and is kept) or fails
      raise


def _write_shard(directory: epath.Path, shard: _Shard, count: int, tok: Tokenizer, dtype: type,
                 rule: corpus.SplitRule, progress: Callable[[int], Any]) -> None:
  writers = {split: _SplitWriter(directory / shards.token_file(split, shard.index, count), tok,
                                 dtype, progress) for split in corpus.SPLITS}
  try:
    for doc in shard.documents():
      writers[corpus.split_of(doc, rule, len(doc.text.encode("utf-8")))].add(doc.text)
    counts = {split: writer.close() for split, writer in writers.items()}
  except BaseException:
    for writer in writers.values():
      writer.discard()
    raise
  atomic.write_bytes(directory / shards.marker_file(shard.index, count),
                     json.dumps({"index": shard.index, "count": count, "splits": counts}).encode())


class _SplitWriter:
  """Encodes texts in ~1 MB batches and appends ids + eos to a temporary file; close() renames it."""

  def __init__(self, path: epath.Path, tok: Tokenizer, dtype: type,
               progress: Callable[[int], Any]):
    self._path, self._tok, self._dtype, self._progress = path, tok, dtype, progress
    self._tmp = atomic.tmp_path(path)
    self._file = self._tmp.open("wb")
    self._texts: list[str] = []
    self._pending = 0
    self.counts = {"n_tokens": 0, "n_docs": 0, "n_bytes": 0, "max_doc_tokens": 0}

  def add(self, text: str) -> None:
    self._texts.append(text)
    self._pending += len(text)
    if self._pending >= _ENCODE_CHUNK_BYTES:
      self._flush()

  def close(self) -> dict[str, int]:
    self._flush()
    self._file.close()
    self._tmp.replace(self._path)
    return self.counts

  def discard(self) -> None:
    self._file.close()
    self._tmp.unlink(missing_ok=True)

  def _flush(self) -> None:
    if not self._texts:
      return
    eos = [self._tok.eos_id]
    ids = self._tok.encode_batch(self._texts)
    flat = np.concatenate([np.array(doc_ids + eos, self._dtype) for doc_ids in ids])  # (n,)
    self._file.write(flat.tobytes())
    n_bytes = sum(len(t.encode("utf-8")) for t in self._texts)
    self.counts["n_tokens"] += flat.size
    self.counts["n_docs"] += len(self._texts)
    self.counts["max_doc_tokens"] = max(self.counts["max_doc_tokens"], *(len(d) + 1 for d in ids))
    self.counts["n_bytes"] += n_bytes
    self._progress(n_bytes)
    self._texts, self._pending = [], 0


def _index(directory: epath.Path, key: dict[str, Any], source: str, tok: Tokenizer,
           count: int) -> dict[str, Any] | None:
  """Writes and returns meta.json once every shard is done; None while some are missing."""
  done = []
  for index in range(count):
    marker = directory / shards.marker_file(index, count)
    if not marker.exists():
      logging.info("%d of %d shards are done; the process finishing the last one writes %s",
                   index, count, directory / "meta.json")
      return None
    done.append(json.loads(marker.read_text()))
  splits = {split: {field: sum(d["splits"][split][field] for d in done)
                    for field in ("n_tokens", "n_docs", "n_bytes")}
            for split in corpus.SPLITS if all(split in d["splits"] for d in done)}
  for split in splits:  # the largest document's share of its split: does one file dominate it?
    splits[split]["max_doc_tokens"] = max(d["splits"][split].get("max_doc_tokens", 0) for d in done)
  if splits["train"]["n_tokens"] == 0:
    raise ValueError(f"data.source = {source!r} gave no training tokens; give a source with text")
  for split in splits:
    splits[split]["shards"] = [d["splits"][split]["n_tokens"] for d in done]
  meta = {
      "version": VERSION,
      "key": key,
      "source": source,
      "tokenizer": tok.path,
      "vocab_size": tok.vocab_size,
      "eos_id": tok.eos_id,
      "dtype": np.dtype(np.uint16 if tok.vocab_size <= 2**16 else np.uint32).name,
      "num_shards": count,
      "n_files": len(corpus.source_files(source).files) if corpus.parse_source(source)[0] in _EDITABLE else None,
      "splits": splits,
  }
  atomic.write_bytes(directory / "meta.json", json.dumps(meta, indent=2).encode())
  return meta


def _trained_bpe(directory: epath.Path, vocab_size: int,
                 train_documents: Iterable[corpus.Document], wait: bool) -> Tokenizer:
  """The set's BPE: loaded when an earlier run (or shard 0's process, with wait) trained it."""
  path = directory / "tokenizer.json"
  start = time.monotonic()
  while wait and not path.exists():
    if time.monotonic() - start > _TOKENIZER_WAIT_S:
      raise ValueError(f"waited {_TOKENIZER_WAIT_S} s for {path}, which the process with "
                       f"--shard_index=0 trains; start it, or pass --tokenizer")
    logging.log_every_n_seconds(logging.INFO, "waiting for --shard_index=0 to train %s", 60, path)
    time.sleep(2)
  if path.exists():
    return load_tokenizer(os.fspath(path))
  logging.info("training a %d-token byte-level BPE -> %s", vocab_size, path)
  return train_bpe((d.text for d in train_documents), vocab_size, os.fspath(path))


def _split_budget(max_bytes: int, rule: corpus.SplitRule, split: str) -> int:
  if not max_bytes:
    return 0
  share = {"val": rule.val_percent / 100, "test": rule.test_percent / 100}.get(
      split, 1 - (rule.val_percent + rule.test_percent) / 100)
  return max(1, int(max_bytes * share))


def _file_digest(path: str) -> str:
  return hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()


@cli.command(then="rerun the same command (shards already written are kept)")
def main(argv: list[str] | None = None) -> None:
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", default="stdlib",
                      help="'stdlib', 'glob:PATTERN', 'jsonl:PATTERN', 'parquet:PATTERN' or 'hf:DIR'")
  parser.add_argument("--vocab_size", type=int, default=8192,
                      help="model vocabulary: the BPE size to train, or the bound a given "
                           "tokenizer must fit in")
  parser.add_argument("--cache_dir", default="",
                      help="cache root, local or gs:// ('' = $MOA_JAX_CACHE or ~/.cache/moa_jax)")
  parser.add_argument("--tokenizer", default="",
                      help="tokenizer.json or sentencepiece .model ('' = train a byte-level BPE)")
  parser.add_argument("--text_field", default="text",
                      help="JSONL field / Parquet or Hugging Face dataset column holding the text")
  parser.add_argument("--val_percent", type=float, default=2.0,
                      help="percent of documents held out for validation")
  parser.add_argument("--test_percent", type=float, default=0.0,
                      help="percent of documents held out as the test split (final comparisons)")
  parser.add_argument("--heldout_max_bytes", type=int, default=0,
                      help="> 0: documents longer than this always train (no file dominates a held-out split)")
  parser.add_argument("--max_bytes", type=int, default=0, help="cap on the text read (0 = all)")
  parser.add_argument("--num_shards", type=int, default=1,
                      help="processes (hosts) sharing the work; each runs with its --shard_index")
  parser.add_argument("--shard_index", type=int, default=0,
                      help="this process's index in [0, num_shards): it tokenizes shards "
                           "shard_index, shard_index + num_shards, ...")
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  start = time.perf_counter()
  cli.check_range("--vocab_size", args.vocab_size, 1)
  cli.check_range("--val_percent", args.val_percent, 0, 100)
  cli.check_range("--max_bytes", args.max_bytes, 0)
  cli.check_range("--num_shards", args.num_shards, 1)
  prepared = prepare(args.source, args.vocab_size, args.cache_dir, args.tokenizer or None,
                     args.text_field, args.val_percent, args.max_bytes,
                     shard_index=args.shard_index, num_shards=args.num_shards,
                     test_percent=args.test_percent, heldout_max_bytes=args.heldout_max_bytes)
  if prepared is None:
    print(f"tokenized this process's shards in {time.perf_counter() - start:.1f} s; the process "
          f"that finishes the last shard writes meta.json")
    return
  print(f"prepared {prepared.directory} in {time.perf_counter() - start:.1f} s "
        f"(vocab_size {prepared.meta['vocab_size']}, {prepared.meta['dtype']}, "
        f"{prepared.meta['num_shards']} shards)")
  for split, info in prepared.meta["splits"].items():
    print(f"  {split}: {info['n_tokens']:,} tokens, {info['n_docs']:,} documents, "
          f"{info['n_bytes']:,} bytes ({info['n_bytes'] / max(info['n_tokens'], 1):.2f} bytes/token)")


if __name__ == "__main__":
  main()
