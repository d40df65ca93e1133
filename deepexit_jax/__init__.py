"""deepexit_jax: early-exit language models in JAX/Flax.

Deep-supervision Transformers whose every layer has logits through one shared
exit head, an early-exit engine with exact compute accounting, threshold sweeps,
saturation probes and real early-exit decoding.
"""

from deepexit_jax.checkpoint import load_checkpoint, load_model, save_model
from deepexit_jax.config import ExperimentConfig, TrainConfig
from deepexit_jax.data import DataConfig, load_corpus, prepare_dataset
from deepexit_jax.errors import UserError
from deepexit_jax.exits import (
    ConfidenceProbe,
    ExitResult,
    FlopCounter,
    flops_per_token,
    oracle_exit_layer,
    predict_with_exit,
)
from deepexit_jax.losses import deep_supervision_loss, resolve_loss_weights
from deepexit_jax.model import (
    DeepSupervisionTransformer,
    ModelConfig,
    ModelOutput,
    all_layer_logits,
    create_model,
)
from deepexit_jax.tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer

# The upper floors (training, sweeps, calibration, probes, decoding) load on first use, so
# `import deepexit_jax` stays light (no TFDS, orbax managers or matplotlib until needed).
# `deepexit_jax.train` is the training module (a submodule import rebinds the name), so the
# training function is exported as `train_model` (README, tests and experiments use it).
_ALIASES = {"train_model": ("deepexit_jax.train", "train")}
_LAZY = {"run_sweep": "deepexit_jax.sweep",
         "Calibration": "deepexit_jax.calibration",
         "calibrate_threshold": "deepexit_jax.calibration",
         "collect_exit_losses": "deepexit_jax.calibration",
         "SweepReport": "deepexit_jax.sweep", "SweepRow": "deepexit_jax.sweep",
         **{name: "deepexit_jax.pretrained" for name in (
             "load_hf_checkpoint", "load_hf_tokenizer", "save_hf_checkpoint")},
         **{name: "deepexit_jax.probes" for name in (
             "Collection", "ProbeStudy", "SaturationProbe", "collect", "fit_probe",
             "load_probe", "run_probes", "run_study", "save_probe")},
         **{name: "deepexit_jax.decoding" for name in (
             "DecodeCost", "DecodeResult", "decode_cost", "decode_teacher_forced", "generate",
             "generate_text", "SpeculativeCost", "SpeculativeResult", "speculative_cost",
             "speculative_generate", "speculative_text")}}


def __getattr__(name):
  import importlib

  if name in _ALIASES:
    module, attr = _ALIASES[name]
    return getattr(importlib.import_module(module), attr)
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'deepexit_jax' has no attribute {name!r}")

__all__ = [
    "Calibration",
    "calibrate_threshold",
    "collect_exit_losses",
    "DecodeCost",
    "DecodeResult",
    "decode_cost",
    "decode_teacher_forced",
    "generate",
    "generate_text",
    "SpeculativeCost",
    "SpeculativeResult",
    "speculative_cost",
    "speculative_generate",
    "speculative_text",
    "ByteTokenizer",
    "CharTokenizer",
    "Collection",
    "ProbeStudy",
    "SaturationProbe",
    "collect",
    "fit_probe",
    "load_probe",
    "run_probes",
    "run_study",
    "save_probe",
    "ConfidenceProbe",
    "ExitResult",
    "FlopCounter",
    "SweepReport",
    "SweepRow",
    "flops_per_token",
    "oracle_exit_layer",
    "predict_with_exit",
    "run_sweep",
    "DataConfig",
    "DeepSupervisionTransformer",
    "ExperimentConfig",
    "ModelConfig",
    "ModelOutput",
    "TrainConfig",
    "UserError",
    "all_layer_logits",
    "create_model",
    "deep_supervision_loss",
    "load_checkpoint",
    "load_hf_checkpoint",
    "load_hf_tokenizer",
    "load_corpus",
    "load_model",
    "load_tokenizer",
    "prepare_dataset",
    "resolve_loss_weights",
    "save_hf_checkpoint",
    "save_model",
    "train_model",
]
