"""`analyze_sae`: every feature of a saved dictionary analysed over an activation stream (statistics and sample
contexts), stored in the record store and optionally exported to a file."""

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import torch
from pydantic import Field, model_validator

from lm_saes_core.activation.config import ActivationFactoryConfig, ActivationFactoryTarget
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.analysis.feature_analyzer import FeatureAnalyzer, FeatureAnalyzerConfig
from lm_saes_core.backend.base import LanguageModelConfig
from lm_saes_core.config import BaseConfig, ConfigError
from lm_saes_core.data import DatasetConfig
from lm_saes_core.log import setup_logging
from lm_saes_core.models import PretrainedSAE, SparseDictionary, SparseDictionaryConfig
from lm_saes_core.models.feature_parallel import require_feature_parallel
from lm_saes_core.runners.common import (
    check_dictionary_fits,
    check_model_config,
    check_sources_configured,
    load_language_model_and_datasets,
)
from lm_saes_core.runners.head_groups import (
    HeadGroupFactory,
    check_dictionary_fits_groups,
    check_head_groups,
    check_model_configs,
    load_head_groups,
    merged_stream,
)
from lm_saes_core.store import DictionaryRecord, FeatureAnalysis, RecordStoreConfig, open_store
from lm_saes_core.store.export import analysis_export_path, write_analysis_export
from lm_saes_core.training.data_parallel import init_parallel

logger = logging.getLogger(__name__)


class _AnalyzeSettings(BaseConfig):
    sae: PretrainedSAE
    """The dictionary; `fold_activation_scale` (default true) makes the analysis see features of raw activations."""
    sae_name: str
    sae_series: str = "default"
    model: LanguageModelConfig | None = None
    """Needed by dataset sources."""
    model_name: str | None = None
    """Name recorded with the dictionary; defaults to `model.model_name`."""
    datasets: dict[str, DatasetConfig | None] | None = None
    analyzer: FeatureAnalyzerConfig
    analysis_name: str = "default"
    store: RecordStoreConfig = Field(default_factory=RecordStoreConfig)
    output_dir: str | None = None
    """Also write the analyses to `<output_dir>/<series>/<name>/<analysis>_analysis_<n>_features.npz`."""
    model_parallel_size: int = Field(default=1, ge=1)
    """Processes (torchrun) that each analyse a part of the features: the language model runs on each, the
    dictionary is split by features, rank 0 records the whole analysis (under the whole's feature indices)."""


class AnalyzeSAESettings(_AnalyzeSettings):
    activation_factory: ActivationFactoryConfig
    """Must produce whole contexts (target activations-2d): the samples are contexts."""


class AnalyzeCrossCoderSettings(_AnalyzeSettings):
    """`analyze_crosscoder`'s settings: a dictionary over the heads that `activation_factories` produce (one
    factory per group of heads, each may run its own model; see `runners.head_groups`)."""

    activation_factories: list[HeadGroupFactory] = Field(min_length=1)
    """Must produce whole contexts (target activations-2d); the samples keep the first factory's tokens."""

    @model_validator(mode="after")
    def _groups(self) -> "AnalyzeCrossCoderSettings":
        check_head_groups(self.activation_factories)
        return self


def read_sae_config(sae: PretrainedSAE) -> tuple[SparseDictionaryConfig, dict]:
    """The saved dictionary's config (validated, of its kind) and the config a record keeps, without the weights."""
    return sae.read_config()


@torch.no_grad()
def analyze_sae(settings: AnalyzeSAESettings) -> list[FeatureAnalysis]:
    """Analyse every feature of `settings.sae` and store the results as feature `i`'s analysis `analysis_name`.

    Cheap checks come first (target, hook points, configured sources, reachable store, then what the model's config
    tells), so a wrong setting fails before the language model loads."""
    setup_logging()
    factory_cfg = settings.activation_factory
    _check_target(factory_cfg, "activation_factory")
    sae_cfg, saved_cfg = read_sae_config(settings.sae)
    check_dictionary_fits(sae_cfg, factory_cfg)
    check_sources_configured(factory_cfg, settings.model, settings.datasets)
    require_feature_parallel(sae_cfg, settings.model_parallel_size)

    def open_stream(sae: SparseDictionary) -> tuple[Iterator, str | None]:
        check_model_config(factory_cfg, settings.model, [sae.cfg])
        language_model, datasets = load_language_model_and_datasets(factory_cfg, settings.model, settings.datasets)
        check_dictionary_fits(sae.cfg, factory_cfg, language_model)
        factory = ActivationFactory(factory_cfg)
        factory.validate(language_model)
        model_name = settings.model_name or (settings.model.model_name if settings.model else None)
        return factory.process(model=language_model, model_name=model_name, datasets=datasets), model_name

    return _analyze(settings, saved_cfg, [source.name for source in factory_cfg.sources], open_stream)


