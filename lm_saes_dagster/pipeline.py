"""The asset factory: one pipeline config -> its assets, checks, schedule and job.

```
corpus -> tokens -> activations[hook] -> dictionary[item] -> evaluation[item]
                          item_config[item] ---^
```

Every asset calls the core runner that does the job, writes its files under the artefact root
(`<root>/<pipeline>/<asset>/<partition>`) and returns a MaterializeResult with the path, small numeric metadata and
a content-hash data version. Steps are idempotent: an artefact already made from the same inputs and config is
reused, so re-materialising unchanged inputs does not recompute.
"""

import hashlib
import json
from pathlib import Path

import dagster as dg

from lm_saes_core.io import atomic_write_text, file_sha256
from lm_saes_dagster.launch import HeavyStepLauncher
from lm_saes_dagster.pipeline_config import DictionaryItem, PipelineConfig

CODE_VERSION = "1"


class ArtifactRoot(dg.ConfigurableResource):
    """Where pipeline artefacts live: `<path>/<pipeline>/<asset>/<partition>`."""

    path: str

    def dir(self, pipeline: str, asset: str, partition: str | None = None) -> Path:
        directory = Path(self.path) / pipeline / asset
        return directory / partition if partition else directory


def _numeric(metrics: dict[str, float], keys: dict[str, str]) -> dict[str, float]:
    return {label: float(metrics[key]) for label, key in keys.items() if key in metrics}


