"""Input pipeline: corpora, tokenization, training batches, eval windows, checkpoints' eval text.

Shapes: NB eval batches, B batch, S sequence length (seq_len), W = S + 1 window length,
L tokens in a split.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from deepexit_jax import tokenizers, validation
from deepexit_jax.errors import UserError

DATASETS = ("embedded", "wikitext2", "text_files", "tiny_shakespeare")
DATA_DIR_ENV = "DEEPEXIT_DATA_DIR"
WIKITEXT2_SUBDIR = "wikitext-2-raw-v1"
TINY_SHAKESPEARE_FILE = os.path.join("tiny_shakespeare", "input.txt")
# Mirrors wikitext2.SPLIT_FILES, kept here so validating a config does not import TFDS.
WIKITEXT2_SPLITS = ("train", "validation", "test", "train_prefix")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What text to train and evaluate on, and how to cut it into batches.

  Attributes:
    dataset: "embedded" (Python's bundled reference docs; no download), "wikitext2",
      "text_files" or "tiny_shakespeare".
    data_dir: root holding wikitext-2-raw-v1/ and tiny_shakespeare/; None: $DEEPEXIT_DATA_DIR
      (for wikitext2, unset means the official archive is downloaded).
    tfds_dir: where the WikiText-2 TFDS dataset is built; None: $TFDS_DATA_DIR or
      ~/tensorflow_datasets.
    train_split: WikiText-2 split to train on (train, validation, test, train_prefix).
    val_split: WikiText-2 split to evaluate on.
    train_file: UTF-8 text file to train on (text_files only).
    val_file: UTF-8 text file to evaluate on (text_files only); None: the end of train_file.
    split_fraction: for a single text (embedded, tiny_shakespeare, text_files without
      val_file), the leading fraction used for training; the rest is validation.
    train_chars: keep only the first this many characters of the training text; None: all.
    val_chars: keep only the first this many characters of the validation text; None: all.
    tokenizer: "char" (fitted on the training text), "byte" (UTF-8 bytes) or "bpe"
      (byte-level BPE fitted on the training text; large vocabularies).
    bpe_vocab_size: vocabulary size of the "bpe" tokenizer.
    seq_len: tokens per training/eval sequence (S).
    batch_size: sequences per batch (B).
  """

  dataset: str = "embedded"
  data_dir: str | None = None
  tfds_dir: str | None = None
  train_split: str = "train"
  val_split: str = "validation"
  train_file: str | None = None
  val_file: str | None = None
  split_fraction: float = 0.9
  train_chars: int | None = 500_000
  val_chars: int | None = 50_000
  tokenizer: str = "char"
  bpe_vocab_size: int = tokenizers.DEFAULT_BPE_VOCAB
  seq_len: int = 128
  batch_size: int = 32

  def __post_init__(self):
    validation.check_choice("data.dataset", self.dataset, DATASETS)
    validation.check_choice("data.tokenizer", self.tokenizer, tokenizers.TOKENIZER_KINDS)
    for name in ("seq_len", "batch_size", "bpe_vocab_size"):
      validation.check_int(f"data.{name}", getattr(self, name), 1)
    for name in ("train_chars", "val_chars"):
      validation.check_int(f"data.{name}", getattr(self, name), 1,
                           none_means="for the whole split")
    fraction = self.split_fraction
    validation.require(validation.is_number(fraction) and 0.0 < fraction < 1.0,
                       "data.split_fraction", fraction, "lie in (0, 1), exclusive")
    for name in ("data_dir", "tfds_dir", "train_file", "val_file"):
      value = getattr(self, name)
      validation.require(value is None or (isinstance(value, str) and bool(value)),
                         f"data.{name}", value, "be a non-empty path or None")

    if self.dataset == "text_files":
      if self.train_file is None:
        raise UserError("data.train_file is required for data.dataset=text_files: pass "
                        "--config.data.train_file=PATH (and optionally --config.data.val_file)")
    elif self.train_file is not None or self.val_file is not None:
      # Refuse rather than silently ignore: the user clearly meant to train on that file.
      raise UserError(f"data.train_file/val_file are only used with data.dataset=text_files, not "
                      f"{self.dataset!r}: pass --config.data.dataset=text_files or drop them")

    if self.dataset == "wikitext2":
      for name in ("train_split", "val_split"):
        value = getattr(self, name)
        if value not in WIKITEXT2_SPLITS:
          raise UserError(f"data.{name}={value!r} is not a WikiText-2 split: use one of "
                          f"{', '.join(WIKITEXT2_SPLITS)}")
      overlapping = (self.train_split == self.val_split
                     or {self.train_split, self.val_split} <= {"train", "train_prefix"})
      if overlapping:
        # Validating on training text would report a meaningless perplexity.
        raise UserError(f"data.val_split={self.val_split!r} overlaps data.train_split="
                        f"{self.train_split!r}: evaluate on held-out text, e.g. "
                        "--config.data.val_split=validation or test")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
    """Builds a validated config from a dict (or ml_collections ConfigDict).

    Args:
      d: field name -> value; every key must be a field.

    Returns:
      The config.
    """
    if hasattr(d, "to_dict"):
      d = d.to_dict()
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(fields))
    if unknown:
      raise UserError(f"unknown data config key(s) {', '.join(unknown)}: valid keys are "
                      f"{', '.join(fields)}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Training and validation text, and a one-line description of where they came from."""

  train_text: str
  val_text: str
  description: str


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A tokenized corpus: the tokenizer and the int32 token ids [L] of each split."""

  tokenizer: tokenizers.Tokenizer
  train_tokens: np.ndarray
  val_tokens: np.ndarray
  corpus: Corpus

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size


def read_text_file(path: str | os.PathLike, fix: str) -> str:
  """Reads a file as strict UTF-8.

  Args:
    path: the file.
    fix: how the user can point to the right file, appended to a "not found" message.

  Returns:
    The file's text, unchanged (no newline translation).
  """
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except (FileNotFoundError, NotADirectoryError):
    raise UserError(f"data file {path} not found: {fix}") from None
  except IsADirectoryError:
    raise UserError(f"data file {path} is a directory, not a text file: {fix}") from None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"data file {path} is not valid UTF-8 at byte offset {e.start}: re-encode "
                    "it as UTF-8 (e.g. iconv -t UTF-8)") from None


def _data_root(cfg: DataConfig) -> str | None:
  root = cfg.data_dir or os.environ.get(DATA_DIR_ENV)
  return os.path.expanduser(root) if root else None


def _require_data_root(cfg: DataConfig, holding: str) -> str:
  root = _data_root(cfg)
  if root is None:
    raise UserError(f"data.dataset={cfg.dataset} needs local files: pass "
                    f"--config.data.data_dir=DIR holding {holding} or set {DATA_DIR_ENV}")
  if not os.path.isdir(root):
    raise UserError(f"data directory {root} not found: pass --config.data.data_dir=DIR holding "
                    f"{holding} or set {DATA_DIR_ENV}")
  return root


def _split_by_fraction(text: str, fraction: float) -> tuple[str, str]:
  n = int(len(text) * fraction)
  return text[:n], text[n:]


def _embedded_text() -> str:
  # Python's own reference docs: real English prose, always installed, no download.
  from pydoc_data import topics

  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _num_tokens(text: str, kind: str) -> int:
  # BPE: the byte count bounds the token count; `prepare_dataset` checks the real one.
  return len(text.encode("utf-8")) if kind in ("byte", "bpe") else len(text)


def _check_long_enough(name: str, num_chars: int, num_tokens: int, cfg: DataConfig) -> None:
  need = cfg.seq_len + 1
  if num_tokens < need:
    limit = "train_chars" if name == "training" else "val_chars"
    raise UserError(f"{name} text has {num_chars} characters ({num_tokens} tokens) but "
                    f"seq_len={cfg.seq_len} needs at least {need} tokens: lower "
                    f"--config.data.seq_len, raise --config.data.{limit}, or use a longer corpus")


def load_corpus(cfg: DataConfig) -> Corpus:
  """Loads the training and validation text that `cfg` names.

  Args:
    cfg: the data config.

  Returns:
    The corpus, each split truncated to its first train_chars / val_chars characters.
  """
  if cfg.dataset == "embedded":
    text = _embedded_text()
    train, val = _split_by_fraction(text, cfg.split_fraction)
    source = f"Python {'.'.join(map(str, sys.version_info[:3]))} pydoc_data topics"
    source += f" ({len(text):,} chars, first {cfg.split_fraction:g} train)"
    empty_fix = "this Python has no bundled pydoc topics; use another data.dataset"
  elif cfg.dataset == "tiny_shakespeare":
    root = _require_data_root(cfg, TINY_SHAKESPEARE_FILE)
    path = os.path.join(root, TINY_SHAKESPEARE_FILE)
    text = read_text_file(path, f"pass --config.data.data_dir=DIR holding {TINY_SHAKESPEARE_FILE} "
                          f"or set {DATA_DIR_ENV}")
    train, val = _split_by_fraction(text, cfg.split_fraction)
    source = f"tiny_shakespeare {path} ({len(text):,} chars, first {cfg.split_fraction:g} train)"
    empty_fix = f"replace {path} with the real file"
  elif cfg.dataset == "text_files":
    fix = "pass --config.data.train_file/val_file=PATH to an existing UTF-8 text file"
    train_path = os.path.expanduser(cfg.train_file)
    text = read_text_file(train_path, fix)
    if cfg.val_file is None:
      train, val = _split_by_fraction(text, cfg.split_fraction)
      source = f"text file {train_path} ({len(text):,} chars, first {cfg.split_fraction:g} train)"
    else:
      val_path = os.path.expanduser(cfg.val_file)
      train, val = text, read_text_file(val_path, fix)
      if not val:
        raise UserError(f"data file {val_path} is empty: pass a --config.data.val_file with text")
      source = f"text files {train_path} (train), {val_path} (validation)"
    empty_fix = f"pass a --config.data.train_file with text instead of {train_path}"
  else:
    # Imported here: it imports TFDS, which the other datasets do not need.
    from deepexit_jax import wikitext2

    root = _data_root(cfg)
    raw_dir = os.path.join(root, WIKITEXT2_SUBDIR) if root else None
    if root is not None and not os.path.isdir(root):
      raise UserError(f"data directory {root} not found: pass --config.data.data_dir=DIR holding "
                      f"{WIKITEXT2_SUBDIR}/ or set {DATA_DIR_ENV}")
    train = wikitext2.load_wikitext2_split(cfg.train_split, raw_dir=raw_dir, tfds_dir=cfg.tfds_dir)
    val = wikitext2.load_wikitext2_split(cfg.val_split, raw_dir=raw_dir, tfds_dir=cfg.tfds_dir)
    text = train + val
    where = raw_dir if raw_dir else wikitext2.URL
    source = f"wikitext2 {cfg.train_split} (train), {cfg.val_split} (validation) from {where}"
    empty_fix = "restore the WikiText-2 files"

  if not text:
    raise UserError(f"corpus is empty ({source}): {empty_fix}")
  train = train[:cfg.train_chars]
  val = val[:cfg.val_chars]
  _check_long_enough("training", len(train), _num_tokens(train, cfg.tokenizer), cfg)
  _check_long_enough("validation", len(val), _num_tokens(val, cfg.tokenizer), cfg)
  description = f"{source}; using {len(train):,} train / {len(val):,} validation chars"
  return Corpus(train_text=train, val_text=val, description=description)


def prepare_dataset(cfg: DataConfig, tokenizer: tokenizers.Tokenizer | None = None) -> Dataset:
  """Loads the corpus and tokenizes both splits.

  Args:
    cfg: the data config.
    tokenizer: the tokenizer to use (e.g. a checkpoint's, so ids match the trained model);
      None: fit a `cfg.tokenizer` tokenizer on the training text.

  Returns:
    The tokenized dataset.
  """
  corpus = load_corpus(cfg)
  if tokenizer is None:
    tokenizer = tokenizers.make_tokenizer(cfg.tokenizer, corpus.train_text, cfg.bpe_vocab_size)
  train_tokens = tokenizer.encode(corpus.train_text)
  val_tokens = tokenizer.encode(corpus.val_text)
  _check_long_enough("training", len(corpus.train_text), len(train_tokens), cfg)
  _check_long_enough("validation", len(corpus.val_text), len(val_tokens), cfg)
  return Dataset(tokenizer=tokenizer, train_tokens=train_tokens, val_tokens=val_tokens,
                 corpus=corpus)


class TrainBatches:
  """Training batches as a pure function of (seed, step), so a resumed run sees the same data.

  Each epoch cuts the tokens into non-overlapping windows of S + 1 tokens, starting at a
  seeded random offset in [0, S), and visits them in a seeded random order; a window gives
  inputs = window[:-1] and targets = window[1:]. Every epoch has the same number of
  windows (the count for the worst offset, S - 1), and the last partial batch is dropped.
  """

  def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
    """Sets up the batches.

    Args:
      tokens: int token ids [L] of the training text.
      seq_len: S, tokens per sequence.
      batch_size: B, sequences per batch.
      seed: data-order seed.
    """
    self._tokens = np.asarray(tokens, dtype=np.int32)
    self.seq_len = int(seq_len)
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    length = self._tokens.shape[0]
    self.windows_per_epoch = max(0, (length - (self.seq_len - 1)) // (self.seq_len + 1))
    self._steps_per_epoch = self.windows_per_epoch // self.batch_size
    if self._steps_per_epoch == 0:
      raise UserError(f"training text has {length} tokens, which give {self.windows_per_epoch} "
                      f"windows of seq_len+1={self.seq_len + 1} per epoch, fewer than "
                      f"batch_size={self.batch_size}: need at least "
                      f"{self.batch_size * (self.seq_len + 1) + self.seq_len - 1} tokens; lower "
                      "--config.data.batch_size/seq_len or raise --config.data.train_chars")
    self._window_offsets = np.arange(self.seq_len + 1)
    self._epoch_cache: tuple[int, int, np.ndarray] | None = None

  @property
  def steps_per_epoch(self) -> int:
    return self._steps_per_epoch

  def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
    if self._epoch_cache is None or self._epoch_cache[0] != epoch:
      # Seeding by (seed, epoch) rather than carrying RNG state makes any step reachable
      # directly, which is what makes resuming exact.
      rng = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, epoch])
      offset = int(rng.integers(0, self.seq_len))
      perm = rng.permutation(self.windows_per_epoch)
      self._epoch_cache = (epoch, offset, perm)
    return self._epoch_cache[1], self._epoch_cache[2]

  def window_starts(self, step: int) -> np.ndarray:
    """Returns where the windows of a step's batch start.

    Args:
      step: the global training step (>= 0).

    Returns:
      int array [B] of token indices.
    """
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}")
    epoch, i = divmod(int(step), self._steps_per_epoch)
    offset, perm = self._epoch_order(epoch)
    windows = perm[i * self.batch_size:(i + 1) * self.batch_size]
    return offset + windows * (self.seq_len + 1)

  def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns the batch for a training step.

    Args:
      step: the global training step (>= 0); epochs follow one another.

    Returns:
      (inputs, targets), both int32 [B, S]; targets are inputs shifted left by one token.
    """
    starts_B = self.window_starts(step)
    rows_BW = self._tokens[starts_B[:, None] + self._window_offsets[None, :]]
    return rows_BW[:, :-1], rows_BW[:, 1:]

  def iterate(self, start_step: int = 0,
              num_steps: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields the batches of steps start_step, start_step + 1, ...

    Args:
      start_step: first step (e.g. the step a checkpoint was saved at).
      num_steps: how many batches; None: without end.

    Yields:
      (inputs, targets) pairs as from `batch`.
    """
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield self.batch(step)
      step += 1


@dataclasses.dataclass(frozen=True)
class EvalBatches:
  """Evaluation windows covering every target position of a text exactly once.

  Attributes:
    inputs: int32 [NB, B, S].
    targets: int32 [NB, B, S], inputs shifted by one token.
    mask: float32 [NB, B, S], 1 on real targets, 0 on padding; sums to L - 1.
  """

  inputs: np.ndarray
  targets: np.ndarray
  mask: np.ndarray

  @property
  def num_batches(self) -> int:
    return self.inputs.shape[0]

  @property
  def num_targets(self) -> int:
    return int(self.mask.sum())


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int) -> EvalBatches:
  """Cuts a text into fixed-shape, non-overlapping eval windows with a padding mask.

  Consecutive windows continue each other (window w has inputs tokens[wS : wS + S]), so
  each target position 1..L-1 appears exactly once and a masked mean of the per-token loss
  is the true per-token loss of the text. Context restarts at each window boundary.

  Args:
    tokens: int token ids [L], L >= 2.
    seq_len: S.
    batch_size: B.

  Returns:
    The batches; all have shape [B, S], so evaluation compiles once.
  """
  tokens = np.asarray(tokens, dtype=np.int32)
  num_targets = tokens.shape[0] - 1
  if num_targets < 1:
    raise UserError(f"eval text has {tokens.shape[0]} tokens but needs at least 2")
  num_windows = math.ceil(num_targets / seq_len)
  num_batches = math.ceil(num_windows / batch_size)
  total = num_batches * batch_size * seq_len
  padded = np.zeros((total + 1,), np.int32)
  padded[:tokens.shape[0]] = tokens
  shape = (num_batches, batch_size, seq_len)
  inputs_NBS = padded[:-1].reshape(shape)
  targets_NBS = padded[1:].reshape(shape)
  mask_NBS = (np.arange(total) < num_targets).astype(np.float32).reshape(shape)
  return EvalBatches(inputs=inputs_NBS, targets=targets_NBS, mask=mask_NBS)


# ----------------------------------------------------------------------------------------
# A checkpoint's evaluation text (what sweeps, calibration and probe studies read).

# Window length for a checkpoint without a training run (an imported model), capped by
# the model's max_len.
DEFAULT_EVAL_SEQ_LEN = 512
DEFAULT_EVAL_BATCH_SIZE = 8
EVAL_PARTS = ("validation", "after_validation")


@dataclasses.dataclass(frozen=True)
class EvalText:
  """A checkpoint's evaluation text, tokenized and cut into windows.

  Attributes:
    batches: the windows (`eval_batches`).
    description: where the text came from, one line (which characters of which file).
    seq_len, batch_size: the window length S and batch size B used.
    skip_chars: characters skipped at the start of the text (probe studies).
  """

  batches: EvalBatches
  description: str
  seq_len: int
  batch_size: int
  skip_chars: int = 0


def evaluation_text(ckpt: Any, *, part: str = "validation", text_file: str | None = None,
                    skip_chars: int | None = None, seq_len: int | None = None,
                    batch_size: int | None = None, data_dir: str | None = None) -> EvalText:
  """The text a checkpoint is evaluated on, tokenized with its tokenizer, in windows.

  From the run's configured validation split (`ckpt.experiment["data"]`):
    part="validation": its first data.val_chars characters (what chose the checkpoint;
      what `deepexit-sweep` and calibration evaluate);
    part="after_validation": the characters after the first `skip_chars` (default
      data.val_chars, 0 if the run used the whole split): the probe study's text, so a
      probe fitted on it and then swept is scored on text it never saw.
  From `text_file` (any checkpoint, and the only source for one without a training run,
  e.g. an imported Hugging Face model): the whole UTF-8 file after its first `skip_chars`
  (default 0) characters, whatever `part` says.

  Args:
    ckpt: a loaded `checkpoint.Checkpoint` (model, tokenizer, experiment).
    part: "validation" or "after_validation" (see above).
    text_file: a UTF-8 text file to evaluate on instead of the run's validation split.
    skip_chars: see above.
    seq_len: window length; None: the run's data.seq_len, or for a checkpoint without a
      run min(`DEFAULT_EVAL_SEQ_LEN`, the model's max_len).
    batch_size: windows per batch; None: the run's data.batch_size, or
      `DEFAULT_EVAL_BATCH_SIZE`.
    data_dir: overrides the run's data.data_dir.

  Raises:
    UserError: no tokenizer; no training run and no `text_file`; too short a text; bad
      sizes.
  """
  validation.check_choice("part", part, EVAL_PARTS)
  run_data = dict(ckpt.experiment["data"]) if ckpt.experiment is not None else None
  if ckpt.tokenizer is None:
    raise UserError(f"{ckpt.path} has no tokenizer.json: evaluate the --workdir of a "
                    "deepexit-train run or a Hugging Face directory with its tokenizer.json")
  if run_data is None and text_file is None:
    raise UserError(f"{ckpt.path} has no training run (no validation text in a config.json): "
                    "pass --text_file=PATH, a UTF-8 text file to evaluate on")
  if seq_len is None:
    seq_len = (run_data["seq_len"] if run_data is not None
               else min(DEFAULT_EVAL_SEQ_LEN, ckpt.model.config.max_len))
  if batch_size is None:
    batch_size = run_data["batch_size"] if run_data is not None else DEFAULT_EVAL_BATCH_SIZE
  validation.check_int("seq_len", seq_len, 1)
  validation.check_int("batch_size", batch_size, 1)
  if seq_len > ckpt.model.config.max_len:
    raise UserError(f"seq_len={seq_len} exceeds the model's max_len="
                    f"{ckpt.model.config.max_len}: pass a smaller --seq_len")
  if skip_chars is not None:
    validation.check_int("skip_chars", skip_chars, 0)
  if text_file is not None:
    path = os.path.expanduser(text_file)
    full = read_text_file(path, "pass --text_file=PATH to an existing UTF-8 text file")
    skip = skip_chars or 0
    text = full[skip:]
    description = f"text file {path}, characters {skip:,}..{len(full):,}"
  else:
    if data_dir:
      run_data["data_dir"] = data_dir
    if part == "validation":
      # The first data.val_chars characters, exactly what training evaluated.
      corpus = load_corpus(DataConfig.from_dict(run_data))
      skip, text, description = 0, corpus.val_text, corpus.description
    else:
      skip = (run_data.get("val_chars") or 0) if skip_chars is None else skip_chars
      corpus = load_corpus(DataConfig.from_dict({**run_data, "val_chars": None}))
      text = corpus.val_text[skip:]
      description = (f"{corpus.description}; validation characters {skip:,}.."
                     f"{len(corpus.val_text):,}")
  tokens = ckpt.tokenizer.encode(text)
  if len(tokens) < 2:
    raise UserError(f"the evaluation text ({description}) has {len(tokens)} token(s), "
                    "fewer than 2: pass a longer text or a smaller --skip_chars")
  return EvalText(batches=eval_batches(tokens, seq_len, batch_size), description=description,
                  seq_len=int(seq_len), batch_size=int(batch_size), skip_chars=skip)
