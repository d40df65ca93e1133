"""Tests for the input pipeline: tokenizers, corpora (WikiText-2 via TFDS), batches."""

import dataclasses
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from deepexit_jax import data, tokenizers, wikitext2
from deepexit_jax.errors import UserError

# Read at import: the autouse fixture below hides the variable from every test.
_REAL_DATA_DIR = os.environ.get("DEEPEXIT_DATA_DIR")

# Fake WikiText-2 files in the real layout: blank lines are " \n", non-ASCII text, a
# stray CR inside a line and (test split) no final newline, all of which must survive.
_ARTICLE = (" \n = {title} = \n \n The {title} is a réservoir of text , with 1 @,@ 000 "
            "entries — “quoted” and ünïcödé ✓ . \n \n = = Section = = \n \n"
            " Line with a carriage\r return inside . \n")


def _fake_wiki(n_articles: int, title: str) -> str:
  return "".join(_ARTICLE.format(title=f"{title} {i}") for i in range(n_articles))


@pytest.fixture
def wiki_root(tmp_path):
  """A data root holding wikitext-2-raw-v1/ with small train, valid and test files."""
  raw = tmp_path / "data" / "wikitext-2-raw-v1"
  raw.mkdir(parents=True)
  (raw / "wiki.train.raw").write_bytes(_fake_wiki(30, "Train").encode())
  (raw / "wiki.valid.raw").write_bytes(_fake_wiki(8, "Valid").encode())
  (raw / "wiki.test.raw").write_bytes(_fake_wiki(8, "Test").encode()[:-1])
  return tmp_path / "data"


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch, tmp_path):
  # Tests pass every directory explicitly; never fall back to CI data or ~/tensorflow_datasets.
  monkeypatch.delenv("DEEPEXIT_DATA_DIR", raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_env"))


# Tokenizers.


@pytest.mark.parametrize("text", ["hello world\n", "ünïcödé ✓ “q” \x00 tab\t", "a"])
def test_char_tokenizer_round_trip(text):
  tok = tokenizers.CharTokenizer.fit(text)
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.shape == (len(text),)
  assert tok.vocab_size == len(set(text)) + 1
  assert ids.min() >= 1 and ids.max() < tok.vocab_size
  assert tok.decode(ids) == text


def test_char_tokenizer_vocab_is_sorted_and_unk():
  tok = tokenizers.CharTokenizer.fit("cabbage")
  np.testing.assert_array_equal(tok.encode("abceg"), [1, 2, 3, 4, 5])
  ids = tok.encode("abz€")
  np.testing.assert_array_equal(ids, [1, 2, 0, 0])
  assert tok.decode(ids) == "ab\ufffd\ufffd"
  assert tok.encode("").shape == (0,)


@pytest.mark.parametrize("text", ["plain ascii", "ünïcödé ✓ 😀 “q”", ""])
def test_byte_tokenizer_round_trip(text):
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(text)
  assert tok.vocab_size == 256
  assert ids.dtype == np.int32 and ids.shape == (len(text.encode("utf-8")),)
  assert tok.decode(ids) == text


def test_byte_tokenizer_decodes_cut_character_as_replacement():
  tok = tokenizers.ByteTokenizer()
  assert tok.decode(tok.encode("a€")[:-1]) == "a\ufffd"


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_tokenizer_save_load_round_trip(tmp_path, kind):
  text = "Some text, ünïcödé ✓ and \x00 \n"
  tok = tokenizers.make_tokenizer(kind, text)
  path = tmp_path / "tokenizer.json"
  tokenizers.save_tokenizer(tok, path)
  loaded = tokenizers.load_tokenizer(path)
  assert type(loaded) is type(tok) and loaded == tok
  assert loaded.to_json() == tok.to_json()
  np.testing.assert_array_equal(loaded.encode(text + "?"), tok.encode(text + "?"))


def test_tokenizer_errors(tmp_path):
  with pytest.raises(UserError, match="unknown tokenizer 'word'"):
    tokenizers.make_tokenizer("word", "x")
  with pytest.raises(UserError, match="not found"):
    tokenizers.load_tokenizer(tmp_path / "missing.json")


# DataConfig.


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset="imagenet"), "data.dataset='imagenet' is unknown"),
    (dict(tokenizer="word"), "data.tokenizer='word'"),
    (dict(seq_len=0), "data.seq_len=0 is invalid: it must be an integer >= 1"),
    (dict(batch_size=2.5), "data.batch_size=2.5"),
    (dict(train_chars=0), "data.train_chars=0"),
    (dict(val_chars=-5), "data.val_chars=-5"),
    (dict(split_fraction=1.0), r"data.split_fraction=1.0 is invalid: it must lie in \(0, 1\)"),
    (dict(split_fraction=0), "data.split_fraction=0"),
    (dict(dataset="text_files"), "data.train_file is required"),
    (dict(train_file="x.txt"), "only used with data.dataset=text_files"),
    (dict(dataset="wikitext2", train_split="dev"), "data.train_split='dev' is not a WikiText-2"),
    (dict(dataset="wikitext2", train_split="test", val_split="test"), "overlaps"),
    (dict(dataset="wikitext2", train_split="train_prefix", val_split="train"), "overlaps"),
])
def test_data_config_validation(kwargs, message):
  with pytest.raises(UserError, match=message):
    data.DataConfig(**kwargs)


