"""What a trained dictionary means: `feature_analyses` -> `logit_attributions` and `interpretations`, per item.

Analyses and logit attributions run the core runners through Dagster Pipes (GPU pods in production, a subprocess
here); interpretations talk to an LLM over HTTP, so they run in-process. All three write to the pipeline's record
store (SQLite at `<artefact root>/<pipeline>/records.sqlite` unless the pipeline sets `store.mongo`), which
`lm-saes show feature` reads. None of them runs for a dictionary whose evaluation fails the pipeline's quality
bounds: the evaluation's checks are blocking, and each step re-reads the evaluation before working.
"""

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import dagster as dg

from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.io import atomic_write_text, file_sha256
from lm_saes_core.store import RecordStoreConfig
from lm_saes_dagster.artifacts import ArtifactRoot, reuse_or_launch
from lm_saes_dagster.kinds import n_analysed_features
from lm_saes_dagster.launch import HeavyStepLauncher
from lm_saes_dagster.links import browser_url
from lm_saes_dagster.pipeline_config import DictionaryItem, InterpretationSettings, PipelineConfig
from lm_saes_dagster.preview import features_markdown, most_active_features
from lm_saes_dagster.quality import failed_bounds
from lm_saes_dagster.settings import analyze_settings, autointerp_settings, dla_settings

CODE_VERSION = "1"
ANALYSIS_NAME = "default"
LLM_BASE_URL_ENV = "LM_SAES_LLM_BASE_URL"
LLM_MODEL_ENV = "LM_SAES_LLM_MODEL"
# New dictionaries are analysed as soon as their evaluation passes: eager, but never past a failed blocking check.
GATED = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


def resolve_auto_interp(
    settings: InterpretationSettings, environ: Mapping[str, str] | None = None
) -> tuple[AutoInterpConfig | None, str]:
    """The endpoint to ask, or None and why there is none: `$LM_SAES_LLM_BASE_URL` (and `$LM_SAES_LLM_MODEL`) win
    over `interpretation.auto_interp`; without a base URL, only an API key for the OpenAI API counts as configured."""
    environ = os.environ if environ is None else environ
    cfg = settings.auto_interp
    base_url = environ.get(LLM_BASE_URL_ENV) or cfg.base_url
    if base_url is None and not environ.get(cfg.api_key_env):
        return None, (
            f"no LLM endpoint configured: set {LLM_BASE_URL_ENV} to an OpenAI-compatible URL (e.g. "
            f"http://127.0.0.1:8080/v1 for a local llama.cpp server) or interpretation.auto_interp.base_url in the "
            f"pipeline file, or {cfg.api_key_env} for the OpenAI API; then materialise `interpretations` again"
        )
    return cfg.model_copy(update={"base_url": base_url, "model": environ.get(LLM_MODEL_ENV) or cfg.model}), ""


