"""What the `activations` and `dictionary` assets hand the core runners: the pipeline's `generate_activations`
settings, one item's `train_sae` settings, and for a run over several item partitions, the groups of items that can
share one activation stream (`sweep_sae`).

Items share a stream when they read the same hooks of the cache in the same batches: same hook points, batch size,
buffer, shuffling and process count. Their own dictionary, initialiser, trainer and seed may differ; a sweep item is
the run `train_sae` would make alone (see `sweep_sae`), and its directory records those single-run settings, so
whichever way a dictionary was trained, the other way finds it finished and does not retrain it.
"""

import json
from pathlib import Path

from lm_saes_dagster.pipeline_config import DictionaryItem, PipelineConfig


def generate_settings(cfg: PipelineConfig, output: Path, *, overwrite: bool = False) -> dict:
    """`generate_activations` settings caching every hook of the pipeline into `output` in one forward pass."""
    settings = cfg.activations
    return {
        "model": cfg.model.model_dump(mode="json"),
        "dataset": cfg.dataset.model_dump(mode="json"),
        "hook_points": cfg.hook_points,
        "output_dir": str(output),
        "context_size": settings.context_size,
        "total_tokens": settings.total_tokens,
        "model_batch_size": settings.model_batch_size,
        "batch_size": settings.model_batch_size,
        "n_samples_per_chunk": settings.n_samples_per_chunk,
        "num_workers": settings.num_workers,
        "overwrite": overwrite,
    }


def _stream_fields(item: DictionaryItem) -> dict:
    return {
        "hook_points": item.hook_points,
        "batch_size": item.batch_size,
        "buffer_size": item.buffer_size,
        "buffer_shuffle": item.buffer_shuffle.model_dump(mode="json"),
        "data_parallel_size": item.data_parallel_size,
        "model_parallel_size": item.model_parallel_size,
    }


def stream_groups(items: dict[str, DictionaryItem]) -> list[list[str]]:
    """Item names grouped by the activation stream they train on, in first-seen order (names keep their order)."""
    groups: dict[str, list[str]] = {}
    for name, item in items.items():
        groups.setdefault(json.dumps(_stream_fields(item), sort_keys=True), []).append(name)
    return list(groups.values())


def _source(item: DictionaryItem, cache: Path) -> dict:
    return {
        "activation_factory": {
            "sources": [{"type": "activations", "name": "cache", "path": str(cache), "shuffle_chunks": True}],
            "target": "activations-1d",
            "hook_points": item.hook_points,  # a transcoder trains on pairs (hook_point_in, hook_point_out)
            "batch_size": item.batch_size,
            "buffer_size": item.buffer_size,
            "buffer_shuffle": item.buffer_shuffle.model_dump(mode="json"),
        },
        "data_parallel_size": item.data_parallel_size,
        "model_parallel_size": item.model_parallel_size,
    }


def _item(cfg: PipelineConfig, item_name: str, item: DictionaryItem, output: Path) -> dict:
    return {
        "sae": item.sae.model_dump(mode="json"),
        "sae_name": item_name,
        "sae_series": cfg.name,
        "initializer": item.initializer.model_dump(mode="json"),
        "trainer": {**item.trainer.model_dump(mode="json"), "exp_result_path": str(output)},
        "seed": item.seed,
    }


def train_settings(cfg: PipelineConfig, item_name: str, item: DictionaryItem, cache: Path, output: Path) -> dict:
    """`train_sae` settings of one item, reading the pipeline's activation cache and writing to `output`."""
    return {**_item(cfg, item_name, item, output), **_source(item, cache)}


def sweep_settings(
    cfg: PipelineConfig, items: dict[str, DictionaryItem], cache: Path, outputs: dict[str, Path]
) -> dict:
    """`sweep_sae` settings training `items` (one stream group) from one read of the cache."""
    groups = stream_groups(items)
    if len(groups) != 1:
        raise ValueError(f"a sweep trains items that share one activation stream; these need {len(groups)}: {groups}")
    first = items[groups[0][0]]
    return {**_source(first, cache), "items": [_item(cfg, name, item, outputs[name]) for name, item in items.items()]}
