"""Text sources: documents (strings) read from a source spec, split into train / validation.

Source specs:

    "stdlib"                  the Python standard library's own `*.py` files (the default; no network)
    "glob:/data/**/*.txt"     one document per text file (UTF-8)
    "jsonl:/data/*.jsonl"     one document per JSON line, taken from its `text_field`
    "parquet:/data/*.parquet" one document per row, taken from its `text_field` column (needs pyarrow)

A spec without a known prefix is a path pattern whose kind is inferred from its extension:
`.jsonl` -> jsonl, `.parquet` -> parquet, anything else -> glob.

The stdlib corpus (~31 MB on CPython 3.11: ~12 MB of modules, ~19 MB of `test/` packages) keeps the
test packages: they are real Python, and without them the corpus is too small to train on. It
skips `site-packages` / `dist-packages` (installed third-party code, which varies by machine),
`encodings/` (generated codec tables) and the few files that are not UTF-8 (CPython's deliberate
source-encoding tests).

Split. Every document has a stable key: the file's path relative to the source root, plus
`:<row>` for JSONL / Parquet records. A document is in validation when
`blake2b(key) % 10000 < val_percent * 100`, so stdlib and glob sources are split by file (no file
is in both splits) and record sources by record (a single big JSONL file still gets a validation
split). Files are read in key-hash order, so a `max_bytes` cap takes a spread-out sample rather
than the alphabetically first files.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import pathlib
import sys
import sysconfig
from typing import Callable, Iterator, NamedTuple

SPLITS = ("train", "val")
# Installed third-party code (varies by machine), and encodings/: 1.5 MB of generated 256-entry codec
# tables ("0x00c0: 0x0410,  # CYRILLIC CAPITAL LETTER A") that a small model learns first and then
# writes back in every sample.
_SKIPPED_STDLIB_DIRS = ("site-packages", "dist-packages", "encodings")
_PATTERN_KINDS = ("glob", "jsonl", "parquet")
_FORMS = "'stdlib', 'glob:PATTERN', 'jsonl:PATTERN' or 'parquet:PATTERN'"


class Document(NamedTuple):
  key: str   # stable id: path relative to the source root, plus ':<row>' for records
  text: str


def parse_source(spec: str) -> tuple[str, str]:
  """'jsonl:/d/*.jsonl' -> ('jsonl', '/d/*.jsonl'); a bare pattern's kind comes from its extension."""
  if spec == "stdlib":
    return "stdlib", _stdlib_root()
  kind, sep, pattern = spec.partition(":")
  if sep and kind in _PATTERN_KINDS:
    return kind, pattern
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
  return _key_hash(key) % 10000 < round(val_percent * 100)


def documents(spec: str, split: str, *, val_percent: float, max_bytes: int = 0,
              text_field: str = "text") -> Iterator[Document]:
  """Yields the split's non-empty documents; with max_bytes > 0, stops after the one crossing it.

  The document crossing the cap is kept, so a split that has any document yields at least one.
  """
  if split not in SPLITS:
    raise ValueError(f"split = {split!r}; expected one of {SPLITS}")
  kind, pattern = parse_source(spec)
  root, files = _list_files(spec, kind, pattern)
  read = _READERS[kind]
  n_bytes = 0
  for path in sorted(files, key=lambda p: _key_hash(_relative(p, root))):
    for key, text in read(path, _relative(path, root), text_field):
      if not text or in_validation(key, val_percent) != (split == "val"):
        continue
      yield Document(key, text)
      n_bytes += len(text.encode("utf-8"))
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
  files = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
  if not files:
    raise ValueError(f"data.source = {spec!r} matched no files; expected {_FORMS} naming existing "
                     f"files (check the path, and quote the pattern so the shell does not expand it)")
  return _pattern_root(os.path.expanduser(pattern)), files


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
  with open(path, encoding="utf-8") as f:
    for row, line in enumerate(f):
      if not line.strip():
        continue
      record = json.loads(line)
      if text_field not in record:
        raise ValueError(f"{path} line {row + 1} has no field data.text_field = {text_field!r}; "
                         f"its fields are {sorted(record)}; set --data.text_field to one of them")
      text = record[text_field]
      if text is not None and not isinstance(text, str):  # null is skipped like empty text
        raise ValueError(f"{path} line {row + 1}: field {text_field!r} is a "
                         f"{type(text).__name__}, expected a string")
      yield f"{key}:{row}", text


def _read_parquet(path: str, key: str, text_field: str) -> Iterator[tuple[str, str | None]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs pyarrow; pip install 'moa_jax[data]' "
                      f"(or pip install pyarrow)") from e
  parquet_file = pq.ParquetFile(path)
  columns = parquet_file.schema_arrow.names
  if text_field not in columns:
    raise ValueError(f"{path} has no column data.text_field = {text_field!r}; its columns are "
                     f"{columns}; set --data.text_field to one of them")
  row = 0
  for batch in parquet_file.iter_batches(columns=[text_field]):
    for text in batch.column(0).to_pylist():  # nulls arrive as None, skipped like empty text
      yield f"{key}:{row}", text
      row += 1


# (path, key, text_field) -> (document key, text or None) for every record in the file.
_READERS: dict[str, Callable[[str, str, str], Iterator[tuple[str, str | None]]]] = {
    "stdlib": _read_stdlib_file,
    "glob": _read_text_file,
    "jsonl": _read_jsonl,
    "parquet": _read_parquet,
}
