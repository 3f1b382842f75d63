"""Text sources: documents (strings) read from a source spec, split into train / validation.

Source specs:

    "stdlib"                  the Python standard library's own `*.py` files (the default; no network)
    "glob:/data/**/*.txt"     one document per text file (UTF-8)
    "jsonl:/data/*.jsonl"     one document per JSON line, taken from its `text_field`
    "parquet:/data/*.parquet" one document per row, taken from its `text_field` column (needs pyarrow)
    "hf:/data/my_dataset"     a Hugging Face `datasets` directory: one document per row of its
                              `text_field` column, from `save_to_disk` Arrow files or Parquet files
                              (needs pyarrow, not `datasets`); see `_hf_files` for which split is read

A spec without a known prefix is a path pattern whose kind is inferred from its extension:
`.jsonl` -> jsonl, `.parquet` -> parquet, anything else -> glob. A bare directory is read as `hf:`
when it holds a Hugging Face dataset; any other directory is refused with the spec to write instead.

The stdlib corpus (~31 MB on CPython 3.11: ~12 MB of modules, ~19 MB of `test/` packages) keeps the
test packages: they are real Python, and without them the corpus is too small to train on. It
skips `site-packages` / `dist-packages` (installed third-party code, which varies by machine),
`encodings/` (generated codec tables) and the few files that are not UTF-8 (CPython's deliberate
source-encoding tests).

Split. Every document has a stable key: the file's path relative to the source root, plus
`:<row>` for JSONL / Parquet records. With h = `blake2b(key) % 10000`, a document is in validation
when `h < val_percent * 100`, in test when `h < (val_percent + test_percent) * 100`, else in train
(`SplitRule.of`), so stdlib and glob sources are split by file (no file is in two splits) and record
sources by record (a single big JSONL file still gets held-out splits). Validation is for choices
(lr, early curves), test for final comparisons only. With `heldout_max_bytes` > 0 a document longer
than it always trains: one big file (the stdlib's `test_asyncio/test_events.py` is 200 KB) cannot
dominate a held-out split (the price: held-out documents are the shorter ones). Files are read in
key-hash order, so a `max_bytes` cap takes a spread-out sample rather than the alphabetically
first files.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
from typing import Any, Callable, Iterator, NamedTuple

from moa_jax.data import hf

SPLITS = ("train", "val", "test")
# Installed third-party code (varies by machine), and encodings/: 1.5 MB of generated 256-entry codec
# tables ("0x00c0: 0x0410,  # CYRILLIC CAPITAL LETTER A") that a small model learns first and then
# writes back in every sample.
_SKIPPED_STDLIB_DIRS = ("site-packages", "dist-packages", "encodings")
_PATTERN_KINDS = ("glob", "jsonl", "parquet", "hf")
_FORMS = "'stdlib', 'glob:PATTERN', 'jsonl:PATTERN', 'parquet:PATTERN' or 'hf:DIR'"
# Files that mark a Hugging Face `datasets` directory (save_to_disk writes the first two or the third).
_HF_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")
# Extensions a directory hint prefers to suggest, over whatever else is most common there.
_TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".jsonl", ".parquet", ".py", ".html", ".json", ".csv")


class MissingPackageError(ImportError, ValueError):
  """An optional package a source or tokenizer needs; a ValueError too, so CLIs print one line."""


class Document(NamedTuple):
  key: str   # stable id: path relative to the source root, plus ':<row>' for records
  text: str
  split: str | None = None  # 'train' / 'val' from a dataset's own splits (hf.py); None: split by hash


def split_of(doc: Document, rule: "SplitRule", n_bytes: int) -> str:
  """The split a document goes to: its dataset's own, else data.val_percent of documents by hash."""
  return doc.split or rule.of(doc.key, n_bytes)


def parse_source(spec: str) -> tuple[str, str]:
  """'jsonl:/d/*.jsonl' -> ('jsonl', '/d/*.jsonl'); a bare pattern's kind comes from its extension."""
  if spec == "stdlib":
    return "stdlib", _stdlib_root()
  kind, sep, pattern = spec.partition(":")
  if sep and kind in _PATTERN_KINDS:
    return kind, pattern
  if os.path.isdir(os.path.expanduser(spec)):
    if _is_hf_dataset(os.path.expanduser(spec)):
      return "hf", spec
    raise ValueError(f"data.source = {spec!r} is a directory; {_directory_hint(spec)}")
  if spec.endswith(".jsonl"):
    return "jsonl", spec
  if spec.endswith(".parquet"):
    return "parquet", spec
  return "glob", spec


