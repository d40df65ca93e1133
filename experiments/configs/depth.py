"""Depth regime (issue 13): 8 layers, dim 64, 4 heads, FFN 256, exit at layer 4, 4 epochs.

Char-level WikiText-2 with the first 1,280,000 characters of the *test* split as
training text (the full train split is not available offline; wiki.train.raw.prefix
holds only ~659 KB) and the first 50,000 characters of validation as validation
text. The rest of the recipe is the reference config's (lr 3e-3, warm-up 50, cosine
to 0.1x, AdamW b1 0.9 / b2 0.98, weight decay 0.01 on matrices, clip 1.0, seq 128,
batch 32).

The part after ':' picks the model:
  early_exit     loss weights {4: 0.5, 8: 0.5}, exit at layer 4 (default)
  early_exit_kd  the same plus the recipe study's best recipe, self-distillation
                 (FREE: kd_weight 0.5, temperature 1; experiments/recipes/RESULTS.md)
  static4        the model cut to 4 layers, final-layer loss only
  static8        8 layers, final-layer loss only
Run:
  DEEPEXIT_DATA_DIR=../shared/data deepexit-train \
      --config=experiments/configs/depth.py:early_exit --workdir=runs/depth/early_exit
`experiments/depth_regime/run.py` trains them all over several seeds.
"""

from deepexit_jax.config import sibling_config

MODELS = ("early_exit", "early_exit_kd", "static4", "static8")


def get_config(model: str = "early_exit"):
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
  c = sibling_config(__file__, "reference")
  c.model.update(num_layers=8, dim=64, num_heads=4, ffn_dim=256)
  c.data.update(train_split="test", train_chars=1_280_000, val_split="validation",
                val_chars=50_000)
  c.train.epochs = 4
  if model.startswith("static"):
    depth = int(model[6:])
    c.model.num_layers = depth
    c.loss_weights = "final"
    c.exit_layers = (depth,)
  else:
    c.loss_weights = "4:0.5,8:0.5"
    c.exit_layers = (4,)
    if model == "early_exit_kd":
      c.recipe.update(kd_weight=0.5, kd_temperature=1.0)
  return c
