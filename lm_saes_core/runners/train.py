"""`train_sae` and `sweep_sae`: train sparse dictionaries on an activation stream (live from a dataset or cached).

A sweep trains several dictionaries from ONE stream: every batch is computed (or read) once and handed to each
item's trainer, which runs in its own thread; items see exactly the batches a single run would see.
"""

import itertools
import json
import logging
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Union, get_args

import torch
from pydantic import Discriminator, Field, Tag, model_validator

from lm_saes_core.activation.buffer import Item
from lm_saes_core.activation.config import ActivationFactoryConfig, ActivationFactoryTarget
from lm_saes_core.activation.factory import ActivationFactory, unshuffled_sources
from lm_saes_core.backend.base import LanguageModelConfig
from lm_saes_core.config import BaseConfig, ConfigError, MongoDBConfig, UserError, field_error
from lm_saes_core.data import DatasetConfig
from lm_saes_core.io import atomic_write_text
from lm_saes_core.log import setup_logging
from lm_saes_core.models import (
    KNOWN_SAE_TYPES,
    PretrainedSAE,
    SparseDictionary,
    SparseDictionaryConfig,
    sae_type_of,
    tagged_dictionary_configs,
)
from lm_saes_core.models.activation_functions import ACTIVATION_FUNCTIONS
from lm_saes_core.models.feature_parallel import FeatureShards, feature_parallel_problem, require_feature_parallel
from lm_saes_core.models.head_parallel import HeadShards, require_head_parallel
from lm_saes_core.models.losses import SparsityLossType
from lm_saes_core.runners.common import (
    activation_epochs,
    check_dictionary_fits,
    check_model_config,
    check_sources_configured,
    load_language_model_and_datasets,
)
from lm_saes_core.runners.head_groups import (
    HeadGroupFactory,
    InitWithEveryHead,
    check_dictionary_fits_groups,
    check_head_groups,
    check_head_parallel,
    check_model_configs,
    heads_factories,
    load_head_groups,
    merged_stream,
)
from lm_saes_core.training.checkpoint import find_latest_checkpoint, read_run_settings
from lm_saes_core.training.config import RUN_NEUTRAL_FIELDS, TrainerConfig
from lm_saes_core.training.data_parallel import DataParallel, init_mesh
from lm_saes_core.training.initializer import Initializer, InitializerConfig
from lm_saes_core.training.run_log import LOG_FILE, RunLog, write_training_curves
from lm_saes_core.training.trainer import Trainer, TrainResult
from lm_saes_core.wandb_logging import WandbConfig, start_wandb_run

logger = logging.getLogger(__name__)


def _sae_kind(value: Any) -> str | None:
    """The union member `value` is meant as; None (an error naming the known kinds) when it is not a config at all."""
    if isinstance(value, PretrainedSAE) or (isinstance(value, dict) and "pretrained_name_or_path" in value):
        return "pretrained"
    if isinstance(value, dict) or hasattr(value, "sae_type"):
        return sae_type_of(value)
    return None


# A dictionary to train: a full config of any kind (discriminated on `sae_type`) or saved weights to continue from.
SAESpec = Annotated[
    Union[(*tagged_dictionary_configs(), Annotated[PretrainedSAE, Tag("pretrained")])],  # noqa: UP007
    Discriminator(
        _sae_kind, custom_error_type="sae_type", custom_error_message=f"unknown sae_type (known: {KNOWN_SAE_TYPES})"
    ),
]