def source_fingerprint(spec: str) -> str:
  """What identifies the source's content for caching: the resolved pattern (and Python version)."""
  kind, pattern = parse_source(spec)
  if kind == "stdlib":
    return f"stdlib:{pattern}:python{sys.version_info.major}.{sys.version_info.minor}"
  return f"{kind}:{os.path.abspath(os.path.expanduser(pattern))}"


def in_validation(key: str, val_percent: float) -> bool:
  return SplitRule(val_percent).of(key, 0) == "val"


class SplitRule(NamedTuple):
  """Which split a document is in (see the module docstring)."""
  val_percent: float
  test_percent: float = 0.0
  heldout_max_bytes: int = 0  # > 0: a document of more bytes always trains

  def of(self, key: str, n_bytes: int) -> str:
    if self.heldout_max_bytes and n_bytes > self.heldout_max_bytes:
      return "train"
    h = _key_hash(key) % 10000
    if h < round(self.val_percent * 100):
      return "val"
    return "test" if h < round((self.val_percent + self.test_percent) * 100) else "train"

  def check(self) -> None:
    if self.val_percent < 0 or self.test_percent < 0 or self.val_percent + self.test_percent >= 100:
      raise ValueError(f"data.val_percent = {self.val_percent}, data.test_percent = {self.test_percent}: "
                       f"each must be ≥ 0 and together below 100")


class SourceFiles(NamedTuple):
  kind: str         # 'stdlib', 'glob', 'jsonl', 'parquet' or 'hf'
  root: str         # document keys are file paths relative to it
  files: list[str]  # in key-hash order: a spread-out sample comes first


def source_files(spec: str) -> SourceFiles:
  """The source's files, in the order documents() reads them; raises when there are none."""
  kind, pattern = parse_source(spec)
  root, files = _list_files(spec, kind, pattern)
  return SourceFiles(kind, root, sorted(files, key=lambda p: _key_hash(_relative(p, root))))


def file_documents(kind: str, path: str, root: str, text_field: str) -> Iterator[Document]:
  """The non-empty documents of one source file, of both splits, in file order."""
  relative = _relative(path, root)
  own = hf.split_of(relative) if kind == "hf" and hf.has_validation(root) else None
  for key, text in _READERS[kind](path, relative, text_field):
    if text:
      yield Document(key, text, own)


def documents(spec: str, split: str, *, val_percent: float, max_bytes: int = 0,
              text_field: str = "text", rule: SplitRule | None = None) -> Iterator[Document]:
  """Yields the split's non-empty documents; with max_bytes > 0, stops after the one crossing it.

  The document crossing the cap is kept, so a split that has any document yields at least one.
  rule: the split rule (default: SplitRule(val_percent), validation and train only).
  """
  if split not in SPLITS:
    raise ValueError(f"split = {split!r}; expected one of {SPLITS}")
  rule = rule or SplitRule(val_percent)
  source = source_files(spec)
  n_bytes = 0
  for path in source.files:
    for doc in file_documents(source.kind, path, source.root, text_field):
      size = len(doc.text.encode("utf-8"))
      if split_of(doc, rule, size) != split:
        continue
      yield doc
      n_bytes += size
      if max_bytes and n_bytes >= max_bytes:
        return


def _stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _key_hash(key: str) -> int:
  return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _relative(path: str, root: str) -> str:
  return pathlib.Path(os.path.relpath(path, root)).as_posix()


def _list_files(spec: str, kind: str, pattern: str) -> tuple[str, list[str]]:
  """(root the document keys are relative to, matching files)."""
  if kind == "stdlib":
    root = pathlib.Path(pattern)
    files = [str(p) for p in root.rglob("*.py")
             if not set(p.relative_to(root).parts) & set(_SKIPPED_STDLIB_DIRS)]
    if not files:
      raise ValueError(f"data.source = 'stdlib' but {root} holds no .py files (this Python ships "
                       f"without its sources); set data.source to {_FORMS}")
    return str(root), files
  if kind == "hf":
    return os.path.expanduser(pattern), _hf_files(spec, os.path.expanduser(pattern))
  if os.path.isdir(os.path.expanduser(pattern)):
    raise ValueError(f"data.source = {spec!r} names a directory; {_directory_hint(pattern)}")
  files = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
  if not files:
    where = "" if os.path.isabs(os.path.expanduser(pattern)) else (
        f"; it is relative, read from the current directory {os.getcwd()}: give an absolute path")
    raise ValueError(f"data.source = {spec!r} matched no files; expected {_FORMS} naming existing "
                     f"files (check the path, and quote the pattern so the shell does not expand it){where}")
  return _pattern_root(os.path.expanduser(pattern)), files