def test_data_config_from_dict():
  cfg = data.DataConfig.from_dict({"dataset": "wikitext2", "train_split": "train_prefix",
                                   "seq_len": 64})
  assert cfg == data.DataConfig(dataset="wikitext2", train_split="train_prefix", seq_len=64)
  with pytest.raises(UserError, match="unknown data config key.*seqlen"):
    data.DataConfig.from_dict({"seqlen": 64})


# Corpora.


def test_load_corpus_embedded():
  from pydoc_data import topics

  full = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
  corpus = data.load_corpus(data.DataConfig(train_chars=None, val_chars=None))
  assert corpus.train_text + corpus.val_text == full
  assert len(corpus.train_text) == int(0.9 * len(full))
  short = data.load_corpus(data.DataConfig(train_chars=1000, val_chars=500))
  assert short.train_text == full[:1000]
  assert short.val_text == corpus.val_text[:500]


def test_load_corpus_tiny_shakespeare(tmp_path):
  text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20
  (tmp_path / "tiny_shakespeare").mkdir()
  (tmp_path / "tiny_shakespeare" / "input.txt").write_text(text)
  cfg = data.DataConfig(dataset="tiny_shakespeare", data_dir=str(tmp_path), seq_len=16,
                        split_fraction=0.75)
  corpus = data.load_corpus(cfg)
  n = int(0.75 * len(text))
  assert (corpus.train_text, corpus.val_text) == (text[:n], text[n:])
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="tiny_shakespeare/input.txt not found"):
    data.load_corpus(data.DataConfig(dataset="tiny_shakespeare", data_dir=str(tmp_path / "empty")))
  with pytest.raises(UserError, match="data directory .*/nowhere not found"):
    data.load_corpus(data.DataConfig(dataset="tiny_shakespeare",
                                     data_dir=str(tmp_path / "nowhere")))
  with pytest.raises(UserError, match="set DEEPEXIT_DATA_DIR"):
    data.load_corpus(data.DataConfig(dataset="tiny_shakespeare"))


def test_load_corpus_text_files(tmp_path):
  train, val = tmp_path / "train.txt", tmp_path / "val.txt"
  train.write_bytes("Train text ✓\r\n".encode() * 30)
  val.write_bytes(b"Validation text\n" * 30)
  corpus = data.load_corpus(data.DataConfig(dataset="text_files", train_file=str(train),
                                            val_file=str(val), seq_len=8))
  assert corpus.train_text == train.read_bytes().decode()  # no newline translation
  assert corpus.val_text == val.read_bytes().decode()
  split = data.load_corpus(data.DataConfig(dataset="text_files", train_file=str(train),
                                           seq_len=8, split_fraction=0.5))
  assert split.train_text + split.val_text == train.read_bytes().decode()
  with pytest.raises(UserError, match="missing.txt not found: pass --config.data.train_file"):
    data.load_corpus(data.DataConfig(dataset="text_files",
                                     train_file=str(tmp_path / "missing.txt")))


