"""The asset factory: one pipeline config -> its assets, checks, sensors, schedule and job.

```
corpus -> tokens -> activations[hook] -> dictionary[item] -> evaluation[item] -> feature_analyses[item] -> ...
                          item_config[item] ---^            (logit_attributions[item], interpretations[item])
```

Dictionary items are dynamic partitions: the pipeline file's items plus one per `<pipeline>.d/<item>.yaml`, added by
the `<pipeline>_dictionary_items` sensor (or `lm_saes_dagster.materialize`), so a sweep grows without editing Python.

Every asset calls the core runner that does the job, writes its files under the artefact root
(`<root>/<pipeline>/<asset>/<partition>`; every hook's activations share one cache) and returns a MaterializeResult
with the path, small numeric metadata and a content-hash data version. Steps are idempotent: an artefact already
made from the same inputs and config is reused, so re-materialising unchanged inputs does not recompute.
"""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import dagster as dg
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG as RANGE_END_TAG
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_START_TAG as RANGE_START_TAG

from lm_saes_core.io import atomic_write_text, file_sha256
from lm_saes_core.models.base import DICTIONARY_KINDS
from lm_saes_dagster.analysis_assets import build_analysis_assets
from lm_saes_dagster.artifacts import ArtifactRoot, reuse_or_launch
from lm_saes_dagster.kinds import hook_metrics, n_analysed_features
from lm_saes_dagster.launch import HeavyStepLauncher
from lm_saes_dagster.links import browser_url, picture_links, summary_markdown
from lm_saes_dagster.pipeline_config import DictionaryItem, PipelineConfig
from lm_saes_dagster.quality import CHECK_NAMES, quality_checks
from lm_saes_dagster.settings import (
    evaluate_settings,
    generate_settings,
    stream_groups,
    sweep_settings,
    train_settings,
)

ItemLoader = Callable[[], tuple[dict[str, DictionaryItem], dict[Path, str]]]
"""Re-reads a pipeline's items (file + `.d` directory): {item: settings} and {file: error} of the invalid files."""

CODE_VERSION = "2"  # 2: one activation cache for all hooks, dynamic item partitions

TRAINING_RETRY_POLICY = dg.RetryPolicy(max_retries=2, delay=5)
"""Retries of the training step within a run; run retries (deploy/*/dagster.yaml) cover a run whose worker died."""


def _numeric(metrics: dict[str, float], keys: dict[str, str]) -> dict[str, float]:
    return {label: float(metrics[key]) for label, key in keys.items() if key in metrics}


def items_partitions(pipeline: str) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{pipeline}_dictionaries")


