"""One training recipe of the recipe study on the reference model, data and budget.

The recipes (name -> loss weights + `recipe` options) are `RECIPES`; every one
exits at each of its supervised layers below the last. Run one alone:
  DEEPEXIT_DATA_DIR=../shared/data deepexit-train \
      --config=experiments/recipes/recipe.py:sum_l --workdir=runs/recipes/sum_l
The part after ':' is the recipe name. `experiments/recipes/run.py` trains them all.
"""

import os

import ml_collections
import numpy as np

from deepexit_jax.config import load_config_file
from deepexit_jax.losses import resolve_loss_weights

# The recipe options (curricula, layer dropout, confidence, distillation) are applied
# to one declared base, uniform weights, so each option is compared with the same
# weights; their parameters are the papers' usual values, set before any result.
BASE = "uniform"
RECIPES = {  # in training order: one of each kind first
    "reference": ("2:0.7,4:0.3", {}),
    "uniform": ("uniform", {}),
    "l": ("l", {}),  # CALM's weighting
    "inv_l": ("inv_l", {}),
    "layer_dropout": (BASE, {"layer_dropout": 0.2, "layer_dropout_schedule": "exponential"}),
    "distill": (BASE, {"kd_weight": 0.5, "kd_temperature": 1.0}),  # FREE's shallow-deep KD
    "confidence": (BASE, {"confidence_power": 1.0}),  # EE-LLM-style confidence-aware
    "rotational": (BASE, {"curriculum": "rotational", "rotation_period": 2}),
    "gradual": (BASE, {"curriculum": "gradual", "gradual_fraction": 0.5}),
    "sum_l": ("sum_l", {}),
    "sqrt_l": ("sqrt_l", {}),
    "inv_sqrt_l": ("inv_sqrt_l", {}),
}


def get_config(name: str = "reference") -> ml_collections.ConfigDict:
  if name not in RECIPES:
    raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
  weights, options = RECIPES[name]
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "configs", "reference.py"))
  n = c.model.num_layers
  w = resolve_loss_weights(weights, n)
  c.loss_weights = weights
  c.exit_layers = tuple(int(i) + 1 for i in np.flatnonzero(w[:-1]))
  c.recipe.update(options)
  return c
