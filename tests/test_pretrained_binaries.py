"""Sweeps, calibration and probe studies of an imported Hugging Face model on a text file,
the one evaluation-text helper (`data.evaluation_text`) and --hf_checkpoint."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deepexit_jax import calibration, checkpoint, cli, data, probes, report, sweep, tokenizers
from deepexit_jax.errors import UserError

GPT2 = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "gpt2")  # Has tokenizer.json.
VAL_CHARS = 3000


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, corpus_file):
  path = tmp_path_factory.mktemp("text") / "pages.txt"
  with open(corpus_file, encoding="utf-8") as f:
    path.write_text(f.read()[:2500], encoding="utf-8")
  return str(path)


def _run_checkpoint(config_dict, corpus_file, model):
  """A loaded checkpoint of a training run (config.json's data section, a char tokenizer)
  as `checkpoint.load_checkpoint` returns it; the text helper reads only these fields."""
  experiment = config_dict()
  experiment["data"].update(val_chars=VAL_CHARS, seq_len=16, batch_size=4)
  with open(corpus_file, encoding="utf-8") as f:
    text = f.read()
  train_text = text[:int(len(text) * 0.9)]  # text_files without val_file: split 0.9.
  tok = tokenizers.make_tokenizer("char", train_text)
  return checkpoint.Checkpoint(model=model, tokenizer=tok, step=1, metrics={},
                               experiment=experiment, path="/run"), text[len(train_text):]


def _tokens(batches):
  """The token ids a set of windows covers, in text order (inputs + the last target)."""
  mask = batches.mask.reshape(-1) > 0
  inputs, targets = batches.inputs.reshape(-1)[mask], batches.targets.reshape(-1)[mask]
  return np.concatenate([inputs, targets[-1:]])


def test_evaluation_text_reads_the_ranges_the_sweep_and_the_probe_study_read(
    config_dict, corpus_file, random_tiny_model, text_file):
  ckpt, val = _run_checkpoint(config_dict, corpus_file, random_tiny_model)
  tok = ckpt.tokenizer
  # The sweep (and calibration): the first data.val_chars validation characters, exactly
  # the tokens training evaluated (`prepare_dataset`, what sweep.load_run used to call).
  text = data.evaluation_text(ckpt)
  np.testing.assert_array_equal(_tokens(text.batches), tok.encode(val[:VAL_CHARS]))
  old = data.prepare_dataset(data.DataConfig.from_dict(ckpt.experiment["data"]), tok)
  want = data.eval_batches(old.val_tokens, 16, 4)
  for field in ("inputs", "targets", "mask"):
    np.testing.assert_array_equal(getattr(text.batches, field), getattr(want, field))
  assert (text.seq_len, text.batch_size) == (16, 4)
  # The probe study: the characters after them (or after --skip_chars).
  after = data.evaluation_text(ckpt, part="after_validation")
  np.testing.assert_array_equal(_tokens(after.batches), tok.encode(val[VAL_CHARS:]))
  assert after.skip_chars == VAL_CHARS and f"{VAL_CHARS:,}..{len(val):,}" in after.description
  skipped = data.evaluation_text(ckpt, part="after_validation", skip_chars=100)
  np.testing.assert_array_equal(_tokens(skipped.batches), tok.encode(val[100:]))
  # A text file instead, in windows of other sizes.
  own = data.evaluation_text(ckpt, text_file=text_file, seq_len=8, batch_size=3, skip_chars=7)
  with open(text_file, encoding="utf-8") as f:
    np.testing.assert_array_equal(_tokens(own.batches), tok.encode(f.read()[7:]))
  assert own.batches.inputs.shape[1:] == (3, 8) and text_file in own.description


def test_a_checkpoint_without_a_run_needs_a_text_file(text_file):
  ckpt = checkpoint.load_checkpoint(GPT2)
  assert ckpt.experiment is None and ckpt.exit_layers == (1, 2)  # Every layer exits.
  for load in (lambda: sweep.load_run(GPT2), lambda: probes.text_batches(GPT2)):
    with pytest.raises(UserError, match="has no training run.*pass --text_file=PATH"):
      load()
  # Without a run, windows of min(512, max_len) tokens (GPT-2 fixture: 32), batch 8.
  text = data.evaluation_text(ckpt, text_file=text_file)
  assert text.batches.inputs.shape[1:] == (data.DEFAULT_EVAL_BATCH_SIZE, 32)
  with pytest.raises(UserError, match="seq_len=33 exceeds the model's max_len=32"):
    data.evaluation_text(ckpt, text_file=text_file, seq_len=33)


def test_checkpoint_flags_take_one_directory_and_hf_checkpoint_must_be_one(tmp_path):
  assert cli.checkpoint_dir(None, GPT2) == GPT2
  assert cli.checkpoint_dir(str(tmp_path), None) == str(tmp_path)
  with pytest.raises(UserError, match="--hf_checkpoint=.* is not a Hugging Face checkpoint"):
    cli.checkpoint_dir(None, str(tmp_path))
  with pytest.raises(UserError, match="--checkpoint or --hf_checkpoint, not both"):
    cli.checkpoint_dir(GPT2, GPT2)
  with pytest.raises(UserError, match="--checkpoint is required"):
    cli.checkpoint_dir(None, None)


def test_sweep_and_calibration_of_a_hugging_face_model_on_a_text_file(text_file, tmp_path):
  thresholds = np.array([0.2, 0.6, np.inf], np.float32)
  result = sweep.run_sweep(GPT2, thresholds, kv_policies=("oracle",), text_file=text_file)
  tokens = checkpoint.load_checkpoint(GPT2).tokenizer.encode(open(text_file).read())
  assert result.exit_layers == (1, 2) and result.num_tokens == len(tokens) - 1
  assert text_file in result.metadata["data"] and result.metadata["experiment"] is None
  cal = calibration.run_calibration(GPT2, thresholds, delta=0.2, epsilon=0.2, splits=3,
                                    kv_policy="oracle", text_file=text_file)
  assert cal.fields["data"] == result.metadata["data"]
  paths = report.write_report(result, str(tmp_path / "sweep"), (), cal)
  with open(paths["json"]) as f:
    assert len(json.load(f)["rows"]) == len(result.rows)


def test_probe_study_of_a_hugging_face_model_on_a_text_file(text_file, tmp_path):
  out = str(tmp_path / "probe")
  study = probes.run_probes(GPT2, out, tokens=400, predictors=("softmax", "state"),
                            balance=(False,), text_file=text_file)
  assert study.metadata["text"].startswith(f"text file {text_file}")
  assert study.metadata["num_tokens"] == 400 and study.metadata["seq_len"] == 32
  assert os.path.getsize(os.path.join(out, "probe.md")) > 0


def test_sweep_binary_on_hf_checkpoint_with_text_file(text_file, tmp_path):
  res = subprocess.run(
      [sys.executable, "-m", "deepexit_jax.main.sweep", f"--hf_checkpoint={GPT2}",
       f"--text_file={text_file}", "--thresholds=0.5,inf", "--kv_policy=oracle",
       "--seq_len=16", "--batch_size=4", f"--out={tmp_path}/sweep"],
      capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode == 0, res.stderr[-2000:]
  with open(tmp_path / "sweep" / "sweep.json") as f:
    swept = json.load(f)
  assert swept["exit_layers"] == [1, 2] and text_file in swept["metadata"]["data"]


def _binary(module, *args):
  return subprocess.run([sys.executable, "-m", f"deepexit_jax.main.{module}", *args],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_probe_binary_on_a_hugging_face_directory_with_text_file(text_file, tmp_path):
  res = _binary("probe", f"--checkpoint={GPT2}", f"--text_file={text_file}", "--tokens=300",
                "--predictors=softmax,state", "--balance=none", "--seq_len=16",
                f"--out={tmp_path}/probe")
  assert res.returncode == 0, res.stderr[-2000:]
  with open(tmp_path / "probe" / "probe.json") as f:
    assert json.load(f)["metadata"]["text"].startswith(f"text file {text_file}")
  # Without --text_file: one line saying to pass it.
  res = _binary("probe", f"--hf_checkpoint={GPT2}", f"--out={tmp_path}/p2")
  assert res.returncode == 2 and "Traceback" not in res.stderr
  assert "pass --text_file=PATH" in res.stderr.strip().splitlines()[-1]
