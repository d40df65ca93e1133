"""Scaling study model: 4 layers, dim 256, 4 heads, FFN 1024, exit at layer 2.

The reference notes ask for a width >= 256. Same data as the reference model
(char-level WikiText-2, first 500,000 training characters, seq 128, batch 32), a
loss of equal weight at the exit and the final layer, 2 epochs, and static baselines
of depth 2 and 4 trained alone with the same budget (pass `:static=K`). The model is
8x wider than the reference one; 2 epochs of it cost ~25 minutes on a 2-core CPU.

Run (the early-exit model; experiments/scaling/run.py trains all of them):
  DEEPEXIT_DATA_DIR=../shared/data deepexit-train \
      --config=experiments/configs/scaling.py --workdir=runs/scaling/early_exit
  DEEPEXIT_DATA_DIR=../shared/data deepexit-train \
      --config=experiments/configs/scaling.py:static=2 --workdir=runs/scaling/static2
"""

from deepexit_jax.config import sibling_config


def get_config(arg: str = ""):
  c = sibling_config(__file__, "reference")
  c.model.update(num_layers=4, dim=256, num_heads=4, ffn_dim=1024)
  c.loss_weights = "2:0.5,4:0.5"
  c.exit_layers = (2,)
  c.train.update(epochs=2, learning_rate=1e-3)
  if arg:
    key, _, value = arg.partition("=")
    if key != "static" or not value.isdigit():
      raise ValueError(f"scaling.py takes ':static=K', got {arg!r}")
    depth = int(value)
    c.model.num_layers = depth
    c.loss_weights = "final"
    c.exit_layers = (depth,)
  return c
