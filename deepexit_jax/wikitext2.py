"""WikiText-2 (raw) as a TFDS dataset: one example per line, read back without TensorFlow."""

from __future__ import annotations

import hashlib
import os

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from deepexit_jax.errors import UserError

URL = "https://wikitext.smerity.com/wikitext-2-raw-v1.zip"
# The official archive unpacks into this folder (without the "-v1").
ARCHIVE_SUBDIR = "wikitext-2-raw"
# Folder under DEEPEXIT_DATA_DIR that holds the raw files.
RAW_SUBDIR = "wikitext-2-raw-v1"
DATA_DIR_ENV = "DEEPEXIT_DATA_DIR"
# Split -> raw file. `train_prefix` (a reconstruction of the start of train, see
# /work/shared/data/README.md) is only built when its file is in the local directory.
SPLIT_FILES = {
    "train": "wiki.train.raw",
    "validation": "wiki.valid.raw",
    "test": "wiki.test.raw",
    "train_prefix": "wiki.train.raw.prefix",
}

_CITATION = """\
@article{merity2016pointer,
  title={Pointer Sentinel Mixture Models},
  author={Merity, Stephen and Xiong, Caiming and Bradbury, James and Socher, Richard},
  journal={arXiv preprint arXiv:1609.07843},
  year={2016}
}"""


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _decode_line(line: bytes, path: os.PathLike | str, offset: int) -> str:
  try:
    return line.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"{path} is not valid UTF-8 at byte offset {offset + e.start}: "
                    "re-encode it as UTF-8") from None


