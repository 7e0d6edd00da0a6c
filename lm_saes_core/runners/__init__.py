"""The runners: each composes the library's pieces into one job driven by one settings object."""

from lm_saes_core.runners.consistency import (
    CheckActivationConsistencySettings,
    ConsistencyReport,
    check_activation_consistency,
)
from lm_saes_core.runners.generate import GenerateActivationsSettings, GenerationResult, generate_activations

__all__ = [
    "CheckActivationConsistencySettings",
    "ConsistencyReport",
    "GenerateActivationsSettings",
    "GenerationResult",
    "check_activation_consistency",
    "generate_activations",
]
