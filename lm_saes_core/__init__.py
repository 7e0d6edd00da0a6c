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
from lm_saes_core.models import PretrainedSAE, SAEConfig, SparseAutoEncoder, load_sparse_dictionary
from lm_saes_core.runners import (
    CheckActivationConsistencySettings,
    EvaluateSAESettings,
    GenerateActivationsSettings,
    SweepingItem,
    SweepSAESettings,
    TrainSAESettings,
    check_activation_consistency,
    evaluate_sae,
    generate_activations,
    sweep_sae,
    train_sae,
)
from lm_saes_core.training import Initializer, InitializerConfig, Trainer, TrainerConfig
from lm_saes_core.wandb_logging import WandbConfig

__all__ = [
    "EvalConfig",
    "EvaluateSAESettings",
    "Evaluator",
    "Initializer",
    "InitializerConfig",
    "PretrainedSAE",
    "SAEConfig",
    "SparseAutoEncoder",
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
