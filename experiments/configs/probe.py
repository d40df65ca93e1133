"""Saturation-probe study model: 8 layers, dim 64, 4 heads, FFN 256, char-level WikiText-2.

Trained with a loss at every layer (uniform weights) so every layer's top-1 is
meaningful for the saturation labels; exits at every layer for sweeps.

Run:
  DEEPEXIT_DATA_DIR=../shared/data deepexit-train \
      --config=experiments/configs/probe.py --workdir=runs/probe
"""

from deepexit_jax.config import sibling_config


def get_config():
  c = sibling_config(__file__, "reference")
  c.model.update(num_layers=8, dim=64, num_heads=4, ffn_dim=256)
  c.data.train_chars = None  # The whole local training text (~659k characters).
  c.loss_weights = "uniform"
  c.exit_layers = (1, 2, 3, 4, 5, 6, 7)
  c.train.epochs = 4
  return c
