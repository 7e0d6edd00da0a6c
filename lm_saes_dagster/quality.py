"""The pipeline's quality bounds as asset-check results: the evaluation reports them, the analysis obeys them."""

import dagster as dg

from lm_saes_dagster.pipeline_config import QualityBounds

CHECK_NAMES = ("explained_variance_above_min", "dead_fraction_below_max", "l0_within_bounds")


def quality_checks(metrics: dict[str, float], quality: QualityBounds) -> list[dg.AssetCheckResult]:
    """The evaluation's bounds as check results (the same verdict gates the analysis)."""
    ev, dead, l0 = (metrics["metrics/explained_variance"], metrics["metrics/dead_fraction"], metrics["metrics/l0"])
    return [
        dg.AssetCheckResult(
            check_name="explained_variance_above_min",
            passed=ev >= quality.min_explained_variance,
            metadata={"explained_variance": ev, "min": quality.min_explained_variance},
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


def failed_bounds(metrics: dict[str, float], quality: QualityBounds) -> list[str]:
    """The failed checks, each with its metadata, e.g. "dead_fraction_below_max (dead_fraction=0.25, max=0.2)"."""
    return [
        f"{check.check_name} ({', '.join(f'{k}={v.value:.4g}' for k, v in check.metadata.items())})"
        for check in quality_checks(metrics, quality)
        if not check.passed
    ]
