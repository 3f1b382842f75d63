"""Data: corpus split, tokenizer, cached preparation, packing, shuffling, sharding, resumption."""

import concurrent.futures
import dataclasses
import json
import os
import random
import sys

import numpy as np
import pytest

from moa_jax.data import EOS, TokenWindows, corpus, default_data_config, load_tokenizer
from moa_jax.data import make_datasets, train_bpe
import moa_jax.data.prepare as prepare_lib
from moa_jax.data import shards

VOCAB = 400
MAX_BYTES = 400_000  # a few stdlib files: ~200k tokens at this vocab
VAL_PERCENT = 10.0


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def _config(cache_dir, **fields):
  config = default_data_config()
  config.update(dict(cache_dir=cache_dir, max_bytes=MAX_BYTES, val_percent=VAL_PERCENT, **fields))
  return config


def _data(cache_dir, *, seq_len=32, global_batch_size=1, seed=0, process_index=0,
          process_count=1):
  return make_datasets(_config(cache_dir), vocab_size=VOCAB, seq_len=seq_len,
                       global_batch_size=global_batch_size, seed=seed,
                       process_index=process_index, process_count=process_count)


def _prepared(cache_dir):
  return prepare_lib.prepare("stdlib", VOCAB, cache_dir, val_percent=VAL_PERCENT,
                             max_bytes=MAX_BYTES)


def _rows(batches, n):
  """The first n batches' input rows as tuples."""
  return [tuple(row) for _, batch in zip(range(n), batches) for row in batch["inputs"]]


def _write_texts(directory, n):
  rng = random.Random(0)
  words = "the a cat dog sat ran on under mat tree quickly slowly red blue".split()
  directory.mkdir()
  texts = [" ".join(rng.choice(words) for _ in range(60)) + f" doc {i}.\n" for i in range(n)]
  for i, text in enumerate(texts):
    (directory / f"doc{i:02d}.txt").write_text(text)
  return texts


def _decoded_documents(prepared):
  tok = prepared.tokenizer
  docs = []
  for split in ("train", "val"):
    docs += tok.decode(np.asarray(prepared.tokens(split))).split(EOS)[:-1]  # every document ends with eos
  return docs


# Corpus split.


def test_stdlib_split_is_by_file_and_disjoint():
  train = {d.key for d in corpus.documents("stdlib", "train", val_percent=VAL_PERCENT)}
  val = {d.key for d in corpus.documents("stdlib", "val", val_percent=VAL_PERCENT)}
  assert not train & val
  assert all(key.endswith(".py") for key in train | val)  # one document per file
  assert 0.05 < len(val) / len(train | val) < 0.15
  assert all(corpus.in_validation(key, VAL_PERCENT) for key in val)


def test_capped_splits_stay_disjoint(cache_dir):
  share = {"train": 1 - VAL_PERCENT / 100, "val": VAL_PERCENT / 100}  # prepare()'s documented caps
  capped = {split: [d.key for d in corpus.documents(
      "stdlib", split, val_percent=VAL_PERCENT, max_bytes=int(MAX_BYTES * share[split]))]
            for split in ("train", "val")}
  assert capped["train"] and capped["val"]
  assert not set(capped["train"]) & set(capped["val"])
  meta = _prepared(cache_dir).meta
  assert meta["splits"]["train"]["n_docs"] == len(capped["train"])
  assert meta["splits"]["val"]["n_docs"] == len(capped["val"])


# Tokenizer and cache.


def test_tokenizer_round_trips_stdlib_text(cache_dir):
  tok = _prepared(cache_dir).tokenizer
  texts = [d.text for d in corpus.documents("stdlib", "val", val_percent=VAL_PERCENT,
                                            max_bytes=50_000)]
  texts.append("naïve café — 東京 🐍\n\t  x = {'a': 1}\r\n")
  for text in texts:
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode_batch(texts[:2]) == [tok.encode(texts[0]), tok.encode(texts[1])]
  assert tok.vocab_size == VOCAB and tok.decode([tok.eos_id]) == EOS