class Wikitext2Raw(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """WikiText-2 raw, one example `{"text": line}` per line, trailing newline kept.

  Rows keep file order (integer keys, shuffling disabled), so joining the `text` of all
  rows of a split gives back its raw file byte for byte. The builder records each
  source file's SHA-256 in `info.metadata["sha256"]` so readers can check that.

  Offline use: put the raw files in a directory and pass it as `manual_dir`:

    builder = Wikitext2Raw(data_dir=tfds_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=raw_dir))

  Splits whose file is not there are left out. Without any of the files in manual_dir,
  the official archive is downloaded.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "One example per line of the raw files, in file order."}
  # Setting this is what lets `dl_manager.manual_dir` be read; manual files are optional.
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Optional. To build without network access, put wiki.train.raw, wiki.valid.raw,
  wiki.test.raw (and optionally wiki.train.raw.prefix) in manual_dir. Splits whose
  file is missing are left out.
  """
  # TFDS 4.9.10 computes this through `importlib_resources`, a package it does not
  # depend on, and fails without it; only the (absent) checksums file is looked up here.
  code_path = epath.Path(__file__)

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    # array_record, not TFDS's default tfrecord: it supports `as_data_source()`, which
    # reads without TensorFlow.
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly, not via `dataset_info_from_configs`, which wants metadata files
    # (README, citations) next to the module.
    return tfds.core.DatasetInfo(
        builder=self,
        description="WikiText-2 raw (character-level, untokenized), one line per example.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        homepage="https://blog.salesforceairesearch.com/"
        "the-wikitext-long-term-dependency-language-modeling-dataset/",
        citation=_CITATION,
        # Row order is the text order; TFDS would otherwise shuffle rows by key hash.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    raw_dir = _manual_raw_dir(dl_manager)
    if raw_dir is None:
      raw_dir = epath.Path(dl_manager.download_and_extract(URL)) / ARCHIVE_SUBDIR
    paths = {split: raw_dir / name for split, name in SPLIT_FILES.items()
             if (raw_dir / name).exists()}
    if not paths:
      raise UserError(f"no WikiText-2 raw files in {raw_dir}: it must hold "
                      f"{', '.join(SPLIT_FILES.values())}")
    self.info.metadata.clear()
    self.info.metadata.update({
        "source": os.fspath(raw_dir),
        "sha256": {split: _sha256(path.read_bytes()) for split, path in paths.items()},
    })
    return {split: self._generate_examples(path) for split, path in paths.items()}

  def _generate_examples(self, path: epath.Path):
    offset = 0
    with path.open("rb") as f:
      # Iterating a binary file splits after each b"\n" only, keeping it: rows join back
      # to the exact bytes (CR or a missing final newline included).
      for i, line in enumerate(f):
        yield i, {"text": _decode_line(line, path, offset)}
        offset += len(line)


def _manual_raw_dir(dl_manager: tfds.download.DownloadManager) -> epath.Path | None:
  """Returns the manual dir if it holds any WikiText-2 raw file, else None."""
  try:
    manual_dir = dl_manager.manual_dir
  except AssertionError:  # TFDS's way of saying the manual dir is missing or empty.
    return None
  if any((manual_dir / name).exists() for name in SPLIT_FILES.values()):
    return manual_dir
  return None


def default_raw_dir() -> str | None:
  """Returns $DEEPEXIT_DATA_DIR/wikitext-2-raw-v1, or None when the variable is unset."""
  root = os.environ.get(DATA_DIR_ENV)
  return os.path.join(os.path.expanduser(root), RAW_SUBDIR) if root else None


def default_tfds_dir() -> str:
  """Returns $TFDS_DATA_DIR, or ~/tensorflow_datasets when it is unset."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _missing_split_message(split: str, where: str) -> str:
  if split in ("train", "train_prefix"):
    fix = ("train on another split, e.g. --config.data.train_split=train_prefix (the first "
           "~659 KB of train) or --config.data.train_split=validation with "
           "--config.data.val_split=test")
  else:
    fix = "pick another split with --config.data.val_split=validation or test"
  return f"WikiText-2 split {split!r} is not available: {where}; {fix}, or add the file"


def load_wikitext2_split(split: str, *, raw_dir: str | os.PathLike | None = None,
                         tfds_dir: str | os.PathLike | None = None) -> str:
  """Returns the full text of one WikiText-2 raw split, building the TFDS dataset if needed.

  The text is read back through TFDS (`as_data_source`, no TensorFlow) and checked
  against the SHA-256 of the raw file recorded at build time. A dataset that was built
  from a raw file with different content (or without this split) is rebuilt.

  Args:
    split: "train", "validation", "test" or "train_prefix".
    raw_dir: local directory holding wiki.{train,valid,test}.raw (and optionally
      wiki.train.raw.prefix); nothing is downloaded then. None: $DEEPEXIT_DATA_DIR/
      wikitext-2-raw-v1 if that variable is set, else the official archive is downloaded.
    tfds_dir: where the TFDS dataset is built and cached; None: $TFDS_DATA_DIR or
      ~/tensorflow_datasets.

  Returns:
    The split's text, identical to its raw file.
  """
  if split not in SPLIT_FILES:
    raise UserError(f"unknown WikiText-2 split {split!r}: use one of {', '.join(SPLIT_FILES)}")
  raw_dir = os.fspath(os.path.expanduser(raw_dir)) if raw_dir is not None else default_raw_dir()
  tfds_dir = os.fspath(os.path.expanduser(tfds_dir)) if tfds_dir is not None else default_tfds_dir()

  want_sha = None
  if raw_dir is not None:
    if not os.path.isdir(raw_dir):
      raise UserError(f"WikiText-2 directory {raw_dir} not found: pass "
                      f"--config.data.data_dir=DIR holding "
                      f"{RAW_SUBDIR}/wiki.{{train,valid,test}}.raw "
                      f"or set {DATA_DIR_ENV}")
    path = os.path.join(raw_dir, SPLIT_FILES[split])
    if not os.path.isfile(path):
      raise UserError(_missing_split_message(split, f"{path} is missing"))
    with open(path, "rb") as f:
      want_sha = _sha256(f.read())

  builder = Wikitext2Raw(data_dir=tfds_dir)
  prepared = builder.is_prepared()
  built_sha = builder.info.metadata.get("sha256", {}).get(split) if prepared else None
  if not prepared or (want_sha is not None and built_sha != want_sha):
    if prepared:
      logging.info("Rebuilding %s: split %r changed in %s", builder.data_dir, split, raw_dir)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if prepared
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=raw_dir, download_mode=mode))
    # A fresh builder reads the info (splits, digests) just written to disk.
    builder = Wikitext2Raw(data_dir=tfds_dir)

  if split not in builder.info.splits:
    source = builder.info.metadata.get("source", "its source")
    raise UserError(_missing_split_message(
        split, f"the TFDS dataset at {builder.data_dir} was built from {source}, which has no "
        f"{SPLIT_FILES[split]}"))
  source = builder.as_data_source(split=split)
  # One batched read of all rows (the data-source API PyGrain uses), not one per row.
  rows = source.__getitems__(range(len(source)))
  data = b"".join(r["text"] if isinstance(r["text"], bytes) else r["text"].encode("utf-8")
                  for r in rows)
  built_sha = builder.info.metadata.get("sha256", {}).get(split)
  if built_sha is not None and _sha256(data) != built_sha:
    raise RuntimeError(f"WikiText-2 split {split!r} read from {builder.data_dir} does not "
                       "match its raw file; delete that directory to rebuild it")
  return data.decode("utf-8")
