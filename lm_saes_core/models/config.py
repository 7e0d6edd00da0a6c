"""The config every sparse dictionary shares; each kind's own config (discriminated on `sae_type`, so a settings
file says which kind it means) lives in the kind's module and subclasses this one."""

from typing import Literal

from pydantic import Field, model_validator

from lm_saes_core.config import BaseModelConfig
from lm_saes_core.models.activation_functions import ACTIVATION_FUNCTIONS

ActivationFunctionName = Literal["relu", "jumprelu", "topk", "batchtopk", "layertopk", "batchlayertopk"]
"""The last two rank features across the layers of a CLT."""
NormActivation = Literal["token-wise", "dataset-wise", "inference"]


class SparseDictionaryConfig(BaseModelConfig):
    """Fields every sparse dictionary shares. Exactly one of `expansion_factor` and `d_sae` sets the width."""

    sae_type: str
    d_model: int = Field(gt=0)
    expansion_factor: float | None = Field(default=None, gt=0)
    d_sae: int | None = Field(default=None, gt=0)
    use_decoder_bias: bool = True
    act_fn: ActivationFunctionName = "relu"
    norm_activation: NormActivation = "dataset-wise"
    """How inputs are scaled before encoding: `token-wise` (every token to norm sqrt(d_model)), `dataset-wise` (one
    scale per hook point, sqrt(d_model) / mean token norm, estimated from data), `inference` (no scaling: raw
    activations, e.g. after the dataset-wise scale was folded into the weights)."""
    dataset_average_activation_norm: dict[str, float] | None = None
    """Mean token L2 norm per hook point (dataset-wise normalisation); set by the initializer, saved with the model."""
    sparsity_include_decoder_norm: bool = True
    """Apply the activation function to h * ||W_D,i|| (each feature's contribution) instead of h."""
    top_k: int = Field(default=50, gt=0)
    jumprelu_threshold_window: float = Field(default=2.0, gt=0)
    """Width of the rectangular kernel of the JumpReLU threshold gradient (the bandwidth)."""

    @model_validator(mode="after")
    def _width(self) -> "SparseDictionaryConfig":
        if (self.expansion_factor is None) == (self.d_sae is None):
            raise ValueError("give exactly one of expansion_factor and d_sae")
        if self.d_sae is None:
            d_sae = int(self.d_model * self.expansion_factor)
            if d_sae < 1:
                raise ValueError(
                    f"d_sae = int(d_model * expansion_factor) = int({self.d_model} * {self.expansion_factor}) = {d_sae}"
                    "; it must be at least 1"
                )
            object.__setattr__(self, "d_sae", d_sae)
            object.__setattr__(self, "expansion_factor", None)
        activation = ACTIVATION_FUNCTIONS[self.act_fn]
        if activation.uses_k and not activation.spans_groups and self.top_k > self.d_sae:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed d_sae ({self.d_sae})")
        return self

    def shard_fields(self, size: int) -> dict:
        """Fields besides d_sae that a feature shard's config divides by the shard count `size` (none here)."""
        return {}

    @property
    def hooks_in(self) -> list[str]:
        """Hook points the dictionary reads."""
        raise NotImplementedError

    @property
    def hooks_out(self) -> list[str]:
        """Hook points the dictionary reconstructs (and replaces when spliced into the model)."""
        raise NotImplementedError

    @property
    def hook_points(self) -> list[str]:
        """Every hook point whose activations a batch must hold: the inputs, then the outputs not read."""
        return list(dict.fromkeys([*self.hooks_in, *self.hooks_out]))

    def hook_widths(self) -> list[tuple[str, int, str]]:
        """(hook, width, field that sets the width) of every hook point, to check against the activations."""
        raise NotImplementedError