def test_load_corpus_invalid_utf8(tmp_path):
  path = tmp_path / "bad.txt"
  path.write_bytes(b"good text " * 20 + b"\xc3\x28 more")
  with pytest.raises(UserError, match=r"bad.txt is not valid UTF-8 at byte offset 200"):
    data.load_corpus(data.DataConfig(dataset="text_files", train_file=str(path), seq_len=8))


def test_load_corpus_empty(tmp_path):
  path = tmp_path / "empty.txt"
  path.write_bytes(b"")
  with pytest.raises(UserError, match="corpus is empty"):
    data.load_corpus(data.DataConfig(dataset="text_files", train_file=str(path)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(), r"validation text has 100 characters \(100 tokens\) but seq_len=128 needs at "
             "least 129"),
    (dict(seq_len=8, train_chars=5), r"training text has 5 characters .* needs at least 9"),
])
def test_load_corpus_too_short(tmp_path, kwargs, message):
  path = tmp_path / "short.txt"
  path.write_text("x" * 900 + "y" * 100)
  with pytest.raises(UserError, match=message):
    data.load_corpus(data.DataConfig(dataset="text_files", train_file=str(path), **kwargs))


def test_wikitext2_tfds_round_trip(wiki_root, tmp_path):
  raw = wiki_root / "wikitext-2-raw-v1"
  tfds_dir = tmp_path / "tfds"
  for split, name in [("train", "wiki.train.raw"), ("validation", "wiki.valid.raw"),
                      ("test", "wiki.test.raw")]:
    text = wikitext2.load_wikitext2_split(split, raw_dir=raw, tfds_dir=tfds_dir)
    assert text.encode("utf-8") == (raw / name).read_bytes()
  assert "tensorflow" not in sys.modules  # Reading went through the no-TF path.
  # One row per line, in file order.
  builder = wikitext2.Wikitext2Raw(data_dir=tfds_dir)
  source = builder.as_data_source(split="validation")
  lines = [line + b"\n" for line in (raw / "wiki.valid.raw").read_bytes().split(b"\n")[:-1]]
  assert len(source) == len(lines)
  assert source[3]["text"] == lines[3]
  assert "train_prefix" not in builder.info.splits

  cfg = data.DataConfig(dataset="wikitext2", data_dir=str(wiki_root), tfds_dir=str(tfds_dir),
                        train_chars=None, val_chars=1000, seq_len=16)
  corpus = data.load_corpus(cfg)
  assert corpus.train_text == (raw / "wiki.train.raw").read_bytes().decode()
  assert corpus.val_text == (raw / "wiki.valid.raw").read_bytes().decode()[:1000]


def test_wikitext2_rebuilds_when_raw_file_changes(wiki_root, tmp_path):
  raw = wiki_root / "wikitext-2-raw-v1"
  tfds_dir = tmp_path / "tfds"
  wikitext2.load_wikitext2_split("validation", raw_dir=raw, tfds_dir=tfds_dir)
  (raw / "wiki.valid.raw").write_text(_fake_wiki(3, "Changed"))
  text = wikitext2.load_wikitext2_split("validation", raw_dir=raw, tfds_dir=tfds_dir)
  assert text == _fake_wiki(3, "Changed")


def test_wikitext2_missing_train_suggests_prefix(wiki_root, tmp_path):
  raw = wiki_root / "wikitext-2-raw-v1"
  os.rename(raw / "wiki.train.raw", raw / "wiki.train.raw.prefix")
  cfg = data.DataConfig(dataset="wikitext2", data_dir=str(wiki_root), tfds_dir=str(tmp_path / "t"),
                        seq_len=16)
  with pytest.raises(UserError, match=r"wiki.train.raw is missing.*train_split=train_prefix"):
    data.load_corpus(cfg)
  corpus = data.load_corpus(dataclasses.replace(cfg, train_split="train_prefix", train_chars=None))
  assert corpus.train_text == (raw / "wiki.train.raw.prefix").read_bytes().decode()
  # The built dataset has no train split either; asking it without a raw dir says so.
  with pytest.raises(UserError, match=r"built from .* which has no wiki.train.raw.*train_prefix"):
    wikitext2.load_wikitext2_split("train", tfds_dir=tmp_path / "t")
  with pytest.raises(UserError, match="WikiText-2 directory .* not found"):
    wikitext2.load_wikitext2_split("train", raw_dir=tmp_path / "nowhere", tfds_dir=tmp_path / "t")


