"""`evaluate_sae`: a saved dictionary evaluated on an activation stream (a dataset run through the language model, or
a cache written by `generate_activations`), with the language model's loss when it is spliced in."""

import json
import logging
from pathlib import Path

import torch
from pydantic import Field, model_validator

from lm_saes_core.activation.config import (
    ActivationFactoryActivationsSource,
    ActivationFactoryConfig,
    ActivationFactoryTarget,
)
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.activation.reader import CachedActivations
from lm_saes_core.backend.base import LanguageModelConfig
from lm_saes_core.config import BaseConfig, ConfigError
from lm_saes_core.data import DatasetConfig
from lm_saes_core.evaluation import EvalConfig, EvalResult, Evaluator
from lm_saes_core.io import atomic_write_text
from lm_saes_core.log import setup_logging
from lm_saes_core.models.feature_parallel import require_feature_parallel
from lm_saes_core.models.pretrained import PretrainedSAE
from lm_saes_core.plots import density_svg
from lm_saes_core.runners.common import check_dictionary_fits, check_model_config, load_language_model_and_datasets
from lm_saes_core.runners.head_groups import (
    HeadGroupFactory,
    check_dictionary_fits_groups,
    check_head_groups,
    check_model_configs,
    load_head_groups,
    merged_stream,
)
from lm_saes_core.training.data_parallel import init_parallel
from lm_saes_core.wandb_logging import WandbConfig, start_wandb_run

logger = logging.getLogger(__name__)


class _EvaluateSettings(BaseConfig):
    sae: PretrainedSAE
    sae_name: str
    sae_series: str | None = None
    model: LanguageModelConfig | None = None
    """Needed by dataset sources; with cached sources it is loaded only for the downstream metrics."""
    model_name: str | None = None
    """Name recorded with the results; defaults to `model.model_name`."""
    datasets: dict[str, DatasetConfig | None] | None = None
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_path: str | None = None
    """Write the metrics (and the frequency histogram) here as JSON."""
    wandb: WandbConfig | None = None
    """Log the metrics once to a W&B run (`exp_name` defaults to `sae_name`)."""
    model_parallel_size: int = Field(default=1, ge=1)
    """Processes (torchrun) that each hold a slice of the features (SAEs and transcoders): the language model runs
    on each, rank 0 reports the whole dictionary's metrics."""


class EvaluateSAESettings(_EvaluateSettings):
    activation_factory: ActivationFactoryConfig


class EvaluateCrossCoderSettings(_EvaluateSettings):
    """`evaluate_crosscoder`'s settings: a dictionary over the heads that `activation_factories` produce (one factory
    per group of heads, each may run its own model; see `runners.head_groups`)."""

    activation_factories: list[HeadGroupFactory] = Field(min_length=1)

    @model_validator(mode="after")
    def _groups(self) -> "EvaluateCrossCoderSettings":
        check_head_groups(self.activation_factories)
        return self


def evaluate_sae(settings: EvaluateSAESettings) -> EvalResult:
    """Evaluate `settings.sae` on the factory's stream. Downstream (spliced-loss) metrics are computed when
    `eval.compute_downstream` is set and a `model` is configured; they need 2-D activations because the model runs
    on whole sequences, and cached 2-D activations carry their tokens, so a cache works as well as a dataset."""
    setup_logging()
    factory_cfg = settings.activation_factory
    downstream = settings.eval.compute_downstream and settings.model is not None
    if downstream and factory_cfg.target != ActivationFactoryTarget.ACTIVATIONS_2D:
        raise ConfigError(
            f"activation_factory.target is {factory_cfg.target.value!r}, but the downstream metrics run the "
            "language model on whole sequences: use activations-2d, or set eval.compute_downstream=false"
        )
    _check_feature_parallel(settings)
    _, shards = init_parallel(1, settings.model_parallel_size, settings.sae.device or "cpu")
    sae = settings.sae.load(shards)  # folds the dataset-wise scale when settings.sae.fold_activation_scale is set
    check_dictionary_fits(sae.cfg, factory_cfg)
    check_model_config(factory_cfg, settings.model, [sae.cfg])
    language_model, datasets = load_language_model_and_datasets(factory_cfg, settings.model, settings.datasets)
    if downstream and language_model is None:
        from lm_saes_core.backend import load_model

        language_model = load_model(settings.model)
        _warn_on_other_model(factory_cfg, settings.model_name or settings.model.model_name)
    check_dictionary_fits(sae.cfg, factory_cfg, language_model)
    factory = ActivationFactory(factory_cfg)
    factory.validate(language_model)
    model_name = settings.model_name or (settings.model.model_name if settings.model else None)
    stream = factory.process(model=language_model, model_name=model_name, datasets=datasets)

    result = Evaluator(settings.eval).run(sae, stream, language_model if downstream else None)
    if shards is not None and torch.distributed.get_rank() != 0:
        return result  # the same metrics; rank 0 reports them
    return _report(settings, result, model_name)