def build_pipeline_defs(cfg: PipelineConfig) -> dg.Definitions:
    name = cfg.name
    hooks = dg.StaticPartitionsDefinition(cfg.hook_points)
    items = dg.StaticPartitionsDefinition(list(cfg.dictionaries))
    item_hook = {item: spec.hook_point for item, spec in cfg.dictionaries.items()}
    corpus_key, tokens_key = dg.AssetKey([name, "corpus"]), dg.AssetKey([name, "tokens"])
    activations_key, dictionary_key = dg.AssetKey([name, "activations"]), dg.AssetKey([name, "dictionary"])
    evaluation_key = dg.AssetKey([name, "evaluation"])
    item_config_key = dg.AssetKey([name, "item_config"])

    @dg.observable_source_asset(key=item_config_key, partitions_def=items, group_name=name)
    def item_config() -> dg.DataVersionsByPartition:
        """Each dictionary item's settings as a data version: editing one item's YAML makes only its dictionary
        (and, once retrained, its evaluation) stale. Observed by `make pipeline` or the UI's "Observe sources"."""
        return dg.DataVersionsByPartition({item: dg.DataVersion(_config_hash(cfg, item)) for item in cfg.dictionaries})

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

        from lm_saes_core.activation.config import ActivationFactoryConfig
        from lm_saes_core.activation.factory import ActivationFactory
        from lm_saes_core.backend import load_model
        from lm_saes_core.data import load_dataset
        from lm_saes_core.io import atomic_path

        settings = cfg.activations
        factory = ActivationFactory(
            ActivationFactoryConfig(
                sources=[{"type": "dataset", "name": "train"}],
                target="tokens",
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
        check_specs=[dg.AssetCheckSpec("tokens_consistent_across_hooks", asset=activations_key, blocking=True)],
    )
    def activations(context: dg.AssetExecutionContext, artifacts: ArtifactRoot) -> dg.MaterializeResult:
        """Cached activations of one hook point (generate_activations), checked for consistency."""
        from lm_saes_core.runners import (
            CheckActivationConsistencySettings,
            GenerateActivationsSettings,
            check_activation_consistency,
            generate_activations,
        )

        hook = context.partition_key
        settings = cfg.activations
        output = artifacts.dir(name, "activations", hook)
        result = generate_activations(
            GenerateActivationsSettings(
                model=cfg.model,
                dataset=cfg.dataset,
                hook_points=[hook],
                output_dir=str(output),
                context_size=settings.context_size,
                total_tokens=settings.total_tokens,
                model_batch_size=settings.model_batch_size,
                batch_size=settings.model_batch_size,
                n_samples_per_chunk=settings.n_samples_per_chunk,
                num_workers=settings.num_workers,
                overwrite=True,  # only reached when the settings differ from the cached ones
            )
        )
        report = check_activation_consistency(CheckActivationConsistencySettings(path=str(output)))
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(output)),
                "n_tokens": result.n_tokens,
                "n_document_tokens": result.n_real_tokens,
                "n_chunks": result.n_chunks,
                "bytes_on_disk": result.bytes_on_disk,
                "reused": result.reused,
            },
            data_version=dg.DataVersion(file_sha256(result.manifest_path)[:16]),
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
        deps=[
            item_config_key,
            dg.AssetDep(
                activations_key,
                partition_mapping=dg.StaticPartitionMapping(
                    {hook: [i for i, h in item_hook.items() if h == hook] for hook in cfg.hook_points}
                ),
            ),
        ],
        partitions_def=items,
        group_name=name,
        code_version=CODE_VERSION,
        kinds={"torch"},
        pool="gpu",
    )
    def dictionary(
        context: dg.AssetExecutionContext, artifacts: ArtifactRoot, launcher: HeavyStepLauncher
    ) -> dg.MaterializeResult:
        """A sparse dictionary trained on its hook point's cached activations: train_sae run through Dagster Pipes
        (a subprocess here, `torchrun` when the item asks for several processes, a GPU pod in Kubernetes)."""
        item_name = context.partition_key
        item = cfg.dictionaries[item_name]
        output = artifacts.dir(name, "dictionary", item_name)
        settings = _train_settings(cfg, item_name, item, artifacts.dir(name, "activations", item.hook_point), output)
        invocation = launcher.run(context, "train", settings, nproc=item.n_processes, workdir=output)
        reported = invocation.get_materialize_result()
        return dg.MaterializeResult(
            metadata={
                **reported.metadata,
                "path": dg.MetadataValue.path(str(output)),
                "hook_point": item.hook_point,
                "d_sae": item.sae.d_sae,
            },
            data_version=reported.data_version,
        )

    quality = cfg.quality
    check_names = ("explained_variance_above_min", "dead_fraction_below_max", "l0_within_bounds")

    @dg.asset(
        key=evaluation_key,
        deps=[dictionary_key],
        partitions_def=items,
        group_name=name,
        code_version=CODE_VERSION,
        kinds={"torch"},
        automation_condition=dg.AutomationCondition.eager(),
        check_specs=[dg.AssetCheckSpec(check, asset=evaluation_key, blocking=True) for check in check_names],
    )
    def evaluation(context: dg.AssetExecutionContext, artifacts: ArtifactRoot) -> dg.MaterializeResult:
        """The dictionary on held-out documents: reconstruction, sparsity and the spliced language-model loss."""
        from lm_saes_core.runners.evaluate import EvaluateSAESettings, evaluate_sae

        item_name = context.partition_key
        item = cfg.dictionaries[item_name]
        output = artifacts.dir(name, "evaluation", item_name) / "evaluation.json"
        settings = EvaluateSAESettings.model_validate(
            {
                "sae": {"pretrained_name_or_path": str(artifacts.dir(name, "dictionary", item_name))},
                "sae_name": item_name,
                "sae_series": name,
                "model": cfg.model.model_dump(mode="json"),
                "datasets": {"heldout": cfg.eval_dataset.model_dump(mode="json")},
                "activation_factory": {
                    "sources": [{"type": "dataset", "name": "heldout"}],
                    "target": "activations-2d",
                    "hook_points": [item.hook_point],
                    "context_size": cfg.activations.context_size,
                    "model_batch_size": cfg.activations.model_batch_size,
                    "batch_size": cfg.activations.model_batch_size,
                },
                "eval": cfg.evaluation.model_dump(mode="json"),
                "output_path": str(output),
            }
        )
        # Idempotent: the same weights evaluated with the same settings give the stored metrics.
        weights = artifacts.dir(name, "dictionary", item_name) / "sae_weights.safetensors"
        inputs = file_sha256(weights) + json.dumps(settings.model_dump(mode="json"), sort_keys=True)
        inputs_key = hashlib.sha256(inputs.encode()).hexdigest()
        stamp = output.with_suffix(".inputs")
        reused = output.is_file() and stamp.is_file() and stamp.read_text() == inputs_key
        if reused:
            metrics = json.loads(output.read_text())["metrics"]
        else:
            stamp.unlink(missing_ok=True)
            metrics = evaluate_sae(settings).metrics
            atomic_write_text(stamp, inputs_key)
        ev, dead, l0 = (metrics["metrics/explained_variance"], metrics["metrics/dead_fraction"], metrics["metrics/l0"])
        checks = [
            dg.AssetCheckResult(
                check_name="explained_variance_above_min",
                passed=ev >= quality.min_explained_variance,
                metadata={"explained_variance": ev, "min": quality.min_explained_variance},
            ),
            dg.AssetCheckResult(
                check_name="dead_fraction_below_max",
                passed=dead <= quality.max_dead_fraction,
                metadata={"dead_fraction": dead, "max": quality.max_dead_fraction},
            ),
            dg.AssetCheckResult(
                check_name="l0_within_bounds",
                passed=quality.min_l0 <= l0 <= quality.max_l0,
                metadata={"l0": l0, "min": quality.min_l0, "max": quality.max_l0},
            ),
        ]
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(str(output)),
                "reused": reused,
                **_numeric(
                    metrics,
                    {
                        "explained_variance": "metrics/explained_variance",
                        "l0": "metrics/l0",
                        "dead_fraction": "metrics/dead_fraction",
                        "ce_loss_recovered": "metrics/ce_loss_recovered",
                        "kl_div_spliced": "metrics/kl_div_spliced",
                    },
                ),
            },
            data_version=dg.DataVersion(file_sha256(output)[:16]),
            check_results=checks,
        )

    reevaluation_job = dg.define_asset_job(f"{name}_reevaluation", selection=dg.AssetSelection.assets(evaluation_key))

    @dg.schedule(job=reevaluation_job, cron_schedule="0 3 * * 1", name=f"{name}_weekly_reevaluation")
    def weekly_reevaluation(context: dg.ScheduleEvaluationContext):
        """Re-evaluate every dictionary partition that has been materialised (one run each)."""
        for partition in sorted(context.instance.get_materialized_partitions(dictionary_key)):
            yield dg.RunRequest(run_key=f"{partition}-{context.scheduled_execution_time}", partition_key=partition)

    return dg.Definitions(
        assets=[item_config, corpus, tokens, activations, dictionary, evaluation],
        jobs=[reevaluation_job],
        schedules=[weekly_reevaluation],
    )


def _config_hash(cfg: PipelineConfig, item: str) -> str:
    """What the item's dictionary depends on besides its input activations: its own settings."""
    payload = json.dumps(cfg.dictionaries[item].model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _train_settings(cfg: PipelineConfig, item_name: str, item: DictionaryItem, cache: Path, output: Path) -> dict:
    return {
        "sae": item.sae.model_dump(mode="json"),
        "sae_name": item_name,
        "sae_series": cfg.name,
        "initializer": item.initializer.model_dump(mode="json"),
        "trainer": {**item.trainer.model_dump(mode="json"), "exp_result_path": str(output)},
        "seed": item.seed,
        "activation_factory": {
            "sources": [{"type": "activations", "name": "cache", "path": str(cache), "shuffle_chunks": True}],
            "target": "activations-1d",
            "hook_points": [item.hook_point],
            "batch_size": item.batch_size,
            "buffer_size": item.buffer_size,
            "buffer_shuffle": item.buffer_shuffle.model_dump(mode="json"),
        },
        "data_parallel_size": item.data_parallel_size,
        "model_parallel_size": item.model_parallel_size,
    }