def build_pipeline_defs(cfg: PipelineConfig, item_loader: ItemLoader | None = None) -> dg.Definitions:
    """`cfg` holds the items known at load; `item_loader` re-reads them (the sensor and late-added items use it)."""
    name = cfg.name
    hooks = dg.StaticPartitionsDefinition(cfg.hook_points)
    items = items_partitions(name)
    corpus_key, tokens_key = dg.AssetKey([name, "corpus"]), dg.AssetKey([name, "tokens"])
    activations_key, dictionary_key = dg.AssetKey([name, "activations"]), dg.AssetKey([name, "dictionary"])
    evaluation_key = dg.AssetKey([name, "evaluation"])
    item_config_key = dg.AssetKey([name, "item_config"])

    def current_items() -> dict[str, DictionaryItem]:
        return item_loader()[0] if item_loader is not None else dict(cfg.dictionaries)

    def item_of(partition: str) -> DictionaryItem:
        """An item known at load, or one added to the `.d` directory since (read afresh)."""
        if partition in cfg.dictionaries:
            return cfg.dictionaries[partition]
        item = current_items().get(partition)
        if item is None:
            raise dg.Failure(
                f"dictionary item {partition!r} is not defined by pipeline {name!r}: add it to the pipeline file's "
                f"`dictionaries` or as {name}.d/{partition}.yaml next to it (an invalid file is reported by the "
                f"{name}_dictionary_items sensor)"
            )
        return item

    @dg.observable_source_asset(key=item_config_key, partitions_def=items, group_name=name)
    def item_config(context: dg.AssetExecutionContext) -> dg.DataVersionsByPartition:
        """Each dictionary item's settings as a data version: editing one item's YAML makes only its dictionary
        (and, once retrained, its evaluation) stale. Observed by `make pipeline` or the UI's "Observe sources"."""
        registered = set(context.instance.get_dynamic_partitions(items.name))
        return dg.DataVersionsByPartition(
            {item: dg.DataVersion(_item_hash(spec)) for item, spec in current_items().items() if item in registered}
        )

    @dg.asset(key=corpus_key, group_name=name, code_version=CODE_VERSION, kinds={"python"})
    def corpus(context: dg.AssetExecutionContext, artifacts: ArtifactRoot) -> dg.MaterializeResult:
        """The training and held-out documents (split by document), identified by their fingerprints."""
        from lm_saes_core.data import dataset_fingerprint, load_dataset

        record = {}
        for role, dataset_cfg in (("train", cfg.dataset), ("heldout", cfg.eval_dataset)):
            record[role] = {
                "config": dataset_cfg.model_dump(mode="json"),
                "fingerprint": dataset_fingerprint(dataset_cfg),
                "n_documents": len(load_dataset(dataset_cfg)),
            }
        path = artifacts.dir(name, "corpus") / "corpus.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True))
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(path)),
                "n_documents": record["train"]["n_documents"],
                "n_heldout_documents": record["heldout"]["n_documents"],
                "fingerprint": record["train"]["fingerprint"],
            },
            data_version=dg.DataVersion(file_sha256(path)[:16]),
        )

    @dg.asset(key=tokens_key, deps=[corpus_key], group_name=name, code_version=CODE_VERSION, kinds={"python"})
    def tokens(context: dg.AssetExecutionContext, artifacts: ArtifactRoot) -> dg.MaterializeResult:
        """The token windows the activations are computed on, with their document provenance."""
        import torch
        from safetensors.torch import save_file

        from lm_saes_core.activation.config import (
            ActivationFactoryConfig,
            ActivationFactoryDatasetSource,
            ActivationFactoryTarget,
        )
        from lm_saes_core.activation.factory import ActivationFactory
        from lm_saes_core.backend import load_model
        from lm_saes_core.data import load_dataset
        from lm_saes_core.io import atomic_path

        settings = cfg.activations
        factory = ActivationFactory(
            ActivationFactoryConfig(
                sources=[ActivationFactoryDatasetSource(name="train")],
                target=ActivationFactoryTarget.TOKENS,
                hook_points=cfg.hook_points,
                batch_size=256,
                context_size=settings.context_size,
            )
        )
        model = load_model(cfg.model)
        dataset = load_dataset(cfg.dataset)
        windows_needed = settings.total_tokens // settings.context_size
        batches, n_windows = [], 0
        for batch in factory.process(
            model=model, datasets={"train": (dataset, {"text_field": cfg.dataset.text_field})}
        ):
            batches.append(batch)
            n_windows += len(batch["tokens"])
            if n_windows >= windows_needed:
                break
        merged = {key: torch.cat([b[key] for b in batches])[:windows_needed].contiguous() for key in batches[0]}
        path = artifacts.dir(name, "tokens") / "tokens.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file(merged, str(tmp))
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(path)),
                "n_windows": int(merged["tokens"].shape[0]),
                "n_document_tokens": int(merged["mask"].sum()),
                "context_size": settings.context_size,
            },
            data_version=dg.DataVersion(file_sha256(path)[:16]),
        )

    @dg.asset(
        key=activations_key,
        deps=[tokens_key],
        partitions_def=hooks,
        group_name=name,
        code_version=CODE_VERSION,
        kinds={"torch"},
        pool="gpu",
        backfill_policy=dg.BackfillPolicy.single_run(),
        check_specs=[dg.AssetCheckSpec("tokens_consistent_across_hooks", asset=activations_key, blocking=True)],
    )
    def activations(
        context: dg.AssetExecutionContext, artifacts: ArtifactRoot, launcher: HeavyStepLauncher
    ) -> dg.MaterializeResult:
        """Cached activations of every hook point of the pipeline from ONE forward pass (generate_activations through
        Dagster Pipes, so it runs where the GPUs are), checked for consistency across hooks. Whichever hook
        partitions a run asks for (a backfill of several is one run), the cache holds them all, so its identity
        never depends on the selection and a later partition reuses it."""
        from lm_saes_core.runners import CheckActivationConsistencySettings, check_activation_consistency

        output = artifacts.activation_cache(name)
        generate = generate_settings(cfg, output, overwrite=True)  # only reached when the settings differ
        reported = launcher.run(context, "generate", generate, workdir=output.parent)
        report = check_activation_consistency(CheckActivationConsistencySettings(path=str(output)))
        manifest = json.loads((output / "manifest.json").read_text())
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(output)),
                "hook_points": ", ".join(manifest["hook_points"]),
                "n_tokens": manifest["n_tokens"],
                "n_document_tokens": manifest["n_real_tokens"],
                "n_chunks": manifest["n_chunks"],
                **{k: v for k, v in reported.get_materialize_result().metadata.items() if k in ("bytes", "reused")},
            },
            data_version=dg.DataVersion(cache_version(manifest)),
            check_results=[
                dg.AssetCheckResult(
                    check_name="tokens_consistent_across_hooks",
                    passed=report.ok,
                    metadata={"summary": report.summary(), "problems": len(report.problems)},
                )
            ],
        )

    @dg.asset(
        key=dictionary_key,
        # Items are dynamic partitions, which no static mapping can name: each dictionary depends on every hook's
        # activations (exact for one hook; coarser lineage for several). What it trains on is the item's own hooks
        # (an SAE's one hook, a transcoder's input and output; all checked at load to be cached hooks, and all hooks
        # come from one forward pass, so they are materialised together).
        deps=[item_config_key, dg.AssetDep(activations_key, partition_mapping=dg.AllPartitionMapping())],
        partitions_def=items,
        group_name=name,
        code_version=CODE_VERSION,
        kinds={"torch"},
        pool="gpu",
        # A backfill (or "materialize all") of several items is one run, so items sharing a stream train together.
        backfill_policy=dg.BackfillPolicy.single_run(),
        # A killed or evicted training process is tried again, and continues from its newest checkpoint; a user
        # error (exit status 2) is not retried (see launch.step_failure).
        retry_policy=TRAINING_RETRY_POLICY,
    )
    def dictionary(
        context: dg.AssetExecutionContext, artifacts: ArtifactRoot, launcher: HeavyStepLauncher
    ) -> dg.MaterializeResult:
        """Sparse dictionaries (of any kind: SAEs, transcoders, ...) trained on their hook points' cached activations
        through Dagster Pipes (a subprocess here, `torchrun` when an item asks for several processes, a GPU pod in
        Kubernetes).

        One item: `train_sae`, and the data version is the hash of its weights. Several items (one run over a
        partition range): the items that read the same stream (same hooks and batching) train together with
        `sweep_sae`, one read of the cache feeding all of them; each partition gets its own metadata (steps,
        metrics, `weights_sha256`), while Dagster gives a run's partitions one data version: the hash of every
        trained item's weights. Data-parallel items (`data_parallel_size` > 1) train one at a time under torchrun."""
        cache = artifacts.activation_cache(name)
        selected = {key: item_of(key) for key in context.partition_keys}
        outputs = {key: artifacts.dictionary(name, key) for key in selected}

        def train_alone(key: str) -> dg.MaterializeResult:
            settings = train_settings(cfg, key, selected[key], cache, outputs[key])
            item = selected[key]  # torchrun for a data- or model-parallel item, over n_nodes pods on k8s
            step = "train-crosscoder" if item.head_parallel_size > 1 else "train"  # one factory per head
            run = launcher.run(context, step, settings, nproc=item.n_processes, nnodes=item.n_nodes,
                               workdir=outputs[key])  # fmt: skip
            return run.get_materialize_result()

        if len(selected) == 1:
            (key,) = selected
            reported = train_alone(key)
            return dg.MaterializeResult(
                metadata={**reported.metadata, **_dictionary_metadata(selected[key], outputs[key])},
                data_version=reported.data_version,
            )
        trained: dict[str, dict] = {}
        groups = stream_groups(selected)
        for index, group in enumerate(groups):
            context.log.info(f"stream {index + 1}/{len(groups)}: {', '.join(group)} on {selected[group[0]].hook_label}")
            if len(group) == 1 or selected[group[0]].n_processes > 1:  # a sweep runs in one process
                for key in group:
                    reported = train_alone(key)
                    values = {k: v.value for k, v in reported.metadata.items()}
                    trained[key] = {**values, "weights_sha256": reported.data_version.value}
                continue
            settings = sweep_settings(cfg, {key: selected[key] for key in group}, cache, outputs)
            workdir = artifacts.dir(name, "dictionary-sweeps", _group_id(group))
            reported = launcher.run(context, "sweep", settings, workdir=workdir).get_materialize_result()
            trained.update(reported.metadata["items"].value)
        for key, item in selected.items():
            summary = {k: v for k, v in trained[key].items() if k != "output_path"}
            shared = len(next(g for g in groups if key in g)) - 1 if item.n_processes == 1 else 0
            context.add_asset_metadata(
                {**summary, "shared_stream_with": shared,
                 **_dictionary_metadata(item, outputs[key])},
                partition_key=key,
            )  # fmt: skip
        combined = hashlib.sha256("".join(trained[key]["weights_sha256"] for key in sorted(selected)).encode())
        return dg.MaterializeResult(
            metadata={"n_items": len(selected), "n_streams": len(groups),
                      "trained": sum(not entry["reused"] for entry in trained.values())},
            data_version=dg.DataVersion(combined.hexdigest()[:16]),
        )  # fmt: skip

    @dg.asset(
        key=evaluation_key,
        deps=[dictionary_key],
        partitions_def=items,
        group_name=name,
        code_version=CODE_VERSION,
        kinds={"torch"},
        pool="gpu",
        automation_condition=dg.AutomationCondition.eager(),
        check_specs=[dg.AssetCheckSpec(check, asset=evaluation_key, blocking=True) for check in CHECK_NAMES],
    )
    def evaluation(
        context: dg.AssetExecutionContext, artifacts: ArtifactRoot, launcher: HeavyStepLauncher
    ) -> dg.MaterializeResult:
        """The dictionary on held-out documents (evaluate_sae through Dagster Pipes, like the other heavy steps):
        reconstruction, sparsity and the language model's loss with the dictionary's reconstructions spliced in at
        its output hooks (a transcoder's prediction of hook_point_out from hook_point_in, at hook_point_out).
        Idempotent: the same weights evaluated with the same settings keep the stored metrics."""
        item_name = context.partition_key
        output = artifacts.dir(name, "evaluation", item_name) / "evaluation.json"
        dictionary = artifacts.dictionary(name, item_name)
        settings = evaluate_settings(cfg, item_name, item_of(item_name), dictionary, output)
        step = reuse_or_launch(
            context,
            launcher,
            "evaluate",
            settings,
            dictionary=dictionary,
            stamp=output.with_suffix(".inputs"),
            outputs=[output],
            workdir=output.parent,
            code_version=CODE_VERSION,
        )
        metrics = json.loads(output.read_text())["metrics"]  # what the runner wrote, reused or not
        sae = item_of(item_name).sae
        per_hook = {  # a crosscoder's heads, a CLT's layers: each output hook's own metrics, under one naming
            f"{metric}/{hook}": value
            for hook, values in hook_metrics(sae, metrics).items()
            for metric, value in values.items()
        }
        figures = _numeric(
            metrics,
            {
                "explained_variance": "metrics/explained_variance",
                "l0": "metrics/l0",
                "dead_fraction": "metrics/dead_fraction",
                "ce_loss_recovered": "metrics/ce_loss_recovered",
                "kl_div_spliced": "metrics/kl_div_spliced",
            },
        )
        pictures = picture_links(dictionary, output)
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(output)),
                "reused": step.reused,
                **figures,
                **per_hook,
                **pictures,
                "summary": dg.MetadataValue.md(summary_markdown(name, item_name, figures, pictures)),
                "browser": dg.MetadataValue.url(browser_url(name, item_name)),
            },
            data_version=dg.DataVersion(file_sha256(output)[:16]),
            check_results=quality_checks(metrics, cfg.quality, sae),
        )

    analysis_assets = build_analysis_assets(cfg, items, item_of)
    downstream = [evaluation_key, *(a.key for a in analysis_assets)]
    reanalysis_job = dg.define_asset_job(f"{name}_reanalysis", selection=dg.AssetSelection.assets(*downstream))

    @dg.schedule(
        job=reanalysis_job,
        cron_schedule="0 3 * * 1",
        name=f"{name}_weekly_reanalysis",
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    def weekly_reanalysis(context: dg.ScheduleEvaluationContext):
        """Re-evaluate and re-analyse every dictionary partition that has been materialised (one run each). Unchanged
        inputs are reused, so a week without changes costs little; interpretations resume the features still
        missing (e.g. after the LLM endpoint was down)."""
        for partition in sorted(context.instance.get_materialized_partitions(dictionary_key)):
            yield dg.RunRequest(run_key=f"{partition}-{context.scheduled_execution_time}", partition_key=partition)

    @dg.sensor(
        name=f"{name}_dictionary_items",
        target=dg.AssetSelection.assets(dictionary_key),
        minimum_interval_seconds=30,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def dictionary_items(context: dg.SensorEvaluationContext):
        """Register new dictionary items (pipeline file or `<pipeline>.d/<item>.yaml`) as partitions, and train those
        whose hook points' activations (every hook the item reads) are already cached. Invalid item files are logged
        and left out."""
        found, errors = item_loader() if item_loader is not None else (dict(cfg.dictionaries), {})
        for path, error in errors.items():
            context.log.error(f"dictionary item {path} was not added:\n{error}")
        registered = set(context.instance.get_dynamic_partitions(items.name))
        new = [item for item in found if item not in registered]
        if not new:
            return dg.SkipReason(f"no new dictionary items ({len(registered)} registered, {len(errors)} invalid)")
        cached = context.instance.get_materialized_partitions(activations_key)
        ready = [item for item in new if all(hook in cached for hook in found[item].hook_points)]
        if len(ready) > 1 and ready == new:
            # The new partitions are appended in this order: one run over their range, so those sharing a hook's
            # stream train together (a whole `.d` directory of sweep items dropped in at once).
            key = hashlib.sha256("".join(f"{item}-{_item_hash(found[item])}" for item in new).encode()).hexdigest()
            runs = [dg.RunRequest(run_key=key[:32], tags={RANGE_START_TAG: new[0], RANGE_END_TAG: new[-1]})]
        else:
            runs = [dg.RunRequest(run_key=f"{item}-{_item_hash(found[item])}", partition_key=item) for item in ready]
        return dg.SensorResult(dynamic_partitions_requests=[items.build_add_request(new)], run_requests=runs)

    return dg.Definitions(
        assets=[item_config, corpus, tokens, activations, dictionary, evaluation, *analysis_assets],
        jobs=[reanalysis_job],
        schedules=[weekly_reanalysis],
        sensors=[dictionary_items],
    )


def _item_hash(item: DictionaryItem) -> str:
    """What the item's dictionary depends on besides its input activations: its own settings."""
    payload = json.dumps(item.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _dictionary_metadata(item: DictionaryItem, output: Path) -> dict:
    """What the item is, for any kind: its hooks in and out (comma-separated when several), whether it reads other
    hooks than it reconstructs (a transcoder), its kind and width."""
    sae = item.sae
    return {
        "path": dg.MetadataValue.path(str(output)),
        **picture_links(output),
        "hook_point": item.hook_label,
        "hook_point_in": ", ".join(sae.hooks_in),
        "hook_point_out": ", ".join(sae.hooks_out),
        "transcoder": sae.hooks_in != sae.hooks_out,
        "sae_type": sae.sae_type,
        "d_sae": sae.d_sae,
        # As the analysis numbers them (a CLT's: every layer's), for the kinds this installation defines.
        **({"n_features": n_analysed_features(sae)} if sae.sae_type in DICTIONARY_KINDS else {}),
    }


def _group_id(group: list[str]) -> str:
    """A sweep's working directory name (its settings file): readable for a few items, a hash beyond."""
    joined = "+".join(group)
    return joined if len(joined) <= 80 else hashlib.sha256(joined.encode()).hexdigest()[:16]


def cache_version(manifest: dict) -> str:
    """The data version of an activation cache: a hash of its manifest (what was cached, from what, in which chunks)
    without the directory it was written to, so the same cache has the same version wherever it lies (a local run,
    a container's /data volume)."""
    provenance = manifest.get("provenance") or {}
    located = {key: {k: v for k, v in (provenance.get(key) or {}).items() if k != "output_dir"}
               for key in ("settings", "settings_key")}  # fmt: skip
    canonical = json.dumps({**manifest, "provenance": {**provenance, **located}}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]