def _is_hf_dataset(directory: str) -> bool:
  return any(os.path.exists(os.path.join(directory, name)) for name in _HF_MARKERS)


def _hf_files(spec: str, directory: str) -> list[str]:
  """A `datasets` directory's data files: save_to_disk's Arrow files, else its Parquet files.

  A DatasetDict (dataset_dict.json) is read through its 'train' split, and its validation split when it
  has one (hf.VAL_SPLITS); Parquet files named for splits (the Hub's data/train-00000-of-00002.parquet,
  or .../train/0000.parquet) likewise. With a validation split, documents keep the dataset's own split
  (hf.py); otherwise moa_jax makes one from what is read (data.val_percent).
  """
  if not os.path.isdir(directory):
    raise ValueError(f"data.source = {spec!r}: {directory} is not a directory; give hf:DIR, where "
                     f"DIR is a Hugging Face dataset saved with save_to_disk or holding Parquet files")
  dict_file = os.path.join(directory, "dataset_dict.json")
  if os.path.exists(dict_file):
    try:
      with open(dict_file, encoding="utf-8") as f:
        splits = json.load(f)["splits"]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{dict_file} is not a datasets DatasetDict index ({e!r}); give hf:DIR/<split> "
                       f"naming one split's directory") from e
    if "train" not in splits:
      raise ValueError(f"data.source = {spec!r} is a DatasetDict without a 'train' split; name one "
                       f"of its splits {splits}: hf:{os.path.join(directory, '<split>')}")
    val = hf.dict_validation_split(directory)  # read too, as the validation split
    return _hf_files(spec, os.path.join(directory, "train")) + (
        _hf_files(spec, os.path.join(directory, val)) if val else [])
  files = sorted(glob.glob(os.path.join(directory, "*.arrow")))
  if not files:
    files = sorted(glob.glob(os.path.join(directory, "**", "*.parquet"), recursive=True))
    splits = [hf.split_of(os.path.relpath(p, directory)) for p in files]
    if "train" in splits:  # the train split, and the validation split when there is one
      files = [p for p, split in zip(files, splits) if split in ("train", "val")]
  if not files:
    raise ValueError(f"data.source = {spec!r} holds no .arrow or .parquet files; give a directory "
                     f"written by Dataset.save_to_disk or holding Parquet files")
  return files


def _directory_hint(directory: str) -> str:
  """What to write instead of a bare directory, from the kinds of files under it."""
  directory = os.path.expanduser(directory).rstrip("/")
  counts: dict[str, int] = {}
  for path in glob.iglob(os.path.join(directory, "**", "*"), recursive=True):
    if os.path.isfile(path):
      ext = os.path.splitext(path)[1] or "(no extension)"
      counts[ext] = counts.get(ext, 0) + 1
  if not counts:
    return f"it holds no files; give {_FORMS} naming files with text"
  ext = max(counts, key=lambda e: (e in _TEXT_EXTENSIONS, counts[e]))  # text files first
  kind = {".jsonl": "jsonl", ".parquet": "parquet"}.get(ext, "glob")
  others = sorted((e for e in counts if e != ext), key=lambda e: -counts[e])[:3]
  found = ", ".join(f"{counts[e]} {e}" for e in [ext] + others)
  suffix = f"*{ext}" if ext.startswith(".") else "*"
  return (f"name the files to read, e.g. data.source='{kind}:{directory}/**/{suffix}' "
          f"(it holds {found} files)")


def _pattern_root(pattern: str) -> str:
  """The directory before the first wildcard: '/d/a/*/x.txt' -> '/d/a'."""
  magic = [i for i, c in enumerate(pattern) if c in "*?["]
  return os.path.dirname(pattern[:magic[0]] if magic else pattern)


