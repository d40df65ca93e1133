"""Shared test setup: four CPU devices, a small real-English corpus and tiny configs."""

import os

# Must run before jax is imported anywhere, so sharded code runs on 4 host devices in
# every test run (and in the binaries that tests start, which inherit the environment).
_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

# No persistent compilation cache. Run as one process, the whole suite segfaulted late in
# the run three times out of three (jax 0.10.2, XLA:CPU, during `train()` in
# tests/test_train.py): twice inside the cache write, once, with the cache off, inside
# XLA's compile; every file passes alone. scripts/test.sh therefore runs each test file
# in its own process, and the cache (a second native code path in the crash) stays off.

import pytest  # noqa: E402


def pytest_terminal_summary(terminalreporter):
  """Ends a run that skipped the real-data tests (plain `pytest`) with a line saying so."""
  skipped = [r for r in terminalreporter.stats.get("skipped", [])
             if "real-data test" in str(getattr(r, "longrepr", ""))]
  if skipped:
    terminalreporter.write_line(
        f"{len(skipped)} real-data tests (WikiText-2, Tiny Shakespeare) were SKIPPED: "
        "DEEPEXIT_DATA_DIR is not set (.ci/run sets it)", yellow=True, bold=True)


# About 40k characters: enough for a few dozen steps of batch 8 x seq 32 plus a
# validation tail, small enough that an evaluation takes a fraction of a second.
CORPUS_CHARS = 40_000


def corpus_text(num_chars: int = CORPUS_CHARS) -> str:
  """Real English prose: the start of Python's bundled reference documentation."""
  from pydoc_data import topics

  text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
  return text[:num_chars]


# The model the exit, decoding, speculative and probe tests share (`random_model`).
RANDOM_CONFIG_FIELDS = dict(vocab_size=23, num_layers=4, dim=16, num_heads=2, max_len=16)


def random_model(config, seed: int = 0, spread: float = 1.0, head_scale: float = 3.0):
  """A model with EVERY parameter random, whose layers disagree and whose confidences spread.

  A freshly initialised model is a poor test subject: near-uniform logits, near-identity
  blocks, and LayerNorm scales of 1 and biases of 0, so a bug that reads the wrong
  LayerNorm, drops a bias or a position embedding computes the same numbers. Here every
  parameter is drawn again from a seeded NumPy generator:
    kernels        N(0, spread^2 / fan_in)  (the unembedding: head_scale^2 / fan_in)
    biases         N(0, 0.3^2)              (dense layers and LayerNorms)
    LayerNorm scale 1 + N(0, 0.3^2)
    token embedding N(0, 1), position embedding N(0, 0.5^2)
  With the defaults on the 4-layer dim-16 model of `RANDOM_CONFIG_FIELDS`, layers 1-3
  pick a different top-1 token than layer 4 for about 70%, 60% and 30% of tokens,
  softmax confidences span about 0.3-0.9 (10-90% quantiles), and the state cosine
  0.6-0.9. Larger `spread` makes layers disagree more; larger `head_scale` makes the
  head more confident.

  Args:
    config: a `ModelConfig` (tied embeddings, bf16 and any size work).
    seed: seeds both the model's own init and the redraw.
    spread: scale of the block kernels.
    head_scale: scale of the unembedding kernel (unused with tied embeddings).

  Returns:
    A `DeepSupervisionTransformer`; a fresh object per call, so a test may edit it.
  """
  import jax
  import numpy as np
  from flax import nnx

  from deepexit_jax.model import create_model

  model = create_model(config, seed=seed)
  rng = np.random.default_rng(seed)

  def draw(path, x):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[-1] == "kernel":
      scale = head_scale if names[0] == "unembed" else spread
      value = rng.normal(0.0, scale / np.sqrt(x.shape[-2]), x.shape)
    elif names[-1] == "scale":
      value = 1.0 + 0.3 * rng.normal(size=x.shape)
    elif names[-1] == "bias":
      value = 0.3 * rng.normal(size=x.shape)
    elif names[-1] == "embedding":
      value = rng.normal(size=x.shape)
    elif names[-1] == "pos_embed":
      value = 0.5 * rng.normal(size=x.shape)
    else:
      raise ValueError(f"random_model: no distribution for parameter {'/'.join(names)}")
    return np.asarray(value, np.asarray(x).dtype)

  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  nnx.update(model, jax.tree_util.tree_map_with_path(draw, params))
  return model


@pytest.fixture(scope="session")
def random_config():
  """The `ModelConfig` of `random_tiny_model`: V=23, N=4, D=16, H=2, max_len=16."""
  from deepexit_jax.model import ModelConfig

  return ModelConfig(**RANDOM_CONFIG_FIELDS)


@pytest.fixture(scope="session")
def random_tiny_model(random_config):
  """`random_model(random_config, seed=0)`, shared by the session: `nnx.clone` it to edit."""
  return random_model(random_config, seed=0)


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
