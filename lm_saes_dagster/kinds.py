"""What the assets need to know about a dictionary's kind without its weights: how many features the analysis
numbers (a CLT's every layer's, a crosscoder's one per shared feature) and under which names the evaluation reports
each output hook's metrics (the kind's own names: `crosscoder_metrics/<head>/...`, a CLT's `..._L<l>`).

Both come from the kind's class itself, built on the meta device (no memory, no weights, microseconds), so a new kind
needs no change here."""

from functools import cache

from lm_saes_core.models import SparseDictionary, SparseDictionaryConfig

GROUP_METRICS = ("explained_variance", "l0")
"""Per output hook metrics that the evaluation asset shows and the quality checks read (l0 where the hook's layer or
head owns its features)."""


@cache
def _shell(sae_type: str, payload: str) -> SparseDictionary:
    kind = SparseDictionary.kind(sae_type)
    return kind(kind.config_class.model_validate_json(payload).model_copy(update={"device": "meta"}))


def shell(sae: SparseDictionaryConfig) -> SparseDictionary:
    """The kind's module for `sae` on the meta device: sizes and metric names, no weights."""
    return _shell(sae.sae_type, sae.model_dump_json())


def n_analysed_features(sae: SparseDictionaryConfig) -> int:
    """Features as the analysis and the logit attributions number them (d_sae for an SAE or crosscoder, n_layers x
    d_sae for a CLT)."""
    return shell(sae).n_analysed_features


def hook_metrics(sae: SparseDictionaryConfig, metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """{output hook: {metric: value}} of the GROUP_METRICS the evaluation reported per output hook; {} for a
    dictionary with one output (its pooled metrics are that hook's)."""
    model = shell(sae)
    result: dict[str, dict[str, float]] = {}
    for group, hook in enumerate(model.metric_groups):
        values = {metric: metrics.get(model.group_metric_key(group, metric)) for metric in GROUP_METRICS}
        result[hook] = {metric: float(value) for metric, value in values.items() if value is not None}
    return result
