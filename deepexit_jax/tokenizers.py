"""Character-, byte- and byte-pair (BPE) tokenizers, serialisable to JSON next to a checkpoint."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from deepexit_jax.errors import UserError

# Shown for ids the vocabulary cannot map back to text (UNK), as UTF-8 decoding does.
REPLACEMENT_CHAR = "\ufffd"
TOKENIZER_KINDS = ("char", "byte", "bpe")
DEFAULT_BPE_VOCAB = 8192


class CharTokenizer:
  """Maps each character seen in training text to an id; id 0 is UNK.

  The vocabulary is the sorted set of characters of the training text, so the same
  text always gives the same ids. Characters not in it encode to 0 and decode to
  U+FFFD.
  """

  UNK_ID = 0

  def __init__(self, chars: str):
    """Builds a tokenizer from its vocabulary.

    Args:
      chars: the vocabulary; character `chars[i]` gets id `i + 1`. Must be unique.
    """
    if len(set(chars)) != len(chars):
      raise UserError("char tokenizer vocabulary has duplicate characters: rebuild it with "
                      "CharTokenizer.fit(text)")
    self._chars = chars
    # A sorted code-point table makes encode one vectorised searchsorted, no Python loop.
    codes = np.array([ord(c) for c in chars], dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    self._sorted_codes = codes[order]
    self._sorted_ids = (order + 1).astype(np.int32)
    # Code points by id; decoding goes through UTF-32 rather than a numpy str array, which
    # would silently drop NUL characters.
    self._id_to_code = np.array([ord(REPLACEMENT_CHAR), *codes.tolist()], dtype=np.uint32)

  @classmethod
  def fit(cls, text: str) -> CharTokenizer:
    """Returns the tokenizer whose vocabulary is the sorted unique characters of `text`.

    Args:
      text: training text.

    Returns:
      A `CharTokenizer` with vocab_size = number of unique characters + 1.
    """
    return cls("".join(sorted(set(text))))

  @property
  def vocab_size(self) -> int:
    return len(self._chars) + 1

  @property
  def chars(self) -> str:
    return self._chars

  def encode(self, text: str) -> np.ndarray:
    """Encodes text to int32 ids, one per character; unseen characters give 0 (UNK).

    Args:
      text: the text to encode.

    Returns:
      int32 array of shape [len(text)].
    """
    if not text:
      return np.zeros((0,), np.int32)
    # UTF-32 gives each character's code point in one vectorised step.
    codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"),
                          dtype=np.uint32).astype(np.int64)
    if self._sorted_codes.size == 0:
      return np.zeros(codes.shape, np.int32)
    pos = np.searchsorted(self._sorted_codes, codes)
    pos_c = np.minimum(pos, self._sorted_codes.size - 1)
    found = self._sorted_codes[pos_c] == codes
    return np.where(found, self._sorted_ids[pos_c], self.UNK_ID).astype(np.int32)

  def decode(self, ids) -> str:
    """Decodes ids to text; UNK (0) and out-of-range ids give U+FFFD.

    Args:
      ids: a sequence or 1-D array of integer ids.

    Returns:
      The decoded string.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = np.where((ids < 0) | (ids >= self.vocab_size), self.UNK_ID, ids)
    return self._id_to_code[ids].tobytes().decode("utf-32-le", errors="surrogatepass")

  def to_json(self) -> dict[str, Any]:
    """Returns a JSON-serialisable dict that `tokenizer_from_json` turns back into this."""
    return {"kind": "char", "chars": self._chars}

  def __eq__(self, other) -> bool:
    return isinstance(other, CharTokenizer) and other.chars == self.chars

  def __hash__(self) -> int:
    return hash(("char", self._chars))

  def __repr__(self) -> str:
    return f"CharTokenizer(vocab_size={self.vocab_size})"