class _StreamSettings(BaseConfig):
    """Where a run's activations come from, besides the factories: the model, datasets and process layout."""

    model: LanguageModelConfig | None = None
    model_name: str | None = None
    datasets: dict[str, DatasetConfig | None] | None = None
    data_parallel_size: int = Field(default=1, ge=1)
    model_parallel_size: int = Field(default=1, ge=1)
    mongo: MongoDBConfig | None = None

    def factory_configs(self) -> list[ActivationFactoryConfig]:
        raise NotImplementedError

    def _check_layout(self) -> None:
        batch_size = self.factory_configs()[0].batch_size
        if self.mongo is not None:
            raise field_error("mongo", "the MongoDB record store is not available yet; give configs inline", self.mongo)
        if batch_size % self.data_parallel_size:
            raise field_error(
                "data_parallel_size",
                f"activation_factory.batch_size={batch_size} does not split evenly over "
                f"data_parallel_size={self.data_parallel_size}",
                self.data_parallel_size,
            )

    def open_stream(
        self, sae_configs: list[SparseDictionaryConfig], data_parallel: DataParallel | None = None
    ) -> Iterator[Item]:
        """Check every dictionary fits the stream (cheap checks first), then load the model(s) and start streaming
        epoch after epoch (a data-parallel rank streams its own part of the data, in batches of batch_size / N)."""
        raise NotImplementedError


class _SourceSettings(_StreamSettings):
    activation_factory: ActivationFactoryConfig

    @model_validator(mode="after")
    def _supported(self) -> "_SourceSettings":
        self._check_layout()
        check_sources_configured(self.activation_factory, self.model, self.datasets)
        return self

    def factory_configs(self) -> list[ActivationFactoryConfig]:
        return [self.activation_factory]

    def open_stream(
        self, sae_configs: list[SparseDictionaryConfig], data_parallel: DataParallel | None = None
    ) -> Iterator[Item]:
        for cfg in sae_configs:
            check_dictionary_fits(cfg, self.activation_factory)
        check_model_config(self.activation_factory, self.model, sae_configs)
        model, datasets = load_language_model_and_datasets(self.activation_factory, self.model, self.datasets)
        factory_cfg, shard = self.activation_factory, None
        if data_parallel is not None:
            per_rank = factory_cfg.batch_size // data_parallel.world_size
            factory_cfg, shard = factory_cfg.model_copy(update={"batch_size": per_rank}), data_parallel.shard_of_data
        factory = ActivationFactory(factory_cfg)
        factory.validate(model)
        for cfg in sae_configs:
            check_dictionary_fits(cfg, self.activation_factory, model)
        model_name = self.model_name or (self.model.model_name if self.model else None)
        return activation_epochs(factory, model=model, model_name=model_name, datasets=datasets, shard=shard)


class _HeadGroupSettings(_StreamSettings):
    activation_factories: list[HeadGroupFactory] = Field(min_length=1)
    """One factory per group of heads, each with its hooks (prefixed by its `name`) and optionally its own model;
    their batches are merged row by row (see `runners.head_groups`)."""
    head_parallel_size: int = Field(default=1, ge=1)
    """Head ranks: the crosscoder's heads split over this many groups of processes (dp x hp x mp under torchrun),
    head rank h streaming only the factories of its heads (the h-th equal share of `activation_factories`)."""

    @model_validator(mode="after")
    def _supported(self) -> "_HeadGroupSettings":
        self._check_layout()
        check_head_groups(self.activation_factories)
        try:
            check_head_parallel(self.activation_factories, self.head_parallel_size, getattr(self, "sae", None))
        except ValueError as exc:
            raise field_error("head_parallel_size", str(exc), self.head_parallel_size) from None
        for index, factory in enumerate(self.activation_factories):
            try:
                check_sources_configured(factory, factory.model or self.model, self.datasets)
            except ValueError as exc:
                raise ValueError(f"activation_factories[{index}]: {exc}") from None
        return self

    def factory_configs(self) -> list[ActivationFactoryConfig]:
        return list(self.activation_factories)

    def open_stream(
        self, sae_configs: list[SparseDictionaryConfig], data_parallel: DataParallel | None = None, heads=None
    ) -> Iterator[Item]:
        factories = self.activation_factories
        if heads is not None:  # this head rank's factories, for its heads
            factories = heads_factories(factories, heads)
            sae_configs = [cfg.model_copy(update={"heads": heads.local_heads(cfg.heads)}) for cfg in sae_configs]
        for cfg in sae_configs:
            check_dictionary_fits_groups(cfg, factories)
        check_model_configs(factories, self.model, sae_configs)
        groups = load_head_groups(factories, self.model, self.model_name, self.datasets)
        for cfg in sae_configs:
            check_dictionary_fits_groups(cfg, factories, [group.model for group in groups])
        if data_parallel is None:
            return merged_stream(groups, epochs=True)
        per_rank = factories[0].batch_size // data_parallel.world_size
        return merged_stream(groups, epochs=True, batch_size=per_rank, shard=data_parallel.shard_of_data)


