"""The family of sparse dictionaries: the `SparseDictionary` base, one module per kind (`sae.py`: SAE and
transcoder, `crosscoder.py`, `clt.py`: cross-layer transcoder, `molt.py`: mixture of linear transforms; all four
share `sparse_coder.py`'s dense and sparse paths), their activation functions and losses, and loading saved
dictionaries by `sae_type`."""

from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag

from lm_saes_core.models.base import (
    DICTIONARY_KINDS,
    NoOutputDirectionsError,
    Prepared,
    SparseDictionary,
    locate_pretrained,
    read_dictionary_config,
)
from lm_saes_core.models.clt import CLTConfig, CrossLayerTranscoder
from lm_saes_core.models.config import SparseDictionaryConfig
from lm_saes_core.models.crosscoder import CrossCoder, CrossCoderConfig
from lm_saes_core.models.lorsa import LorsaConfig, LowRankSparseAttention
from lm_saes_core.models.losses import LossCoefficients, LossConfig, LossOutput
from lm_saes_core.models.molt import MixtureOfLinearTransforms, MOLTConfig
from lm_saes_core.models.pretrained import PretrainedSAE, load_sparse_dictionary
from lm_saes_core.models.sae import SAEConfig, SparseAutoEncoder

DICTIONARY_CONFIGS = (SAEConfig, CrossCoderConfig, CLTConfig, MOLTConfig, LorsaConfig)
"""Every kind's config; a new kind adds its config here so settings files can name its `sae_type`."""
DEFAULT_SAE_TYPE = "sae"
"""What a config without `sae_type` means (files written before there were other kinds)."""


def sae_type_of(value: Any) -> str:
    """The kind a config (or a mapping about to become one) names."""
    if isinstance(value, dict):
        return str(value.get("sae_type", DEFAULT_SAE_TYPE))
    return value.sae_type


def tagged_dictionary_configs() -> tuple:
    """Every kind's config tagged with its `sae_type`, for discriminated unions."""
    return tuple(Annotated[cfg, Tag(cfg.model_fields["sae_type"].default)] for cfg in DICTIONARY_CONFIGS)


KNOWN_SAE_TYPES = [cfg.model_fields["sae_type"].default for cfg in DICTIONARY_CONFIGS]

AnySAEConfig = Annotated[
    Union[tagged_dictionary_configs()],  # noqa: UP007
    Discriminator(
        sae_type_of, custom_error_type="sae_type", custom_error_message=f"unknown sae_type (known: {KNOWN_SAE_TYPES})"
    ),  # fmt: skip
]
"""A dictionary config of any kind, chosen by its `sae_type` ("sae" when it names none)."""

__all__ = [
    "DEFAULT_SAE_TYPE",
    "DICTIONARY_CONFIGS",
    "KNOWN_SAE_TYPES",
    "DICTIONARY_KINDS",
    "AnySAEConfig",
    "CLTConfig",
    "CrossCoder",
    "CrossCoderConfig",
    "CrossLayerTranscoder",
    "LorsaConfig",
    "LowRankSparseAttention",
    "LossCoefficients",
    "LossConfig",
    "LossOutput",
    "MixtureOfLinearTransforms",
    "MOLTConfig",
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
    "sae_type_of",
    "tagged_dictionary_configs",
]