class ByteTokenizer:
  """Maps text to its UTF-8 bytes (vocab 256); needs no fitting and has no UNK."""

  @classmethod
  def fit(cls, text: str) -> ByteTokenizer:
    """Returns a `ByteTokenizer`; `text` is ignored (the vocabulary is fixed).

    Args:
      text: training text (unused; kept so both tokenizers fit the same way).

    Returns:
      A `ByteTokenizer`.
    """
    del text
    return cls()

  @property
  def vocab_size(self) -> int:
    return 256

  def encode(self, text: str) -> np.ndarray:
    """Encodes text to int32 ids, one per UTF-8 byte.

    Args:
      text: the text to encode.

    Returns:
      int32 array of shape [len(text.encode("utf-8"))].
    """
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """Decodes byte ids to text; invalid UTF-8 (e.g. a cut multi-byte char) gives U+FFFD.

    Args:
      ids: a sequence or 1-D array of ids in [0, 256).

    Returns:
      The decoded string.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise ValueError(f"byte ids must lie in [0, 256), got range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def to_json(self) -> dict[str, Any]:
    """Returns a JSON-serialisable dict that `tokenizer_from_json` turns back into this."""
    return {"kind": "byte"}

  def __eq__(self, other) -> bool:
    return isinstance(other, ByteTokenizer)

  def __hash__(self) -> int:
    return hash("byte")

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=256)"


class BPETokenizer:
  """Byte-level byte-pair encoding (GPT-2 style) fitted on the training text.

  A large-vocabulary tokenizer (V in the thousands to tens of thousands) built on
  the Hugging Face `tokenizers` library: every UTF-8 byte is in the base
  alphabet, so any text encodes (no UNK) and `decode(encode(text)) == text`.
  """

  def __init__(self, hf_tokenizer: Any):
    self._tok = hf_tokenizer
    self._json = hf_tokenizer.to_str()

  @classmethod
  def fit(cls, text: str, vocab_size: int = DEFAULT_BPE_VOCAB) -> BPETokenizer:
    """Learns merges on `text` until the vocabulary has `vocab_size` ids (or no pair repeats).

    Args:
      text: training text.
      vocab_size: target vocabulary size, >= 256 (the byte alphabet).

    Returns:
      A `BPETokenizer`; deterministic for the same text and size.
    """
    import tokenizers as hf

    if vocab_size < 256:
      raise UserError(f"data.bpe_vocab_size={vocab_size} must be >= 256 (the byte alphabet)")
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False,
        initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return cls(tok)

  @classmethod
  def from_json_string(cls, s: str) -> BPETokenizer:
    import tokenizers as hf

    return cls(hf.Tokenizer.from_str(s))

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode(self, text: str) -> np.ndarray:
    """Encodes text to int32 ids."""
    return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

  def decode(self, ids) -> str:
    """Decodes ids to text (a cut multi-byte character gives U+FFFD)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"BPE ids must lie in [0, {self.vocab_size}), got range "
                       f"[{ids.min()}, {ids.max()}]")
    return self._tok.decode(ids.tolist(), skip_special_tokens=False)

  def to_json(self) -> dict[str, Any]:
    """Returns a JSON-serialisable dict that `tokenizer_from_json` turns back into this."""
    return {"kind": "bpe", "tokenizer": self._json}

  def __eq__(self, other) -> bool:
    return isinstance(other, BPETokenizer) and other._json == self._json

  def __hash__(self) -> int:
    return hash(("bpe", self._json))

  def __repr__(self) -> str:
    return f"BPETokenizer(vocab_size={self.vocab_size})"


Tokenizer = CharTokenizer | ByteTokenizer | BPETokenizer


def make_tokenizer(kind: str, train_text: str, bpe_vocab_size: int = DEFAULT_BPE_VOCAB
                   ) -> Tokenizer:
  """Fits a tokenizer of the given kind on the training text.

  Args:
    kind: "char", "byte" or "bpe".
    train_text: the training text (the char and BPE vocabularies come from it).
    bpe_vocab_size: vocabulary size of a "bpe" tokenizer.

  Returns:
    The fitted tokenizer.
  """
  if kind == "char":
    return CharTokenizer.fit(train_text)
  if kind == "byte":
    return ByteTokenizer()
  if kind == "bpe":
    return BPETokenizer.fit(train_text, bpe_vocab_size)
  raise UserError(f"unknown tokenizer {kind!r}: pass --config.data.tokenizer=char, byte or bpe")


def tokenizer_from_json(d: dict[str, Any]) -> Tokenizer:
  """Rebuilds a tokenizer from the dict that its `to_json()` returned.

  Args:
    d: the dict.

  Returns:
    The tokenizer.
  """
  kind = d.get("kind") if isinstance(d, dict) else None
  if kind == "char" and isinstance(d.get("chars"), str):
    return CharTokenizer(d["chars"])
  if kind == "byte":
    return ByteTokenizer()
  if kind == "bpe" and isinstance(d.get("tokenizer"), str):
    try:
      return BPETokenizer.from_json_string(d["tokenizer"])
    except Exception as e:  # The library raises its own exception type for bad JSON.
      raise UserError(f"bad BPE tokenizer JSON ({str(e)[:80]}): re-save the tokenizer") from None
  raise UserError(f"bad tokenizer JSON {str(d)[:80]!r}: expected {{'kind': 'char', 'chars': ...}}, "
                  "{'kind': 'byte'} or {'kind': 'bpe', 'tokenizer': ...}; re-save the tokenizer")


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
  """Writes the tokenizer as JSON.

  Args:
    tok: the tokenizer.
    path: the file to write (parent directory must exist).
  """
  with open(path, "w", encoding="utf-8") as f:
    # ensure_ascii keeps the file readable whatever the vocabulary (lone surrogates, controls).
    json.dump(tok.to_json(), f, ensure_ascii=True)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """Reads a tokenizer written by `save_tokenizer`.

  Args:
    path: the JSON file.

  Returns:
    The tokenizer.
  """
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except FileNotFoundError:
    raise UserError(f"tokenizer file {path} not found: point to the checkpoint directory "
                    "that holds it") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"tokenizer file {path} is not valid JSON ({e}): "
                    "re-save the tokenizer") from None
  return tokenizer_from_json(d)
