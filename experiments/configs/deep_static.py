"""Static-depth baseline for the deep model: experiments/configs/deep.py cut to `depth`
layers, trained alone with a final-layer loss, same data, budget and seed.

Run (depth 2, the deep model's shallowest exit):
  DEEPEXIT_DATA_DIR=../shared/data deepexit-train \
      --config=experiments/configs/deep_static.py:2 --workdir=runs/decoding/deep_static2
"""

from deepexit_jax.config import sibling_config


def get_config(depth: str = "2"):
  c = sibling_config(__file__, "deep")
  c.model.num_layers = int(depth)
  c.loss_weights = "final"
  c.exit_layers = (int(depth),)
  return c
