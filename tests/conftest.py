"""Shared test setup: four CPU devices, a small real-English corpus and tiny configs."""

import os

# Must run before jax is imported anywhere, so sharded code runs on 4 host devices in
# every test run (and in the binaries that tests start, which inherit the environment).
_FLAG = "--xla_force_host_platform_device_count=4"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

import pytest  # noqa: E402

# About 40k characters: enough for a few dozen steps of batch 8 x seq 32 plus a
# validation tail, small enough that an evaluation takes a fraction of a second.
CORPUS_CHARS = 40_000


def corpus_text(num_chars: int = CORPUS_CHARS) -> str:
  """Real English prose: the start of Python's bundled reference documentation."""
  from pydoc_data import topics

  text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
  return text[:num_chars]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> str:
  """Path of a UTF-8 text file holding `CORPUS_CHARS` characters of real English text."""
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text(corpus_text(), encoding="utf-8")
  return str(path)


def tiny_config_dict(corpus_path: str, **train) -> dict:
  """A plain-dict experiment config: 2-layer dim-32 model on `corpus_path`, batch 8 x seq 32.

  Args:
    corpus_path: the text file to train on (the last 10% validates).
    **train: overrides of the `train` section (e.g. max_steps, eval_every).

  Returns:
    A dict for `ExperimentConfig.from_dict` (also valid as a config file's ConfigDict).
  """
  return {
      "model": {"num_layers": 2, "dim": 32, "num_heads": 2, "ffn_dim": 64, "max_len": 32},
      "data": {"dataset": "text_files", "train_file": corpus_path, "train_chars": None,
               "val_chars": None, "seq_len": 32, "batch_size": 8},
      "loss_weights": "1:0.5,2:0.5",
      "exit_layers": [1],
      "train": {"max_steps": 40, "learning_rate": 1e-2, "warmup_steps": 5, "eval_every": 20,
                "log_every": 10, "seed": 0, **train},
  }


@pytest.fixture
def tiny_config(corpus_file):
  """Factory: `tiny_config(**train_overrides)` -> validated `ExperimentConfig` on the corpus."""
  from deepexit_jax.config import ExperimentConfig

  def make(**train):
    return ExperimentConfig.from_dict(tiny_config_dict(corpus_file, **train))

  return make
