"""`deepexit-probe`: the saturation-probe study of a trained checkpoint.

Usage:
  deepexit-probe --checkpoint=/tmp/ref [--tokens=65536] [--out=/tmp/ref/probe]
  deepexit-probe --hf_checkpoint=ckpt/layerskip-llama3.2-1B --text_file=pages.txt --out=/tmp/p
  deepexit-sweep --checkpoint=/tmp/ref --probe=/tmp/ref/probe/probes/best  # then exit on it
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags

from deepexit_jax import cli, probes
from deepexit_jax.errors import UserError
from deepexit_jax.probes import FitConfig
from deepexit_jax.report import probes as probe_report

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir of a deepexit-train run (or "
                                  "a Hugging Face directory).")
_HF_CHECKPOINT = flags.DEFINE_string("hf_checkpoint", None, "A Hugging Face checkpoint "
                                     "directory (config.json + *.safetensors + "
                                     "tokenizer.json); instead of --checkpoint.")
_TOKENS = flags.DEFINE_integer("tokens", probes.DEFAULT_TOKENS,
                               "Validation tokens to collect (the budget M).")
_OUT = flags.DEFINE_string("out", None, "Output directory (default CHECKPOINT/probe).")
_PROBE_DIR = flags.DEFINE_string("probe_dir", None, "Where fitted probes go "
                                 "(default OUT/probes; OUT/probes/best is the best).")
_COLLECTION = flags.DEFINE_string("collection", None, "The .npz of collected layers "
                                  "(default OUT/collection.npz; reused if it matches).")
_LABELS = flags.DEFINE_list("labels", list(probes.LABELS), "Labels to study.")
_PREDICTORS = flags.DEFINE_list("predictors", list(probes.PREDICTORS), "Predictors to fit.")
_BALANCE = flags.DEFINE_list("balance", ["none", "balanced"],
                             "Loss weighting of learned probes: none and/or balanced.")
_EXIT_LABEL = flags.DEFINE_enum("exit_label", "final", list(probes.LABELS),
                                "Label whose best probe is saved as OUT/probes/best.")
_FIT_FRACTION = flags.DEFINE_float("fit_fraction", 0.75, "Leading share of the "
                                   "tokens used for fitting; the rest is held out.")
_HIDDEN = flags.DEFINE_integer("hidden", FitConfig.hidden, "MLP hidden width.")
_EPOCHS = flags.DEFINE_integer("max_epochs", FitConfig.max_epochs, "Epochs at most.")
_SEED = flags.DEFINE_integer("seed", 0, "Probe initialisation and data-order seed.")
_TOP_K = flags.DEFINE_integer("top_k", 5, "Ranks kept per layer (top-k settling).")
_SKIP_CHARS = flags.DEFINE_integer("skip_chars", None, "Characters of the text to skip "
                                   "(default: the run's data.val_chars, which sweeps use; "
                                   "0 with --text_file).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override the run's data.data_dir.")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "UTF-8 text file to evaluate on instead "
                                 "of the run's validation text (required for a Hugging Face "
                                 "checkpoint, which has no training run).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Evaluation window length (default: the "
                                "run's data.seq_len; without a run min(512, model max_len)).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Evaluation windows per batch "
                                   "(default: the run's data.batch_size; without a run 8).")


def main(argv: Sequence[str]) -> None:
  del argv  # Stray arguments are refused by `cli.run_main`.
  ckpt_dir = cli.checkpoint_dir(_CHECKPOINT.value, _HF_CHECKPOINT.value)
  bad = [b for b in _BALANCE.value if b not in ("none", "balanced")]
  if bad or not _BALANCE.value:
    raise UserError(f"--balance={','.join(_BALANCE.value)}: give none and/or balanced")
  cli.log_devices()
  out = _OUT.value or os.path.join(ckpt_dir, "probe")
  study = probes.run_probes(
      ckpt_dir, out, tokens=_TOKENS.value, probe_dir=_PROBE_DIR.value,
      collection_path=_COLLECTION.value, labels=_LABELS.value, predictors=_PREDICTORS.value,
      balance=tuple(b == "balanced" for b in _BALANCE.value),
      fit_fraction=_FIT_FRACTION.value,
      fit=FitConfig(hidden=_HIDDEN.value, max_epochs=_EPOCHS.value, seed=_SEED.value),
      exit_label=_EXIT_LABEL.value, top_k=_TOP_K.value, skip_chars=_SKIP_CHARS.value,
      data_dir=_DATA_DIR.value, text_file=_TEXT_FILE.value, seq_len=_SEQ_LEN.value,
      batch_size=_BATCH_SIZE.value)
  print(probe_report.markdown(study))
  print(f"wrote {out}/probe.{{md,csv,json,png}}; probes in {study.metadata['probe_dir']}"
        + (f" (best: {study.best} -> {study.metadata['probe_dir']}/best)"
           if study.best else ""))


def run() -> None:
  cli.run_main(main)


if __name__ == "__main__":
  run()