def test_wikitext2_online_path_uses_official_archive_layout(wiki_root, tmp_path, monkeypatch):
  # Stands in for the download: the archive unpacks to wikitext-2-raw/wiki.*.raw.
  extracted = tmp_path / "extracted"
  extracted.mkdir()
  (wiki_root / "wikitext-2-raw-v1").rename(extracted / "wikitext-2-raw")
  urls = []

  def fake_download_and_extract(self, url):
    urls.append(url)
    return extracted

  monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract",
                      fake_download_and_extract)
  text = wikitext2.load_wikitext2_split("test", tfds_dir=tmp_path / "tfds")
  assert urls == [wikitext2.URL]
  assert text.encode() == (extracted / "wikitext-2-raw" / "wiki.test.raw").read_bytes()


def test_wikitext2_invalid_utf8(wiki_root, tmp_path):
  raw = wiki_root / "wikitext-2-raw-v1"
  (raw / "wiki.test.raw").write_bytes(b" ok \n bad \xff \n")
  with pytest.raises(UserError, match=r"wiki.test.raw is not valid UTF-8 at byte offset 10"):
    wikitext2.load_wikitext2_split("test", raw_dir=raw, tfds_dir=tmp_path / "tfds")


# The bundled datasets (README.md of the data directory). `.ci/run` sets DEEPEXIT_DATA_DIR
# and fails when the directory is missing; a plain `pytest` skips these tests, and says so
# in its header (conftest.py) and in each skip reason (`pytest -rs`).
real_data = pytest.mark.skipif(
    not _REAL_DATA_DIR, reason="real-data test: DEEPEXIT_DATA_DIR is not set (plain pytest "
    "skips it; .ci/run sets it to the directory holding wikitext-2-raw-v1/ and "
    "tiny_shakespeare/)")


def _sha256(path):
  import hashlib

  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


@real_data
def test_real_tiny_shakespeare():
  path = os.path.join(_REAL_DATA_DIR, "tiny_shakespeare", "input.txt")
  assert _sha256(path) == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
  cfg = data.DataConfig(dataset="tiny_shakespeare", data_dir=_REAL_DATA_DIR, train_chars=None,
                        val_chars=None, seq_len=64, batch_size=4)
  ds = data.prepare_dataset(cfg)
  text = open(path, encoding="utf-8").read()
  assert len(text) == 1_115_394 and text.count("\n") == 40_000
  assert ds.corpus.train_text + ds.corpus.val_text == text
  assert len(ds.corpus.train_text) == int(0.9 * len(text))
  assert ds.corpus.train_text.startswith("First Citizen:\nBefore we proceed any further")
  # Character tokenizer: the 65 distinct characters of the plays (plain ASCII), no UNK in
  # the validation tokens, and decoding gives the text back.
  assert len(set(text)) == 65 and text.isascii()
  assert ds.tokenizer.decode(ds.val_tokens) == ds.corpus.val_text
  assert len(ds.val_tokens) == len(ds.corpus.val_text)


