"""`python -m lm_saes_dagster.materialize PIPELINE`: materialise a whole pipeline, in lineage order, on the persistent
Dagster instance of `$DAGSTER_HOME`, so every run, check and artefact shows up in the UI (`make ui`). `make
quickstart` runs it on the quickstart pipeline.

When the pipeline interprets features but no LLM endpoint is configured, the bundled SmolLM2-135M-Instruct is served
by llama.cpp on loopback for the run (`--no-local-llm` skips interpretations instead), so the lineage's last stage is
seen working; it is stopped by its pid when the run ends."""

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from dagster._core.definitions.observe import observe  # not re-exported at the top level in 1.13
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG as RANGE_END
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_START_TAG as RANGE_START

from lm_saes_core.analysis.autointerp.local_server import (
    LOCAL_MODEL_NAME,
    LocalLLMServer,
    LocalServerUnavailableError,
    start_local_server,
)

UI_URL = "http://127.0.0.1:3000"
LOCATION = "lm_saes_dagster.definitions"  # the code location workspace.yaml names
LOCAL_INSTANCE_YAML = Path(__file__).resolve().parents[1] / "deploy" / "local" / "dagster.yaml"
ITEM_ASSETS = ("dictionary", "evaluation", "feature_analyses", "logit_attributions", "interpretations")
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
"""Dagster's console logger without its DEBUG events (every step start, output and handoff); the UI keeps them all."""


@dataclass
class ItemOutcome:
    """What one dictionary item's run produced: metadata per asset, check verdicts, skipped assets and why."""

    metadata: dict[str, dict[str, object]] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    success: bool = True
    seconds: float = 0.0
    """Wall time of the item's steps, its share of a shared training run included."""


def _assets_of(defs: dg.Definitions, name: str) -> dict[str, dg.AssetsDefinition]:
    graph = defs.resolve_asset_graph()
    keys = graph.get_all_asset_keys()
    if dg.AssetKey([name, "corpus"]) not in keys:
        raise SystemExit(f"no pipeline named {name!r}; known: {sorted({k.path[0] for k in keys})}")
    return {k.path[-1]: graph.assets_def_for_key(k) for k in keys if k.path[0] == name}


def register_items(defs: dg.Definitions, name: str, instance: dg.DagsterInstance) -> list[str]:
    """Add the pipeline's dictionary items (file and `.d` directory) as partitions, as its sensor would."""
    partitions = _assets_of(defs, name)["dictionary"].partitions_def
    sensor = defs.resolve_sensor_def(f"{name}_dictionary_items")
    result = sensor(dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def()))
    for request in result.dynamic_partitions_requests if isinstance(result, dg.SensorResult) else []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return list(partitions.get_partition_keys(dynamic_partitions_store=instance))


def materialize_pipeline(
    defs: dg.Definitions, name: str, instance: dg.DagsterInstance, items: list[str] | None = None
) -> dict[str, ItemOutcome]:
    """Every asset of the pipeline `name`: corpus and tokens, each hook's activations (one run), the dictionaries
    (one run: items sharing a hook's stream train together), then one run per item through its evaluation, analyses
    and interpretations (a failed blocking check skips what follows)."""
    assets = _assets_of(defs, name)
    registered = register_items(defs, name, instance)
    unknown = sorted(set(items or ()) - set(registered))
    if unknown:
        raise SystemExit(f"pipeline {name!r} has no dictionary items {unknown}; it has {registered}")
    observe([assets["item_config"]], instance=instance)  # record each item's settings before training on them
    if not dg.materialize([assets["corpus"], assets["tokens"]], instance=instance, run_config=QUIET).success:
        raise SystemExit("corpus/tokens failed")
    hooks = assets["activations"].partitions_def.get_partition_keys()
    every_hook = {RANGE_START: hooks[0], RANGE_END: hooks[-1]}  # one run, one forward pass (single-run backfill)
    if not dg.materialize([assets["activations"]], instance=instance, tags=every_hook, run_config=QUIET).success:
        raise SystemExit(f"activations of {hooks} failed")
    selected = [item for item in registered if item in set(items or registered)]
    outcomes = {item: ItemOutcome() for item in selected}
    for block in contiguous_blocks(selected, registered):
        # One run per contiguous range of items: those sharing a hook's stream train together (a sweep).
        started = time.perf_counter()
        tags = {RANGE_START: block[0], RANGE_END: block[-1]} if len(block) > 1 else {}
        run = dg.materialize(
            [assets["dictionary"]],
            partition_key=None if tags else block[0],
            tags=tags,
            instance=instance,
            raise_on_error=False,
            run_config=QUIET,
        )
        for event in run.get_asset_materialization_events():
            metadata = {k: v.value for k, v in event.materialization.metadata.items()}
            outcomes[event.partition].metadata["dictionary"] = metadata
        for item in block:
            outcomes[item].seconds = (time.perf_counter() - started) / len(block)
    for item in selected:
        outcome = outcomes[item]
        if "dictionary" not in outcome.metadata:
            outcome.success = False
            continue
        started = time.perf_counter()
        run = dg.materialize(
            [assets[a] for a in ITEM_ASSETS if a != "dictionary"],
            partition_key=item,
            instance=instance,
            raise_on_error=False,
            run_config=QUIET,
        )
        outcome.success = run.success
        outcome.seconds += time.perf_counter() - started
        for event in run.get_asset_materialization_events():
            metadata = event.materialization.metadata
            outcome.metadata[event.asset_key.path[-1]] = {k: v.value for k, v in metadata.items()}
        for event in run.get_asset_observation_events():
            skipped = event.asset_observation_data.asset_observation.metadata.get("skipped")
            if skipped is not None:
                outcome.skipped[event.asset_key.path[-1]] = skipped.value
        outcome.checks = {check.check_name: check.passed for check in run.get_asset_check_evaluations()}
    return outcomes


