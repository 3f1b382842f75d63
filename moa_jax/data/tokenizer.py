"""`Tokenizer`: a Hugging Face `tokenizer.json` or a sentencepiece `.model`, behind one small API.

`train_bpe` trains a byte-level BPE (GPT-2 style: any string round-trips exactly) with one special
token, `<|endoftext|>`, on at most `TRAIN_SAMPLE_BYTES` of text; the whole stdlib training split
(~31 MB) fits under the cap and trains in under 10 s on 2 cores.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator, Sequence

from etils import epath
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from moa_jax.data import atomic
from moa_jax.data.corpus import MissingPackageError

EOS = "<|endoftext|>"
TRAIN_SAMPLE_BYTES = 64 * 2**20
_BYTE_ALPHABET = 256
# End-of-text names used by common tokenizer.json files, in the order they are looked for.
_EOS_CANDIDATES = (EOS, "</s>", "<|end_of_text|>", "<eos>")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  path: str                                                # the tokenizer.json or .model file
  vocab_size: int                                          # largest token id + 1
  eos_id: int
  _encode_batch: Callable[[list[str]], list[list[int]]] = dataclasses.field(repr=False)
  _decode: Callable[[list[int]], str] = dataclasses.field(repr=False)

  def encode(self, text: str) -> list[int]:
    return self._encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._encode_batch(list(texts))

  def decode(self, ids: Sequence[int]) -> str:
    return self._decode([int(i) for i in ids])


def load_tokenizer(path: str) -> Tokenizer:
  """A `tokenizer.json` (Hugging Face tokenizers) or a sentencepiece `.model`; local or gs://."""
  if not epath.Path(path).is_file():
    raise ValueError(f"data.tokenizer = {path!r} is not a file; give a tokenizer.json or a "
                     f"sentencepiece .model, or '' to train a BPE on the training split")
  if path.endswith(".model"):
    return _load_sentencepiece(path)
  return _load_hf(path)


def train_bpe(texts: Iterable[str], vocab_size: int, path: str) -> Tokenizer:
  """Trains a byte-level BPE on `texts` (first TRAIN_SAMPLE_BYTES), saves it atomically to `path`."""
  if vocab_size < _BYTE_ALPHABET + 1:
    raise ValueError(f"vocab_size = {vocab_size} is below {_BYTE_ALPHABET + 1} (256 byte tokens + "
                     f"{EOS}); set model.vocab_size to {_BYTE_ALPHABET + 1} or more")
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  hf.train_from_iterator(_first_bytes(texts, TRAIN_SAMPLE_BYTES), trainer)
  atomic.write_bytes(path, hf.to_str(pretty=True).encode("utf-8"))
  return _load_hf(path)


def _first_bytes(texts: Iterable[str], n_bytes: int) -> Iterator[str]:
  """The texts up to and including the one that reaches n_bytes."""
  seen = 0
  for text in texts:
    if seen >= n_bytes:
      return
    yield text
    seen += len(text.encode("utf-8"))


def _load_hf(path: str) -> Tokenizer:
  try:
    hf = tokenizers.Tokenizer.from_str(epath.Path(path).read_text())
  except Exception as e:  # tokenizers raises a bare Exception for unreadable files
    raise ValueError(f"data.tokenizer = {path!r} is not a tokenizer.json that Hugging Face tokenizers "
                     f"can read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); give a "
                     f"tokenizer.json or a sentencepiece .model, or '' to train a BPE") from e
  vocab = hf.get_vocab(with_added_tokens=True)
  eos = next((name for name in _EOS_CANDIDATES if name in vocab), None)
  if eos is None:
    raise ValueError(f"tokenizer {path} has none of the end-of-text tokens {_EOS_CANDIDATES}; add "
                     f"one as a special token (documents are separated by it)")

  # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never use; both encode
  # the batch on every core (the library's own thread pool) with the GIL released.
  encode = getattr(hf, "encode_batch_fast", hf.encode_batch)

  def encode_batch(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in encode(texts, add_special_tokens=False)]

  def decode(ids: list[int]) -> str:
    return hf.decode(ids, skip_special_tokens=False)

  return Tokenizer(path=path, vocab_size=max(vocab.values()) + 1, eos_id=vocab[eos],
                   _encode_batch=encode_batch, _decode=decode)


def _load_sentencepiece(path: str) -> Tokenizer:
  try:
    import sentencepiece  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise MissingPackageError(f"data.tokenizer = {path!r} is a sentencepiece model, which needs "
                              f"the sentencepiece package; pip install 'moa_jax[data]' "
                              f"(or pip install sentencepiece)") from e
  try:
    sp = sentencepiece.SentencePieceProcessor(model_proto=epath.Path(path).read_bytes())
  except Exception as e:  # sentencepiece raises OSError or RuntimeError for unreadable models
    raise ValueError(f"data.tokenizer = {path!r} is not a sentencepiece model sentencepiece can "
                     f"read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); give a "
                     f"tokenizer.json or a sentencepiece .model, or '' to train a BPE") from e
  if sp.eos_id() < 0:
    raise ValueError(f"sentencepiece model {path} has no end-of-text piece (eos_id = -1); "
                     f"retrain it with --eos_id set (documents are separated by it)")
  return Tokenizer(path=path, vocab_size=sp.get_piece_size(), eos_id=sp.eos_id(),
                   _encode_batch=sp.encode, _decode=sp.decode)
