"""`generate_activations`: run a dataset through a language model and cache the activations on disk."""

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from lm_saes_core.activation.cache_format import manifest_name
from lm_saes_core.activation.config import (
    ActivationFactoryConfig,
    ActivationFactoryDatasetSource,
    ActivationFactoryTarget,
    BufferShuffleConfig,
)
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.activation.writer import ActivationWriter, ActivationWriterConfig
from lm_saes_core.backend.base import LanguageModelConfig
from lm_saes_core.config import BaseConfig, DType, MongoDBConfig, dtype_name
from lm_saes_core.data import DatasetConfig
from lm_saes_core.log import setup_logging

logger = logging.getLogger(__name__)

# Bytes each position costs per hook file besides its activation: token id, document index and position,
# source index (int64 each), two boolean masks, and roughly 20 bytes of JSON sidecar.
_OVERHEAD_BYTES_PER_POSITION = 4 * 8 + 2 + 20


class GenerateActivationsSettings(BaseConfig):
    model: LanguageModelConfig | None = None
    model_name: str | None = None
    """Name recorded with the activations; defaults to `model.model_name`."""
    dataset: DatasetConfig | None = None
    dataset_name: str | None = None
    """Name recorded with the activations (and the factory source name); defaults to the dataset path."""
    hook_points: list[str] = Field(min_length=1)
    output_dir: str
    target: ActivationFactoryTarget = ActivationFactoryTarget.ACTIVATIONS_2D
    model_batch_size: int = Field(default=1, gt=0)
    batch_size: int = Field(gt=0)
    buffer_size: int | None = Field(default=None, gt=0)
    buffer_shuffle: BufferShuffleConfig | None = None
    total_tokens: int | None = Field(default=None, gt=0)
    """Exact number of token positions to write (over all shards): rows x context_size for activations-2d
    (so a multiple of context_size), tokens for activations-1d."""
    context_size: int = Field(default=128, gt=1)
    n_samples_per_chunk: int | None = Field(default=None, gt=0)
    num_workers: int | None = Field(default=None, ge=0)
    format: Literal["pt", "safetensors"] = "safetensors"
    n_shards: int | None = Field(default=None, gt=0)
    """Split the dataset into this many contiguous shards; this process writes shard `start_shard` (+ its rank under
    torchrun). Defaults to the torchrun world size, or no sharding in a single process."""
    start_shard: int = Field(default=0, ge=0)
    mongo: MongoDBConfig | None = None
    ignore_token_ids: list[int] | None = None
    device_type: Literal["cuda", "cpu"] | None = None
    """Under torchrun, place each rank's model on `<device_type>:<LOCAL_RANK>`; None keeps `model.device`."""
    override_dtype: DType | None = None
    overwrite: bool = False
    """Replace a complete cache already in `output_dir`."""

    @model_validator(mode="after")
    def _check(self) -> "GenerateActivationsSettings":
        if self.mongo is not None:
            raise ValueError(
                "mongo: reading model and dataset configs from MongoDB is not available yet; give them inline"
            )
        if self.model is None:
            raise ValueError("model: a LanguageModelConfig is required (e.g. {model_name: smollm2-135m})")
        if self.dataset is None:
            raise ValueError("dataset: a DatasetConfig is required (e.g. {dataset_name_or_path: python-docs})")
        if self.target == ActivationFactoryTarget.TOKENS:
            raise ValueError("target: generate_activations writes activations; use activations-2d or activations-1d")
        if self.total_tokens is not None:
            n_shards = self.n_shards or 1
            unit = self.context_size if self.target == ActivationFactoryTarget.ACTIVATIONS_2D else 1
            if self.total_tokens % (unit * n_shards):
                raise ValueError(
                    f"total_tokens ({self.total_tokens}) must be a multiple of "
                    + (f"context_size ({self.context_size}) " if unit > 1 else "")
                    + (f"x n_shards ({n_shards})" if n_shards > 1 else "")
                    + " so that every shard writes whole rows"
                )
        if self.n_shards is not None and self.start_shard >= self.n_shards:
            raise ValueError(f"start_shard ({self.start_shard}) must be smaller than n_shards ({self.n_shards})")
        return self

    def factory_config(self) -> ActivationFactoryConfig:
        return ActivationFactoryConfig(
            sources=[ActivationFactoryDatasetSource(name=self.source_name)],
            target=self.target,
            hook_points=self.hook_points,
            batch_size=self.batch_size,
            context_size=self.context_size,
            model_batch_size=self.model_batch_size,
            override_dtype=self.override_dtype,
            buffer_size=self.buffer_size,
            buffer_shuffle=self.buffer_shuffle,
            ignore_token_ids=self.ignore_token_ids,
        )

    @property
    def source_name(self) -> str:
        return self.dataset_name or self.dataset.dataset_name_or_path


@dataclass
class GenerationResult:
    output_dir: Path
    manifest_path: Path
    n_tokens: int
    n_real_tokens: int
    n_chunks: int
    bytes_on_disk: int
    seconds: float
    reused: bool = False
    """True when an identical complete cache was already there and nothing was recomputed."""

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds else float("nan")


@dataclass(frozen=True)
class ShardPlan:
    shard: int | None
    n_shards: int | None
    rank: int
    world_size: int