def contiguous_blocks(selected: list[str], registered: list[str]) -> list[list[str]]:
    """`selected` (in registration order) cut where a registered item not selected lies between two selected ones,
    since a run covers a contiguous partition range."""
    blocks: list[list[str]] = []
    previous = None
    for item in selected:
        position = registered.index(item)
        if blocks and position == previous + 1:
            blocks[-1].append(item)
        else:
            blocks.append([item])
        previous = position
    return blocks


def _number(metadata: dict[str, object], key: str, spec: str = ".3f") -> str:
    value = metadata.get(key)
    return format(value, spec) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def summary(name: str, outcomes: dict[str, ItemOutcome]) -> str:
    header = f"{'item':<16} {'EV':>6} {'L0':>6} {'dead':>6} {'CE rec.':>7} {'alive':>6} {'time':>6}  checks"
    lines = [f"pipeline {name}:", header]
    for item, outcome in outcomes.items():
        evaluation = outcome.metadata.get("evaluation", {})
        analyses = outcome.metadata.get("feature_analyses", {})
        failed = [check for check, passed in outcome.checks.items() if not passed]
        verdict = f"{len(outcome.checks) - len(failed)}/{len(outcome.checks)} passed"
        lines.append(
            f"{item:<16} {_number(evaluation, 'explained_variance'):>6} {_number(evaluation, 'l0', '.1f'):>6} "
            f"{_number(evaluation, 'dead_fraction'):>6} {_number(evaluation, 'ce_loss_recovered'):>7} "
            f"{_number(analyses, 'alive_fraction', '.2f'):>6} {outcome.seconds:>5.0f}s  {verdict}"
            + (f"; FAILED: {', '.join(failed)}" if failed else "")
        )
        hooks = [key.removeprefix("explained_variance/") for key in evaluation if key.startswith("explained_variance/")]
        for hook in hooks:  # a crosscoder's heads, a CLT's layers
            lines.append(
                f"  {hook:<30} EV {_number(evaluation, f'explained_variance/{hook}')}"
                f"  L0 {_number(evaluation, f'l0/{hook}', '.1f')}"
            )
    shared = [
        item for item, outcome in outcomes.items() if outcome.metadata.get("dictionary", {}).get("shared_stream_with")
    ]
    if shared:
        lines.append(f"trained together from one activation stream (sweep): {', '.join(shared)}")
    reasons: dict[str, list[str]] = {}
    for item, outcome in outcomes.items():
        logits = outcome.metadata.get("logit_attributions", {})
        if "attributed_hooks" in logits:
            how = "each feature's decoders summed over" if logits.get("summed_over_hooks") else "decoder rows of"
            lines.append(f"{item}: logit attributions of {how} {logits['attributed_hooks']}")
        interpretations = outcome.metadata.get("interpretations")
        if interpretations is not None:
            scores = ", ".join(
                f"{key.removeprefix('mean_balanced_accuracy_')} {value:.2f}"
                for key, value in interpretations.items()
                if key.startswith("mean_balanced_accuracy_")
            )
            lines.append(
                f"{item}: {interpretations['interpreted']} features interpreted by {interpretations['llm']}"
                + (f" (mean balanced accuracy: {scores})" if scores else "")
            )
        for asset, why in outcome.skipped.items():
            reasons.setdefault(f"{asset} skipped ({why})", []).append(item)
        if not outcome.success:
            missing = [a for a in ITEM_ASSETS if a not in outcome.metadata and a not in outcome.skipped]
            lines.append(f"{item}: not materialised: {', '.join(missing)} (see the run's logs in the UI)")
    lines.extend(f"{', '.join(items)}: {reason}" for reason, items in reasons.items())
    return "\n".join(lines)


