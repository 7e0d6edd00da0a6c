"""Configs of sparse dictionaries, discriminated on `sae_type` so a settings file can say which model it means."""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from lm_saes_core.config import BaseModelConfig

ActivationFunctionName = Literal["relu", "jumprelu", "topk", "batchtopk"]
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
        if self.act_fn in ("topk", "batchtopk") and self.top_k > self.d_sae:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed d_sae ({self.d_sae})")
        return self

    @property
    def hook_points(self) -> list[str]:
        raise NotImplementedError


class SAEConfig(SparseDictionaryConfig):
    """A sparse autoencoder (`hook_point_in == hook_point_out`) or a transcoder (they differ)."""

    sae_type: Literal["sae"] = "sae"
    hook_point_in: str
    hook_point_out: str
    d_out: int | None = Field(default=None, gt=0)
    """Width of the output hook point when it differs from d_model (transcoders only)."""
    use_skip_connection: bool = False
    """Transcoders: add a learned linear map x @ W_skip to the reconstruction."""

    @model_validator(mode="after")
    def _transcoder_only(self) -> "SAEConfig":
        if not self.is_transcoder and (self.d_out not in (None, self.d_model) or self.use_skip_connection):
            raise ValueError("d_out and use_skip_connection apply to transcoders (hook_point_in != hook_point_out)")
        return self

    @property
    def is_transcoder(self) -> bool:
        return self.hook_point_in != self.hook_point_out

    @property
    def d_output(self) -> int:
        return self.d_out or self.d_model

    @property
    def hook_points(self) -> list[str]:
        return [self.hook_point_in] if not self.is_transcoder else [self.hook_point_in, self.hook_point_out]


# Later dictionary types (crosscoder, clt, lorsa, molt) join this union with their own `sae_type`.
AnySAEConfig = Annotated[SAEConfig, Field(discriminator="sae_type")]
