"""Deeper early-exit model for the decoding benchmark: 8 layers, dim 64, 4 heads, FFN 256.

The reference recipe's data (char-level WikiText-2, first 500,000 training characters),
a loss at every layer (uniform weights) so every exit is usable, exits at 2, 4 and 6,
3 epochs (the decoding benchmark needs a model whose shallow exits are confident on
easy tokens, not the best PPL).

Run:
  DEEPEXIT_DATA_DIR=../shared/data deepexit-train \
      --config=experiments/configs/deep.py --workdir=runs/decoding/deep
"""

from deepexit_jax.config import sibling_config


def get_config():
  c = sibling_config(__file__, "reference")
  c.model.update(num_layers=8, dim=64, num_heads=4, ffn_dim=256)
  c.loss_weights = "uniform"
  c.exit_layers = (2, 4, 6)
  c.train.epochs = 3
  return c
