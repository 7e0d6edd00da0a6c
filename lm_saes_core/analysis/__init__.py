"""Analysing trained dictionaries: per-feature activation statistics and sample contexts."""

from lm_saes_core.analysis.feature_analyzer import (
    ActivationBand,
    ContextBatch,
    FeatureAnalysisState,
    FeatureAnalyzer,
    FeatureAnalyzerConfig,
    SamplePool,
    encode_contexts,
)

__all__ = [
    "ActivationBand",
    "ContextBatch",
    "FeatureAnalysisState",
    "FeatureAnalyzer",
    "FeatureAnalyzerConfig",
    "SamplePool",
    "encode_contexts",
]
