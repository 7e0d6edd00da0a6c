"""Configs of the activation pipeline: where activations come from (a dataset run through the model, or a cache on
disk), what shape they leave in (tokens, 2-D sequences, 1-D tokens), and how they are batched and shuffled."""

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import Field, model_validator

from lm_saes_core.config import BaseConfig, DType


class ActivationFactoryTarget(StrEnum):
    """How far the pipeline goes; the order matters (`tokens` < `activations-2d` < `activations-1d`)."""

    TOKENS = "tokens"
    ACTIVATIONS_2D = "activations-2d"
    ACTIVATIONS_1D = "activations-1d"

    @property
    def stage(self) -> int:
        return list(ActivationFactoryTarget).index(self)


class BufferShuffleConfig(BaseConfig):
    """Seed (and generator device) of the shuffle buffer's permutations, so a shuffled stream is reproducible."""

    perm_seed: int = 42
    generator_device: str | None = None


class ActivationFactoryDatasetSource(BaseConfig):
    """Run a dataset (by name in the `datasets` mapping given to the factory) through the language model."""

    type: Literal["dataset"] = "dataset"
    name: str
    sample_weights: float = Field(default=1.0, gt=0)


class ActivationFactoryActivationsSource(BaseConfig):
    """Read activations cached by `generate_activations`: a root directory (with its manifest) or hook -> directory."""

    type: Literal["activations"] = "activations"
    name: str
    path: str | dict[str, str]
    sample_weights: float = Field(default=1.0, gt=0)
    device: str = "cpu"
    dtype: DType | None = None
    num_workers: int = Field(default=2, ge=0)
    prefetch: int | None = Field(default=4, ge=1)
    shuffle_chunks: bool = False
    """Visit chunks in a random (seeded by `BufferShuffleConfig.perm_seed`) order instead of the stored order."""


ActivationFactorySource = Annotated[
    ActivationFactoryDatasetSource | ActivationFactoryActivationsSource, Field(discriminator="type")
]


class ActivationFactoryConfig(BaseConfig):
    sources: list[ActivationFactorySource] = Field(min_length=1)
    target: ActivationFactoryTarget
    hook_points: list[str] = Field(min_length=1)
    batch_size: int = Field(gt=0)
    """Output batch size: sequences for `activations-2d` and `tokens`, tokens for `activations-1d`."""
    context_size: int = Field(default=128, gt=1)
    """Length of each token window (including the BOS token when the model prepends one)."""
    model_batch_size: int = Field(default=1, gt=0)
    """Token windows per language-model forward pass."""
    override_dtype: DType | None = None
    """Cast the activations (never tokens or masks) to this dtype."""
    buffer_size: int | None = Field(default=None, gt=0)
    """Rows held in the shuffle buffer; None means no shuffling."""
    buffer_shuffle: BufferShuffleConfig | None = None
    ignore_token_ids: list[int] | None = None
    """Token ids excluded from the mask (in addition to BOS and padding)."""

    @model_validator(mode="after")
    def _check(self) -> "ActivationFactoryConfig":
        names = [source.name for source in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if len(set(self.hook_points)) != len(self.hook_points):
            raise ValueError(f"hook_points contains duplicates: {self.hook_points}")
        if self.target == ActivationFactoryTarget.TOKENS and any(s.type == "activations" for s in self.sources):
            raise ValueError("target 'tokens' cannot read an 'activations' source (cached activations have no text)")
        if self.buffer_size is not None and self.buffer_size < self.batch_size:
            raise ValueError(f"buffer_size ({self.buffer_size}) must be at least batch_size ({self.batch_size})")
        return self
