"""Loading saved sparse dictionaries by their `sae_type`, and the runner-side reference to saved weights."""

from pathlib import Path

import torch

from lm_saes_core.config import BaseModelConfig
from lm_saes_core.models.base import SparseDictionary


def load_sparse_dictionary(
    path: str | Path,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    fold_activation_scale: bool = False,
    strict_loading: bool = True,
) -> SparseDictionary:
    """Load a saved dictionary (directory with config.json + weights) as the kind its `sae_type` names, in eval
    mode (ready for inference)."""
    return SparseDictionary.from_pretrained(
        path, device=device, dtype=dtype, fold_activation_scale=fold_activation_scale, strict_loading=strict_loading
    )


class PretrainedSAE(BaseModelConfig):
    """Saved weights to start from or to evaluate/analyse (a local directory written by `save_pretrained`)."""

    pretrained_name_or_path: str
    fold_activation_scale: bool = True
    """Fold a dataset-wise model's activation scale into its weights after loading, so it takes raw activations."""
    strict_loading: bool = True

    def load(self) -> SparseDictionary:
        return load_sparse_dictionary(
            self.pretrained_name_or_path,
            device=self.device,
            dtype=self.dtype,
            fold_activation_scale=self.fold_activation_scale,
            strict_loading=self.strict_loading,
        )
