"""The family of sparse dictionaries: the `SparseDictionary` base, one module per kind (`sae.py`: SAE and
transcoder), their activation functions and losses, and loading saved dictionaries by `sae_type`."""

from typing import Annotated, Union

from pydantic import Field

from lm_saes_core.models.base import (
    DICTIONARY_KINDS,
    NoOutputDirectionsError,
    Prepared,
    SparseDictionary,
    locate_pretrained,
    read_dictionary_config,
)
from lm_saes_core.models.config import SparseDictionaryConfig
from lm_saes_core.models.losses import LossCoefficients, LossConfig, LossOutput
from lm_saes_core.models.pretrained import PretrainedSAE, load_sparse_dictionary
from lm_saes_core.models.sae import SAEConfig, SparseAutoEncoder

DICTIONARY_CONFIGS = (SAEConfig,)
"""Every kind's config; a new kind adds its config here so settings files can name its `sae_type`."""

AnySAEConfig = Annotated[Union[DICTIONARY_CONFIGS], Field(discriminator="sae_type")]  # noqa: UP007
"""A dictionary config of any kind, chosen by its `sae_type`."""

__all__ = [
    "DICTIONARY_CONFIGS",
    "DICTIONARY_KINDS",
    "AnySAEConfig",
    "LossCoefficients",
    "LossConfig",
    "LossOutput",
    "NoOutputDirectionsError",
    "Prepared",
    "PretrainedSAE",
    "SAEConfig",
    "SparseAutoEncoder",
    "SparseDictionary",
    "SparseDictionaryConfig",
    "load_sparse_dictionary",
    "locate_pretrained",
    "read_dictionary_config",
]