def _check_feature_parallel(settings: _EvaluateSettings) -> None:
    if settings.model_parallel_size == 1:
        return
    require_feature_parallel(settings.sae.read_config()[0], settings.model_parallel_size)


def evaluate_crosscoder(settings: EvaluateCrossCoderSettings) -> EvalResult:
    """Evaluate `settings.sae` on the merged stream of `activation_factories`. The downstream (spliced-loss)
    metrics need every head to be a hook of the one language model they splice into: factories without a `name` or
    a model of their own (heads of several models have no single forward pass to splice into)."""
    setup_logging()
    factories = settings.activation_factories
    one_model = all(factory.name is None and factory.model is None for factory in factories)
    downstream = settings.eval.compute_downstream and settings.model is not None
    if downstream and not one_model:
        logger.warning(
            "downstream metrics skipped: the heads come from several models (factories with a name or a model of "
            "their own), so there is no one forward pass to splice the crosscoder into"
        )
        downstream = False
    if downstream and factories[0].target != ActivationFactoryTarget.ACTIVATIONS_2D:
        raise ConfigError(
            f"activation_factories[0].target is {factories[0].target.value!r}, but the downstream metrics run the "
            "language model on whole sequences: use activations-2d, or set eval.compute_downstream=false"
        )
    _check_feature_parallel(settings)
    _, shards = init_parallel(1, settings.model_parallel_size, settings.sae.device or "cpu")
    sae = settings.sae.load(shards)
    check_dictionary_fits_groups(sae.cfg, factories)
    check_model_configs(factories, settings.model, [sae.cfg])
    groups = load_head_groups(factories, settings.model, settings.model_name, settings.datasets)
    check_dictionary_fits_groups(sae.cfg, factories, [group.model for group in groups])
    language_model = None
    if downstream:
        language_model = next((group.model for group in groups if group.model is not None), None)
        if language_model is None:
            from lm_saes_core.backend import load_model

            language_model = load_model(settings.model)
    result = Evaluator(settings.eval).run(sae, merged_stream(groups, epochs=False), language_model)
    if shards is not None and torch.distributed.get_rank() != 0:
        return result  # the same metrics; rank 0 reports them
    return _report(settings, result, groups[0].model_name)


def _report(settings: _EvaluateSettings, result: EvalResult, model_name: str | None) -> EvalResult:
    """Log the metrics, and write them to `output_path` and W&B when asked."""
    logger.info(
        "evaluation of %s:\n%s",
        settings.sae_name,
        "\n".join(f"  {key:<40} {value:.6g}" for key, value in sorted(result.metrics.items())),
    )
    if settings.output_path is not None:
        record = {
            "sae_name": settings.sae_name,
            "sae_series": settings.sae_series,
            "sae_path": settings.sae.pretrained_name_or_path,
            "model_name": model_name,
            **result.to_json(),
        }
        Path(settings.output_path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(settings.output_path, json.dumps(record, indent=2))
        histogram = result.frequency_histogram
        n_tokens = result.metrics.get("details/n_tokens", 0)
        picture = density_svg(
            f"{settings.sae_series}/{settings.sae_name}: feature density on {n_tokens:.0f} held-out tokens",
            histogram.bin_edges.tolist(),
            histogram.counts.tolist(),
            histogram.n_dead,
        )
        atomic_write_text(density_path(settings.output_path), picture)
    if settings.wandb is not None:
        _log_to_wandb(settings, result)
    return result


def density_path(output_path: str | Path) -> Path:
    """The feature-density histogram (SVG) written beside an evaluation's metrics JSON."""
    return Path(output_path).with_suffix(".density.svg")


def _warn_on_other_model(factory_cfg: ActivationFactoryConfig, model_name: str) -> None:
    """Cached tokens are ids of the tokenizer that generated them; a different model would read other text."""
    for source in factory_cfg.sources:
        if isinstance(source, ActivationFactoryActivationsSource):
            cache = CachedActivations(source.path, hook_points=factory_cfg.hook_points)
            cached_name = cache.manifests[0].get("provenance", {}).get("model_name")
            if cached_name is not None and cached_name != model_name:
                logger.warning(
                    "source %r was generated by model %r, but the downstream metrics use %r: the cached token ids "
                    "must mean the same text for both",
                    source.name,
                    cached_name,
                    model_name,
                )


def _log_to_wandb(settings: _EvaluateSettings, result: EvalResult) -> None:
    cfg = (
        settings.wandb if settings.wandb.exp_name else settings.wandb.model_copy(update={"exp_name": settings.sae_name})
    )
    run = start_wandb_run(cfg, config=settings.model_dump(mode="json"))
    try:
        run.log(result.metrics)
    finally:
        run.finish()
