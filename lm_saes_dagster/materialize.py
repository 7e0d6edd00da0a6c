"""`python -m lm_saes_dagster.materialize PIPELINE`: materialise a whole pipeline, in lineage order, on the persistent
Dagster instance of `$DAGSTER_HOME`, so every run, check and artefact shows up in the UI (`make ui`)."""

import argparse
import os
import sys

import dagster as dg
from dagster._core.definitions.observe import observe  # not re-exported at the top level in 1.13

from lm_saes_dagster.definitions import defs


def materialize_pipeline(name: str, instance: dg.DagsterInstance) -> dict[str, dict[str, float]]:
    """Every asset of the pipeline `name`, each partition in its own run; returns the evaluation metadata per item."""
    graph = defs.resolve_asset_graph()
    key = lambda asset: dg.AssetKey([name, asset])  # noqa: E731
    if key("corpus") not in graph.get_all_asset_keys():
        raise SystemExit(
            f"no pipeline named {name!r}; known: {sorted({k.path[0] for k in graph.get_all_asset_keys()})}"
        )
    assets = {k.path[-1]: graph.assets_def_for_key(k) for k in graph.get_all_asset_keys() if k.path[0] == name}
    observe([assets["item_config"]], instance=instance)  # record each item's settings before training on them
    if not dg.materialize([assets["corpus"], assets["tokens"]], instance=instance).success:
        raise SystemExit("corpus/tokens failed")
    for hook in assets["activations"].partitions_def.get_partition_keys():
        dg.materialize([assets["activations"]], partition_key=hook, instance=instance)
    evaluations = {}
    for item in assets["dictionary"].partitions_def.get_partition_keys():
        run = dg.materialize(
            [assets["dictionary"], assets["evaluation"]], partition_key=item, instance=instance, raise_on_error=False
        )
        for event in run.get_asset_materialization_events():
            if event.asset_key == key("evaluation"):
                evaluations[item] = {k: v.value for k, v in event.materialization.metadata.items() if k != "path"}
        for check in run.get_asset_check_evaluations():
            print(f"check {item}/{check.check_name}: {'passed' if check.passed else 'FAILED'}")
    return evaluations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline")
    args = parser.parse_args()
    if "DAGSTER_HOME" not in os.environ:
        raise SystemExit("set DAGSTER_HOME to a directory (the Makefile uses .lm_saes/dagster_home)")
    os.makedirs(os.environ["DAGSTER_HOME"], exist_ok=True)
    with dg.DagsterInstance.get() as instance:
        evaluations = materialize_pipeline(args.pipeline, instance)
    print()
    for item, metrics in evaluations.items():
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        print(f"{args.pipeline}/{item}: {shown}")
    print("\nsee the lineage, runs and checks: make ui (dagster dev -w workspace.yaml on http://127.0.0.1:3000)")
    return 0 if evaluations else 1


if __name__ == "__main__":
    sys.exit(main())
