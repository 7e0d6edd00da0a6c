"""What the assets hand the core runners: one typed builder per runner, each returning that runner's settings object
(the launcher writes its JSON dump for the child process).

Runner         builder                 settings class
-------------  ----------------------  ------------------------------
generate       generate_settings       GenerateActivationsSettings
train          train_settings          TrainSAESettings
sweep          sweep_settings          SweepSAESettings
evaluate       evaluate_settings       EvaluateSAESettings
analyze        analyze_settings        AnalyzeSAESettings
dla            dla_settings            DirectLogitAttributeSettings
auto_interp    autointerp_settings     AutoInterpSettings (in-process)

Training reads the pipeline's activation cache. For a run over several item partitions, `stream_groups` finds the
items that can share one activation stream (`sweep_sae`): same hook points, batch size, buffer, shuffling and process
count. Their own dictionary, initialiser, trainer and seed may differ; a sweep item is the run `train_sae` would make
alone (see `sweep_sae`), and its directory records those single-run settings, so whichever way a dictionary was
trained, the other way finds it finished and does not retrain it.

Training continues killed runs by itself: every item resumes (`resume_from: auto`) from the newest complete checkpoint
its own settings wrote under its output directory, and checkpoints every `DEFAULT_CHECKPOINT_MINUTES` of wall-clock
time unless its trainer sets `checkpoint_every_minutes`.
"""

import json
from pathlib import Path

from lm_saes_core.activation.config import (
    ActivationFactoryActivationsSource,
    ActivationFactoryConfig,
    ActivationFactoryDatasetSource,
    ActivationFactoryTarget,
)
from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.analysis.feature_analyzer import FeatureAnalyzerConfig
from lm_saes_core.models import DICTIONARY_KINDS, PretrainedSAE
from lm_saes_core.runners.analyze import AnalyzeSAESettings
from lm_saes_core.runners.autointerp import AutoInterpSettings
from lm_saes_core.runners.dla import DirectLogitAttributeSettings
from lm_saes_core.runners.evaluate import EvaluateSAESettings
from lm_saes_core.runners.generate import GenerateActivationsSettings
from lm_saes_core.runners.train import SweepingItem, SweepSAESettings, TrainCrossCoderSettings, TrainSAESettings
from lm_saes_core.store import RecordStoreConfig
from lm_saes_dagster.pipeline_config import DictionaryItem, PipelineConfig

DEFAULT_CHECKPOINT_MINUTES = 10.0
"""Wall-clock cadence of pipeline items' checkpoints: a killed or evicted run loses at most about this much work on any
hardware (a step count would mean seconds on one GPU and hours on a CPU), while writing a checkpoint (seconds, even
for a 65k-feature dictionary with its Adam moments) stays a small fraction of it. Periodic checkpoints replace each
other (the newest two are kept), so a long run does not fill the disk."""

CACHE_SOURCE, HELDOUT_SOURCE, ANALYSIS_SOURCE = "cache", "heldout", "train"
"""Names of the activation sources of training, evaluation and analysis. They are part of the recorded settings (a
finished training run is recognised by them), so they stay as the first pipelines named them."""


def generate_settings(cfg: PipelineConfig, output: Path, *, overwrite: bool = False) -> GenerateActivationsSettings:
    """Every hook of the pipeline cached into `output` in one forward pass."""
    activations = cfg.activations
    return GenerateActivationsSettings(
        model=cfg.model,
        dataset=cfg.dataset,
        hook_points=cfg.hook_points,
        output_dir=str(output),
        context_size=activations.context_size,
        total_tokens=activations.total_tokens,
        model_batch_size=activations.model_batch_size,
        batch_size=activations.model_batch_size,
        n_samples_per_chunk=activations.n_samples_per_chunk,
        num_workers=activations.num_workers,
        overwrite=overwrite,
    )


# ---------------------------------------------------------------------------------------------------- training