def test_cached_set_is_reused_and_tokenizer_trained_once(cache_dir, monkeypatch):
  first = _prepared(cache_dir)
  files = [os.path.join(first.directory, f)
           for f in ("tokenizer.json", shards.token_file("train", 0, 1), "meta.json")]
  mtimes = [os.stat(f).st_mtime_ns for f in files]

  def no_training(*args):
    raise AssertionError("the cached tokenizer was retrained")

  monkeypatch.setattr(prepare_lib, "train_bpe", no_training)
  assert _prepared(cache_dir).meta == first.meta
  assert [os.stat(f).st_mtime_ns for f in files] == mtimes
  # A run that died before writing meta.json is redone, reusing its tokenizer.
  os.remove(os.path.join(first.directory, "meta.json"))
  again = _prepared(cache_dir)
  assert again.meta == first.meta
  np.testing.assert_array_equal(again.tokens("train"), first.tokens("train"))


def test_bpe_needs_byte_alphabet(tmp_path):
  with pytest.raises(ValueError, match=r"vocab_size = 200 is below 257"):
    train_bpe(["some text"], 200, str(tmp_path / "tokenizer.json"))


def test_sentencepiece_missing_is_explained(tmp_path, monkeypatch):
  model = tmp_path / "sp.model"
  model.write_bytes(b"")
  monkeypatch.setitem(sys.modules, "sentencepiece", None)
  with pytest.raises(ImportError, match=r"needs the sentencepiece package; pip install"):
    load_tokenizer(str(model))


# Packing, shuffling, resumption, sharding.


def test_windows_pack_every_token_and_drop_the_partial_one():
  windows = TokenWindows(np.arange(10, dtype=np.uint16), seq_len=3)
  assert [list(windows[i]) for i in range(len(windows))] == [[0, 1, 2, 3], [3, 4, 5, 6],
                                                             [6, 7, 8, 9]]
  assert len(TokenWindows(np.arange(9), seq_len=3)) == 2  # tokens 7, 8 make no full window


def test_eval_stream_is_the_token_stream(cache_dir):
  seq_len = 32
  data = _data(cache_dir, seq_len=seq_len)
  tokens = _prepared(cache_dir).tokens("val")
  n = (len(tokens) - 1) // seq_len
  batches = list(data.eval_batches(n + 1))
  inputs = np.concatenate([b["inputs"][0] for b in batches[:n]])
  targets = np.concatenate([b["targets"][0] for b in batches[:n]])
  np.testing.assert_array_equal(np.append(inputs, targets[-1]), tokens[:n * seq_len + 1])
  np.testing.assert_array_equal(targets, tokens[1:n * seq_len + 1])
  assert batches[0]["inputs"].dtype == np.int32 and batches[0]["inputs"].shape == (1, seq_len)
  np.testing.assert_array_equal(batches[n]["inputs"], batches[0]["inputs"])  # wraps around
  assert _rows(data.eval_batches(5), 5) == _rows(data.eval_batches(5), 5)


def test_shuffle_is_deterministic_per_seed_and_permutes_each_epoch(cache_dir):
  seq_len = 256
  n = len(TokenWindows(_prepared(cache_dir).tokens("train"), seq_len))
  order = _rows(_data(cache_dir, seq_len=seq_len, seed=0).train_iter(), 2 * n)
  assert _rows(_data(cache_dir, seq_len=seq_len, seed=0).train_iter(), 2 * n) == order
  assert _rows(_data(cache_dir, seq_len=seq_len, seed=1).train_iter(), n) != order[:n]
  unshuffled = [tuple(w[:-1]) for w in TokenWindows(_prepared(cache_dir).tokens("train"), seq_len)]
  assert order[:n] != unshuffled
  assert sorted(order[:n]) == sorted(order[n:]) == sorted(unshuffled)
  assert order[n:] != order[:n]  # each epoch is reshuffled


