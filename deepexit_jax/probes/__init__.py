"""Saturation probes: when is a token's top-1 prediction settled, and can a layer tell?

Shapes (suffixes on locals): N layers, B batch, T time, D model width, V vocabulary,
M collected tokens, K top-k ranks, L = N - 1 transitions (layer l -> l + 1 for
l = 1..N-1, indexed l - 1), F probe input features, H probe hidden width, G fitted
groups (one per layer, or one shared).

Pipeline:
  collect   one jitted pass of the model's single layer scan per batch keeps, per
            layer, the input/output hidden states, the top-k token ids of the shared
            exit head, the exit engine's confidences and the target NLL; the [B, T, V]
            logits of a layer live only inside the scan body, so nothing of size
            [N, B, T, V] is ever materialised (vocabularies of 32k fit).
  labels    from the per-layer top-1 (LABELS): `change` (top-1 at l + 1 differs from
            top-1 at l, the reference's transition l -> l + 1), `saturated` (top-1 at l
            equals the top-1 of EVERY later layer, strict) and `final` (top-1 at l
            equals the last layer's, CALM's label).
  predict   per transition, from what layer l has when it must decide to exit
            (h_in, h_out, delta = h_out - h_in): `delta_norm` (threshold on ||delta||),
            `linear` (logistic regression on delta), `mlp` (on delta), `mlp_h_delta`
            (on [h_out, delta]), `shared_mlp` (one MLP for all layers, with a learned
            layer embedding), and the exit engine's `state` and `softmax` measures as
            baselines. Fitted on the first part of the tokens, scored on the rest.
  metrics   the POSITIVE class is always "settled": label `change` is predicted as
            its complement (top-1 unchanged at the next layer), `saturated`/`final`
            as given. F1, precision, recall, AUROC, and the trivial baselines (the
            majority class's accuracy; F1 of always predicting "settled").

Every fitted probe is a `SaturationProbe` (a `ConfidenceProbe` for
`predict_with_exit(..., measure="probe")`) whose confidence is its estimated
probability that the layer's top-1 is settled; 0.5 is the decision threshold that
the study scores.

Files, in pipeline order: `collection` (collect, `Collection`, labels), `metrics`
(F1, AUROC, ...), `predictors` (`SaturationProbe`, `fit_probe`, `save_probe` /
`load_probe`), `study` (`run_study`, analyses, the `deepexit-probe` pipeline
`run_probes`). The reports are `deepexit_jax.report.probes`; the binary is
`deepexit_jax.main.probe`.
"""

from deepexit_jax.probes.collection import (
    LABELS,
    Collection,
    change_labels,
    collect,
    final_labels,
    layer_summaries,
    saturated_labels,
    settled_labels,
    text_batches,
    trace_layer_summaries,
)
from deepexit_jax.probes.metrics import auroc, best_f1_threshold, binary_metrics, pearson_r
from deepexit_jax.probes.predictors import (
    LAYER_EMBED_DIM,
    LEARNED,
    PREDICTORS,
    PROBE_JSON,
    FitConfig,
    SaturationProbe,
    fit_probe,
    load_probe,
    probe_features,
    probe_flops,
    probe_scores,
    save_probe,
)
from deepexit_jax.probes.study import (
    DEFAULT_TOKENS,
    ProbeStudy,
    analyses,
    run_probes,
    run_study,
    topk_settling,
)

__all__ = [
    "DEFAULT_TOKENS", "LABELS", "LAYER_EMBED_DIM", "LEARNED", "PREDICTORS", "PROBE_JSON",
    "Collection", "FitConfig", "ProbeStudy", "SaturationProbe", "analyses", "auroc",
    "best_f1_threshold", "binary_metrics", "change_labels", "collect", "final_labels",
    "fit_probe", "layer_summaries", "load_probe", "pearson_r", "probe_features",
    "probe_flops", "probe_scores", "run_probes", "run_study", "saturated_labels",
    "save_probe", "settled_labels", "text_batches", "topk_settling", "trace_layer_summaries",
]
