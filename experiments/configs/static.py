"""Static-depth baseline for the reference recipe: the reference model cut to `depth` layers,
trained alone with a final-layer loss, same data, budget and seed.

Run (depth 2, the reference exit depth):
  DEEPEXIT_DATA_DIR=../shared/data deepexit-train \
      --config=experiments/configs/static.py:2 --workdir=runs/static2
The part after ':' is the depth (default 2).
"""

from deepexit_jax.config import sibling_config


def get_config(depth: str = "2"):
  c = sibling_config(__file__, "reference")
  c.model.num_layers = int(depth)
  c.loss_weights = "final"
  c.exit_layers = (int(depth),)
  return c