def test_iterator_state_round_trips_across_an_epoch(cache_dir):
  data = _data(cache_dir, seq_len=512, global_batch_size=8)
  per_epoch = len(TokenWindows(_prepared(cache_dir).tokens("train"), 512)) // 8
  it = data.train_iter()
  for _ in range(per_epoch - 2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  resumed = data.train_iter()
  resumed.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
  for want in expected:
    got = next(resumed)
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_see_disjoint_windows_covering_the_epoch(cache_dir):
  seq_len = 256
  n = len(TokenWindows(_prepared(cache_dir).tokens("train"), seq_len))
  single = _rows(_data(cache_dir, seq_len=seq_len).train_iter(), n)
  shards = [_rows(_data(cache_dir, seq_len=seq_len, global_batch_size=2, process_index=p,
                        process_count=2).train_iter(), n // 2) for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == n // 2
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(single[:n - n % 2])


# User sources.


def test_glob_source_reads_one_document_per_file(tmp_path):
  texts = _write_texts(tmp_path / "texts", 12)
  prepared = prepare_lib.prepare(f"glob:{tmp_path}/texts/*.txt", 300, str(tmp_path / "cache"),
                                 val_percent=30.0)
  splits = prepared.meta["splits"]
  assert splits["train"]["n_docs"] > 0 and splits["val"]["n_docs"] > 0
  assert sorted(_decoded_documents(prepared)) == sorted(texts)


def test_jsonl_source_inferred_from_extension(tmp_path):
  texts = _write_texts(tmp_path / "texts", 20)
  path = tmp_path / "docs.jsonl"
  path.write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)) + "\n\n")
  prepared = prepare_lib.prepare(str(path), 300, str(tmp_path / "cache"), text_field="body",
                                 val_percent=30.0)
  assert prepared.meta["splits"]["val"]["n_docs"] > 0  # one file, split by record
  assert sorted(_decoded_documents(prepared)) == sorted(texts)


def test_parquet_source(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  texts = _write_texts(tmp_path / "texts", 20)
  pq.write_table(pa.table({"text": texts + [None]}), tmp_path / "docs.parquet")
  prepared = prepare_lib.prepare(f"parquet:{tmp_path}/*.parquet", 300, str(tmp_path / "cache"),
                                 val_percent=30.0)
  assert sorted(_decoded_documents(prepared)) == sorted(texts)


def _write_hf_arrow(directory, texts, name="data-00000-of-00001.arrow"):
  """A directory laid out as `datasets`' save_to_disk writes it: an Arrow stream plus its json."""
  pa = pytest.importorskip("pyarrow")
  directory.mkdir(parents=True)
  table = pa.table({"id": list(range(len(texts))), "content": texts})
  with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
    for batch in table.to_batches(max_chunksize=7):
      w.write_batch(batch)
  (directory / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}]}))
  (directory / "dataset_info.json").write_text("{}")


def test_hf_saved_dataset_directory(tmp_path):
  texts = _write_texts(tmp_path / "texts", 20)
  _write_hf_arrow(tmp_path / "ds", texts)
  prepared = prepare_lib.prepare(f"hf:{tmp_path}/ds", 300, str(tmp_path / "cache"),
                                 text_field="content", val_percent=30.0)
  assert sorted(_decoded_documents(prepared)) == sorted(texts)
  bare = prepare_lib.prepare(str(tmp_path / "ds"), 300, str(tmp_path / "cache2"),
                             text_field="content", val_percent=30.0)  # a bare directory is hf:
  np.testing.assert_array_equal(np.asarray(bare.tokens("train")), np.asarray(prepared.tokens("train")))