def _stream_key(item: DictionaryItem) -> str:
    stream = {
        "target": _training_target(item).value,
        "hook_points": item.hook_points,
        "batch_size": item.batch_size,
        "buffer_size": item.buffer_size,
        "buffer_shuffle": item.buffer_shuffle.model_dump(mode="json"),
        "data_parallel_size": item.data_parallel_size,
        "model_parallel_size": item.model_parallel_size,
        "head_parallel_size": item.head_parallel_size,
    }
    return json.dumps(stream, sort_keys=True)


def stream_groups(items: dict[str, DictionaryItem]) -> list[list[str]]:
    """Item names grouped by the activation stream they train on, in first-seen order (names keep their order)."""
    groups: dict[str, list[str]] = {}
    for name, item in items.items():
        groups.setdefault(_stream_key(item), []).append(name)
    return list(groups.values())


def _training_target(item: DictionaryItem) -> ActivationFactoryTarget:
    """Tokens (1-D, shuffled) for most kinds; whole contexts (2-D) for a kind that reads positions (Lorsa), whose
    `batch_size` then counts contexts."""
    kind = DICTIONARY_KINDS.get(item.sae.sae_type)
    contexts = kind is not None and kind.granularity == "contexts"
    return ActivationFactoryTarget.ACTIVATIONS_2D if contexts else ActivationFactoryTarget.ACTIVATIONS_1D


def _training_stream(item: DictionaryItem, cache: Path) -> ActivationFactoryConfig:
    """The item's hooks (all of them: a transcoder trains on pairs) from the cache, shuffled, in its batches."""
    return ActivationFactoryConfig(
        sources=[ActivationFactoryActivationsSource(name=CACHE_SOURCE, path=str(cache), shuffle_chunks=True)],
        target=_training_target(item),
        hook_points=item.hook_points,
        batch_size=item.batch_size,
        buffer_size=item.buffer_size,
        buffer_shuffle=item.buffer_shuffle,
    )


def _sweeping_item(cfg: PipelineConfig, item_name: str, item: DictionaryItem, output: Path) -> SweepingItem:
    trainer = item.trainer.model_copy(deep=True)  # the pipeline's item stays as it is
    trainer.exp_result_path = str(output)
    if "checkpoint_every_minutes" not in item.trainer.model_fields_set:
        trainer.checkpoint_every_minutes = DEFAULT_CHECKPOINT_MINUTES
    return SweepingItem(
        sae=item.sae,
        sae_name=item_name,
        sae_series=cfg.name,
        initializer=item.initializer,
        trainer=trainer,
        seed=item.seed,
        resume_from="auto",
    )


def train_settings(
    cfg: PipelineConfig, item_name: str, item: DictionaryItem, cache: Path, output: Path
) -> TrainSAESettings | TrainCrossCoderSettings:
    """One item, reading the pipeline's activation cache and writing to `output`; a head-parallel crosscoder reads
    one factory per head (the same shuffled stream of the cache, one hook each), so each head rank reads its own."""
    if item.head_parallel_size > 1:
        stream = _training_stream(item, cache).model_dump()
        return TrainCrossCoderSettings(
            **dict(_sweeping_item(cfg, item_name, item, output)),
            activation_factories=[{**stream, "hook_points": [head]} for head in item.sae.heads],
            data_parallel_size=item.data_parallel_size,
            head_parallel_size=item.head_parallel_size,
            model_parallel_size=item.model_parallel_size,
        )
    return TrainSAESettings(
        **dict(_sweeping_item(cfg, item_name, item, output)),  # the item's own fields, as a sweep would train it
        activation_factory=_training_stream(item, cache),
        data_parallel_size=item.data_parallel_size,
        model_parallel_size=item.model_parallel_size,
        # a Lorsa that starts from the host's attention reads it from the model (its config and weights only)
        model=cfg.model if item.initializer.uses_host_attention else None,
    )