class SweepingItem(BaseConfig):
    """One dictionary to train: what it is, how to initialise and train it, where to log."""

    sae: SAESpec
    sae_name: str
    sae_series: str = "default"
    initializer: InitializerConfig | None = None
    """How to initialise a new dictionary (ignored for a pretrained one); None uses the defaults."""
    trainer: TrainerConfig
    wandb: WandbConfig | None = None
    seed: int = 42
    """Seeds torch before the dictionary is initialised, so a run (or a sweep item) is reproducible."""
    resume_from: str | None = None
    """Continue a run from a checkpoint: a checkpoint directory (`.../checkpoints/step_N`), "latest" (the newest
    complete checkpoint under trainer.exp_result_path written by these settings; an error when there is none) or
    "auto" (the same, but a fresh start when there is none: what pipelines use, so a killed run continues when run
    again). "latest" and "auto" refuse, by name, a checkpoint that other settings wrote."""

    @model_validator(mode="after")
    def _sparsity_penalty(self) -> "SweepingItem":
        """relu and jumprelu are sparse only under a penalty; none is the loss default (TopK needs none), and choosing
        one for the user would pick the science of the run, so its absence is an error naming the field. Saved
        weights are checked once loaded, before training starts."""
        if isinstance(self.sae, PretrainedSAE) or self.trainer.loss.sparsity_loss_type is not None:
            return self
        activation = ACTIVATION_FUNCTIONS[self.sae.act_fn]
        if activation.needs_sparsity_penalty:
            has_l0 = hasattr(activation, "active_count")
            choices = [name for name in get_args(SparsityLossType) if name != "l0" or has_l0]
            raise field_error(
                "trainer.loss.sparsity_loss_type",
                f"sae.act_fn {self.sae.act_fn!r} is sparse only under a sparsity penalty; set one of {choices} (and "
                "trainer.loss.l1_coefficient, its weight)",
                None,
            )
        return self


class TrainSAESettings(SweepingItem, _SourceSettings):
    """`train_sae`'s settings: one dictionary of any kind and the activation factory it trains on."""

    @model_validator(mode="after")
    def _whole_contexts_and_host(self) -> "TrainSAESettings":
        """A kind that consumes whole contexts (Lorsa) needs 2-D batches; starting from the host's attention needs
        the host model."""
        if isinstance(self.sae, PretrainedSAE):
            return self  # checked once loaded
        try:
            check_whole_contexts(self.sae, self.activation_factory)
        except ConfigError as exc:
            raise field_error("activation_factory.target", str(exc), self.activation_factory.target.value) from None
        _check_feature_parallel(self.sae, self.model_parallel_size)
        init = self.initializer
        if init is not None and init.uses_host_attention and self.model is None:
            raise field_error("model", "the initializer starts the Lorsa from the host model's attention", None)
        return self


class TrainCLTSettings(TrainSAESettings):
    """`train_clt`'s settings: those of `train_sae`, for a cross-layer transcoder (`sae_type: clt`) whose
    activation factory produces every `hook_points_in` and `hook_points_out`."""


class TrainMOLTSettings(TrainSAESettings):
    """`train_molt`'s settings: those of `train_sae`, for a mixture of linear transforms (`sae_type: molt`) whose
    activation factory produces its `hook_point_in` and `hook_point_out`."""


class TrainLorsaSettings(TrainSAESettings):
    """`train_lorsa`'s settings: those of `train_sae`, for a low-rank sparse attention (`sae_type: lorsa`) whose
    activation factory gives whole contexts (target `activations-2d`; `batch_size` counts contexts) of its
    `hook_point_in` and `hook_point_out`."""