def test_hf_dataset_dict_reads_train_and_parquet_layout(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  texts = _write_texts(tmp_path / "texts", 20)
  _write_hf_arrow(tmp_path / "dict" / "train", texts[:15])
  _write_hf_arrow(tmp_path / "dict" / "test", texts[15:])
  (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
  prepared = prepare_lib.prepare(f"hf:{tmp_path}/dict", 300, str(tmp_path / "cache"),
                                 text_field="content", val_percent=30.0)
  assert sorted(_decoded_documents(prepared)) == sorted(texts[:15])  # the train split only
  (tmp_path / "hub" / "data").mkdir(parents=True)
  pq.write_table(pa.table({"text": texts[:12]}), tmp_path / "hub/data/train-00000-of-00002.parquet")
  pq.write_table(pa.table({"text": texts[12:15]}), tmp_path / "hub/data/train-00001-of-00002.parquet")
  pq.write_table(pa.table({"text": texts[15:]}), tmp_path / "hub/data/test-00000-of-00001.parquet")
  prepared = prepare_lib.prepare(f"hf:{tmp_path}/hub", 300, str(tmp_path / "cache"),
                                 val_percent=30.0)
  assert sorted(_decoded_documents(prepared)) == sorted(texts[:15])
  for split, rows in (("train", texts[:15]), ("test", texts[15:])):  # the Hub's converted layout
    (tmp_path / "converted" / "default" / split).mkdir(parents=True)
    pq.write_table(pa.table({"text": rows}), tmp_path / "converted/default" / split / "0000.parquet")
  prepared = prepare_lib.prepare(f"hf:{tmp_path}/converted", 300, str(tmp_path / "cache"),
                                 val_percent=30.0)
  assert sorted(_decoded_documents(prepared)) == sorted(texts[:15])


# Shards: the parallel path, resume, processes sharing the work, reading.


def _glob_set(tmp_path, cache, **kwargs):
  return prepare_lib.prepare(f"glob:{tmp_path}/texts/*.txt", 300, str(tmp_path / cache),
                             val_percent=30.0, **kwargs)


def _all_tokens(prepared):
  return {split: np.asarray(prepared.tokens(split)) for split in ("train", "val")}


def test_shards_group_files_and_resume_only_missing_ones(tmp_path, monkeypatch):
  texts = _write_texts(tmp_path / "texts", 40)
  first = _glob_set(tmp_path, "cache")
  assert first.meta["num_shards"] == prepare_lib.default_shard_count(40, 0) == 16
  assert sum(first.meta["splits"]["train"]["shards"]) == first.meta["splits"]["train"]["n_tokens"]
  assert sorted(_decoded_documents(first)) == sorted(texts)
  expected = _all_tokens(first)
  # A run killed after shard 5 was written but before the index: only shard 5 is tokenized again.
  marker = os.path.join(first.directory, shards.marker_file(5, 16))
  with open(marker) as f:
    shard_docs = sum(split["n_docs"] for split in json.load(f)["splits"].values())
  os.remove(os.path.join(first.directory, "meta.json"))
  os.remove(marker)
  encoded = []

  def counting(texts):
    encoded.extend(texts)
    return first.tokenizer.encode_batch(texts)

  monkeypatch.setattr(prepare_lib, "load_tokenizer",
                      lambda path: dataclasses.replace(first.tokenizer, _encode_batch=counting))
  again = _glob_set(tmp_path, "cache")
  assert 0 < len(encoded) == shard_docs
  for split in ("train", "val"):
    np.testing.assert_array_equal(_all_tokens(again)[split], expected[split])


def test_processes_split_the_shards(tmp_path):
  _write_texts(tmp_path / "texts", 40)
  whole = _glob_set(tmp_path, "whole")
  tokenizer = os.path.join(whole.directory, "tokenizer.json")
  assert _glob_set(tmp_path, "pod", tokenizer=tokenizer, shard_index=1, num_shards=3) is None
  assert _glob_set(tmp_path, "pod", tokenizer=tokenizer, shard_index=2, num_shards=3) is None
  pod_dir = _glob_set(tmp_path, "pod", tokenizer=tokenizer, shard_index=0, num_shards=3).directory
  markers = sorted(f for f in os.listdir(pod_dir) if f.startswith("shard-"))
  assert len(markers) == 16
  pod = _glob_set(tmp_path, "pod", tokenizer=tokenizer)
  for split in ("train", "val"):
    np.testing.assert_array_equal(_all_tokens(pod)[split], _all_tokens(whole)[split])
  with pytest.raises(ValueError, match=r"--shard_index = 3 with --num_shards = 3"):
    _glob_set(tmp_path, "pod", shard_index=3, num_shards=3)


def test_a_job_on_a_shared_cache_tokenizes_each_shard_once(tmp_path, monkeypatch):
  texts = _write_texts(tmp_path / "texts", 40)
  monkeypatch.setattr(shards, "is_local", lambda path: False)  # the cache behaves as gs:// does
  written, write_shard = [], prepare_lib._write_shard
  monkeypatch.setattr(prepare_lib, "_write_shard",
                      lambda directory, shard, *args: written.append(shard.index) or write_shard(
                          directory, shard, *args))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two hosts' processes, one shared cache
    jobs = [pool.submit(prepare_lib.prepare_for_job, f"glob:{tmp_path}/texts/*.txt", 300,
                        str(tmp_path / "pod"), val_percent=30.0, process_index=p,
                        process_count=2, poll_s=0.05) for p in (1, 0)]
    prepared = [job.result(timeout=300) for job in jobs]
  assert sorted(written) == list(range(16))
  assert prepared[0].meta == prepared[1].meta
  assert sorted(_decoded_documents(prepared[0])) == sorted(texts)  # read by ranged reads


def test_other_processes_wait_for_shard_zeros_tokenizer(tmp_path, monkeypatch):
  _write_texts(tmp_path / "texts", 4)
  monkeypatch.setattr(prepare_lib, "_TOKENIZER_WAIT_S", 0)
  with pytest.raises(ValueError, match=r"which the process with --shard_index=0 trains"):
    _glob_set(tmp_path, "cache", shard_index=1, num_shards=2)


@pytest.mark.parametrize("memory_map", [True, False])  # False: the ranged reads gs:// gets
def test_token_stream_reads_across_shards(tmp_path, memory_map):
  counts = [5, 0, 3, 7]
  stream = np.arange(sum(counts), dtype=np.uint16)
  bounds = np.cumsum([0] + counts)
  for i, n in enumerate(counts):
    stream[bounds[i]:bounds[i + 1]].tofile(tmp_path / shards.token_file("train", i, len(counts)))
  tokens = shards.TokenStream(str(tmp_path), "train", counts, "uint16", memory_map=memory_map)
  assert len(tokens) == 15
  for start in range(16):
    for stop in range(start, 16):
      np.testing.assert_array_equal(tokens[start:stop], stream[start:stop])
  np.testing.assert_array_equal(np.asarray(tokens), stream)
  windows = TokenWindows(tokens, seq_len=4)
  assert [list(windows[i]) for i in range(len(windows))] == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8],
                                                             [8, 9, 10, 11, 12]]


