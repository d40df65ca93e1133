"""Reference early-exit model: 4 layers, dim 32, 2 heads, exit at layer 2, weights {2: 0.7, 4: 0.3}.

Char-level WikiText-2: the first 500,000 characters of the training split and the
first 50,000 of validation, seq 128, batch 32. Offline, the training text is
`wiki.train.raw.prefix` (a reconstruction of the first ~659 KB of wiki.train.raw,
see ../shared/data/README.md); only its first 500,000 characters are used.

Run (DEEPEXIT_DATA_DIR points at the folder holding wikitext-2-raw-v1/):
  DEEPEXIT_DATA_DIR=../shared/data deepexit-train \
      --config=experiments/configs/reference.py --workdir=runs/reference
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # remat="attention" keeps each layer's attention output and log-normaliser and
  # recomputes the rest in the backward pass: faster on CPU than storing the scan's
  # stacked residuals or recomputing attention (BUILD_NOTES.md, Performance); outputs
  # are unchanged.
  c.model = dict(num_layers=4, dim=32, num_heads=2, ffn_dim=128, max_len=128, dropout=0.0,
                 tie_embeddings=False, remat="attention", attention_chunks=2, dtype="float32")
  c.data = dict(
      dataset="wikitext2",
      data_dir=config_dict.placeholder(str),  # None: $DEEPEXIT_DATA_DIR, else download.
      tfds_dir=config_dict.placeholder(str),
      train_file=config_dict.placeholder(str),  # dataset=text_files only.
      val_file=config_dict.placeholder(str),
      split_fraction=0.9,  # Single-text datasets: the first 90% train.
      train_split="train_prefix",
      val_split="validation",
      train_chars=500_000,
      val_chars=50_000,
      tokenizer="char",
      bpe_vocab_size=8192,  # tokenizer="bpe" only.
      seq_len=128,
      batch_size=32,
  )
  c.loss_weights = "2:0.7,4:0.3"
  c.exit_layers = (2,)
  # Every TrainConfig field is declared so that any can be overridden by flag.
  c.train = dict(epochs=10, max_steps=config_dict.placeholder(int), learning_rate=3e-3,
                 min_lr_ratio=0.1, warmup_steps=50, weight_decay=0.01, grad_clip=1.0,
                 b1=0.9, b2=0.98, seed=0, eval_every=0, log_every=50,
                 num_devices=0)  # 0: data-parallel over every device.
  # Training recipes, all off (BUILD_NOTES.md, Training recipes; experiments/recipes/).
  c.recipe = dict(curriculum="none", rotation_period=2, gradual_fraction=0.5,
                  layer_dropout=0.0, layer_dropout_schedule="exponential",
                  confidence_power=0.0, kd_weight=0.0, kd_temperature=1.0)
  return c
