"""Continued pretraining of an imported checkpoint with LayerSkip's recipe (Elhoushi et al.,
2024): every layer exits through the shared final norm + LM head, sum_l-scaled early-exit
losses, a rotational early-exit curriculum and layer dropout rising exponentially with depth.

The model (and tokenizer) come from --init_from, so this config has no architecture
fields: only how the model runs (remat, attention_chunks, dtype, dropout). Train on your
own text file (the last 10% validates unless --config.data.val_file is given).

Run (a downloaded LayerSkip checkpoint, README "Pretrained models"):
  deepexit-train --config=experiments/configs/layerskip_continue.py \
      --config.data.train_file=pages.txt --init_from=ckpt/layerskip-llama3.2-1B \
      --workdir=runs/layerskip_continue
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = dict(remat="full", attention_chunks=2, dtype="float32", dropout=0.0)
  c.data = dict(dataset="text_files", train_file=config_dict.placeholder(str),
                val_file=config_dict.placeholder(str), split_fraction=0.9,
                train_chars=config_dict.placeholder(int), val_chars=50_000,
                seq_len=512, batch_size=8)
  c.loss_weights = "sum_l"
  c.exit_layers = config_dict.placeholder(tuple)  # None: every layer.
  c.train = dict(epochs=1, max_steps=config_dict.placeholder(int), learning_rate=2e-5,
                 min_lr_ratio=0.1, warmup_steps=50, weight_decay=0.01, grad_clip=1.0,
                 seed=0, eval_every=0, log_every=10, checkpoint_every=200, num_devices=0)
  c.recipe = dict(curriculum="rotational", rotation_period=2, layer_dropout=0.2,
                  layer_dropout_schedule="exponential")
  return c
