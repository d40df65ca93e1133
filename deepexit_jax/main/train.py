"""`deepexit-train`: trains a deep-supervision model from an experiment config.

Usage:
  deepexit-train --config=experiments/configs/reference.py --workdir=/tmp/ref
  deepexit-train --config=experiments/configs/reference.py --workdir=/tmp/ref --resume
  deepexit-train --config=experiments/configs/demo.py --config.train.epochs=2 ...
  deepexit-train --config=experiments/configs/layerskip_continue.py \
      --config.data.train_file=pages.txt --init_from=ckpt/layerskip-llama3.2-1B --workdir=/tmp/ls
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from deepexit_jax import checkpoint, cli, parallel, train
from deepexit_jax.config import ExperimentConfig
from deepexit_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (experiments/configs/*.py); fields can be "
    "overridden, e.g. --config.train.epochs=2.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --workdir.")
_INIT_FROM = flags.DEFINE_string(
    "init_from", None, "Start from the weights and tokenizer of this checkpoint (a "
    "deepexit-train workdir or a Hugging Face directory); the model is the checkpoint's "
    "(the config's model section may only set remat, attention_chunks, dtype, dropout).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize() first (one "
    "process per host; coordinator from the cluster environment).")


def main(argv: Sequence[str]) -> None:
  del argv  # Stray arguments are refused by `cli.run_main`.
  if _CONFIG.value is None:
    raise UserError("--config is required, e.g. --config=experiments/configs/reference.py")
  if not _WORKDIR.value:
    raise UserError("--workdir is required: the directory for checkpoints and metrics")
  if _DISTRIBUTED.value:
    parallel.initialize_distributed()
  cli.log_devices()
  init_model = checkpoint.read_model_config(_INIT_FROM.value) if _INIT_FROM.value else None
  try:
    experiment = ExperimentConfig.from_dict(_CONFIG.value, init_model=init_model)
  except OSError as e:  # config_flags reports an unloadable --config file only when used.
    raise UserError(f"cannot load --config: {' '.join(str(e).split())}") from None
  result = train.train(experiment, _WORKDIR.value, resume=_RESUME.value,
                       init_from=_INIT_FROM.value)
  best = result.best
  print(f"best validation PPL by layer (step {best['step']}): "
        f"{train.format_ppl(best['layer_ppl'])}")
  print(f"checkpoint: {os.path.abspath(result.workdir)}")


def run() -> None:
  cli.run_main(main)


if __name__ == "__main__":
  run()
