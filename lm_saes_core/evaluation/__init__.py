"""Evaluating sparse dictionaries: metrics over an activation stream and with the dictionary spliced into the
language model (`evaluator`), and the activation-frequency bounds and histogram shared with training (`frequency`)."""

from lm_saes_core.evaluation.evaluator import EvalConfig, EvalResult, Evaluator, limit_mask, zero_ablation
from lm_saes_core.evaluation.frequency import FREQUENCY_BOUNDS, FrequencyHistogram, frequency_counts

__all__ = [
    "FREQUENCY_BOUNDS",
    "EvalConfig",
    "EvalResult",
    "Evaluator",
    "FrequencyHistogram",
    "frequency_counts",
    "limit_mask",
    "zero_ablation",
]