def check_whole_contexts(cfg: SparseDictionaryConfig, factory: ActivationFactoryConfig) -> None:
    """A kind that consumes whole contexts (Lorsa attends over each context's positions) cannot train on 1-D
    (shuffled token) batches."""
    if SparseDictionary.kind(cfg.sae_type).granularity == "contexts" and factory.target != "activations-2d":
        raise ConfigError(
            f"activation_factory.target {factory.target.value!r} gives a hook without positions for Lorsa: sae_type "
            f"{cfg.sae_type!r} attends over whole contexts; use target 'activations-2d' (batch_size counts contexts)"
        )


class TrainCrossCoderSettings(SweepingItem, _HeadGroupSettings):
    """`train_crosscoder`'s settings: a crosscoder (or saved weights to continue) over the heads its
    `activation_factories` produce: one factory per group of heads, each may run its own model (give each a `name`
    when they read the same hooks; the crosscoder's `heads` are then `<name>/<hook>`)."""


class SweepSAESettings(_SourceSettings):
    items: list[SweepingItem] = Field(min_length=1)

    def item_settings(self, index: int) -> TrainSAESettings:
        """Item `index` as the `train_sae` settings that would train it alone: what its output directory records,
        so a dictionary trained in a sweep is recognised (and reused) by a single run, and the other way round."""
        source = self.model_dump(exclude={"items"})
        return TrainSAESettings.model_validate({**source, **self.items[index].model_dump()})

    @model_validator(mode="after")
    def _whole_contexts(self) -> "SweepSAESettings":
        for index, item in enumerate(self.items):
            try:
                if not isinstance(item.sae, PretrainedSAE):
                    check_whole_contexts(item.sae, self.activation_factory)
            except ConfigError as exc:
                raise field_error(f"items.{index}.sae.sae_type", str(exc), item.sae.sae_type) from None
        return self

    @model_validator(mode="after")
    def _distinct_outputs(self) -> "SweepSAESettings":
        paths = [item.trainer.exp_result_path for item in self.items]
        if len(set(paths)) != len(paths):
            raise field_error("items", f"items must write to distinct trainer.exp_result_path, got {paths}", paths)
        for index, item in enumerate(self.items):
            if not isinstance(item.sae, PretrainedSAE):
                problem = feature_parallel_problem(item.sae, self.model_parallel_size)
                if problem is not None:
                    raise field_error("model_parallel_size", f"items[{index}]: {problem}", self.model_parallel_size)
        return self


def _check_feature_parallel(sae: SparseDictionaryConfig, model_parallel_size: int) -> None:
    """Feature parallelism (model_parallel_size > 1) splits an SAE's or transcoder's features evenly over the
    shards, with a per-token activation (TopK, BatchTopK, ReLU, JumpReLU); what cannot be split is named here."""
    if model_parallel_size == 1 or isinstance(sae, PretrainedSAE):
        return  # saved weights are checked once loaded
    problem = feature_parallel_problem(sae, model_parallel_size)
    if problem is not None:
        raise field_error("model_parallel_size", problem, model_parallel_size)


