"""Pipeline configs (`configs/pipelines/*.yaml`): one file describes a whole experiment, corpus to evaluation.

Every section reuses a core config class, so a pipeline file is checked exactly like a runner settings file:
unknown keys and bad values are errors naming the file and the field.
"""

from pathlib import Path

from pydantic import Field, model_validator

from lm_saes_core.activation.config import BufferShuffleConfig
from lm_saes_core.backend.base import LanguageModelConfig
from lm_saes_core.config import BaseConfig, load_config
from lm_saes_core.data import DatasetConfig
from lm_saes_core.evaluation import EvalConfig
from lm_saes_core.models import SAEConfig
from lm_saes_core.training import InitializerConfig, TrainerConfig


class ActivationSettings(BaseConfig):
    """How the `activations` asset caches each hook point (see GenerateActivationsSettings)."""

    context_size: int = Field(default=128, gt=1)
    total_tokens: int = Field(gt=0)
    model_batch_size: int = Field(default=16, gt=0)
    n_samples_per_chunk: int | None = Field(default=64, gt=0)
    num_workers: int = Field(default=2, ge=0)


class DictionaryItem(BaseConfig):
    """One dictionary to train on the cached activations of its hook point."""

    sae: SAEConfig
    initializer: InitializerConfig = Field(
        default_factory=lambda: InitializerConfig(bias_init_method="mean", grid_search_init_norm=True)
    )
    """Defaults to the data-driven initialisation (decoder bias at the data mean, decoder norm by grid search)."""
    trainer: TrainerConfig
    batch_size: int = Field(default=4096, gt=0)
    """Tokens per training step."""
    buffer_size: int | None = Field(default=32768, gt=0)
    buffer_shuffle: BufferShuffleConfig = Field(default_factory=BufferShuffleConfig)
    seed: int = 42
    data_parallel_size: int = Field(default=1, ge=1)
    model_parallel_size: int = Field(default=1, ge=1)

    @property
    def hook_point(self) -> str:
        return self.sae.hook_point_in

    @property
    def n_processes(self) -> int:
        return self.data_parallel_size * self.model_parallel_size


class QualityBounds(BaseConfig):
    """Bounds the evaluation must meet; failing them blocks what comes after the evaluation."""

    min_explained_variance: float = 0.7
    max_dead_fraction: float = Field(default=0.5, ge=0, le=1)
    min_l0: float = Field(default=1.0, ge=0)
    max_l0: float = Field(default=1000.0, gt=0)


class PipelineConfig(BaseConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    """Asset key prefix and group name (letters, digits and underscores)."""
    model: LanguageModelConfig
    dataset: DatasetConfig
    eval_dataset: DatasetConfig
    """Held-out documents for the evaluation (split by document from `dataset`)."""
    hook_points: list[str] = Field(min_length=1)
    activations: ActivationSettings
    dictionaries: dict[str, DictionaryItem] = Field(min_length=1)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    quality: QualityBounds = Field(default_factory=QualityBounds)

    @model_validator(mode="after")
    def _items_use_pipeline_hooks(self) -> "PipelineConfig":
        for name, item in self.dictionaries.items():
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"dictionaries.{name}: item names use letters, digits, '-' and '_' only")
            for hook in item.sae.hook_points:
                if hook not in self.hook_points:
                    raise ValueError(
                        f"dictionaries.{name}.sae: hook point {hook!r} is not one of the pipeline's hook_points "
                        f"{self.hook_points}"
                    )
            if item.sae.is_transcoder:
                raise ValueError(f"dictionaries.{name}.sae: transcoders are not wired into pipelines yet")
        return self


def load_pipeline(path: str | Path) -> PipelineConfig:
    return load_config(PipelineConfig, path)
