"""lm-saes core: sparse dictionaries on language-model activations (torch only; no Dagster).

The public names below are imported on first use (PEP 562), so importing a submodule (e.g. the Pipes entry point,
`python -m lm_saes_core.pipes_entry`) does not load torch and every runner first.
"""

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "ConvertTopKToJumpReLUSettings": "lm_saes_core.runners",
    "convert_topk_to_jumprelu": "lm_saes_core.runners",
    "CLTConfig": "lm_saes_core.models",
    "CrossLayerTranscoder": "lm_saes_core.models",
    "MOLTConfig": "lm_saes_core.models",
    "MixtureOfLinearTransforms": "lm_saes_core.models",
    "LorsaConfig": "lm_saes_core.models",
    "LowRankSparseAttention": "lm_saes_core.models",
    "CrossCoderConfig": "lm_saes_core.models",
    "CrossCoder": "lm_saes_core.models",
    "ActivationFactoryActivationsSource": "lm_saes_core.activation.config",
    "ActivationFactoryConfig": "lm_saes_core.activation.config",
    "ActivationFactoryDatasetSource": "lm_saes_core.activation.config",
    "ActivationFactoryTarget": "lm_saes_core.activation.config",
    "BufferShuffleConfig": "lm_saes_core.activation.config",
    "ActivationFactory": "lm_saes_core.activation.factory",
    "CachedActivations": "lm_saes_core.activation.reader",
    "ActivationWriter": "lm_saes_core.activation.writer",
    "ActivationWriterConfig": "lm_saes_core.activation.writer",
    "ActivationBand": "lm_saes_core.analysis",
    "FeatureAnalyzer": "lm_saes_core.analysis",
    "FeatureAnalyzerConfig": "lm_saes_core.analysis",
    "AutoInterpConfig": "lm_saes_core.analysis.autointerp",
    "HuggingFaceLanguageModel": "lm_saes_core.backend",
    "LanguageModel": "lm_saes_core.backend",
    "LanguageModelConfig": "lm_saes_core.backend",
    "load_model": "lm_saes_core.backend",
    "TransformerLensLanguageModel": "lm_saes_core.backend",
    "load_config": "lm_saes_core.config",
    "MongoDBConfig": "lm_saes_core.config",
    "DatasetConfig": "lm_saes_core.data",
    "load_dataset": "lm_saes_core.data",
    "EvalConfig": "lm_saes_core.evaluation",
    "Evaluator": "lm_saes_core.evaluation",
    "setup_logging": "lm_saes_core.log",
    "load_sparse_dictionary": "lm_saes_core.models",
    "LossConfig": "lm_saes_core.models",
    "PretrainedSAE": "lm_saes_core.models",
    "SAEConfig": "lm_saes_core.models",
    "SparseAutoEncoder": "lm_saes_core.models",
    "SparseDictionary": "lm_saes_core.models",
    "SparseDictionaryConfig": "lm_saes_core.models",
    "AnalyzeCrossCoderSettings": "lm_saes_core.runners",
    "analyze_crosscoder": "lm_saes_core.runners",
    "EvaluateCrossCoderSettings": "lm_saes_core.runners",
    "evaluate_crosscoder": "lm_saes_core.runners",
    "HeadGroupFactory": "lm_saes_core.runners",
    "TrainCLTSettings": "lm_saes_core.runners",
    "TrainCrossCoderSettings": "lm_saes_core.runners",
    "train_clt": "lm_saes_core.runners",
    "TrainMOLTSettings": "lm_saes_core.runners",
    "train_molt": "lm_saes_core.runners",
    "TrainLorsaSettings": "lm_saes_core.runners",
    "train_lorsa": "lm_saes_core.runners",
    "train_crosscoder": "lm_saes_core.runners",
    "analyze_sae": "lm_saes_core.runners",
    "AnalyzeSAESettings": "lm_saes_core.runners",
    "auto_interp": "lm_saes_core.runners",
    "AutoInterpSettings": "lm_saes_core.runners",
    "check_activation_consistency": "lm_saes_core.runners",
    "CheckActivationConsistencySettings": "lm_saes_core.runners",
    "direct_logit_attribute": "lm_saes_core.runners",
    "DirectLogitAttributeSettings": "lm_saes_core.runners",
    "evaluate_sae": "lm_saes_core.runners",
    "EvaluateSAESettings": "lm_saes_core.runners",
    "generate_activations": "lm_saes_core.runners",
    "GenerateActivationsSettings": "lm_saes_core.runners",
    "sweep_sae": "lm_saes_core.runners",
    "SweepingItem": "lm_saes_core.runners",
    "SweepSAESettings": "lm_saes_core.runners",
    "train_sae": "lm_saes_core.runners",
    "TrainSAESettings": "lm_saes_core.runners",
    "open_store": "lm_saes_core.store",
    "RecordStore": "lm_saes_core.store",
    "RecordStoreConfig": "lm_saes_core.store",
    "Initializer": "lm_saes_core.training",
    "InitializerConfig": "lm_saes_core.training",
    "Trainer": "lm_saes_core.training",
    "TrainerConfig": "lm_saes_core.training",
    "WandbConfig": "lm_saes_core.wandb_logging",
}
"""Public name -> the module that defines it."""

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
