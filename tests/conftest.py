"""Shared test setup: four CPU devices, a small real-English corpus and tiny configs."""

import atexit
import os
import shutil
import tempfile

# Must run before jax is imported anywhere, so sharded code runs on 4 host devices in
# every test run (and in the binaries that tests start, which inherit the environment).
_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

# A compilation cache for this session only: every `train()` call jits a fresh training
# step, which XLA:CPU takes seconds to compile; runs with the same config (resume tests,
# the binary's subprocess) then load the executable instead of compiling it again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="deepexit_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402

# About 40k characters: enough for a few dozen steps of batch 8 x seq 32 plus a
# validation tail, small enough that an evaluation takes a fraction of a second.
CORPUS_CHARS = 40_000


def corpus_text(num_chars: int = CORPUS_CHARS) -> str:
  """Real English prose: the start of Python's bundled reference documentation."""
  from pydoc_data import topics

  text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
  return text[:num_chars]


def spread_model(config):
  """A random model whose layers disagree and whose confidences spread over (0, 1].

  Random init gives near-uniform logits and near-identity blocks; scaling the head
  and the block kernels makes exit tests meaningful without training.
  """
  from deepexit_jax.model import create_model

  model = create_model(config, seed=0)
  model.unembed.kernel[...] = model.unembed.kernel[...] * 40
  for name in ("qkv", "attn_out", "fc1", "fc2"):
    kernel = getattr(model.blocks, name).kernel
    kernel[...] = kernel[...] * 5
  return model


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> str:
  """Path of a UTF-8 text file holding `CORPUS_CHARS` characters of real English text."""
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text(corpus_text(), encoding="utf-8")
  return str(path)


@pytest.fixture(scope="session")
def config_dict(corpus_file):
  """Factory: a plain-dict experiment config training a tiny model on `corpus_file`.

  `config_dict(**train)` gives a 2-layer dim-32 model (dropout 0.1), batch 8 x seq 32,
  40 steps evaluated every 8; keyword arguments override fields of the `train` section.
  The dict is what `ExperimentConfig.from_dict` takes and what a config file may return.
  """

  def make(**train):
    return {
        "model": {"num_layers": 2, "dim": 32, "num_heads": 2, "ffn_dim": 64, "max_len": 32,
                  "dropout": 0.1},
        "data": {"dataset": "text_files", "train_file": corpus_file, "train_chars": None,
                 "val_chars": None, "seq_len": 32, "batch_size": 8},
        "loss_weights": "1:0.5,2:0.5",
        "exit_layers": [1],
        "train": {"max_steps": 40, "learning_rate": 1e-2, "warmup_steps": 5, "eval_every": 8,
                  "log_every": 10, "seed": 0, **train},
    }

  return make


@pytest.fixture(scope="session")
def tiny_config(config_dict):
  """Factory: `tiny_config(**train)` -> the validated `ExperimentConfig` of `config_dict`."""
  from deepexit_jax.config import ExperimentConfig

  def make(**train):
    return ExperimentConfig.from_dict(config_dict(**train))

  return make
