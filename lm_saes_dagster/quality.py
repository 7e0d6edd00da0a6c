"""The pipeline's quality bounds as asset-check results: the evaluation reports them, the analysis obeys them.

A dictionary with several output hooks (a crosscoder's heads, a CLT's layers) must reach the explained-variance
bound both pooled over its hooks and on each hook: it is spliced in at all of them, so one badly reconstructed hook
is not hidden by the others. Dead fraction and L0 are the evaluation's pooled values (a crosscoder's L0 counts active
(head, feature) pairs, a CLT's the active features of every layer)."""

import dagster as dg

from lm_saes_core.models import SparseDictionaryConfig
from lm_saes_dagster.kinds import hook_metrics
from lm_saes_dagster.pipeline_config import QualityBounds

CHECK_NAMES = ("explained_variance_above_min", "dead_fraction_below_max", "l0_within_bounds")


def quality_checks(
    metrics: dict[str, float], quality: QualityBounds, sae: SparseDictionaryConfig | None = None
) -> list[dg.AssetCheckResult]:
    """The evaluation's bounds as check results (the same verdict gates the analysis); `sae` (the item's dictionary
    config) names the per-hook metrics of a dictionary with several outputs."""
    ev, dead, l0 = (metrics["metrics/explained_variance"], metrics["metrics/dead_fraction"], metrics["metrics/l0"])
    per_hook = {
        hook: values["explained_variance"]
        for hook, values in (hook_metrics(sae, metrics) if sae is not None else {}).items()
        if "explained_variance" in values
    }
    worst = min(per_hook.values(), default=ev)
    worst_hook = (
        {"worst_hook": min(per_hook, key=per_hook.get), "worst_hook_explained_variance": worst} if per_hook else {}
    )
    return [
        dg.AssetCheckResult(
            check_name="explained_variance_above_min",
            passed=all(value >= quality.min_explained_variance for value in (ev, *per_hook.values())),  # NaN fails
            metadata={
                "explained_variance": ev,
                "min": quality.min_explained_variance,
                **worst_hook,
            },
        ),
        dg.AssetCheckResult(
            check_name="dead_fraction_below_max",
            passed=dead <= quality.max_dead_fraction,
            metadata={"dead_fraction": dead, "max": quality.max_dead_fraction},
        ),
        dg.AssetCheckResult(
            check_name="l0_within_bounds",
            passed=quality.min_l0 <= l0 <= quality.max_l0,
            metadata={"l0": l0, "min": quality.min_l0, "max": quality.max_l0},
        ),
    ]


def failed_bounds(
    metrics: dict[str, float], quality: QualityBounds, sae: SparseDictionaryConfig | None = None
) -> list[str]:
    """The failed checks, each with its metadata, e.g. "dead_fraction_below_max (dead_fraction=0.25, max=0.2)"."""
    return [
        f"{check.check_name} ({', '.join(f'{k}={_value(v.value)}' for k, v in check.metadata.items())})"
        for check in quality_checks(metrics, quality, sae)
        if not check.passed
    ]


def _value(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else str(value)
