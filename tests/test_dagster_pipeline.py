"""The Dagster layer on a real instance: definitions from pipeline files, lineage, an end-to-end materialisation of a
small pipeline on the real SmolLM2, idempotent re-materialisation, automation and the re-evaluation schedule."""

import shutil
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.definitions.observe import observe  # not re-exported at the top level in 1.13
from dagster._utils.test.data_versions import get_stale_status_resolver  # dagster's own staleness resolver setup
from pipeline_fixtures import HOOK, small_pipeline

from lm_saes_dagster.definitions import build_definitions

ROOT = Path(__file__).resolve().parents[1]


def write_pipelines(directory: Path, **pipelines: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, data in pipelines.items():
        (directory / f"{file_name}.yaml").write_text(yaml.safe_dump(data))
    return directory


def test_shipped_pipelines_load_with_the_expected_lineage(tmp_path):
    defs, errors = build_definitions(ROOT / "configs" / "pipelines", tmp_path)
    assert errors == {}
    graph = defs.resolve_asset_graph()
    parents = {
        key.to_user_string(): {p.to_user_string() for p in graph.get(key).parent_keys}
        for key in graph.get_all_asset_keys()
    }
    assert parents["quickstart/tokens"] == {"quickstart/corpus"}
    assert parents["quickstart/activations"] == {"quickstart/tokens"}
    assert parents["quickstart/dictionary"] == {"quickstart/activations", "quickstart/item_config"}
    assert parents["quickstart/evaluation"] == {"quickstart/dictionary"}
    checks = {key.name for key in graph.asset_check_keys}
    assert checks == {"tokens_consistent_across_hooks", "explained_variance_above_min", "dead_fraction_below_max",
                      "l0_within_bounds"}  # fmt: skip
    sensor = defs.resolve_sensor_def("lm_saes_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert defs.resolve_schedule_def("quickstart_weekly_reevaluation") is not None


def test_an_invalid_pipeline_is_reported_and_the_others_still_load(tmp_path):
    bad = small_pipeline("bad")
    bad["dictionaries"]["topk"]["trainer"]["learning_rate"] = 0.1
    other = small_pipeline("other")
    other["dictionaries"]["topk"]["sae"]["hook_point_in"] = "blocks.9.hook_resid_post"
    directory = write_pipelines(tmp_path / "pipelines", bad=bad, good=small_pipeline("good"), other=other)
    with pytest.warns(UserWarning, match="was not loaded"):
        defs, errors = build_definitions(directory, tmp_path)
    assert set(errors) == {directory / "bad.yaml", directory / "other.yaml"}
    assert "unknown key 'dictionaries.topk.trainer.learning_rate'" in errors[directory / "bad.yaml"]
    assert "'blocks.9.hook_resid_post' is not one of the pipeline's hook_points" in errors[directory / "other.yaml"]
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert "good/dictionary" in keys and not any(key.startswith(("bad/", "other/")) for key in keys)


@pytest.mark.slow
def test_small_pipeline_end_to_end_idempotent_with_automation_and_schedule(tmp_path):
    directory = write_pipelines(tmp_path / "pipelines", small=small_pipeline())
    defs, errors = build_definitions(directory, tmp_path / "home")
    assert errors == {}
    graph = defs.resolve_asset_graph()
    assets = [graph.assets_def_for_key(key) for key in graph.get_all_asset_keys()]
    key = lambda name: dg.AssetKey(["small", name])  # noqa: E731

    with dg.instance_for_test() as instance:
        observe([graph.assets_def_for_key(key("item_config"))], instance=instance)  # as `make pipeline` does
        upstream = dg.materialize([a for a in assets if a.key in (key("corpus"), key("tokens"))], instance=instance)
        assert upstream.success
        result = dg.materialize(
            [a for a in assets if a.key == key("activations")], partition_key=HOOK, instance=instance,
             selection=[key("activations")],
        )  # fmt: skip
        assert result.success
        checks = result.get_asset_check_evaluations()
        assert [c.passed for c in checks] == [True]
        first_versions = {}
        for item in ("topk", "batchtopk"):
            run = dg.materialize(
                [a for a in assets if a.key in (key("dictionary"), key("evaluation"))], partition_key=item,
                instance=instance,
            )  # fmt: skip
            assert run.success
            events = {e.asset_key.path[-1]: e for e in run.get_asset_materialization_events()}
            dictionary = events["dictionary"].materialization
            first_versions[item] = dictionary.tags["dagster/data_version"]
            assert dictionary.metadata["steps"].value == 48 and dictionary.metadata["reused"].value is False
            assert Path(dictionary.metadata["path"].value, "sae_weights.safetensors").is_file()
            evaluation = events["evaluation"].materialization.metadata
            assert 0.5 < evaluation["explained_variance"].value <= 1.0
            assert "ce_loss_recovered" in evaluation
            assert {c.check_name: c.passed for c in run.get_asset_check_evaluations()} == {
                "explained_variance_above_min": True, "dead_fraction_below_max": True, "l0_within_bounds": True
            }  # fmt: skip

        # Unchanged inputs: the dictionary step reuses the finished run and reports the same data version.
        again = dg.materialize(
            [a for a in assets if a.key == key("dictionary")], partition_key="topk", instance=instance,

        )  # fmt: skip
        materialization = again.get_asset_materialization_events()[0].materialization
        assert materialization.metadata["reused"].value is True
        assert materialization.tags["dagster/data_version"] == first_versions["topk"]
        reevaluated = (
            dg.materialize([a for a in assets if a.key == key("evaluation")], partition_key="topk", instance=instance)
            .get_asset_materialization_events()[0]
            .materialization
        )
        assert reevaluated.metadata["reused"].value is True  # same weights, same settings: stored metrics

        # The schedule asks for one re-evaluation per materialised dictionary partition.
        schedule = defs.resolve_schedule_def("small_weekly_reevaluation")
        context = dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=datetime(2026, 11, 30, 3, tzinfo=UTC),
            repository_def=defs.get_repository_def(),
        )
        requests = list(schedule.evaluate_tick(context).run_requests)
        assert sorted(r.partition_key for r in requests) == ["batchtopk", "topk"]

        # Editing one item's settings makes only that item's dictionary stale.
        changed = small_pipeline()
        changed["dictionaries"]["topk"]["trainer"]["lr"] = 1e-3
        new_graph = build_definitions(write_pipelines(directory, small=changed), tmp_path / "home")[
            0
        ].resolve_asset_graph()
        observe([new_graph.assets_def_for_key(key("item_config"))], instance=instance)
        resolver = get_stale_status_resolver(
            instance, [new_graph.assets_def_for_key(k) for k in new_graph.get_all_asset_keys()]
        )
        assert resolver.get_status(key("dictionary"), "topk").name == "STALE"
        assert resolver.get_status(key("dictionary"), "batchtopk").name == "FRESH", resolver.get_stale_causes(
            key("dictionary"), "batchtopk"
        )

    # Automation: a new dictionary partition makes the eager evaluation request itself.
    with dg.instance_for_test() as instance:
        before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert before.total_requested == 0
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key("dictionary"), partition="topk"))
        evaluated = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
        requested = evaluated.get_requested_partitions(key("evaluation"))
        assert requested == {"topk"}
    shutil.rmtree(tmp_path / "home", ignore_errors=True)
