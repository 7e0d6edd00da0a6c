"""Several activation factories read as one stream: a crosscoder's `activation_factories`, one per group of heads.

A group may run its own language model (checkpoints of one training run, a base model and its fine-tune): every
factory reads the same documents in the same order, so batch i of each holds the same tokens, and the batches are
merged key by key. A factory with a `name` prefixes its hook keys (`base/blocks.3.hook_resid_post`), so the same
hook of two models stays two heads; the dictionary's hook points are these keys. The merged batch keeps the first
factory's tokens, mask and positions, and every other factory's tokens must equal them (checked per batch: models
whose tokenizers differ cannot share a crosscoder, and the error says so instead of training on misaligned rows).
"""

import json
import logging
from collections.abc import Iterator, Sequence

from pydantic import Field

from lm_saes_core.activation.buffer import Item
from lm_saes_core.activation.config import ActivationFactoryConfig
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.activation.reader import first_difference
from lm_saes_core.backend.base import LanguageModel, LanguageModelConfig, ModelShape
from lm_saes_core.config import ConfigError
from lm_saes_core.data import DatasetConfig
from lm_saes_core.models.config import SparseDictionaryConfig
from lm_saes_core.runners.common import (
    activation_epochs,
    cached_hook_dims,
    check_sources_configured,
    load_datasets,
    needs_language_model,
)

logger = logging.getLogger(__name__)


class HeadGroupFactory(ActivationFactoryConfig):
    """One of `activation_factories`: an activation factory, optionally with its own model and a key prefix."""

    name: str | None = Field(default=None, pattern=r"^[^/]+$")
    """Prefix of this factory's hook keys (`<name>/<hook>`); needed when two factories read the same hook."""
    model: LanguageModelConfig | None = None
    """The language model of this factory's dataset sources; None uses the settings' `model`."""
    model_name: str | None = None
    """Recorded with its activations; defaults to its model's name."""

    def key(self, hook: str) -> str:
        return f"{self.name}/{hook}" if self.name else hook

    @property
    def keys(self) -> list[str]:
        return [self.key(hook) for hook in self.hook_points]

    def plain(self) -> ActivationFactoryConfig:
        """The factory alone (what `ActivationFactory` runs)."""
        return ActivationFactoryConfig.model_validate(self.model_dump(exclude={"name", "model", "model_name"}))


def check_head_groups(factories: list[HeadGroupFactory]) -> None:
    """Factories whose batches can be merged: one target, batch size and context size; every key produced once."""
    first = factories[0]
    for index, factory in enumerate(factories[1:], start=1):
        for field in ("target", "batch_size", "context_size"):
            if getattr(factory, field) != getattr(first, field):
                raise ValueError(
                    f"activation_factories[{index}].{field} is {getattr(factory, field)!r} but activation_factories[0]"
                    f" has {getattr(first, field)!r}: the factories' batches are merged row by row, so they must agree"
                )
    producers: dict[str, int] = {}
    for index, factory in enumerate(factories):
        for key in factory.keys:
            if key in producers:
                raise ValueError(
                    f"activation_factories[{producers[key]}] and [{index}] both produce {key!r}: give each factory "
                    "a `name` (its hooks become '<name>/<hook>') so the heads stay distinct"
                )
            producers[key] = index


