"""lm-saes core: sparse dictionaries on language-model activations (torch only; no Dagster)."""

from lm_saes_core.activation.config import (
    ActivationFactoryActivationsSource,
    ActivationFactoryConfig,
    ActivationFactoryDatasetSource,
    ActivationFactoryTarget,
    BufferShuffleConfig,
)
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.activation.reader import CachedActivations
from lm_saes_core.activation.writer import ActivationWriter, ActivationWriterConfig
from lm_saes_core.analysis import ActivationBand, FeatureAnalyzer, FeatureAnalyzerConfig
from lm_saes_core.analysis.autointerp import AutoInterpConfig
from lm_saes_core.backend import (
    HuggingFaceLanguageModel,
    LanguageModel,
    LanguageModelConfig,
    TransformerLensLanguageModel,
    load_model,
)
from lm_saes_core.config import MongoDBConfig, load_config
from lm_saes_core.data import DatasetConfig, load_dataset
from lm_saes_core.evaluation import EvalConfig, Evaluator
from lm_saes_core.log import setup_logging
from lm_saes_core.models import (
    LossConfig,
    PretrainedSAE,
    SAEConfig,
    SparseAutoEncoder,
    SparseDictionary,
    SparseDictionaryConfig,
    load_sparse_dictionary,
)
from lm_saes_core.runners import (
    AnalyzeSAESettings,
    AutoInterpSettings,
    CheckActivationConsistencySettings,
    DirectLogitAttributeSettings,
    EvaluateSAESettings,
    GenerateActivationsSettings,
    SweepingItem,
    SweepSAESettings,
    TrainSAESettings,
    analyze_sae,
    auto_interp,
    check_activation_consistency,
    direct_logit_attribute,
    evaluate_sae,
    generate_activations,
    sweep_sae,
    train_sae,
)
from lm_saes_core.store import RecordStore, RecordStoreConfig, open_store
from lm_saes_core.training import Initializer, InitializerConfig, Trainer, TrainerConfig
from lm_saes_core.wandb_logging import WandbConfig

__all__ = [
    "ActivationBand",
    "AnalyzeSAESettings",
    "AutoInterpConfig",
    "AutoInterpSettings",
    "DirectLogitAttributeSettings",
    "FeatureAnalyzer",
    "FeatureAnalyzerConfig",
    "RecordStore",
    "RecordStoreConfig",
    "analyze_sae",
    "auto_interp",
    "direct_logit_attribute",
    "open_store",
    "EvalConfig",
    "EvaluateSAESettings",
    "Evaluator",
    "Initializer",
    "InitializerConfig",
    "PretrainedSAE",
    "SAEConfig",
    "SparseAutoEncoder",
    "SparseDictionary",
    "SparseDictionaryConfig",
    "LossConfig",
    "SweepSAESettings",
    "SweepingItem",
    "TrainSAESettings",
    "Trainer",
    "TrainerConfig",
    "WandbConfig",
    "evaluate_sae",
    "load_sparse_dictionary",
    "sweep_sae",
    "train_sae",
    "ActivationFactory",
    "ActivationFactoryActivationsSource",
    "ActivationFactoryConfig",
    "ActivationFactoryDatasetSource",
    "ActivationFactoryTarget",
    "ActivationWriter",
    "ActivationWriterConfig",
    "BufferShuffleConfig",
    "CachedActivations",
    "CheckActivationConsistencySettings",
    "DatasetConfig",
    "GenerateActivationsSettings",
    "HuggingFaceLanguageModel",
    "LanguageModel",
    "LanguageModelConfig",
    "MongoDBConfig",
    "TransformerLensLanguageModel",
    "check_activation_consistency",
    "generate_activations",
    "load_config",
    "load_dataset",
    "load_model",
    "setup_logging",
]