def prepare_home() -> Path:
    """`$DAGSTER_HOME`, created with the local instance settings (deploy/local/dagster.yaml) if it has none."""
    if "DAGSTER_HOME" not in os.environ:
        raise SystemExit("set DAGSTER_HOME to a directory (the Makefile uses .lm_saes/dagster_home)")
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and LOCAL_INSTANCE_YAML.is_file():
        shutil.copyfile(LOCAL_INSTANCE_YAML, home / "dagster.yaml")
    return home


def local_llm(pipeline: str, log_path: Path) -> LocalLLMServer | None:
    """The bundled model's server, started when `pipeline` interprets features and no endpoint is configured (its
    URL then goes to `$LM_SAES_LLM_BASE_URL` for this process); None when an endpoint is configured or the server
    cannot run here (the interpretations are then skipped, and the message says why)."""
    from lm_saes_dagster.analysis_assets import LLM_BASE_URL_ENV, LLM_MODEL_ENV, resolve_auto_interp
    from lm_saes_dagster.definitions import pipeline_config

    cfg = pipeline_config(pipeline)
    if cfg is None or resolve_auto_interp(cfg.interpretation)[0] is not None:
        return None
    try:
        server = start_local_server(log_path, n_threads=1)
    except LocalServerUnavailableError as exc:
        print(f"no LLM endpoint configured and the bundled one cannot start ({exc}); interpretations are skipped")
        return None
    os.environ[LLM_BASE_URL_ENV] = server.base_url
    os.environ[LLM_MODEL_ENV] = LOCAL_MODEL_NAME  # what the records and the summary name as the labeller
    print(
        f"No LLM endpoint configured: features are labelled by the bundled SmolLM2-135M-Instruct, served by llama.cpp "
        f"at {server.base_url} (pid {server.process.pid}, log {log_path}) until this run ends. A 135M model's labels "
        f"are weak: set {LLM_BASE_URL_ENV} (and LM_SAES_LLM_MODEL) to a real OpenAI-compatible endpoint, or "
        "OPENAI_API_KEY, and materialise `interpretations` again.\n"
    )
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline")
    parser.add_argument("--items", nargs="+", help="only these dictionary items (default: all)")
    parser.add_argument(
        "--no-local-llm", action="store_true", help="without an endpoint, skip interpretations instead of serving the "
        "bundled SmolLM2-135M-Instruct on loopback"
    )  # fmt: skip
    args = parser.parse_args()
    started = time.perf_counter()
    home = prepare_home()
    from lm_saes_dagster.definitions import defs  # after DAGSTER_HOME is checked: loading reads every pipeline

    server = None if args.no_local_llm else local_llm(args.pipeline, home / "local-llm.log")
    try:
        with dg.DagsterInstance.get() as instance:
            outcomes = materialize_pipeline(defs, args.pipeline, instance, args.items)
    finally:
        if server is not None:
            server.stop()
    print()
    print(summary(args.pipeline, outcomes))
    print(f"total time: {time.perf_counter() - started:.0f} s")
    print(
        f"\nSee the lineage, the runs, the checks and the feature previews in the Dagster UI: run `make ui` and open "
        f"{UI_URL}/locations/{LOCATION}/asset-groups/{args.pipeline} (click an asset for its materialisations, "
        "metadata plots and feature previews)."
    )
    store = _store_path(args.pipeline)
    if store is not None:
        print(f"Browse the features in your web browser: `.venv/bin/lm-saes serve --store-path {store}`.")
    return 0 if outcomes and all(outcome.success for outcome in outcomes.values()) else 1


def _store_path(pipeline: str) -> Path | None:
    """The pipeline's SQLite record store as a path relative to the working directory when it is under it."""
    from lm_saes_core.config import lm_saes_home
    from lm_saes_dagster.definitions import pipeline_config

    cfg = pipeline_config(pipeline)
    if cfg is None or (cfg.store is not None and cfg.store.mongo is not None):
        return None
    path = cfg.store.resolved_sqlite_path() if cfg.store else lm_saes_home() / "pipelines" / pipeline / "records.sqlite"
    path = path.resolve()
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


if __name__ == "__main__":
    sys.exit(main())