def sweep_settings(
    cfg: PipelineConfig, items: dict[str, DictionaryItem], cache: Path, outputs: dict[str, Path]
) -> SweepSAESettings:
    """`items` (one stream group) trained from one read of the cache."""
    groups = stream_groups(items)
    if len(groups) != 1:
        raise ValueError(f"a sweep trains items that share one activation stream; these need {len(groups)}: {groups}")
    first = items[groups[0][0]]
    return SweepSAESettings(
        activation_factory=_training_stream(first, cache),
        data_parallel_size=first.data_parallel_size,
        model_parallel_size=first.model_parallel_size,
        items=[_sweeping_item(cfg, name, item, outputs[name]) for name, item in items.items()],
    )


# ---------------------------------------------------------------------------------------------------- after training


def evaluate_settings(
    cfg: PipelineConfig, item_name: str, item: DictionaryItem, dictionary: Path, output: Path
) -> EvaluateSAESettings:
    """The saved dictionary on the held-out documents run through the model (whole sequences, so the dictionary can
    be spliced in for the language-model loss); the metrics JSON goes to `output`."""
    activations = cfg.activations
    return EvaluateSAESettings(
        sae=PretrainedSAE(pretrained_name_or_path=str(dictionary)),
        sae_name=item_name,
        sae_series=cfg.name,
        model=cfg.model,
        datasets={HELDOUT_SOURCE: cfg.eval_dataset},
        activation_factory=ActivationFactoryConfig(
            sources=[ActivationFactoryDatasetSource(name=HELDOUT_SOURCE)],
            target=ActivationFactoryTarget.ACTIVATIONS_2D,
            hook_points=item.hook_points,
            context_size=activations.context_size,
            model_batch_size=activations.model_batch_size,
            batch_size=activations.model_batch_size,
        ),
        eval=cfg.evaluation,
        output_path=str(output),
    )


def analyze_settings(
    cfg: PipelineConfig,
    item_name: str,
    item: DictionaryItem,
    dictionary: Path,
    cache: Path,
    output: Path,
    store: RecordStoreConfig,
    analysis_name: str,
) -> AnalyzeSAESettings:
    """Every feature over the cached activations of the item's hooks (whole windows, for the contexts); the export
    goes under `output`, the records to `store`."""
    analyzer = cfg.analysis.analyzer or FeatureAnalyzerConfig(total_analyzing_tokens=cfg.activations.total_tokens)
    return AnalyzeSAESettings(
        sae=PretrainedSAE(pretrained_name_or_path=str(dictionary)),
        sae_name=item_name,
        sae_series=cfg.name,
        activation_factory=ActivationFactoryConfig(
            sources=[ActivationFactoryActivationsSource(name=ANALYSIS_SOURCE, path=str(cache))],
            target=ActivationFactoryTarget.ACTIVATIONS_2D,
            hook_points=item.hook_points,
            batch_size=cfg.analysis.batch_size,
        ),
        model_name=cfg.model.model_name,
        analyzer=analyzer,
        analysis_name=analysis_name,
        store=store,
        output_dir=str(output),
    )


def dla_settings(
    cfg: PipelineConfig, item_name: str, dictionary: Path, output: Path, store: RecordStoreConfig
) -> DirectLogitAttributeSettings:
    """Every feature's direct logit effect through the pipeline's model; the results JSON goes to `output`."""
    return DirectLogitAttributeSettings(
        sae=PretrainedSAE(pretrained_name_or_path=str(dictionary)),
        sae_name=item_name,
        sae_series=cfg.name,
        model=cfg.model,
        top_k=cfg.logit_attribution.top_k,
        feature_batch_size=cfg.logit_attribution.feature_batch_size,
        store=store,
        output_path=str(output),
    )


def autointerp_settings(
    cfg: PipelineConfig,
    item_name: str,
    auto_interp: AutoInterpConfig,
    features: list[int] | None,
    store: RecordStoreConfig,
    analysis_name: str,
) -> AutoInterpSettings:
    """Explanations of `features` (None: every analysed one) by the LLM endpoint `auto_interp` names."""
    return AutoInterpSettings(
        sae_name=item_name,
        sae_series=cfg.name,
        model=cfg.model,
        auto_interp=auto_interp,
        features=features,
        analysis_name=analysis_name,
        store=store,
    )
