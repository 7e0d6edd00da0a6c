"""The runners: each composes the library's pieces into one job driven by one settings object."""

from lm_saes_core.runners.analyze import AnalyzeCrossCoderSettings, AnalyzeSAESettings, analyze_crosscoder, analyze_sae
from lm_saes_core.runners.autointerp import AutoInterpResult, AutoInterpSettings, auto_interp
from lm_saes_core.runners.consistency import (
    CheckActivationConsistencySettings,
    ConsistencyReport,
    check_activation_consistency,
)
from lm_saes_core.runners.convert import ConversionResult, ConvertTopKToJumpReLUSettings, convert_topk_to_jumprelu
from lm_saes_core.runners.dla import DirectLogitAttributeSettings, direct_logit_attribute
from lm_saes_core.runners.evaluate import (
    EvaluateCrossCoderSettings,
    EvaluateSAESettings,
    evaluate_crosscoder,
    evaluate_sae,
)
from lm_saes_core.runners.generate import GenerateActivationsSettings, GenerationResult, generate_activations
from lm_saes_core.runners.head_groups import HeadGroupFactory
from lm_saes_core.runners.train import (
    SweepingItem,
    SweepSAESettings,
    TrainCLTSettings,
    TrainCrossCoderSettings,
    TrainLorsaSettings,
    TrainMOLTSettings,
    TrainSAESettings,
    sweep_sae,
    train_clt,
    train_crosscoder,
    train_lorsa,
    train_molt,
    train_sae,
)

__all__ = [
    "AnalyzeCrossCoderSettings",
    "analyze_crosscoder",
    "EvaluateCrossCoderSettings",
    "evaluate_crosscoder",
    "HeadGroupFactory",
    "TrainCLTSettings",
    "TrainCrossCoderSettings",
    "TrainLorsaSettings",
    "TrainMOLTSettings",
    "train_clt",
    "train_crosscoder",
    "train_lorsa",
    "train_molt",
    "AnalyzeSAESettings",
    "AutoInterpResult",
    "AutoInterpSettings",
    "DirectLogitAttributeSettings",
    "analyze_sae",
    "auto_interp",
    "direct_logit_attribute",
    "CheckActivationConsistencySettings",
    "ConsistencyReport",
    "ConversionResult",
    "ConvertTopKToJumpReLUSettings",
    "convert_topk_to_jumprelu",
    "EvaluateSAESettings",
    "GenerateActivationsSettings",
    "GenerationResult",
    "SweepSAESettings",
    "SweepingItem",
    "TrainSAESettings",
    "check_activation_consistency",
    "evaluate_sae",
    "generate_activations",
    "sweep_sae",
    "train_sae",
]