@real_data
def test_real_wikitext2_validation(tmp_path):
  root = _REAL_DATA_DIR
  cfg = data.DataConfig(dataset="wikitext2", data_dir=root, tfds_dir=str(tmp_path / "tfds"),
                        train_split="train_prefix", train_chars=10_000)
  corpus = data.load_corpus(cfg)
  assert len(corpus.val_text) == 50_000
  assert corpus.val_text.startswith(" \n = Homarus gammarus = \n \n Homarus gammarus , known as")
  assert corpus.train_text.startswith(" \n = Valkyria Chronicles III = \n \n Senjō no Valkyria")
  raw = os.path.join(root, "wikitext-2-raw-v1")
  for name, sha in (
      ("wiki.valid.raw", "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"),
      ("wiki.test.raw", "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"),
      ("wiki.train.raw.prefix",
       "62a786b75ecd4d1ca27cc0883ead2143e2677efcbe7c0f8e64f57f2b6228d2ad")):
    assert _sha256(os.path.join(raw, name)) == sha, name
  for split, chars, start in (("validation", 1_144_748, " \n = Homarus gammarus = \n"),
                              ("test", 1_288_556, " \n = Robert Boulter = \n"),
                              ("train_prefix", 658_739, " \n = Valkyria Chronicles III = \n")):
    full = wikitext2.load_wikitext2_split(split, raw_dir=raw, tfds_dir=tmp_path / "tfds")
    assert (len(full), full[:len(start)]) == (chars, start), split
    with open(os.path.join(raw, {"validation": "wiki.valid.raw", "test": "wiki.test.raw",
                                 "train_prefix": "wiki.train.raw.prefix"}[split]),
              encoding="utf-8", newline="") as f:
      assert full == f.read(), split  # the TFDS round trip keeps every byte


# Tokenized dataset.


def test_prepare_dataset_fits_or_reuses_tokenizer(tmp_path):
  train, val = tmp_path / "train.txt", tmp_path / "val.txt"
  train.write_text("abcabcabc " * 10)
  val.write_text("abcxyz " * 10)
  cfg = data.DataConfig(dataset="text_files", train_file=str(train), val_file=str(val), seq_len=8)
  ds = data.prepare_dataset(cfg)
  assert ds.tokenizer == tokenizers.CharTokenizer.fit(ds.corpus.train_text)
  assert ds.train_tokens.dtype == np.int32 and len(ds.train_tokens) == 100
  assert (ds.val_tokens == 0).sum() == 30  # x, y, z are unseen in training: UNK.
  other = tokenizers.CharTokenizer.fit("abcxyz ")
  ds2 = data.prepare_dataset(cfg, tokenizer=other)
  assert ds2.tokenizer is other and ds2.tokenizer.decode(ds2.val_tokens) == ds2.corpus.val_text


# Training batches.


def _train_batches(length=5000, seq_len=16, batch_size=8, seed=0):
  # Token value = position, so each batch row says exactly where its window lies.
  return data.TrainBatches(np.arange(length, dtype=np.int32), seq_len, batch_size, seed)