def build_analysis_assets(
    cfg: PipelineConfig, items: dg.PartitionsDefinition, item_of: Callable[[str], DictionaryItem]
) -> list[dg.AssetsDefinition]:
    name = cfg.name
    dictionary_key, evaluation_key = dg.AssetKey([name, "dictionary"]), dg.AssetKey([name, "evaluation"])
    analyses_key, logits_key = dg.AssetKey([name, "feature_analyses"]), dg.AssetKey([name, "logit_attributions"])
    interpretations_key = dg.AssetKey([name, "interpretations"])

    def store_config(artifacts: ArtifactRoot) -> RecordStoreConfig:
        return cfg.store or RecordStoreConfig(sqlite_path=str(artifacts.store_path(name)))

    def require_passing_evaluation(artifacts: ArtifactRoot, item_name: str) -> dict[str, float]:
        """The evaluation's metrics; refuses a dictionary that is not evaluated or fails the quality bounds, however
        the run was launched (the blocking checks stop downstream steps only within one run)."""
        path = artifacts.dir(name, "evaluation", item_name) / "evaluation.json"
        if not path.is_file():
            raise dg.Failure(f"{name}/{item_name} has no evaluation ({path}); materialise `evaluation` first")
        metrics = json.loads(path.read_text())["metrics"]
        failed = failed_bounds(metrics, cfg.quality, item_of(item_name).sae)
        if failed:
            raise dg.Failure(
                f"{name}/{item_name} fails the pipeline's quality bounds: {'; '.join(failed)}. The analysis is "
                "blocked: retrain the dictionary (or change the `quality` bounds) and evaluate it again."
            )
        return metrics

    def tokenizer():
        from transformers import AutoTokenizer

        from lm_saes_core.backend.registry import resolve_model_dir

        return AutoTokenizer.from_pretrained(resolve_model_dir(cfg.model))

    def preview(artifacts: ArtifactRoot, item_name: str, parts: tuple[str, ...]) -> tuple[str, list[int]]:
        from lm_saes_core.store import open_store

        with open_store(store_config(artifacts)) as store:
            shown = most_active_features(store, item_name, name, ANALYSIS_NAME, cfg.analysis.preview_features)
            return features_markdown(store, item_name, name, shown, tokenizer(), parts=parts), shown

    @dg.asset(
        key=analyses_key,
        deps=[dictionary_key, evaluation_key],
        partitions_def=items,
        group_name=name,
        code_version=CODE_VERSION,
        kinds={"torch"},
        pool="gpu",
        automation_condition=GATED,
        check_specs=[dg.AssetCheckSpec("features_analysed", asset=analyses_key, blocking=True)],
    )
    def feature_analyses(
        context: dg.AssetExecutionContext, artifacts: ArtifactRoot, launcher: HeavyStepLauncher
    ) -> dg.MaterializeResult:
        """Every feature over the cached activations of its hook points (analyze_sae through Dagster Pipes):
        activation frequency and histogram, top contexts, samples across activation bands and non-activating
        contexts. Features are encoded from the dictionary's input hooks, so its contexts are those tokens (a
        transcoder's hook_point_in); the factory still reads every hook of the item, because the dictionary is
        prepared from (and checked against) all of them."""
        from lm_saes_core.store import open_store
        from lm_saes_core.store.export import analysis_export_path

        item_name = context.partition_key
        item = item_of(item_name)
        metrics = require_passing_evaluation(artifacts, item_name)
        output = artifacts.dir(name, "feature_analyses", item_name)
        dictionary = artifacts.dictionary(name, item_name)
        cache = artifacts.activation_cache(name)
        settings = analyze_settings(
            cfg, item_name, item, dictionary, cache, output, store_config(artifacts), ANALYSIS_NAME
        )
        n_features = n_analysed_features(item.sae)  # a CLT's: every layer's
        export = analysis_export_path(output, item_name, name, ANALYSIS_NAME, n_features)
        summary_path = output / "summary.json"

        def every_feature_stored() -> bool:
            with open_store(store_config(artifacts)) as store:
                return store.count_features_with_analysis(item_name, name, ANALYSIS_NAME) == n_features

        def write_summary(reported: dg.MaterializeResult) -> None:  # what a reused analysis shows
            numbers = {k: v.value for k, v in reported.metadata.items() if isinstance(v.value, int | float)}
            atomic_write_text(summary_path, json.dumps(numbers, indent=1))

        step = reuse_or_launch(
            context,
            launcher,
            "analyze",
            settings,
            dictionary=dictionary,
            stamp=output / "analysis.inputs",
            outputs=[export, summary_path],
            workdir=output,
            code_version=CODE_VERSION,
            complete=every_feature_stored,
            keep_report=write_summary,
        )
        numbers = json.loads(summary_path.read_text())
        with open_store(store_config(artifacts)) as store:
            stored = store.count_features_with_analysis(item_name, name, ANALYSIS_NAME)
            # `lm-saes list` shows the evaluation next to the analyses.
            store.update_dictionary_metrics(item_name, name, {k: float(v) for k, v in metrics.items()})
        fraction = stored / n_features
        markdown, _ = preview(artifacts, item_name, ("contexts",))
        alive = numbers.get("alive_features", 0)
        return dg.MaterializeResult(
            metadata={
                **numbers,
                "alive_fraction": alive / n_features,
                "analysed_fraction": fraction,
                "reused": step.reused,
                "path": dg.MetadataValue.path(str(export)),
                "store": _store_label(store_config(artifacts)),
                "browser": dg.MetadataValue.url(browser_url(name, item_name)),
                "preview": dg.MetadataValue.md(markdown),
            },
            data_version=dg.DataVersion(file_sha256(export)[:16]),
            check_results=[
                dg.AssetCheckResult(
                    check_name="features_analysed",
                    passed=fraction >= cfg.analysis.min_analysed_fraction,
                    metadata={"analysed_fraction": fraction, "min": cfg.analysis.min_analysed_fraction},
                )
            ],
        )

    @dg.asset(
        key=logits_key,
        deps=[analyses_key],
        partitions_def=items,
        group_name=name,
        code_version=CODE_VERSION,
        kinds={"torch"},
        pool="gpu",
        output_required=False,
        automation_condition=GATED,
    )
    def logit_attributions(
        context: dg.AssetExecutionContext, artifacts: ArtifactRoot, launcher: HeavyStepLauncher
    ) -> Iterator:
        """The tokens each feature's decoder direction promotes and suppresses through the model's final norm and
        unembedding (direct_logit_attribute through Dagster Pipes): an SAE's or transcoder's decoder row, a
        crosscoder's row in its deepest residual-stream head, the sum of a CLT feature's decoders over the layers it
        writes to. A dictionary whose outputs are not on the residual stream (e.g. a transcoder into `ln2.hook_out`)
        has no direct logit effect: the step is skipped (an observation says why), not failed, so the rest of the
        item's assets still run."""
        from lm_saes_core.analysis.direct_logit import check_attributable
        from lm_saes_core.store import open_store

        item_name = context.partition_key
        item = item_of(item_name)
        try:
            hooks = check_attributable(item.sae)
        except ValueError as exc:
            why = f"no direct logit attribution for {item.hook_label}: {exc}"
            context.log.warning(f"logit_attributions of {name}/{item_name} skipped: {why}")
            yield dg.AssetObservation(asset_key=logits_key, partition=item_name, metadata={"skipped": why})
            return
        require_passing_evaluation(artifacts, item_name)
        output = artifacts.dir(name, "logit_attributions", item_name) / "logits.json"
        dictionary = artifacts.dictionary(name, item_name)
        settings = dla_settings(cfg, item_name, dictionary, output, store_config(artifacts))

        def logits_stored() -> bool:
            with open_store(store_config(artifacts)) as store:
                first = store.get_feature(item_name, name, 0)
            return first is not None and first.logits is not None

        step = reuse_or_launch(
            context,
            launcher,
            "dla",
            settings,
            dictionary=dictionary,
            stamp=output.with_suffix(".inputs"),
            outputs=[output],
            workdir=output.parent,
            code_version=CODE_VERSION,
            complete=logits_stored,
        )
        features = json.loads(output.read_text())["features"].values()
        top = [feature["top_positive"][0]["logit"] for feature in features if feature["top_positive"]]
        markdown, _ = preview(artifacts, item_name, ("logits",))
        yield dg.MaterializeResult(
            metadata={
                "n_features": len(top),
                "mean_top_logit": sum(top) / len(top) if top else 0.0,
                "attributed_hooks": ", ".join(hooks),
                "summed_over_hooks": len(hooks) > 1,
                "reused": step.reused,
                "path": dg.MetadataValue.path(str(output)),
                "preview": dg.MetadataValue.md(markdown),
            },
            data_version=dg.DataVersion(file_sha256(output)[:16]),
        )

    @dg.asset(
        key=interpretations_key,
        deps=[analyses_key],
        partitions_def=items,
        group_name=name,
        code_version=CODE_VERSION,
        kinds={"openai"},
        output_required=False,
        automation_condition=GATED,
    )
    def interpretations(context: dg.AssetExecutionContext, artifacts: ArtifactRoot) -> Iterator:
        """Explanations of the most active features by an LLM behind an OpenAI-compatible API, each scored by
        detection and fuzzing (auto_interp). A re-run asks only about the features still missing. Without a
        configured endpoint the step is skipped (an observation says why), not failed."""
        from lm_saes_core.runners.autointerp import auto_interp
        from lm_saes_core.store import open_store

        item_name = context.partition_key
        require_passing_evaluation(artifacts, item_name)
        auto_cfg, why = resolve_auto_interp(cfg.interpretation)
        if auto_cfg is None:
            context.log.warning(f"interpretations of {name}/{item_name} skipped: {why}")
            yield dg.AssetObservation(asset_key=interpretations_key, partition=item_name, metadata={"skipped": why})
            return
        store_cfg = store_config(artifacts)
        max_features = cfg.interpretation.max_features
        with open_store(store_cfg) as store:
            features = (
                most_active_features(store, item_name, name, ANALYSIS_NAME, max_features)
                if max_features is not None
                else None
            )
        result = auto_interp(autointerp_settings(cfg, item_name, auto_cfg, features, store_cfg, ANALYSIS_NAME))
        output = artifacts.dir(name, "interpretations", item_name) / "interpretations.json"
        _write_interpretations(store_cfg, item_name, name, features, output)
        markdown, _ = preview(artifacts, item_name, ("explanation", "contexts"))
        yield dg.MaterializeResult(
            metadata={
                "interpreted": len(result.interpreted),
                "failed": len(result.failed),
                "already_interpreted": len(result.skipped_existing),
                "requests": result.n_requests,
                **{f"mean_balanced_accuracy_{m}": v for m, v in sorted(result.mean_balanced_accuracy.items())},
                "endpoint": auto_cfg.base_url or "OpenAI API",
                "llm": auto_cfg.model,
                "path": dg.MetadataValue.path(str(output)),
                "preview": dg.MetadataValue.md(markdown),
            },
            data_version=dg.DataVersion(file_sha256(output)[:16]),
        )

    return [feature_analyses, logit_attributions, interpretations]


def _store_label(store_cfg: RecordStoreConfig) -> str:
    if store_cfg.mongo is not None:
        return f"MongoDB database {store_cfg.mongo.mongo_db!r}"
    return str(store_cfg.resolved_sqlite_path())


def _write_interpretations(
    store_cfg: RecordStoreConfig, dictionary: str, series: str, features: list[int] | None, output: Path
) -> None:
    """The stored explanations and scores of `features` as one JSON file (its hash is the data version)."""
    from lm_saes_core.store import open_store

    record = {}
    with open_store(store_cfg) as store:
        for feature in store.iter_features(dictionary, series, features, with_samples=False):
            interpretation = feature.interpretation
            if interpretation is not None:
                record[str(feature.index)] = {
                    "explanation": interpretation.explanation,
                    "error": interpretation.error,
                    "model": interpretation.model,
                    "scores": {s.method: s.balanced_accuracy for s in interpretation.scores},
                }
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, json.dumps(record, indent=1, sort_keys=True))
