"""Static-depth baseline for the saturation-probe study model (issue 13): probe.py cut to
`depth` layers, trained alone with a final-layer loss, same data, budget and seed.

Run (depth 1, 2 or 4):
  DEEPEXIT_DATA_DIR=../shared/data deepexit-train \
      --config=experiments/configs/probe_static.py:2 --workdir=runs/saturation_probe/static2
`experiments/saturation_probe/run.py` trains depths 1, 2 and 4 and puts them on its sweeps.
"""

from deepexit_jax.config import sibling_config


def get_config(depth: str = "2"):
  c = sibling_config(__file__, "probe")
  c.model.num_layers = int(depth)
  c.loss_weights = "final"
  c.exit_layers = (int(depth),)
  return c
