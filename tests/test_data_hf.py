"""Hugging Face datasets keep their own validation split (a 27-document dataset trains and validates)."""

import json

import numpy as np
import pytest

from moa_jax.data import EOS, corpus, hf
from moa_jax.data import prepare as prepare_lib

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = [f"the cat sat on mat number {i} and the dog ran under tree {i}.\n" for i in range(27)]


def _split_texts(prepared, split):
  return prepared.tokenizer.decode(np.asarray(prepared.tokens(split))).split(EOS)[:-1]


def _arrow(directory, texts):
  directory.mkdir(parents=True)
  table = pa.table({"text": texts})
  with pa.OSFile(str(directory / "data-00000-of-00001.arrow"), "wb") as sink, \
       pa.ipc.new_stream(sink, table.schema) as w:
    w.write_table(table)
  (directory / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))


def test_split_names_from_paths():
  assert hf.split_of("validation/data-00000-of-00001.arrow") == "val"
  assert hf.split_of("data/validation-00000-of-00001.parquet") == "val"
  assert hf.split_of("default/train/0000.parquet") == "train"
  assert hf.split_of("data/test-00000-of-00001.parquet") is None


def test_a_dataset_dict_with_a_validation_split_is_validated_on_it(tmp_path):
  _arrow(tmp_path / "dd" / "train", TEXTS[:24])
  _arrow(tmp_path / "dd" / "validation", TEXTS[24:])
  _arrow(tmp_path / "dd" / "test", ["never read\n"])
  (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation", "test"]}))
  prepared = prepare_lib.prepare(f"hf:{tmp_path}/dd", 300, str(tmp_path / "cache"), val_percent=2.0)
  assert sorted(_split_texts(prepared, "val")) == sorted(TEXTS[24:])
  assert sorted(_split_texts(prepared, "train")) == sorted(TEXTS[:24])
  val = [d.text for d in corpus.documents(f"hf:{tmp_path}/dd", "val", val_percent=2.0)]
  assert sorted(val) == sorted(TEXTS[24:])


def test_hub_parquet_layout_with_a_validation_split(tmp_path):
  (tmp_path / "hub" / "data").mkdir(parents=True)
  pq.write_table(pa.table({"text": TEXTS[:24]}), tmp_path / "hub/data/train-00000-of-00001.parquet")
  pq.write_table(pa.table({"text": TEXTS[24:]}), tmp_path / "hub/data/validation-00000-of-00001.parquet")
  prepared = prepare_lib.prepare(f"hf:{tmp_path}/hub", 300, str(tmp_path / "cache"), val_percent=2.0)
  assert sorted(_split_texts(prepared, "val")) == sorted(TEXTS[24:])
  assert len(_split_texts(prepared, "train")) == 24
