"""Bad data inputs end in one `error: ...` line naming the file and the fix, never a traceback, and
leave the cache and the workdir as they were; a prepare killed midway is cleaned up by the next one."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import moa_jax.data.prepare as prepare_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = [{"text": f"document {i}: the cat sat on the mat, the dog ran under the tree."} for i in range(9)]


def _jsonl(path, lines):
  path.write_bytes(b"\n".join(lines) + b"\n")
  return f"jsonl:{path}"


def _malformed_line_8(tmp):
  lines = [json.dumps(r).encode() for r in GOOD[:6]]
  lines.insert(2, b"")  # a blank line: counted by the line number, skipped as a document
  lines.append(b'{"text": "unterminated')  # line 8
  return _jsonl(tmp / "docs.jsonl", lines), [], r"docs.jsonl line 8 is not valid JSON"


def _jsonl_not_utf8(tmp):
  lines = [json.dumps(r).encode() for r in GOOD[:2]] + ['{"text": "caf\xe9"}'.encode("latin-1")]
  return _jsonl(tmp / "latin.jsonl", lines), [], r"latin.jsonl line 3 is not UTF-8"


def _jsonl_not_an_object(tmp):
  return (_jsonl(tmp / "list.jsonl", [json.dumps(GOOD[0]).encode(), b"[1, 2]"]), [],
          r"list.jsonl line 2 is a JSON list, not an object")


def _text_not_utf8(tmp):
  (tmp / "texts").mkdir()
  (tmp / "texts" / "good.txt").write_text("plain text " * 20)
  (tmp / "texts" / "bad.txt").write_bytes("caf\xe9 ".encode("latin-1") * 20)
  return f"glob:{tmp}/texts/*.txt", [], r"bad.txt is not UTF-8"


def _garbage_tokenizer(content):
  def case(tmp):
    (tmp / "tokenizer.json").write_bytes(content)
    return ("stdlib", ["--tokenizer", str(tmp / "tokenizer.json")],
            r"data.tokenizer = '.*tokenizer.json' is not a tokenizer.json")
  return case


def _garbage_sentencepiece(tmp):
  (tmp / "sp.model").write_bytes(os.urandom(200))
  return "stdlib", ["--tokenizer", str(tmp / "sp.model")], r"data.tokenizer = '.*sp.model'"


def _tokenizer_is_a_directory(tmp):
  return "stdlib", ["--tokenizer", str(tmp)], r"data.tokenizer = '.*' is not a file"


def _directory_of_texts(tmp):
  (tmp / "corpus" / "sub").mkdir(parents=True)
  for i in range(3):
    (tmp / "corpus" / "sub" / f"{i}.txt").write_text("text")
  return (str(tmp / "corpus"), [],
          r"data.source = '.*corpus' is a directory; .*data.source='glob:.*corpus/\*\*/\*\.txt' "
          r"\(it holds 3 \.txt files\)")


def _glob_of_a_directory(tmp):
  (tmp / "corpus").mkdir()
  (tmp / "corpus" / "a.jsonl").write_text(json.dumps(GOOD[0]))
  return f"glob:{tmp}/corpus", [], r"names a directory; .*'jsonl:.*corpus/\*\*/\*\.jsonl'"


def _empty_directory(tmp):
  (tmp / "empty").mkdir()
  return str(tmp / "empty"), [], r"is a directory; it holds no files"


def _hf_without_the_field(tmp):
  pa = pytest.importorskip("pyarrow")
  (tmp / "ds").mkdir()
  table = pa.table({"body": ["x y z"] * 3})
  with pa.OSFile(str(tmp / "ds" / "data-00000-of-00001.arrow"), "wb") as sink:
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table)
  (tmp / "ds" / "state.json").write_text("{}")
  return f"hf:{tmp}/ds", [], r"has no column data.text_field = 'text'; its columns are \['body'\]"


def _hf_dict_without_train(tmp):
  (tmp / "dd").mkdir()
  (tmp / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
  return str(tmp / "dd"), [], r"DatasetDict without a 'train' split; name one of its splits"


def _garbage_parquet(tmp):
  pytest.importorskip("pyarrow")
  (tmp / "bad.parquet").write_bytes(b"not parquet at all" * 10)
  return f"parquet:{tmp}/bad.parquet", [], r"bad.parquet is not a readable Parquet file"


def _shard_index_out_of_range(tmp):
  del tmp
  return "stdlib", ["--shard_index", "2", "--num_shards", "2"], r"--shard_index = 2 with --num_shards = 2"


CASES = {
    "malformed_jsonl_line_8": _malformed_line_8,
    "jsonl_not_utf8": _jsonl_not_utf8,
    "jsonl_not_an_object": _jsonl_not_an_object,
    "text_not_utf8": _text_not_utf8,
    "garbage_tokenizer_binary": _garbage_tokenizer(os.urandom(300)),
    "garbage_tokenizer_text": _garbage_tokenizer(b"this is not json\n"),
    "garbage_tokenizer_json": _garbage_tokenizer(b'{"model": 3}'),
    "garbage_sentencepiece": _garbage_sentencepiece,
    "tokenizer_is_a_directory": _tokenizer_is_a_directory,
    "directory_of_texts": _directory_of_texts,
    "glob_of_a_directory": _glob_of_a_directory,
    "empty_directory": _empty_directory,
    "hf_without_the_field": _hf_without_the_field,
    "hf_dict_without_train": _hf_dict_without_train,
    "garbage_parquet": _garbage_parquet,
    "shard_index_out_of_range": _shard_index_out_of_range,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_and_touches_nothing(case, tmp_path):
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  source, flags, message = CASES[case](inputs)
  cache = tmp_path / "cache"
  cache.mkdir()
  with pytest.raises(SystemExit) as exit_info:
    prepare_lib.main([f"--source={source}", "--vocab_size=300", f"--cache_dir={cache}", *flags])
  text = str(exit_info.value.code)
  assert text.startswith("error: ") and "\n" not in text, text
  assert re.search(message, text), text
  assert os.listdir(cache) == []  # no half-made set left behind


def test_killed_prepare_leaves_temporaries_that_the_next_run_removes(tmp_path):
  (tmp_path / "texts").mkdir()
  for i in range(4):
    (tmp_path / "texts" / f"{i}.txt").write_text(f"text number {i} " * 200)
  args = [f"--source=glob:{tmp_path}/texts/*.txt", "--vocab_size=300",
          f"--cache_dir={tmp_path}/cache", "--val_percent=0"]
  # Encoding hangs, so the process is killed while its token files are still temporaries.
  hang = ("import sys, time; import moa_jax.data.tokenizer as t; "
          "t.Tokenizer.encode_batch = lambda self, texts: time.sleep(600); "
          "import moa_jax.data.prepare as p; p.main(sys.argv[1:])")
  proc = subprocess.Popen([sys.executable, "-c", hang, *args], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache").glob("*/*.tmp-*")):
      assert proc.poll() is None and time.monotonic() < deadline, "prepare never started writing"
      time.sleep(0.2)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert list((tmp_path / "cache").glob("*/*.tmp-*"))
  prepare_lib.main(args)
  assert not list((tmp_path / "cache").glob("*/*.tmp-*"))
  assert list((tmp_path / "cache").glob("*/meta.json"))


def test_train_cli_bad_source_is_one_line_and_leaves_the_workdir(tmp_path):
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "a.txt").write_text("text")
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
  proc = subprocess.run(
      [sys.executable, "-m", "moa_jax.train", "--config=configs/debug.py", f"--workdir={workdir}",
       f"--config.data.source={tmp_path}/corpus", f"--config.data.cache_dir={tmp_path}/cache"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: data.source = ") and "is a directory; name the files" in last, last
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl"]
  assert (workdir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
