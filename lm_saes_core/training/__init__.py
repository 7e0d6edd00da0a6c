"""Initialising and training sparse dictionaries."""

from lm_saes_core.training.checkpoint import find_latest_checkpoint
from lm_saes_core.training.config import TrainerConfig
from lm_saes_core.training.initializer import Initializer, InitializerConfig
from lm_saes_core.training.trainer import NonFiniteTrainingError, Trainer, TrainResult

__all__ = [
    "Initializer",
    "InitializerConfig",
    "NonFiniteTrainingError",
    "TrainResult",
    "Trainer",
    "TrainerConfig",
    "find_latest_checkpoint",
]