@torch.no_grad()
def analyze_crosscoder(settings: AnalyzeCrossCoderSettings) -> list[FeatureAnalysis]:
    """`analyze_sae` over the merged stream of `activation_factories` (a feature's activation is its heads'
    largest; the store also records where each feature lives: see `FeatureAnalysis.location`)."""
    setup_logging()
    factories = settings.activation_factories
    _check_target(factories[0], "activation_factories[0]")
    sae_cfg, saved_cfg = read_sae_config(settings.sae)
    check_dictionary_fits_groups(sae_cfg, factories)
    require_feature_parallel(sae_cfg, settings.model_parallel_size)

    def open_stream(sae: SparseDictionary) -> tuple[Iterator, str | None]:
        check_model_configs(factories, settings.model, [sae.cfg])
        groups = load_head_groups(factories, settings.model, settings.model_name, settings.datasets)
        check_dictionary_fits_groups(sae.cfg, factories, [group.model for group in groups])
        return merged_stream(groups, epochs=False), groups[0].model_name

    return _analyze(settings, saved_cfg, [source.name for source in factories[0].sources], open_stream)


def _check_target(factory_cfg: ActivationFactoryConfig, field: str) -> None:
    if factory_cfg.target != ActivationFactoryTarget.ACTIVATIONS_2D:
        raise ConfigError(
            f"{field}.target is {factory_cfg.target.value!r}, but feature analysis keeps whole contexts: "
            "use activations-2d"
        )


def _analyze(
    settings: _AnalyzeSettings,
    saved_cfg: dict,
    source_names: list[str],
    open_stream: Callable[[SparseDictionary], tuple[Iterator, str | None]],
) -> list[FeatureAnalysis]:
    """Open the store, load the dictionary, stream, analyse, and record the dictionary and its analyses."""
    if settings.output_dir is not None:
        analysis_export_path(settings.output_dir, settings.sae_name, settings.sae_series, settings.analysis_name, 0)
    _, shards = init_parallel(1, settings.model_parallel_size, settings.sae.device or "cpu")
    main = shards is None or torch.distributed.get_rank() == 0
    with open_store(settings.store) if main else contextlib.nullcontext() as store:
        sae = settings.sae.load(shards)  # a shard reads only its slices of the file
        stream, model_name = open_stream(sae)

        started = time.perf_counter()
        analyses = FeatureAnalyzer(settings.analyzer).analyze(
            sae, stream, source_names=source_names, analysis_name=settings.analysis_name, progress=main
        )
        elapsed = time.perf_counter() - started
        if not main:
            return analyses
        n_tokens = analyses[0].n_analyzed_tokens
        alive = sum(analysis.act_times > 0 for analysis in analyses)
        logger.info(
            "analysed %d features of %s over %d tokens in %.1f s (%.0f tokens/s): %d alive (%.1f%%)",
            len(analyses),
            settings.sae_name,
            n_tokens,
            elapsed,
            n_tokens / elapsed,
            alive,
            100 * alive / len(analyses),
        )

        existing = store.get_dictionary(settings.sae_name, settings.sae_series)
        store.add_dictionary(
            DictionaryRecord(
                name=settings.sae_name,
                series=settings.sae_series,
                path=settings.sae.source(),
                cfg=saved_cfg,
                model_name=model_name,
                metrics=existing.metrics if existing is not None else {},  # keep what evaluation stored
            )
        )
        store.add_feature_analyses(settings.sae_name, settings.sae_series, analyses)
    if settings.output_dir is not None:
        path = write_analysis_export(
            settings.output_dir, settings.sae_name, settings.sae_series, settings.analysis_name, analyses
        )
        logger.info("wrote the analysis export %s", path)
    return analyses