def check_head_parallel(factories: list[HeadGroupFactory], head_parallel_size: int, sae=None) -> None:
    """Head rank h streams the h-th equal share of the factories, which must produce exactly the h-th equal share of
    the crosscoder's heads (checked when `sae` is a config; saved weights are checked once loaded)."""
    if head_parallel_size == 1:
        return
    if len(factories) % head_parallel_size:
        raise ValueError(
            f"{head_parallel_size} head ranks do not split the {len(factories)} activation_factories into equal "
            "shares (head rank h streams the h-th share)"
        )
    heads = getattr(sae, "heads", None)
    if heads is None:
        return
    from lm_saes_core.models.head_parallel import head_parallel_problem

    problem = head_parallel_problem(sae, head_parallel_size)
    if problem is not None:
        raise ValueError(problem)
    per_rank, share = len(heads) // head_parallel_size, len(factories) // head_parallel_size
    for rank in range(head_parallel_size):
        keys = [key for factory in factories[rank * share : (rank + 1) * share] for key in factory.keys]
        wanted = heads[rank * per_rank : (rank + 1) * per_rank]
        if sorted(keys) != sorted(wanted):
            raise ValueError(
                f"head rank {rank} of {head_parallel_size} streams activation_factories"
                f"[{rank * share}:{(rank + 1) * share}], which produce {keys}, but its heads are {wanted}: order "
                "sae.heads as the factories produce them, with as many heads per share"
            )


def heads_factories(factories: list[HeadGroupFactory], heads) -> list[HeadGroupFactory]:
    """The factories head rank `heads.rank` streams (its equal share)."""
    share = len(factories) // heads.size
    return factories[heads.rank * share : (heads.rank + 1) * share]


class InitWithEveryHead:
    """A head rank's stream whose batches carry every head rank's hooks (gathered) until `initialized()`: the
    dictionary is initialised whole, from the same batches on every rank, then each rank trains on its own hooks."""

    def __init__(self, stream: Iterator[Item], heads) -> None:
        self.stream, self.heads, self.gathering = stream, heads, True

    def __iter__(self) -> "InitWithEveryHead":
        return self

    def __next__(self) -> Item:
        batch = next(self.stream)
        if not self.gathering:
            return batch
        merged = dict(batch)
        for rank, part in enumerate(self.heads.gather_objects(batch)):
            if "tokens" in batch and not _same_tokens(part["tokens"], batch["tokens"]):
                raise ValueError(
                    f"head rank {rank} read other tokens than head rank {self.heads.rank}: the head ranks' factories "
                    "must read the same documents in the same order (same sources, seeds and buffer settings)"
                )
            merged |= {key: value for key, value in part.items() if key not in merged}
        return merged

    def initialized(self) -> None:
        self.gathering = False


def head_group_keys(factories: list[HeadGroupFactory]) -> dict[str, tuple[int, str]]:
    """key -> (index of the factory producing it, the hook it reads)."""
    return {factory.key(hook): (index, hook) for index, factory in enumerate(factories) for hook in factory.hook_points}


def check_dictionary_fits_groups(
    sae_cfg: SparseDictionaryConfig,
    factories: list[HeadGroupFactory],
    models: Sequence[ModelShape | None] | None = None,
) -> None:
    """Every hook point of the dictionary is a key of some factory, with the width the dictionary expects (read from
    the caches' manifests, and from the models: loaded, or as their configs describe them)."""
    keys = head_group_keys(factories)
    missing = [hook for hook in sae_cfg.hook_points if hook not in keys]
    if missing:
        raise ConfigError(
            f"sae hook point(s) {missing} are not produced by the activation factories (keys: {list(keys)})"
        )
    dims: dict[str, int] = {}
    for index, factory in enumerate(factories):
        dims |= {factory.key(hook): width for hook, width in cached_hook_dims(factory.plain()).items()}
        model = models[index] if models else None
        if model is not None:
            dims |= {
                factory.key(hook): model.hook_dim(hook) for hook in factory.hook_points if factory.key(hook) not in dims
            }
    for hook, width, field in sae_cfg.hook_widths():
        if hook in dims and dims[hook] != width:
            raise ConfigError(f"sae.{field} is {width} but the activations at {hook!r} have width {dims[hook]}")


