"""The activation factory: one stream of batches from datasets run through a language model and/or cached activations.

Per source a chain produces items (dicts of row-aligned tensors); items of several sources are interleaved by
their `sample_weights`; the result is re-batched (and shuffled) to the target's batch size.

Item keys: one tensor per hook point, (B, S, D) for 2-D and (N, D) for 1-D, plus `tokens`, `doc_index`,
`doc_position`, `source_idx` ((B, S) / (N,)) and, for 2-D, `mask` (document tokens to use) and `attention_mask`.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from lm_saes_core.activation.buffer import KEEP, ActivationBatcher, Item
from lm_saes_core.activation.cache_format import ActivationCacheError
from lm_saes_core.activation.config import (
    ActivationFactoryActivationsSource,
    ActivationFactoryConfig,
    ActivationFactoryDatasetSource,
    ActivationFactoryTarget,
    BufferShuffleConfig,
)
from lm_saes_core.activation.reader import CachedActivations
from lm_saes_core.activation.windows import iter_window_batches
from lm_saes_core.backend.base import LanguageModel, ModelShape
from lm_saes_core.config import ConfigError

DatasetInput = Any  # a datasets.Dataset, or (Dataset, {"text_field": ..., "doc_offset": ...})


def unshuffled_sources(cfg: ActivationFactoryConfig) -> list[str]:
    """The sources whose rows this factory would yield in document order: without a shuffle buffer, a dataset's and
    a cache's not written shuffled in the rows read (contexts shuffled still hold their tokens in order, so a 2-D
    cache read as tokens counts as unshuffled; a cache that cannot be opened is left to the error reading it gives)."""
    if cfg.buffer_size is not None:
        return []
    names = []
    for source in cfg.sources:
        if isinstance(source, ActivationFactoryActivationsSource):
            try:
                cache = CachedActivations(source.path)
            except ActivationCacheError:
                continue
            as_written = cache.layout == "1d" or cfg.target != ActivationFactoryTarget.ACTIVATIONS_1D
            if cache.written_shuffled and as_written:
                continue
        names.append(source.name)
    return names


def flatten_tokens(item: Item) -> Item:
    """2-D -> 1-D: every position a row (views, no copy), the positions whose `mask` is false marked for the batcher
    to drop (`KEEP`) as it copies the rest; the masks themselves dropped."""
    flat = {KEEP: item["mask"].reshape(-1)}
    for key, value in item.items():
        if key in ("mask", "attention_mask"):
            continue
        flat[key] = value.reshape(-1, *value.shape[2:])
    return flat


class ActivationFactory:
    def __init__(self, cfg: ActivationFactoryConfig):
        self.cfg = cfg
        self.target = cfg.target

    def validate(self, model: ModelShape | None) -> None:
        """Check hooks and context length against the model (loaded, or its config) before any forward pass."""
        if model is None:
            return
        model.validate_hook_points(self.cfg.hook_points)
        if self.cfg.context_size > model.max_context:
            raise ConfigError(
                f"context_size {self.cfg.context_size} exceeds the maximum context of model "
                f"{model.cfg.model_name!r} ({model.max_context})"
            )

    def process(
        self,
        *,
        model: LanguageModel | None = None,
        model_name: str | None = None,
        datasets: Mapping[str, DatasetInput] | None = None,
        epoch: int = 0,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[Item]:
        """One pass over the sources. `epoch` re-seeds the shuffle buffer, the chunk order of cached sources and the
        source interleaving, so epoch e of a run is the same wherever it is replayed (exact resume).

        `shard=(rank, world)`: this data-parallel rank's disjoint part of every source (every world-th document of a
        dataset, every world-th chunk of a cache, from the rank-th); the ranks' parts together are the whole pass."""
        chains = []
        for source_idx, source in enumerate(self.cfg.sources):
            if isinstance(source, ActivationFactoryDatasetSource):
                if datasets is None or source.name not in datasets:
                    raise KeyError(f"dataset {source.name!r} of the activation factory was not provided")
                if model is None and self.target != ActivationFactoryTarget.TOKENS:
                    raise ValueError(f"a language model is needed to compute activations for source {source.name!r}")
                chains.append(self._dataset_chain(source_idx, source, datasets[source.name], model, shard))
            else:
                chains.append(self._activations_chain(source_idx, source, epoch, shard))
        weights = [source.sample_weights for source in self.cfg.sources]
        items = self._interleave(chains, weights, self._seed + epoch)
        shuffle = BufferShuffleConfig(
            perm_seed=self._seed + epoch,
            generator_device=self.cfg.buffer_shuffle.generator_device if self.cfg.buffer_shuffle else None,
        )
        return ActivationBatcher(self.cfg.batch_size, self.cfg.buffer_size, shuffle)(items)

    @property
    def _seed(self) -> int:
        return self.cfg.buffer_shuffle.perm_seed if self.cfg.buffer_shuffle else 42

    # ---- sources ----
    def _dataset_chain(
        self,
        source_idx: int,
        source: ActivationFactoryDatasetSource,
        dataset: DatasetInput,
        model: LanguageModel,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[Item]:
        dataset, meta = dataset if isinstance(dataset, tuple) else (dataset, {})
        text_field = meta.get("text_field", "text")
        doc_offset = meta.get("doc_offset", 0)
        tokenizer = model.tokenizer
        bos = model.bos_token_id if model.cfg.prepend_bos else None
        texts = _iter_texts(dataset, text_field, doc_offset, desc=f"documents of {source.name}")
        if shard is not None:
            rank, world = shard
            texts = ((index, text) for index, text in texts if (index - doc_offset) % world == rank)
        windows = iter_window_batches(
            texts,
            tokenizer,
            batch_rows=self.cfg.model_batch_size,
            context_size=self.cfg.context_size,
            bos_token_id=bos,
            pad_token_id=model.pad_token_id,
            ignore_token_ids=self.cfg.ignore_token_ids or (),
        )
        for batch in windows:
            batch["source_idx"] = torch.full_like(batch["tokens"], source_idx)
            if self.target == ActivationFactoryTarget.TOKENS:
                yield batch
                continue
            device = _model_device(model)
            batch = {key: value.to(device) for key, value in batch.items()}
            activations = model.activations(batch["tokens"], batch["attention_mask"], self.cfg.hook_points)
            if self.cfg.override_dtype is not None:
                activations = {hook: value.to(self.cfg.override_dtype) for hook, value in activations.items()}
            item = {**activations, **batch}
            yield flatten_tokens(item) if self.target == ActivationFactoryTarget.ACTIVATIONS_1D else item

    def _activations_chain(
        self,
        source_idx: int,
        source: ActivationFactoryActivationsSource,
        epoch: int,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[Item]:
        cache = CachedActivations(source.path, hook_points=self.cfg.hook_points)
        if cache.layout == "1d" and self.target == ActivationFactoryTarget.ACTIVATIONS_2D:
            raise ValueError(f"source {source.name!r} holds 1-D (token) activations; target activations-2d needs 2-D")
        dtype = source.dtype or self.cfg.override_dtype
        for item in cache.iterate(
            device=source.device,
            dtype=dtype,
            num_workers=source.num_workers,
            prefetch=source.prefetch,
            shuffle_seed=self._seed if source.shuffle_chunks else None,
            epoch=epoch,
            shard=shard,
        ):
            if "tokens" in item:  # the cache recorded its generator's source index; this factory's index names it here
                item["source_idx"] = torch.full_like(item["tokens"], source_idx)
            yield (
                flatten_tokens(item)
                if self.target == ActivationFactoryTarget.ACTIVATIONS_1D and "mask" in item
                else item
            )

    def _interleave(self, chains: list[Iterator[Item]], weights: list[float], seed: int) -> Iterator[Item]:
        """Draw the next item from a source chosen with probability proportional to its weight (seeded)."""
        if len(chains) == 1:
            yield from chains[0]
            return
        rng = np.random.default_rng(seed)
        live = list(range(len(chains)))
        while live:
            probabilities = np.array([weights[i] for i in live]) / sum(weights[i] for i in live)
            choice = live[int(rng.choice(len(live), p=probabilities))]
            try:
                yield next(chains[choice])
            except StopIteration:
                live.remove(choice)


def _model_device(model: LanguageModel) -> torch.device:
    return torch.device(model.cfg.device)


def _iter_texts(dataset, text_field: str, doc_offset: int, desc: str) -> Iterator[tuple[int, str]]:
    if text_field not in dataset.column_names:
        raise KeyError(f"dataset has no text field {text_field!r}; its columns are {dataset.column_names}")
    index = doc_offset
    with tqdm(total=len(dataset), desc=desc, unit="doc", leave=False, position=1) as bar:
        for batch in dataset.select_columns([text_field]).iter(batch_size=64):
            for text in batch[text_field]:
                yield index, text
                index += 1
            bar.update(len(batch[text_field]))