def test_train_batches_shapes_and_shift():
  tb = _train_batches()
  inputs, targets = tb.batch(3)
  assert inputs.shape == targets.shape == (8, 16)
  assert inputs.dtype == targets.dtype == np.int32
  np.testing.assert_array_equal(targets, inputs + 1)
  assert tb.steps_per_epoch == ((5000 - 15) // 17) // 8


def test_train_batches_deterministic_and_resumable():
  a, b = _train_batches(seed=7), _train_batches(seed=7)
  steps = range(0, 3 * a.steps_per_epoch + 2)
  for step in (0, 5, a.steps_per_epoch + 1, 3 * a.steps_per_epoch):
    np.testing.assert_array_equal(a.batch(step)[0], b.batch(step)[0])
  assert not np.array_equal(a.batch(0)[0], _train_batches(seed=8).batch(0)[0])
  full = list(a.iterate(0, len(steps)))
  resumed = list(_train_batches(seed=7).iterate(40, len(steps) - 40))
  for (x, y), (rx, ry) in zip(full[40:], resumed, strict=True):
    np.testing.assert_array_equal(x, rx)
    np.testing.assert_array_equal(y, ry)


@pytest.mark.parametrize("length, seq_len, batch_size", [(5000, 16, 8), (1000, 7, 3), (300, 1, 5)])
def test_train_batches_epoch_windows_distinct_and_non_overlapping(length, seq_len, batch_size):
  tb = _train_batches(length, seq_len, batch_size, seed=3)
  epoch_starts = []
  for epoch in range(4):
    first = epoch * tb.steps_per_epoch
    steps = range(first, first + tb.steps_per_epoch)
    starts = np.concatenate([tb.batch(s)[0][:, 0] for s in steps])
    assert len(starts) == tb.steps_per_epoch * batch_size  # Same count every epoch.
    ordered = np.sort(starts)
    assert np.all(np.diff(ordered) >= seq_len + 1)  # Distinct, non-overlapping windows.
    assert len(set(ordered % (seq_len + 1))) == 1  # One offset per epoch...
    assert ordered[0] % (seq_len + 1) < seq_len  # ...in [0, seq_len).
    assert ordered[-1] + seq_len + 1 <= length  # Window (incl. last target) fits.
    epoch_starts.append(starts)
  # Different epochs visit windows in a different order (and usually at another offset).
  assert not np.array_equal(epoch_starts[0], epoch_starts[1])


def test_train_batches_too_few_tokens():
  with pytest.raises(UserError, match="fewer than batch_size=8"):
    _train_batches(length=100, seq_len=16, batch_size=8)


# Eval batches.


@pytest.mark.parametrize("length, seq_len, batch_size", [
    (1000, 16, 4), (97, 8, 3), (17, 16, 2), (2, 16, 1), (129, 8, 16)])
def test_eval_batches_cover_every_target_once(length, seq_len, batch_size):
  tokens = np.arange(length, dtype=np.int32) + 3  # + 3: distinguishable from padding.
  ev = data.eval_batches(tokens, seq_len, batch_size)
  assert ev.inputs.shape == ev.targets.shape == ev.mask.shape
  assert ev.inputs.shape[1:] == (batch_size, seq_len)
  assert ev.mask.dtype == np.float32 and ev.inputs.dtype == np.int32
  assert ev.mask.sum() == length - 1 == ev.num_targets
  real = ev.mask == 1
  # Reconstruct: the real targets, in order, are exactly tokens[1:], each once.
  np.testing.assert_array_equal(ev.targets[real], tokens[1:])
  np.testing.assert_array_equal(ev.inputs[real], tokens[:-1])
  # Only the tail is padding, and no batch is entirely padding.
  assert np.all(real.reshape(-1)[: length - 1]) and not np.any(real.reshape(-1)[length - 1:])
  assert ev.mask[-1].sum() > 0


def test_bpe_tokenizer_round_trip_and_json(tmp_path):
  from conftest import corpus_text

  text = corpus_text(20_000)
  tok = tokenizers.make_tokenizer("bpe", text, bpe_vocab_size=600)
  assert tok.vocab_size == 600
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 600
  assert len(ids) < 0.6 * len(text)  # Merges really compress the text.
  assert tok.decode(ids) == text
  unseen = "naïve 日本語 \x00 text"  # Bytes never seen in training still encode.
  assert tok.decode(tok.encode(unseen)) == unseen
  path = tmp_path / "tok.json"
  tokenizers.save_tokenizer(tok, path)
  again = tokenizers.load_tokenizer(path)
  assert again == tok and np.array_equal(again.encode(text), ids)
  assert tokenizers.make_tokenizer("bpe", text, bpe_vocab_size=600) == tok  # Deterministic.


def test_bpe_dataset_and_errors(corpus_file):
  cfg = data.DataConfig(dataset="text_files", train_file=corpus_file, train_chars=None,
                        val_chars=None, seq_len=32, batch_size=4, tokenizer="bpe",
                        bpe_vocab_size=512)
  ds = data.prepare_dataset(cfg)
  assert ds.vocab_size == 512 and ds.train_tokens.max() < 512
  assert ds.tokenizer.decode(ds.val_tokens) == ds.corpus.val_text
  with pytest.raises(UserError, match="bpe_vocab_size=100 must be >= 256"):
    data.prepare_dataset(dataclasses.replace(cfg, bpe_vocab_size=100))
  with pytest.raises(UserError, match="bad BPE tokenizer JSON"):
    tokenizers.tokenizer_from_json({"kind": "bpe", "tokenizer": "{not json"})
