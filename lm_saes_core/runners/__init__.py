"""The runners: each composes the library's pieces into one job driven by one settings object.

The names below are imported on first use (PEP 562), so importing one runner's module (the Pipes entry point, the
CLI) does not load every other runner and its libraries first."""

from lm_saes_core.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "AnalyzeCrossCoderSettings": "lm_saes_core.runners.analyze",
    "AnalyzeSAESettings": "lm_saes_core.runners.analyze",
    "analyze_crosscoder": "lm_saes_core.runners.analyze",
    "analyze_sae": "lm_saes_core.runners.analyze",
    "AutoInterpResult": "lm_saes_core.runners.autointerp",
    "AutoInterpSettings": "lm_saes_core.runners.autointerp",
    "auto_interp": "lm_saes_core.runners.autointerp",
    "CheckActivationConsistencySettings": "lm_saes_core.runners.consistency",
    "ConsistencyReport": "lm_saes_core.runners.consistency",
    "check_activation_consistency": "lm_saes_core.runners.consistency",
    "ConversionResult": "lm_saes_core.runners.convert",
    "ConvertTopKToJumpReLUSettings": "lm_saes_core.runners.convert",
    "convert_topk_to_jumprelu": "lm_saes_core.runners.convert",
    "DirectLogitAttributeSettings": "lm_saes_core.runners.dla",
    "direct_logit_attribute": "lm_saes_core.runners.dla",
    "EvaluateCrossCoderSettings": "lm_saes_core.runners.evaluate",
    "EvaluateSAESettings": "lm_saes_core.runners.evaluate",
    "evaluate_crosscoder": "lm_saes_core.runners.evaluate",
    "evaluate_sae": "lm_saes_core.runners.evaluate",
    "GenerateActivationsSettings": "lm_saes_core.runners.generate",
    "GenerationResult": "lm_saes_core.runners.generate",
    "generate_activations": "lm_saes_core.runners.generate",
    "HeadGroupFactory": "lm_saes_core.runners.head_groups",
    "SweepSAESettings": "lm_saes_core.runners.train",
    "SweepingItem": "lm_saes_core.runners.train",
    "TrainCLTSettings": "lm_saes_core.runners.train",
    "TrainCrossCoderSettings": "lm_saes_core.runners.train",
    "TrainLorsaSettings": "lm_saes_core.runners.train",
    "TrainMOLTSettings": "lm_saes_core.runners.train",
    "TrainSAESettings": "lm_saes_core.runners.train",
    "sweep_sae": "lm_saes_core.runners.train",
    "train_clt": "lm_saes_core.runners.train",
    "train_crosscoder": "lm_saes_core.runners.train",
    "train_lorsa": "lm_saes_core.runners.train",
    "train_molt": "lm_saes_core.runners.train",
    "train_sae": "lm_saes_core.runners.train",
}
"""Public name -> the module that defines it."""

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