def check_model_configs(
    factories: list[HeadGroupFactory],
    model: LanguageModelConfig | None,
    sae_cfgs: Sequence[SparseDictionaryConfig] = (),
) -> None:
    """What each group's model config tells, before any weights load (`common.check_model_config` per group): its
    factory's hooks and context size, and the dictionaries' widths."""
    from lm_saes_core.backend import read_model_shape

    read: dict[str, ModelShape | None] = {}
    shapes: list[ModelShape | None] = []
    for factory in factories:
        model_cfg = factory.model or model
        shape = None
        if model_cfg is not None and needs_language_model(factory):
            identity = json.dumps(model_cfg.model_dump(mode="json"), sort_keys=True)
            if identity not in read:
                read[identity] = read_model_shape(model_cfg)
            shape = read[identity]
            if shape is not None:
                ActivationFactory(factory.plain()).validate(shape)
        shapes.append(shape)
    for sae_cfg in sae_cfgs:
        check_dictionary_fits_groups(sae_cfg, factories, shapes)


class HeadGroup:
    """A factory ready to stream: its model (None for caches), datasets and the model name it records."""

    def __init__(self, cfg: HeadGroupFactory, model: LanguageModel | None, datasets: dict, model_name: str | None):
        self.cfg, self.model, self.datasets, self.model_name = cfg, model, datasets, model_name

    def stream(self, epochs: bool, batch_size: int | None = None, shard: tuple[int, int] | None = None):
        factory_cfg = self.cfg.plain()
        if batch_size is not None:
            factory_cfg = factory_cfg.model_copy(update={"batch_size": batch_size})
        factory = ActivationFactory(factory_cfg)
        kwargs = {"model": self.model, "model_name": self.model_name, "datasets": self.datasets, "shard": shard}
        return activation_epochs(factory, **kwargs) if epochs else factory.process(**kwargs)


def load_head_groups(
    factories: list[HeadGroupFactory],
    model: LanguageModelConfig | None,
    model_name: str | None,
    dataset_cfgs: dict[str, DatasetConfig | None] | None,
) -> list[HeadGroup]:
    """Load each distinct language model once (factories naming the same config share it) and every dataset."""
    for factory in factories:
        check_sources_configured(factory, factory.model or model, dataset_cfgs)
    loaded: dict[str, LanguageModel] = {}
    groups = []
    for factory in factories:
        model_cfg = factory.model or model
        language_model = None
        if needs_language_model(factory):
            from lm_saes_core.backend import load_model

            identity = json.dumps(model_cfg.model_dump(mode="json"), sort_keys=True)
            if identity not in loaded:
                loaded[identity] = load_model(model_cfg)
            language_model = loaded[identity]
            ActivationFactory(factory.plain()).validate(language_model)
        name = factory.model_name or (factory.model.model_name if factory.model else None) or model_name
        if name is None and model is not None:
            name = model.model_name
        groups.append(HeadGroup(factory, language_model, load_datasets(factory, dataset_cfgs), name))
    return groups


def merged_stream(
    groups: list[HeadGroup], epochs: bool, batch_size: int | None = None, shard: tuple[int, int] | None = None
) -> Iterator[Item]:
    """Batch i of every group merged into one (the first group's tokens and positions, every group's hooks under
    their keys); the streams must hold the same tokens batch by batch."""
    streams = [group.stream(epochs, batch_size, shard) for group in groups]
    try:
        for index, batches in enumerate(zip(*streams, strict=False)):
            merged = {key: value for key, value in batches[0].items() if key not in groups[0].cfg.hook_points}
            for group_index, (group, batch) in enumerate(zip(groups, batches, strict=True)):
                if group_index and not _same_tokens(batch["tokens"], merged["tokens"]):
                    raise ValueError(
                        f"activation_factories[{group_index}] yielded other tokens than activation_factories[0] in "
                        f"batch {index} (first difference at {first_difference(batch['tokens'], merged['tokens'])}): "
                        "the factories must read the same documents in the same order (same sources, seeds and "
                        "buffer settings) through tokenizers that agree"
                    )
                merged |= {group.cfg.key(hook): batch[hook] for hook in group.cfg.hook_points}
            yield merged
    finally:
        for stream in streams:
            if hasattr(stream, "close"):
                stream.close()


def _same_tokens(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