# Errors.


def test_missing_and_empty_sources_raise(tmp_path):
  with pytest.raises(ValueError, match=r"data.source = 'glob:/nonexistent/\*.txt' matched no files"):
    prepare_lib.prepare("glob:/nonexistent/*.txt", 300, str(tmp_path))
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(ValueError, match=r"has no non-empty training documents"):
    prepare_lib.prepare(f"glob:{tmp_path}/*.txt", 300, str(tmp_path))
  (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
  with pytest.raises(ValueError, match=r"line 1 has no field data.text_field = 'text'.*\['body'\]"):
    prepare_lib.prepare(f"jsonl:{tmp_path}/docs.jsonl", 300, str(tmp_path))
  with pytest.raises(ValueError, match=r"data.tokenizer = '/nonexistent.json' is not a file"):
    prepare_lib.prepare("stdlib", 300, str(tmp_path), tokenizer="/nonexistent.json")


def test_tokenizer_larger_than_model_vocab_raises(cache_dir, tmp_path):
  tok = _prepared(cache_dir).tokenizer
  with pytest.raises(ValueError, match=rf"tokenizer {tok.path} has {tok.vocab_size} tokens but "
                     rf"model.vocab_size = 300; set --config.model.vocab_size={tok.vocab_size}"):
    prepare_lib.prepare("stdlib", 300, str(tmp_path), tokenizer=tok.path, max_bytes=MAX_BYTES)


def test_too_small_val_split_raises(cache_dir):
  val_tokens = _prepared(cache_dir).meta["splits"]["val"]["n_tokens"]
  with pytest.raises(ValueError, match=rf"val split has {val_tokens} tokens, 0 windows of "
                     rf"seq_len \+ 1 = {val_tokens + 1}.*smaller seq_len"):
    _data(cache_dir, seq_len=val_tokens)


def test_batch_must_divide_among_processes(cache_dir):
  with pytest.raises(ValueError, match=r"global_batch_size = 6 is not divisible by "
                     r"process_count = 4"):
    _data(cache_dir, global_batch_size=6, process_count=4)