def _check_schedules(settings: _StreamSettings, trainers: list[TrainerConfig]) -> None:
    """With 1-D activations a batch is exactly `batch_size` tokens, so a schedule period that cannot fit the run is
    refused here, before the language model loads and the dictionary is initialised (the trainer checks 2-D
    batches, whose masks decide their sizes, at the first one)."""
    factory = settings.factory_configs()[0]
    batch_size = factory.batch_size
    if factory.target == ActivationFactoryTarget.ACTIVATIONS_1D:
        for trainer in trainers:
            trainer.check_schedule_lengths(max(trainer.total_training_tokens // batch_size, 1), batch_size)


SETTINGS_NEUTRAL_KEYS = frozenset(
    {"resume_from", "wandb", "sae.device", *(f"trainer.{name}" for name in RUN_NEUTRAL_FIELDS)}
)
"""Settings (dotted keys, and everything under them) that may differ between a run and the checkpoint it continues:
they change neither the weights nor the batches."""


def warn_if_unshuffled(settings: _StreamSettings) -> None:
    """Training batches in document order learn worse (consecutive tokens of few documents per step): say so."""
    for cfg in settings.factory_configs():
        names = unshuffled_sources(cfg)
        if names:
            logger.warning(
                "activation_factory.buffer_size is not set, so source(s) %s stream in document order: each batch "
                "holds consecutive tokens of a few documents. Set buffer_size (e.g. 32768 tokens, or 256 contexts "
                "for whole-context kinds) or train from a cache written shuffled (generate with target "
                "activations-1d and buffer_size)",
                ", ".join(repr(name) for name in names),
            )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix.removesuffix("."): value}


def settings_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (saved, current) for every setting that differs and would change the run."""

    def neutral(key: str) -> bool:
        return any(key == name or key.startswith(f"{name}.") for name in SETTINGS_NEUTRAL_KEYS)

    old, new = _flatten(saved), _flatten(current)
    missing = object()
    return {
        key: (old.get(key, missing), new.get(key, missing))
        for key in sorted(old.keys() | new.keys())
        if not neutral(key) and old.get(key, missing) != new.get(key, missing)
    }


def _describe(changes: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    shown = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changes.items())[:limit]]
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return "; ".join(shown).replace("<object object", "<unset") + more


def _resolve_resume(resume_from: str | None, trainer: TrainerConfig, settings_dump: dict) -> Path | None:
    """The checkpoint to continue from (None: start at step 0). See `SweepingItem.resume_from`."""
    if resume_from is None:
        return None
    if resume_from not in ("latest", "auto"):
        path = Path(resume_from)
        if not path.is_dir():
            raise ConfigError(f"resume_from: checkpoint directory {path} does not exist")
        return path
    latest = find_latest_checkpoint(trainer.exp_result_path)
    if latest is None:
        if resume_from == "latest":
            raise ConfigError(f"resume_from='latest': no checkpoint under {trainer.exp_result_path}/checkpoints")
        return None
    saved = read_run_settings(latest)
    if saved is None:
        logger.warning("%s records no run settings (an older checkpoint): only its trainer and dictionary settings "
                       "are compared with this run's", latest)  # fmt: skip
        return latest
    changes = settings_changes(saved, settings_dump)
    if changes:
        raise ConfigError(
            f"resume_from={resume_from!r}: the checkpoint {latest} was written by other settings ({_describe(changes)})"
            f", so it is not continued. Restore those settings to continue it, or move {latest.parent} away to train "
            "these settings from step 0"
        )
    logger.info("continuing from %s", latest)
    return latest


def _dictionary_config(
    spec: SparseDictionaryConfig | PretrainedSAE,
) -> tuple[SparseDictionaryConfig, SparseDictionary | None]:
    """The config of the dictionary to train, and the dictionary itself when training continues from saved weights
    (loaded as saved: a folded dictionary keeps training on raw activations)."""
    if isinstance(spec, PretrainedSAE):
        model = spec.model_copy(update={"fold_activation_scale": False}).load()
        return model.cfg, model
    return spec, None


def _check_loss(cfg: SparseDictionaryConfig, preloaded: SparseDictionary | None, trainer: TrainerConfig) -> None:
    """The loss settings must suit the dictionary (the trainer checks again when it starts); checked here, before
    any language model loads. A new dictionary is built on the meta device for it: its kind, no weights."""
    model = preloaded
    if model is None:
        model = SparseDictionary.from_config(cfg.model_copy(update={"device": "meta"}))
    try:
        model.check_loss(trainer.loss)
    except ValueError as exc:
        raise ConfigError(f"trainer.loss: {exc}") from None


def _initialize(
    item: SweepingItem | TrainSAESettings | TrainCrossCoderSettings,
    stream: Iterator[Item],
    preloaded: SparseDictionary | None,
    resume_from: Path | None,
) -> tuple[SparseDictionary, Iterator[Item]]:
    """The dictionary to train and the stream to train it on (the initializer's peeked batches stay in it)."""
    if preloaded is not None:
        return preloaded, stream
    if resume_from is not None:
        return SparseDictionary.from_config(item.sae), stream  # the trainer loads the checkpoint's weights
    init = item.initializer or InitializerConfig()
    host = _host_attention(item, init)
    torch.manual_seed(item.seed)
    return Initializer(init).initialize(item.sae, stream, host)


def _host_attention(item: SweepingItem | TrainSAESettings, init: InitializerConfig):
    """The host model's attention layer a Lorsa starts from, when its initializer asks: the run's `model`, loaded once
    more for it (the stream's copy lives inside the stream)."""
    if not init.uses_host_attention:
        return None
    model_cfg = getattr(item, "model", None)
    if model_cfg is None:
        raise ConfigError(
            "initializer.initialize_lorsa_with_mhsa / initialize_W_D_with_active_subspace need the host model: set "
            "`model` (in a sweep, train the Lorsa with train_lorsa)"
        )
    from lm_saes_core.backend import load_model
    from lm_saes_core.backend.attention import host_attention

    return host_attention(load_model(model_cfg), init.host_layer(item.sae), item.sae.hook_point_in)


SETTINGS_FILE = "train_settings.json"
RESULT_FILE = "train_result.json"


def finished_run(output: Path, settings_dump: dict) -> TrainResult | None:
    """A run that finished in `output` with exactly these settings (so training again would change nothing)."""
    result_file, settings_file = output / RESULT_FILE, output / SETTINGS_FILE
    if not (result_file.is_file() and settings_file.is_file() and (output / "config.json").is_file()):
        return None
    if settings_changes(json.loads(settings_file.read_text()), settings_dump):
        return None
    stored = json.loads(result_file.read_text())
    return TrainResult(**{**stored, "output_path": Path(stored["output_path"]), "checkpoints": [], "reused": True})


def _fit(
    item: SweepingItem | TrainSAESettings | TrainCrossCoderSettings,
    model: SparseDictionary,
    stream: Iterator[Item],
    resume_from: Path | None,
    settings_dump: dict,
    line: int = 0,
    data_parallel: DataParallel | None = None,
    shards: FeatureShards | None = None,
    heads: HeadShards | None = None,
) -> TrainResult:
    """Train and record the run in its output directory (rank 0 of a data-parallel launch writes; the others train)."""
    main = data_parallel is None or data_parallel.is_main
    output = Path(item.trainer.exp_result_path)
    if main:
        output.mkdir(parents=True, exist_ok=True)
        (output / RESULT_FILE).unlink(missing_ok=True)  # a run in progress is not a finished one
        atomic_write_text(output / SETTINGS_FILE, json.dumps(settings_dump, indent=2))
    wandb_run = start_wandb_run(item.wandb, config=settings_dump) if item.wandb and main else None
    if main and resume_from is None:
        (output / LOG_FILE).unlink(missing_ok=True)  # an earlier run's curves are not this run's
    run_log = RunLog(output, model.n_features, wandb_run) if main else None
    try:
        result = Trainer(item.trainer, data_parallel, feature_shards=shards, head_shards=heads).fit(
            model,
            stream,
            wandb_run=run_log,
            resume_from=resume_from,
            progress_bar=(item.sae_name, line),
            run_settings=settings_dump,
        )
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    if main:
        write_training_curves(output, f"{item.sae_series}/{item.sae_name}")
    if not result.stream_exhausted and main:
        summary = {key: value for key, value in vars(result).items() if key not in ("checkpoints", "reused")}
        atomic_write_text(output / RESULT_FILE, json.dumps({**summary, "output_path": str(result.output_path)}))
    logger.info("%s/%s: saved to %s", item.sae_series, item.sae_name, result.output_path)
    return result


def train_sae(settings: TrainSAESettings | TrainCrossCoderSettings) -> TrainResult:
    """Train one dictionary of any kind. A finished run with identical settings in `trainer.exp_result_path` is
    reused."""
    return _train(settings)


def train_crosscoder(settings: TrainCrossCoderSettings) -> TrainResult:
    """Train a crosscoder over the heads of `activation_factories` (the seed's runner name; `train_sae` does the
    same for any kind)."""
    return _train(settings, kind="crosscoder")


def train_clt(settings: TrainCLTSettings) -> TrainResult:
    """Train a cross-layer transcoder (the seed's runner name; `train_sae` does the same for any kind)."""
    return _train(settings, kind="clt")


def train_molt(settings: TrainMOLTSettings) -> TrainResult:
    """Train a mixture of linear transforms (the seed's runner name; `train_sae` does the same for any kind)."""
    return _train(settings, kind="molt")


def train_lorsa(settings: TrainLorsaSettings) -> TrainResult:
    """Train a low-rank sparse attention (the seed's runner name; `train_sae` does the same for any kind)."""
    return _train(settings, kind="lorsa")


def _require_kind(cfg: SparseDictionaryConfig | PretrainedSAE, kind: str | None) -> None:
    if kind is not None and not isinstance(cfg, PretrainedSAE) and cfg.sae_type != kind:
        raise ConfigError(f"sae.sae_type is {cfg.sae_type!r}, but this runner trains sae_type {kind!r}")


def _train(settings: TrainSAESettings | TrainCrossCoderSettings, kind: str | None = None) -> TrainResult:
    setup_logging()
    _require_kind(settings.sae, kind)
    head_parallel_size = getattr(settings, "head_parallel_size", 1)
    data_parallel, shards, heads = init_mesh(
        settings.data_parallel_size, head_parallel_size, settings.model_parallel_size, str(settings.sae.device)
    )
    dump = settings.model_dump(mode="json")
    previous = finished_run(Path(settings.trainer.exp_result_path), dump)
    if previous is not None and settings.resume_from in (None, "auto"):
        logger.info("%s already holds a finished run with these settings; nothing to train", previous.output_path)
        return previous
    resume_from = _resolve_resume(settings.resume_from, settings.trainer, dump)
    if data_parallel is not None:
        data_parallel.barrier()  # every rank has looked before rank 0 starts rewriting the directory
    _check_schedules(settings, [settings.trainer])
    warn_if_unshuffled(settings)
    cfg, preloaded = _dictionary_config(settings.sae)
    _require_kind(cfg, kind)
    if isinstance(settings, TrainSAESettings):
        check_whole_contexts(cfg, settings.activation_factory)  # saved weights are checked once their kind is known
    _check_loss(cfg, preloaded, settings.trainer)
    require_head_parallel(cfg, head_parallel_size)
    stream = settings.open_stream([cfg], data_parallel, *([heads] if heads is not None else []))
    if heads is not None:  # the initializer reads every head's batches; training this rank's
        stream = gathering = InitWithEveryHead(stream, heads)
    model, stream = _initialize(settings, stream, preloaded, resume_from)
    if heads is not None:
        gathering.initialized()
    require_feature_parallel(model.cfg, settings.model_parallel_size)  # saved weights are known by now
    return _fit(settings, model, stream, resume_from, dump, 0, data_parallel, shards, heads)


_END = object()


def _broadcast(stream: Iterator[Item], queues: list[queue.Queue], stop: threading.Event) -> None:
    """Feed every batch of `stream` to every queue (bounded, so a slow trainer holds the others back)."""
    try:
        for batch in stream:
            if all(isinstance(q, _DiscardQueue) for q in queues):
                return  # every trainer has finished
            for q in queues:
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.5)
                        break
                    except queue.Full:
                        continue
            if stop.is_set():
                return
    except BaseException as exc:  # surface the stream's error in the trainers
        for q in queues:
            q.put(exc)
        return
    for q in queues:
        q.put(_END)


def _drain(q: queue.Queue) -> Iterator[Item]:
    while True:
        batch = q.get()
        if batch is _END:
            return
        if isinstance(batch, BaseException):
            raise batch
        yield batch


def sweep_sae(settings: SweepSAESettings) -> list[TrainResult]:
    """Train every item on one shared activation stream (one forward pass of the model, or one read of the cache,
    feeds all of them).

    Items are initialised one after the other in this thread, each from the same first batches of the stream and
    its own seed, then trained concurrently, one thread each, so each item is the run `train_sae` would make. An item
    whose output directory holds a finished run with the same settings is reused, not trained (`reused=True`); when
    all are, no stream is opened.

    Under torchrun (data_parallel_size or model_parallel_size > 1) the items train one after the other on every
    process, each exactly as `train_sae` would (the collectives of several items' steps in threads of one process
    would interleave), each reading the stream again."""
    setup_logging()
    if settings.data_parallel_size > 1 or settings.model_parallel_size > 1:
        return [_train(settings.item_settings(index)) for index in range(len(settings.items))]
    dumps = [settings.item_settings(index).model_dump(mode="json") for index in range(len(settings.items))]
    results: list[TrainResult | BaseException | None] = [
        finished_run(Path(item.trainer.exp_result_path), dump) for item, dump in zip(settings.items, dumps, strict=True)
    ]
    pending = [index for index, result in enumerate(results) if result is None]
    for result in results:
        if result is not None:
            logger.info("%s already holds a finished run with these settings; not trained again", result.output_path)
    if not pending:
        return results  # type: ignore[return-value]
    resumes = {}  # an item continues from its own checkpoint: its stream skips the batches it had trained on
    for index in pending:
        item = settings.items[index]
        try:
            resumes[index] = _resolve_resume(item.resume_from, item.trainer, dumps[index])
        except ConfigError as exc:
            raise ConfigError(f"items[{index}] ({item.sae_name!r}): {exc}") from None
    _check_schedules(settings, [settings.items[index].trainer for index in pending])
    warn_if_unshuffled(settings)
    loaded = {index: _dictionary_config(settings.items[index].sae) for index in pending}
    for index, (cfg, preloaded) in loaded.items():
        try:
            _check_loss(cfg, preloaded, settings.items[index].trainer)
        except ConfigError as exc:
            raise ConfigError(f"items[{index}] ({settings.items[index].sae_name!r}): {exc}") from None
    stream = settings.open_stream([cfg for cfg, _ in loaded.values()])
    n_init = max((settings.items[i].initializer or InitializerConfig()).norm_estimation_batches for i in pending) + 1
    head = list(itertools.islice(stream, n_init))
    queues: list[queue.Queue] = [queue.Queue(maxsize=4) for _ in pending]  # queues[slot] feeds items[pending[slot]]
    item_streams, models = [], []
    for slot, index in enumerate(pending):
        model, initial = _initialize(settings.items[index], iter(head), loaded[index][1], resumes[index])
        models.append(model)
        item_streams.append(itertools.chain(initial, _drain(queues[slot])))
    stop = threading.Event()

    def run(slot: int) -> None:
        index = pending[slot]
        try:
            results[index] = _fit(
                settings.items[index], models[slot], item_streams[slot], resumes[index], dumps[index], slot
            )
        except BaseException as exc:
            results[index] = exc
        finally:
            finished, queues[slot] = queues[slot], _DiscardQueue()  # unblock the feeder: stop listening
            while not finished.empty():
                finished.get_nowait()

    workers = [threading.Thread(target=run, args=(slot,), name=f"sweep-{slot}") for slot in range(len(pending))]
    for worker in workers:
        worker.start()
    feeder = threading.Thread(target=_broadcast, args=(stream, queues, stop), name="sweep-feeder", daemon=True)
    feeder.start()
    for worker in workers:
        worker.join()
    stop.set()
    feeder.join()  # it returns after the batch in hand; a thread still streaming at exit aborts the interpreter
    if hasattr(stream, "close"):
        stream.close()  # release the stream's readers (and workers) now, not at garbage collection
    failures = [(settings.items[i].sae_name, r) for i, r in enumerate(results) if isinstance(r, BaseException)]
    if failures:
        name, error = failures[0]
        failure = UserError if isinstance(error, UserError) else RuntimeError  # a setting's fault, or a bug
        raise failure(f"sweep item {name!r} failed: {error}") from error
    return results  # type: ignore[return-value]


class _DiscardQueue(queue.Queue):
    """Stands in for a finished trainer's queue: accepts and drops batches."""

    def put(self, item, block=True, timeout=None) -> None:  # noqa: ARG002
        return None
