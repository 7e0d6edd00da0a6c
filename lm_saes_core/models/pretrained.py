"""Loading saved sparse dictionaries by their `sae_type`, and the runner-side reference to saved weights."""

from pathlib import Path

import torch

from lm_saes_core.config import BaseModelConfig, ConfigError
from lm_saes_core.models.sae import SparseAutoEncoder, locate_pretrained, read_config_json

DICTIONARY_CLASSES: dict[str, type[SparseAutoEncoder]] = {"sae": SparseAutoEncoder}
"""sae_type -> model class; later dictionary types (crosscoder, clt, lorsa, molt) are added here."""


def load_sparse_dictionary(
    path: str | Path,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    fold_activation_scale: bool = False,
    strict_loading: bool = True,
) -> SparseAutoEncoder:
    """Load a saved dictionary (directory with config.json + weights) as the class its `sae_type` names."""
    config_file, _ = locate_pretrained(path)
    sae_type = read_config_json(config_file).get("sae_type")
    if sae_type not in DICTIONARY_CLASSES:
        raise ConfigError(
            f"{config_file}: unknown sae_type {sae_type!r}; known dictionary types: {sorted(DICTIONARY_CLASSES)}"
        )
    return DICTIONARY_CLASSES[sae_type].from_pretrained(
        path, device=device, dtype=dtype, fold_activation_scale=fold_activation_scale, strict_loading=strict_loading
    )


class PretrainedSAE(BaseModelConfig):
    """Saved weights to start from or to evaluate/analyse (a local directory written by `save_pretrained`)."""

    pretrained_name_or_path: str
    fold_activation_scale: bool = True
    """Fold a dataset-wise model's activation scale into its weights after loading, so it takes raw activations."""
    strict_loading: bool = True

    def load(self) -> SparseAutoEncoder:
        return load_sparse_dictionary(
            self.pretrained_name_or_path,
            device=self.device,
            dtype=self.dtype,
            fold_activation_scale=self.fold_activation_scale,
            strict_loading=self.strict_loading,
        )
