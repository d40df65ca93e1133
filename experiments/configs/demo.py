"""Demo: the reference model on the embedded corpus (Python's own docs), no download.

Run:
  deepexit-train --config=experiments/configs/demo.py --workdir=runs/demo
"""

from deepexit_jax.config import sibling_config


def get_config():
  c = sibling_config(__file__, "reference")
  c.data.dataset = "embedded"
  c.data.train_chars = None  # 90% of the ~470k characters train, 10% validate.
  c.data.val_chars = None
  c.train.epochs = 3
  return c