def plan_shard(settings: GenerateActivationsSettings) -> ShardPlan:
    """Which shard this process writes: torchrun ranks take consecutive shards from `start_shard`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    n_shards = settings.n_shards or (world_size if world_size > 1 else None)
    if n_shards is None:
        return ShardPlan(None, None, rank, world_size)
    shard = settings.start_shard + rank
    if shard >= n_shards:
        raise ValueError(f"rank {rank} would write shard {shard}, but n_shards is {n_shards}")
    return ShardPlan(shard, n_shards, rank, world_size)


def estimate_bytes(n_positions: int, hook_dims: dict[str, int], dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(n_positions * (dim * itemsize + _OVERHEAD_BYTES_PER_POSITION) for dim in hook_dims.values())


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _settings_key(settings: GenerateActivationsSettings) -> dict:
    return settings.model_dump(mode="json", exclude={"overwrite", "num_workers"})


def find_identical_cache(manifest_path: Path, settings: GenerateActivationsSettings) -> GenerationResult | None:
    """A complete cache written with the same settings (idempotent re-runs cost nothing)."""
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("provenance", {}).get("settings_key") != _settings_key(settings):
        return None
    return GenerationResult(
        output_dir=manifest_path.parent,
        manifest_path=manifest_path,
        n_tokens=manifest["n_tokens"],
        n_real_tokens=manifest["n_real_tokens"],
        n_chunks=manifest["n_chunks"],
        bytes_on_disk=directory_bytes(manifest_path.parent),
        seconds=0.0,
        reused=True,
    )


def generate_activations(settings: GenerateActivationsSettings) -> GenerationResult:
    from lm_saes_core.backend import load_model, read_model_shape
    from lm_saes_core.data import dataset_fingerprint, load_dataset

    setup_logging()
    plan = plan_shard(settings)
    output_dir = Path(settings.output_dir)
    existing = find_identical_cache(output_dir / manifest_name(plan.shard), settings)
    if existing is not None:
        logger.info("%s already holds activations generated with these settings; nothing to do", output_dir)
        return existing
    factory = ActivationFactory(settings.factory_config())
    factory.validate(read_model_shape(settings.model))  # hooks and context from the model's config: no weights yet
    writer = ActivationWriter(
        ActivationWriterConfig(
            hook_points=settings.hook_points,
            cache_dir=str(output_dir),
            total_generating_tokens=settings.total_tokens // (plan.n_shards or 1) if settings.total_tokens else None,
            n_samples_per_chunk=settings.n_samples_per_chunk,
            format=settings.format,
            num_workers=settings.num_workers,
            overwrite=settings.overwrite,
        ),
        shard=plan.shard,
    )
    writer.prepare()  # before any heavy work: unwritable directory or an existing complete cache fail here
    model_cfg = settings.model
    if plan.world_size > 1 and settings.device_type is not None:
        model_cfg = model_cfg.model_copy(update={"device": f"{settings.device_type}:{os.environ.get('LOCAL_RANK', 0)}"})

    dataset = load_dataset(settings.dataset)
    doc_offset = 0
    if plan.shard is not None:
        full_length = len(dataset)
        base, extra = divmod(full_length, plan.n_shards)
        doc_offset = base * plan.shard + min(plan.shard, extra)
        dataset = dataset.shard(plan.n_shards, plan.shard, contiguous=True)
    if len(dataset) == 0:
        raise ValueError(f"dataset {settings.source_name!r} (shard {plan.shard}) has no documents")

    model = load_model(model_cfg)
    factory.validate(model)

    hook_dims = {hook: model.hook_dim(hook) for hook in settings.hook_points}
    out_dtype = settings.override_dtype or model_cfg.dtype
    shard_tokens = writer.cfg.total_generating_tokens
    if shard_tokens:
        logger.info(
            "expected size on disk: %s for %d tokens x %d hook point(s) %s in %s",
            human_bytes(estimate_bytes(shard_tokens, hook_dims, out_dtype)),
            shard_tokens,
            len(hook_dims),
            hook_dims,
            dtype_name(out_dtype),
        )
    else:
        logger.info(
            "expected size on disk: %s per million tokens (whole dataset, %d documents)",
            human_bytes(estimate_bytes(1_000_000, hook_dims, out_dtype)),
            len(dataset),
        )

    writer.provenance = {
        "model_name": settings.model_name or model_cfg.model_name,
        "model": model_cfg.model_dump(mode="json"),
        "dataset_name": settings.source_name,
        "dataset": settings.dataset.model_dump(mode="json"),
        "dataset_fingerprint": dataset_fingerprint(settings.dataset),
        "sources": [settings.source_name],
        "shard": plan.shard,
        "n_shards": plan.n_shards,
        "doc_offset": doc_offset,
        "bos_token_id": model.bos_token_id if model_cfg.prepend_bos else None,
        "pad_token_id": model.pad_token_id,
        "settings": settings.model_dump(mode="json"),
        "settings_key": _settings_key(settings),
    }
    stream = factory.process(
        model=model,
        model_name=writer.provenance["model_name"],
        datasets={
            settings.source_name: (dataset, {"text_field": settings.dataset.text_field, "doc_offset": doc_offset})
        },
    )
    started = time.perf_counter()
    try:
        manifest = writer.write(stream)
    except KeyboardInterrupt:
        logger.error(
            "interrupted: %s has no manifest and is incomplete; re-running cleans it and starts over", output_dir
        )
        raise
    seconds = time.perf_counter() - started
    result = GenerationResult(
        output_dir=output_dir,
        manifest_path=writer.manifest_path,
        n_tokens=manifest["n_tokens"],
        n_real_tokens=manifest["n_real_tokens"],
        n_chunks=manifest["n_chunks"],
        bytes_on_disk=directory_bytes(output_dir),
        seconds=seconds,
    )
    logger.info(
        "wrote %d tokens (%d unmasked) in %d chunks to %s: %s, %.0f tokens/s",
        result.n_tokens,
        result.n_real_tokens,
        result.n_chunks,
        output_dir,
        human_bytes(result.bytes_on_disk),
        result.tokens_per_second,
    )
    return result


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
