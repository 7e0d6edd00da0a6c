"""What the train/evaluate/sweep runners share: loading the model and datasets an activation factory needs,
checking a dictionary fits the stream before any heavy work, and streaming several epochs."""

import logging
from collections.abc import Iterator, Sequence

from lm_saes_core.activation.buffer import Item
from lm_saes_core.activation.config import ActivationFactoryActivationsSource, ActivationFactoryConfig
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.activation.reader import CachedActivations
from lm_saes_core.backend.base import LanguageModel, LanguageModelConfig, ModelShape
from lm_saes_core.config import ConfigError
from lm_saes_core.data import DatasetConfig
from lm_saes_core.models.config import SparseDictionaryConfig

logger = logging.getLogger(__name__)


def needs_language_model(factory_cfg: ActivationFactoryConfig) -> bool:
    return any(source.type == "dataset" for source in factory_cfg.sources)


def check_sources_configured(
    factory_cfg: ActivationFactoryConfig,
    model: LanguageModelConfig | None,
    datasets: dict[str, DatasetConfig | None] | None,
) -> None:
    """Dataset sources need a language model and a DatasetConfig each; say which one is missing."""
    for source in factory_cfg.sources:
        if source.type != "dataset":
            continue
        if model is None:
            raise ValueError(f"model: activation source {source.name!r} reads a dataset, so a model config is needed")
        if not datasets or datasets.get(source.name) is None:
            raise ValueError(f"datasets.{source.name}: a DatasetConfig is needed for dataset source {source.name!r}")


def cached_hook_dims(factory_cfg: ActivationFactoryConfig) -> dict[str, int]:
    """Widths of the hook points that cached sources hold (read from their manifests; cheap)."""
    dims: dict[str, int] = {}
    for source in factory_cfg.sources:
        if isinstance(source, ActivationFactoryActivationsSource):
            dims.update(CachedActivations(source.path, hook_points=factory_cfg.hook_points).hook_dims)
    return dims


def check_dictionary_fits(
    sae_cfg: SparseDictionaryConfig, factory_cfg: ActivationFactoryConfig, model: ModelShape | None = None
) -> None:
    """The dictionary's hook points must be in the stream and its widths must match the activations (the caches',
    and the model's when given: loaded, or as its config describes it)."""
    missing = [hook for hook in sae_cfg.hook_points if hook not in factory_cfg.hook_points]
    if missing:
        raise ConfigError(
            f"sae hook point(s) {missing} are not produced by the activation factory (hook_points: "
            f"{factory_cfg.hook_points})"
        )
    dims = cached_hook_dims(factory_cfg)
    if model is not None:
        dims.update({hook: model.hook_dim(hook) for hook in sae_cfg.hook_points if hook not in dims})
    for hook, width, field in sae_cfg.hook_widths():
        if hook in dims and dims[hook] != width:
            raise ConfigError(f"sae.{field} is {width} but the activations at {hook!r} have width {dims[hook]}")


def check_model_config(
    factory_cfg: ActivationFactoryConfig,
    model_cfg: LanguageModelConfig | None,
    sae_cfgs: Sequence[SparseDictionaryConfig] = (),
) -> None:
    """What the language model's config tells, checked before its weights load: the factory's hook points and
    context size, and the dictionaries' widths. Only for factories that run the model, and only where its backend can
    tell without loading it (the HuggingFace backend; a TransformerLens model is checked once loaded)."""
    if model_cfg is None or not needs_language_model(factory_cfg):
        return
    from lm_saes_core.backend import read_model_shape

    shape = read_model_shape(model_cfg)
    if shape is None:
        return
    ActivationFactory(factory_cfg).validate(shape)
    for sae_cfg in sae_cfgs:
        check_dictionary_fits(sae_cfg, factory_cfg, shape)


def load_language_model_and_datasets(
    factory_cfg: ActivationFactoryConfig,
    model_cfg: LanguageModelConfig | None,
    dataset_cfgs: dict[str, DatasetConfig | None] | None,
) -> tuple[LanguageModel | None, dict]:
    """Load what the factory's dataset sources need (nothing for cache-only factories): the datasets first, so a
    missing one fails before the model's weights load."""
    check_sources_configured(factory_cfg, model_cfg, dataset_cfgs)
    if not needs_language_model(factory_cfg):
        return None, {}
    from lm_saes_core.backend import load_model

    datasets = load_datasets(factory_cfg, dataset_cfgs)
    return load_model(model_cfg), datasets


def load_datasets(factory_cfg: ActivationFactoryConfig, dataset_cfgs: dict[str, DatasetConfig | None] | None) -> dict:
    """The datasets of the factory's dataset sources, as `ActivationFactory.process` takes them."""
    from lm_saes_core.data import load_dataset

    datasets = {}
    for source in factory_cfg.sources:
        if source.type == "dataset":
            cfg = dataset_cfgs[source.name]
            dataset = load_dataset(cfg)
            if len(dataset) == 0:
                raise ConfigError(f"datasets.{source.name}: {cfg.dataset_name_or_path!r} has no documents")
            datasets[source.name] = (dataset, {"text_field": cfg.text_field})
    return datasets


def activation_epochs(factory: ActivationFactory, **process_kwargs) -> Iterator[Item]:
    """Stream the factory's data over and over (epoch 0, 1, ...); each epoch reshuffles with its own seed."""
    epoch = 0
    while True:
        produced = False
        for batch in factory.process(epoch=epoch, **process_kwargs):
            produced = True
            yield batch
        if not produced:
            raise ValueError("the activation stream produced no batches (empty dataset or cache?)")
        epoch += 1
        logger.info("activation stream: starting epoch %d", epoch)