def _read_stdlib_file(path: str, key: str, text_field: str) -> Iterator[tuple[str, str]]:
  del text_field
  try:
    yield key, pathlib.Path(path).read_text(encoding="utf-8")
  except UnicodeDecodeError:
    return  # CPython's deliberate non-UTF-8 encoding tests; see the module docstring.


def _read_text_file(path: str, key: str, text_field: str) -> Iterator[tuple[str, str]]:
  del text_field
  try:
    yield key, pathlib.Path(path).read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 ({e}); convert it to UTF-8 or narrow the "
                     f"data.source pattern to exclude it") from e


def _read_jsonl(path: str, key: str, text_field: str) -> Iterator[tuple[str, str]]:
  with open(path, "rb") as f:
    for row, raw in enumerate(f):  # row + 1 is the line number: blank lines are counted too
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{path} line {row + 1} is not UTF-8 ({e.reason} at byte {e.start}); "
                         f"convert the file to UTF-8 or leave it out of data.source") from e
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {row + 1} is not valid JSON ({e.msg}: column {e.colno}); "
                         f"fix or remove that line") from e
      if not isinstance(record, dict):
        raise ValueError(f"{path} line {row + 1} is a JSON {type(record).__name__}, not an object; "
                         f"each line must be an object with a data.text_field = {text_field!r} field")
      if text_field not in record:
        raise ValueError(f"{path} line {row + 1} has no field data.text_field = {text_field!r}; "
                         f"its fields are {sorted(record)}; set --data.text_field to one of them")
      text = record[text_field]
      if text is not None and not isinstance(text, str):  # null is skipped like empty text
        raise ValueError(f"{path} line {row + 1}: field {text_field!r} is a "
                         f"{type(text).__name__}, expected a string")
      yield f"{key}:{row}", text


def _pyarrow(path: str):
  try:
    import pyarrow  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise MissingPackageError(f"reading {path} needs pyarrow; pip install 'moa_jax[data]' "
                              f"(or pip install pyarrow)") from e
  return pyarrow


def _read_parquet(path: str, key: str, text_field: str) -> Iterator[tuple[str, str | None]]:
  pa = _pyarrow(path)
  try:
    parquet_file = pa.parquet.ParquetFile(path)
  except pa.ArrowException as e:
    raise ValueError(f"{path} is not a readable Parquet file ({e}); leave it out of data.source") from e
  yield from _column_rows(path, key, text_field, parquet_file.schema_arrow.names,
                          parquet_file.iter_batches(columns=[text_field]))


def _read_hf_file(path: str, key: str, text_field: str) -> Iterator[tuple[str, str | None]]:
  """One data file of a `datasets` directory: Parquet, or save_to_disk's Arrow stream."""
  if path.endswith(".parquet"):
    yield from _read_parquet(path, key, text_field)
    return
  pa = _pyarrow(path)
  with pa.memory_map(path) as source:
    try:
      reader = pa.ipc.open_stream(source)
    except pa.ArrowInvalid:
      source.seek(0)
      try:
        reader = pa.ipc.open_file(source)
      except pa.ArrowInvalid as e:
        raise ValueError(f"{path} is not an Arrow file ({e}); leave it out of data.source") from e
      batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    else:
      batches = iter(reader)
    yield from _column_rows(path, key, text_field, reader.schema.names,
                            (batch.select([text_field]) for batch in batches))


def _column_rows(path: str, key: str, text_field: str, columns: list[str],
                 batches: Iterator[Any]) -> Iterator[tuple[str, str | None]]:
  """(key:row, text) for every row of one-column record batches."""
  if text_field not in columns:
    raise ValueError(f"{path} has no column data.text_field = {text_field!r}; its columns are "
                     f"{columns}; set --data.text_field to one of them")
  row = 0
  for batch in batches:
    for text in batch.column(0).to_pylist():  # nulls arrive as None, skipped like empty text
      if text is not None and not isinstance(text, str):
        raise ValueError(f"{path} row {row}: column {text_field!r} holds a "
                         f"{type(text).__name__}, expected a string")
      yield f"{key}:{row}", text
      row += 1


# (path, key, text_field) -> (document key, text or None) for every record in the file.
_READERS: dict[str, Callable[[str, str, str], Iterator[tuple[str, str | None]]]] = {
    "stdlib": _read_stdlib_file,
    "glob": _read_text_file,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
    "hf": _read_hf_file,
}
