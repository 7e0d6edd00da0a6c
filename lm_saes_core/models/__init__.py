"""Sparse dictionaries: configs, the SAE/transcoder model, loading saved models."""

from lm_saes_core.models.config import AnySAEConfig, SAEConfig, SparseDictionaryConfig
from lm_saes_core.models.pretrained import PretrainedSAE, load_sparse_dictionary
from lm_saes_core.models.sae import LossOutput, SparseAutoEncoder

__all__ = [
    "AnySAEConfig",
    "LossOutput",
    "PretrainedSAE",
    "SAEConfig",
    "SparseAutoEncoder",
    "SparseDictionaryConfig",
    "load_sparse_dictionary",
]
