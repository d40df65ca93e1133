"""Saturation probes, part 1: collecting every layer's summaries of a text, and the labels.

Shapes: N layers, B batch, T time, D model width, V vocabulary, M collected tokens,
K top-k ranks, L = N - 1 transitions (see the `deepexit_jax.probes` docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepexit_jax import checkpoint, data, exits
from deepexit_jax.errors import UserError
from deepexit_jax.model import DeepSupervisionTransformer

Array = jax.Array

LABELS = ("change", "saturated", "final")


# ----------------------------------------------------------------------------------------
# Collection: one layer scan per batch, summaries only.


@dataclasses.dataclass
class Collection:
  """Per-layer summaries of M validation tokens, in text order (see module docstring).

  Attributes:
    hidden_NMD: [N + 1, M, D] float32 hidden states; index 0 is the embedding (the
      input of layer 1), index l the output of layer l. h_in of layer l is
      hidden[l - 1], h_out is hidden[l].
    topk_NMK: [N, M, K] int32 token ids ranked 1..K by each layer's exit head.
    softmax_NM, margin_NM, entropy_NM, state_NM: [N, M] the exit engine's
      confidence measures at every layer.
    nll_NM: [N, M] negative log-likelihood of the target at every layer.
    targets_M: [M] int32 next-token ids.
    positions_M: [M] int32 0-based positions inside their evaluation window.
    metadata: where the tokens came from (checkpoint, text, budget).
  """

  hidden_NMD: np.ndarray
  topk_NMK: np.ndarray
  softmax_NM: np.ndarray
  margin_NM: np.ndarray
  entropy_NM: np.ndarray
  state_NM: np.ndarray
  nll_NM: np.ndarray
  targets_M: np.ndarray
  positions_M: np.ndarray
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_layers(self) -> int:
    return self.topk_NMK.shape[0]

  @property
  def num_tokens(self) -> int:
    return self.topk_NMK.shape[1]

  @property
  def top1_NM(self) -> np.ndarray:
    return self.topk_NMK[..., 0]

  @property
  def h_in_NMD(self) -> np.ndarray:
    return self.hidden_NMD[:-1]

  @property
  def h_out_NMD(self) -> np.ndarray:
    return self.hidden_NMD[1:]

  @property
  def delta_NMD(self) -> np.ndarray:
    return self.hidden_NMD[1:] - self.hidden_NMD[:-1]

  def save(self, path: str) -> None:
    """Writes the arrays (and metadata as JSON) to one .npz file, atomically."""
    arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
              if f.name != "metadata"}
    tmp = path + ".tmp.npz"
    np.savez(tmp, metadata=np.asarray(json.dumps(self.metadata)), **arrays)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> Collection:
    if not os.path.exists(path):
      raise UserError(f"collection file {path} not found: run the collection first "
                      "(deepexit-probe without --collection, or collect())")
    with np.load(path) as f:
      fields = {k: f[k] for k in f.files if k != "metadata"}
      metadata = json.loads(str(f["metadata"]))
    return cls(metadata=metadata, **fields)


def trace_layer_summaries(model: DeepSupervisionTransformer, tokens_BT: Array,
                          targets_BT: Array, top_k: int,
                          use_scan: bool = True) -> dict[str, Array]:
  """Every layer's summaries [N, B, T, ...] from ONE layer scan, unjitted (to trace inside
  a caller's jit or `make_jaxpr`); `layer_summaries` is the jitted call, with the same
  arguments and outputs."""

  def body(i, h_in_BTD, h_out_BTD, carry):
    del i
    logits_BTV = model.head(h_out_BTD).astype(jnp.float32)
    logp_BTV = jax.nn.log_softmax(logits_BTV, -1)
    top_logp_BTK, top_ids_BTK = jax.lax.top_k(logp_BTV, max(top_k, 2))
    p_BT2 = jnp.exp(top_logp_BTK[..., :2])
    out = {
        "hidden": h_out_BTD.astype(jnp.float32),
        "topk": top_ids_BTK[..., :top_k].astype(jnp.int32),
        "softmax": p_BT2[..., 0],
        "margin": p_BT2[..., 0] - p_BT2[..., 1],
        "entropy": jnp.sum(jnp.exp(logp_BTV) * logp_BTV, -1),
        "state": exits.state_confidence(h_in_BTD, h_out_BTD),
        "nll": -jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1)[..., 0],
    }
    return h_out_BTD, carry, out

  h0_BTD = model.embed_tokens(tokens_BT)
  _, _, out = model.scan_layers(h0_BTD, body, use_scan=use_scan)
  out["embed"] = h0_BTD.astype(jnp.float32)
  return out


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k", "use_scan"))
def _summaries_jit(graphdef, state, tokens_BT, targets_BT, top_k, use_scan=True):
  return trace_layer_summaries(nnx.merge(graphdef, state), tokens_BT, targets_BT, top_k,
                               use_scan)


def layer_summaries(model: DeepSupervisionTransformer, tokens: Array, targets: Array, *,
                    top_k: int = 5, use_scan: bool = True) -> dict[str, Array]:
  """Jitted per-layer summaries of one batch (what `collect` keeps), [N, B, T, ...].

  Args:
    model: the early-exit model.
    tokens: int [B, T] inputs.
    targets: int [B, T] next tokens (for the per-layer NLL).
    top_k: ranks of each layer's prediction to keep (K >= 1).
    use_scan: False runs the model's Python-loop path (tested equal).

  Returns:
    {"embed" [B,T,D], "hidden" [N,B,T,D], "topk" [N,B,T,K], "softmax", "margin",
    "entropy", "state", "nll" [N,B,T]}.
  """
  graphdef, state = nnx.split(model)
  return _summaries_jit(graphdef, state, jnp.asarray(tokens, jnp.int32),
                        jnp.asarray(targets, jnp.int32), int(top_k), use_scan)


def collect(model: DeepSupervisionTransformer, batches: data.EvalBatches, num_tokens: int, *,
            top_k: int = 5, metadata: dict[str, Any] | None = None) -> Collection:
  """Collects the first `num_tokens` targets of a text (its evaluation windows in order).

  Args:
    model: the early-exit model.
    batches: `data.eval_batches` of the text; only the batches needed are run.
    num_tokens: the token budget M.
    top_k: ranks kept per layer.
    metadata: stored with the collection.

  Raises:
    UserError: the text has fewer than `num_tokens` targets, or top_k is out of range.
  """
  if not 1 <= top_k <= model.config.vocab_size:
    raise UserError(f"top_k={top_k} must be in 1..{model.config.vocab_size} (the vocabulary)")
  if num_tokens < 1 or num_tokens > batches.num_targets:
    raise UserError(
        f"token budget {num_tokens:,} exceeds the {batches.num_targets:,} targets of the "
        "validation text (or is < 1): lower --tokens or give a longer text (--val_chars)")
  per_batch = batches.inputs.shape[1] * batches.inputs.shape[2]
  parts: dict[str, list[np.ndarray]] = {}
  for b in range(math.ceil(num_tokens / per_batch)):
    out = jax.device_get(layer_summaries(model, batches.inputs[b], batches.targets[b],
                                         top_k=top_k))
    out["hidden"] = np.concatenate([out.pop("embed")[None], out["hidden"]])
    out["targets"] = np.asarray(batches.targets[b])[None]
    out["positions"] = np.broadcast_to(np.arange(batches.inputs.shape[2]),
                                       batches.inputs.shape[1:])[None]
    keep_M = np.asarray(batches.mask[b]).reshape(-1) > 0
    for name, value in out.items():  # every entry: [lead, B, T, trailing...]
      x = np.asarray(value)
      flat = x.reshape(x.shape[:1] + (-1,) + x.shape[3:])
      parts.setdefault(name, []).append(np.compress(keep_M, flat, axis=1))
  arr = {k: np.concatenate(v, axis=1) for k, v in parts.items()}
  m = num_tokens
  return Collection(
      hidden_NMD=arr["hidden"][:, :m], topk_NMK=arr["topk"][:, :m],
      softmax_NM=arr["softmax"][:, :m], margin_NM=arr["margin"][:, :m],
      entropy_NM=arr["entropy"][:, :m], state_NM=arr["state"][:, :m],
      nll_NM=arr["nll"][:, :m], targets_M=arr["targets"][0, :m].astype(np.int32),
      positions_M=arr["positions"][0, :m].astype(np.int32), metadata=dict(metadata or {}))


def text_batches(checkpoint_dir: str, *, skip_chars: int | None = None,
                 data_dir: str | None = None, text_file: str | None = None,
                 seq_len: int | None = None, batch_size: int | None = None
                 ) -> tuple[Any, data.EvalBatches, dict[str, Any]]:
  """The checkpoint's model and the text the probe study reads (`data.evaluation_text`).

  The text is the checkpoint's validation split AFTER its first `data.val_chars`
  characters (which chose the checkpoint and which `deepexit-sweep` evaluates), so a
  probe fitted here and then swept is scored on text it never saw; or `text_file`
  (required for a checkpoint without a training run, e.g. a Hugging Face directory).

  Args:
    checkpoint_dir: a `deepexit-train` workdir or a Hugging Face directory.
    skip_chars: characters of the text to skip; None: the run's data.val_chars (0 if it
      used the whole split), or 0 for `text_file`.
    data_dir: overrides the run's data.data_dir.
    text_file, seq_len, batch_size: see `data.evaluation_text`.

  Returns:
    (the loaded `checkpoint.Checkpoint`, evaluation batches, metadata).
  """
  ckpt = checkpoint.load_checkpoint(checkpoint_dir)
  text = data.evaluation_text(ckpt, part="after_validation", text_file=text_file,
                              skip_chars=skip_chars, seq_len=seq_len, batch_size=batch_size,
                              data_dir=data_dir)
  meta = {"checkpoint": checkpoint_dir, "checkpoint_abspath": ckpt.path, "step": ckpt.step,
          "text": text.description, "skip_chars": text.skip_chars, "seq_len": text.seq_len,
          "model": ckpt.model.config.to_dict()}
  return ckpt, text.batches, meta


# ----------------------------------------------------------------------------------------
# Labels: per transition l -> l + 1 (l = 1..N-1), from the per-layer top-1 [N, M].


def change_labels(top1_NM: np.ndarray) -> np.ndarray:
  """[N-1, M] True where the top-1 at layer l + 1 differs from the top-1 at layer l."""
  top1_NM = np.asarray(top1_NM)
  return top1_NM[1:] != top1_NM[:-1]


def saturated_labels(top1_NM: np.ndarray) -> np.ndarray:
  """[N-1, M] True where the top-1 at layer l equals the top-1 of every later layer."""
  top1_NM = np.asarray(top1_NM)
  same_next_LM = top1_NM[1:] == top1_NM[:-1]
  # Settled at l iff unchanged at l -> l+1 and settled at l+1 (layer N always is).
  return np.flip(np.logical_and.accumulate(np.flip(same_next_LM, 0), axis=0), 0)


def final_labels(top1_NM: np.ndarray) -> np.ndarray:
  """[N-1, M] True where the top-1 at layer l equals the last layer's (CALM's label)."""
  top1_NM = np.asarray(top1_NM)
  return top1_NM[:-1] == top1_NM[-1]


def settled_labels(label: str, top1_NM: np.ndarray) -> np.ndarray:
  """The POSITIVE class [N-1, M] of a label: "settled" (for `change`: unchanged)."""
  if label == "change":
    return ~change_labels(top1_NM)
  if label == "saturated":
    return saturated_labels(top1_NM)
  if label == "final":
    return final_labels(top1_NM)
  raise UserError(f"unknown label {label!r}: choose one of {', '.join(LABELS)}")
