"""The Dagster layer on a real instance: definitions from pipeline files, lineage, an end-to-end materialisation of a
small pipeline on the real SmolLM2, idempotent re-materialisation, automation and the re-evaluation schedule."""

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import dagster as dg
import pytest
import yaml
from dagster._core.definitions.observe import observe  # not re-exported at the top level in 1.13
from dagster._utils.test.data_versions import get_stale_status_resolver  # dagster's own staleness resolver setup
from llm_server import llm_server  # noqa: F401 - the module-scoped server fixture
from pipeline_fixtures import HOOK, TRANSCODER_IN, TRANSCODER_OUT, small_pipeline, transcoder_item

from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.config import ConfigError, validate_config
from lm_saes_core.models import SparseDictionaryConfig
from lm_saes_core.pipes_entry import RUNNERS
from lm_saes_core.runners.autointerp import AutoInterpSettings
from lm_saes_core.runners.evaluate import EvaluateSAESettings
from lm_saes_core.store import RecordStoreConfig, open_store
from lm_saes_dagster.analysis_assets import LLM_BASE_URL_ENV, LLM_MODEL_ENV
from lm_saes_dagster.definitions import build_definitions
from lm_saes_dagster.materialize import RANGE_END, RANGE_START, contiguous_blocks, register_items
from lm_saes_dagster.model_check import check_pipeline_model, local_config_dir
from lm_saes_dagster.pipeline import _dictionary_metadata
from lm_saes_dagster.pipeline_config import DictionaryItem, PipelineConfig, item_problem, load_pipeline
from lm_saes_dagster.settings import (
    analyze_settings,
    autointerp_settings,
    dla_settings,
    evaluate_settings,
    generate_settings,
    stream_groups,
    sweep_settings,
    train_settings,
)

ROOT = Path(__file__).resolve().parents[1]
EXTRA_HOOK = "blocks.1.hook_resid_post"
CACHED_HOOKS = [HOOK, EXTRA_HOOK, TRANSCODER_IN, TRANSCODER_OUT]
"""The hooks of the shared small run: its SAEs' hook, one without dictionaries and the transcoder's two."""


def small_run_pipeline() -> dict:
    """The small pipeline with the extra hook and a transcoder item (layer 3's MLP) next to its two SAEs."""
    pipeline = small_pipeline(extra_hooks=(EXTRA_HOOK, TRANSCODER_IN, TRANSCODER_OUT))
    pipeline["dictionaries"]["transcoder"] = transcoder_item()
    # 48 steps over 3072 cached tokens leave the transcoder at EV ~0.15 (SAEs: > 0.5, asserted by their test).
    pipeline["quality"]["min_explained_variance"] = 0.1
    return pipeline


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
    assert parents["quickstart/feature_analyses"] == {"quickstart/dictionary", "quickstart/evaluation"}
    assert parents["quickstart/logit_attributions"] == {"quickstart/feature_analyses"}
    assert parents["quickstart/interpretations"] == {"quickstart/feature_analyses"}
    checks = {key.name for key in graph.asset_check_keys}
    assert checks == {"tokens_consistent_across_hooks", "explained_variance_above_min", "dead_fraction_below_max",
                      "l0_within_bounds", "features_analysed"}  # fmt: skip
    for sensor in ("lm_saes_automation", "quickstart_dictionary_items"):
        assert defs.resolve_sensor_def(sensor).default_status == dg.DefaultSensorStatus.RUNNING
    schedule = defs.resolve_schedule_def("quickstart_weekly_reanalysis")
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    assert {key.path[-1] for key in schedule.job.selection.resolve(graph)} == {
        "evaluation", "feature_analyses", "logit_attributions", "interpretations"
    }  # fmt: skip


def test_the_gpu_example_validates_but_is_not_loaded_by_default(tmp_path):
    """configs/pipelines/examples/ is only loaded when LM_SAES_PIPELINES points there; its hub model is not needed
    to validate it (hook names are checked when the model is in the local cache, skipped with a note otherwise)."""
    examples = ROOT / "configs" / "pipelines" / "examples"
    defs, errors = build_definitions(examples, tmp_path)
    assert errors == {}
    assert {key.path[0] for key in defs.resolve_asset_graph().get_all_asset_keys()} == {"gpu_example"}
    cfg = load_pipeline(examples / "gpu-example.yaml")
    assert len(cfg.hook_points) == 3 and len(cfg.dictionaries) == 6
    assert {item.sae.d_model for item in cfg.dictionaries.values()} == {896}  # Qwen2.5-0.5B's width
    cached = local_config_dir(cfg.model)[0]
    note = check_pipeline_model(cfg, examples / "gpu-example.yaml")
    assert (note is None) == (cached is not None)
    default, _ = build_definitions(ROOT / "configs" / "pipelines", tmp_path)
    assert {key.path[0] for key in default.resolve_asset_graph().get_all_asset_keys()} == {"quickstart", "circuits"}


def test_an_invalid_pipeline_is_reported_and_the_others_still_load(tmp_path, smollm2_dir):
    bad = small_pipeline("bad")
    bad["dictionaries"]["topk"]["trainer"]["learning_rate"] = 0.1
    other = small_pipeline("other")
    other["dictionaries"]["topk"]["sae"]["hook_point_in"] = "blocks.9.hook_resid_post"
    # Checked against the model's config.json at load: SmolLM2-135M has 30 layers of width 576.
    deep = small_pipeline("deep")
    deep["hook_points"] = ["blocks.30.hook_resid_post"]
    for item in deep["dictionaries"].values():
        item["sae"]["hook_point_in"] = item["sae"]["hook_point_out"] = "blocks.30.hook_resid_post"
    typo = small_pipeline("typo")
    typo["hook_points"] = [HOOK.replace("resid_post", "resid_pots")]
    for item in typo["dictionaries"].values():
        item["sae"]["hook_point_in"] = item["sae"]["hook_point_out"] = typo["hook_points"][0]
    wide = small_pipeline("wide")
    wide["dictionaries"]["batchtopk"]["sae"]["d_model"] = 512
    directory = write_pipelines(
        tmp_path / "pipelines", bad=bad, good=small_pipeline("good"), other=other, deep=deep, typo=typo, wide=wide
    )
    with pytest.warns(UserWarning, match="was not loaded"):
        defs, errors = build_definitions(directory, tmp_path)
    assert set(errors) == {directory / f"{name}.yaml" for name in ("bad", "other", "deep", "typo", "wide")}
    assert "unknown key 'dictionaries.topk.trainer.learning_rate'" in errors[directory / "bad.yaml"]
    assert "'blocks.9.hook_resid_post' is not one of the pipeline's hook_points" in errors[directory / "other.yaml"]
    assert str(directory / "deep.yaml") in errors[directory / "deep.yaml"]
    assert (
        "hook_points.0: model 'smollm2-135m' (30 layers) has no hook point 'blocks.30.hook_resid_post'"
        in errors[directory / "deep.yaml"]
    )
    assert f"closest: {HOOK}" in errors[directory / "typo.yaml"]
    assert "dictionaries.batchtopk.sae.d_model: 512 does not match the width" in errors[directory / "wide.yaml"]
    assert "(576)" in errors[directory / "wide.yaml"]
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert "good/dictionary" in keys and {key.split("/")[0] for key in keys} == {"good"}


def test_a_hub_model_missing_from_the_local_cache_loads_with_a_note(tmp_path):
    """Definition load never downloads: a hub model not in the cache is checked when a step loads it."""
    pipeline = small_pipeline("hub")
    pipeline["model"] = {"model_name": "EleutherAI/pythia-160m", "cache_dir": str(tmp_path / "empty-hub-cache")}
    cfg = PipelineConfig.model_validate(pipeline)
    note = check_pipeline_model(cfg, "hub.yaml")
    assert note is not None and "not in the local Hugging Face cache" in note and note.startswith("hub.yaml")


def test_items_group_by_the_stream_they_read_and_runs_cover_contiguous_ranges():
    items = {name: DictionaryItem.model_validate(spec) for name, spec in small_pipeline()["dictionaries"].items()}
    items["transcoder"] = DictionaryItem.model_validate(transcoder_item())
    topk = small_pipeline()["dictionaries"]["topk"]
    items["big-batch"] = DictionaryItem.model_validate({**topk, "batch_size": 1024})
    items["two-gpus"] = DictionaryItem.model_validate({**topk, "data_parallel_size": 2})
    assert stream_groups(items) == [["topk", "batchtopk"], ["transcoder"], ["big-batch"], ["two-gpus"]]
    registered = ["a", "b", "c", "d", "e"]
    assert contiguous_blocks(["a", "b", "d", "e"], registered) == [["a", "b"], ["d", "e"]]
    assert contiguous_blocks(["c"], registered) == [["c"]]
    assert contiguous_blocks(registered, registered) == [registered]


def test_every_builder_returns_its_runners_settings_whose_json_dump_validates_back(tmp_path):
    """What a launched step reads is the JSON dump of the builder's object: it must load as the same settings. A sweep
    item's single-run settings are exactly `train_settings` of that item (so either way finds the other's run)."""
    cfg = PipelineConfig.model_validate(small_run_pipeline())
    cache, store = tmp_path / "cache", RecordStoreConfig(sqlite_path=str(tmp_path / "records.sqlite"))
    item, dictionary = cfg.dictionaries["transcoder"], tmp_path / "dictionary" / "transcoder"
    pair = {name: cfg.dictionaries[name] for name in ("topk", "batchtopk")}
    outputs = {name: tmp_path / "dictionary" / name for name in pair}
    built = {
        "generate": generate_settings(cfg, cache, overwrite=True),
        "train": train_settings(cfg, "transcoder", item, cache, dictionary),
        "sweep": sweep_settings(cfg, pair, cache, outputs),
        "evaluate": evaluate_settings(cfg, "transcoder", item, dictionary, tmp_path / "evaluation.json"),
        "analyze": analyze_settings(cfg, "transcoder", item, dictionary, cache, tmp_path / "analysis", store, "a"),
        "dla": dla_settings(cfg, "transcoder", dictionary, tmp_path / "logits.json", store),
        "train-crosscoder": train_settings(cfg, "heads", DictionaryItem.model_validate({
            "sae": {"sae_type": "crosscoder", "d_model": 576, "d_sae": 1152, "heads": [TRANSCODER_IN, TRANSCODER_OUT],
                    "act_fn": "topk", "top_k": 8},
            "trainer": {"total_training_tokens": 4096}, "head_parallel_size": 2,
        }), cache, dictionary),
    }  # fmt: skip
    assert set(built) == set(RUNNERS)
    factories = built["train-crosscoder"].activation_factories  # one per head: each head rank reads its own
    assert [f.hook_points for f in factories] == [[TRANSCODER_IN], [TRANSCODER_OUT]]
    for runner, settings in built.items():
        settings_class = RUNNERS[runner].settings_class()
        assert type(settings) is settings_class, runner
        assert settings_class.model_validate(settings.model_dump(mode="json")) == settings, runner
    auto = autointerp_settings(cfg, "topk", AutoInterpConfig(base_url="http://127.0.0.1:1/v1"), [3, 1], store, "a")
    assert type(auto) is AutoInterpSettings and AutoInterpSettings.model_validate(auto.model_dump(mode="json")) == auto
    assert built["train"].activation_factory.hook_points == [TRANSCODER_IN, TRANSCODER_OUT]
    assert built["evaluate"].activation_factory.hook_points == [TRANSCODER_IN, TRANSCODER_OUT]
    assert built["train"].trainer.exp_result_path == str(dictionary) and item.trainer.exp_result_path == "results"
    for index, name in enumerate(pair):
        alone = train_settings(cfg, name, pair[name], cache, outputs[name])
        assert built["sweep"].item_settings(index).model_dump(mode="json") == alone.model_dump(mode="json")
    with pytest.raises(ValueError, match="share one activation stream"):
        sweep_settings(cfg, {"topk": pair["topk"], "transcoder": item}, cache, {**outputs, "transcoder": dictionary})


class HookListConfig(SparseDictionaryConfig):
    """A kind the Dagster layer has never heard of, defined here only: its hooks are one list field (inputs, then the
    one output), as a crosscoder's or a CLT's are."""

    sae_type: Literal["hook-list"] = "hook-list"
    hooks: list[str]
    d_out: int | None = None

    @property
    def hooks_in(self) -> list[str]:
        return self.hooks[:-1]

    @property
    def hooks_out(self) -> list[str]:
        return self.hooks[-1:]

    def hook_widths(self) -> list[tuple[str, int, str]]:
        widths = [(hook, self.d_model, "d_model") for hook in self.hooks_in]
        return [*widths, (self.hooks[-1], self.d_out or self.d_model, "d_out" if self.d_out else "d_model")]


def test_items_of_any_kind_are_checked_through_the_config_api(tmp_path, smollm2_dir):
    """Hooks, widths and metadata come from the kind's config API (hooks_in, hooks_out, hook_points, hook_widths,
    sae_type), never from SAE fields; messages still name the file's field. A settings file without `sae_type`
    means an SAE; an unknown kind is an error naming the field."""
    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post", HOOK]
    toy = HookListConfig(d_model=576, d_sae=64, hooks=hooks, d_out=512)
    item = DictionaryItem.model_validate(small_pipeline()["dictionaries"]["topk"]).model_copy(update={"sae": toy})
    assert item.hook_points == hooks and item.hook_label == f"{hooks[0]}, {hooks[1]} -> {HOOK}"
    problem = item_problem("toy", item, [hooks[0], HOOK])
    assert problem.startswith(f".sae.hooks.1: hook point {hooks[1]!r} is not one of the pipeline's hook_points")
    assert f"reads all of its hooks ({', '.join(hooks)}) from the activation cache" in problem
    assert item_problem("toy", item, hooks) is None
    cfg = PipelineConfig.model_validate(small_pipeline(extra_hooks=tuple(hooks[:2])))
    with pytest.raises(ConfigError, match=rf"dictionaries\.toy\.sae\.d_out: 512 does not match the width of '{HOOK}'"):
        check_pipeline_model(cfg.model_copy(update={"dictionaries": {"toy": item}}), "toy.yaml")
    metadata = _dictionary_metadata(item, tmp_path)
    assert (metadata["hook_point_in"], metadata["hook_point_out"]) == (f"{hooks[0]}, {hooks[1]}", HOOK)
    assert metadata["transcoder"] is True and metadata["sae_type"] == "hook-list" and metadata["d_sae"] == 64

    named = small_pipeline()
    named["dictionaries"]["topk"]["sae"]["sae_type"] = "sae"
    assert PipelineConfig.model_validate(named) == PipelineConfig.model_validate(small_pipeline())
    named["dictionaries"]["topk"]["sae"]["sae_type"] = "hook-list"  # not a registered kind
    with pytest.raises(ConfigError, match=r"field 'dictionaries\.topk\.sae': unknown sae_type \(known: \['sae'"):
        validate_config(PipelineConfig, named, source="named.yaml")


def test_item_files_add_dictionary_items_and_bad_ones_are_reported(tmp_path):
    directory = write_pipelines(tmp_path / "pipelines", small=small_pipeline())
    (directory / "small.d").mkdir()
    extra = small_pipeline()["dictionaries"]["topk"] | {"seed": 7}
    (directory / "small.d" / "extra.yaml").write_text(yaml.safe_dump(extra))
    (directory / "small.d" / "twice.yaml").write_text(yaml.safe_dump(extra))
    (directory / "small.d" / "topk.yaml").write_text(yaml.safe_dump(extra))  # already in the pipeline file
    bad_hook = {**extra, "sae": {**extra["sae"], "hook_point_in": "blocks.1.hook_resid_post"}}
    (directory / "small.d" / "elsewhere.yaml").write_text(yaml.safe_dump(bad_hook))
    with pytest.warns(UserWarning, match="dictionary item .* was not loaded"):
        defs, errors = build_definitions(directory, tmp_path / "home")
    assert set(errors) == {directory / "small.d" / "topk.yaml", directory / "small.d" / "elsewhere.yaml"}
    assert "already defined in the pipeline file" in errors[directory / "small.d" / "topk.yaml"]
    assert (
        "hook point 'blocks.1.hook_resid_post' is not one of the pipeline's hook_points"
        in errors[directory / "small.d" / "elsewhere.yaml"]
    )
    with dg.instance_for_test() as instance:
        assert register_items(defs, "small", instance) == ["batchtopk", "topk", "extra", "twice"]  # file order


def test_a_transcoder_needs_both_hooks_cached_and_only_residual_outputs_get_logit_attributions(tmp_path, smollm2_dir):
    """Both of a transcoder's hooks come from the activation cache, so both must be pipeline hook points (checked at
    load, naming the file and field); DLA is skipped, not failed, for an output hook off the residual stream."""
    missing = small_pipeline("missing", act_fns=("topk",), extra_hooks=(TRANSCODER_IN,))
    missing["dictionaries"]["transcoder"] = transcoder_item()
    narrow = small_pipeline("narrow", act_fns=("topk",), extra_hooks=(TRANSCODER_IN, TRANSCODER_OUT))
    narrow["dictionaries"]["transcoder"] = transcoder_item() | {
        "sae": transcoder_item()["sae"] | {"d_out": 512}
    }  # fmt: skip
    ln2_out = "blocks.3.ln2.hook_out"
    good = small_pipeline("good", act_fns=("topk",), extra_hooks=(TRANSCODER_IN, TRANSCODER_OUT, ln2_out))
    good["dictionaries"] |= {"transcoder": transcoder_item(), "ln2": transcoder_item(TRANSCODER_IN, ln2_out)}
    directory = write_pipelines(tmp_path / "pipelines", missing=missing, narrow=narrow, good=good)
    (directory / "good.d").mkdir()
    item_file = directory / "good.d" / "late.yaml"
    item_file.write_text(yaml.safe_dump(transcoder_item(TRANSCODER_IN, "blocks.4.hook_mlp_out")))
    with pytest.warns(UserWarning, match="was not loaded"):
        defs, errors = build_definitions(directory, tmp_path / "home")
    assert set(errors) == {directory / "missing.yaml", directory / "narrow.yaml", item_file}
    assert str(directory / "missing.yaml") in errors[directory / "missing.yaml"]
    assert (
        f"dictionaries.transcoder.sae.hook_point_out: hook point {TRANSCODER_OUT!r} is not one of the pipeline's "
        "hook_points" in errors[directory / "missing.yaml"]
    )
    assert (
        f"the dictionary reads all of its hooks ({TRANSCODER_IN}, {TRANSCODER_OUT}) from the activation cache"
        in errors[directory / "missing.yaml"]
    )
    narrow_error = errors[directory / "narrow.yaml"]
    assert f"dictionaries.transcoder.sae.d_out: 512 does not match the width of {TRANSCODER_OUT!r}" in narrow_error
    assert str(item_file) in errors[item_file]
    assert "sae.hook_point_out: hook point 'blocks.4.hook_mlp_out' is not one of" in errors[item_file]
    graph = defs.resolve_asset_graph()
    assert {key.path[0] for key in graph.get_all_asset_keys()} == {"good"}
    with dg.instance_for_test() as instance:
        assert register_items(defs, "good", instance) == ["ln2", "topk", "transcoder"]
        logits = graph.assets_def_for_key(dg.AssetKey(["good", "logit_attributions"]))
        run = dg.materialize([logits], partition_key="ln2", instance=instance)  # nothing trained: skipped first
    assert run.success and not run.get_asset_materialization_events()
    (observation,) = [e.asset_observation_data.asset_observation for e in run.get_asset_observation_events()]
    why = observation.metadata["skipped"].value
    assert f"{TRANSCODER_IN} -> {ln2_out}" in why and "not a residual-stream hook" in why


@dataclass
class SmallRun:
    """The small pipeline materialised through its analyses on one instance, shared by the slow tests below."""

    defs: dg.Definitions
    instance: dg.DagsterInstance
    directory: Path
    home: Path
    activations: dg.ExecuteInProcessResult
    items: dict[str, dg.ExecuteInProcessResult]
    """Each item's evaluation."""
    analyses: dg.ExecuteInProcessResult
    dictionaries: dg.ExecuteInProcessResult | None = None
    """Every item's dictionary, trained in one run."""
    transcoder: dg.ExecuteInProcessResult | None = None
    """feature_analyses and logit_attributions of the transcoder item."""

    def assets(self, *names: str) -> list[dg.AssetsDefinition]:
        graph = self.defs.resolve_asset_graph()
        return [graph.assets_def_for_key(dg.AssetKey(["small", name])) for name in names]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Iterator[SmallRun]:
    tmp_path = tmp_path_factory.mktemp("small_run")
    pipeline = small_run_pipeline()
    # One feature, short prompts: a real local LLM on 2 CPU cores answers slowly (see test_autointerp).
    pipeline["interpretation"] = {"max_features": 1, "auto_interp": {
        "n_activating_examples": 3, "n_non_activating_examples": 4, "max_length": 16, "include_cot": False,
        "detection_n_examples": 2, "fuzzing_n_correct": 2, "fuzzing_n_incorrect": 1, "max_tokens_explanation": 64,
        "max_tokens_scoring": 32, "max_concurrent_requests": 1, "request_timeout_s": 120}}  # fmt: skip
    directory = write_pipelines(tmp_path / "pipelines", small=pipeline)
    defs, errors = build_definitions(directory, tmp_path / "home")
    assert errors == {}
    with dg.instance_for_test() as instance, pytest.MonkeyPatch.context() as env:
        for variable in (LLM_BASE_URL_ENV, "OPENAI_API_KEY"):
            env.delenv(variable, raising=False)  # no LLM endpoint: interpretations are skipped
        run = SmallRun(defs, instance, directory, tmp_path / "home", None, {}, None)
        assert register_items(defs, "small", instance) == ["batchtopk", "topk", "transcoder"]  # as `make quickstart`
        observe(run.assets("item_config"), instance=instance)
        assert dg.materialize(run.assets("corpus", "tokens"), instance=instance).success
        # Both hooks in one run (what a UI backfill does under the single-run backfill policy): one forward pass.
        every_hook = {RANGE_START: CACHED_HOOKS[0], RANGE_END: CACHED_HOOKS[-1]}
        run.activations = dg.materialize(run.assets("activations"), instance=instance, tags=every_hook)
        # Every item in one run (what a UI backfill or `make quickstart` does): the two SAEs share layer 3's stream
        # and train as one sweep; the transcoder reads other hooks and trains from its own stream.
        every_item = {RANGE_START: "batchtopk", RANGE_END: "transcoder"}
        run.dictionaries = dg.materialize(run.assets("dictionary"), instance=instance, tags=every_item)
        for item in ("topk", "batchtopk", "transcoder"):
            run.items[item] = dg.materialize(run.assets("evaluation"), partition_key=item, instance=instance)
        run.analyses = dg.materialize(
            run.assets("feature_analyses", "logit_attributions", "interpretations"), partition_key="topk",
            instance=instance,
        )  # fmt: skip
        run.transcoder = dg.materialize(
            run.assets("feature_analyses", "logit_attributions"), partition_key="transcoder", instance=instance
        )
        yield run
    shutil.rmtree(tmp_path / "home", ignore_errors=True)


@pytest.mark.slow
def test_small_pipeline_end_to_end_idempotent_with_automation_and_schedule(small_run):
    defs, instance, directory, tmp_path = small_run.defs, small_run.instance, small_run.directory, small_run.home.parent
    selected = small_run.assets
    key = lambda name: dg.AssetKey(["small", name])  # noqa: E731
    assert small_run.activations.success
    assert {c.passed for c in small_run.activations.get_asset_check_evaluations()} == {True}
    (cached,) = small_run.activations.get_asset_materialization_events()[:1]
    assert sorted(e.partition for e in small_run.activations.get_asset_materialization_events()) == sorted(CACHED_HOOKS)
    assert cached.materialization.metadata["hook_points"].value == ", ".join(CACHED_HOOKS)
    assert small_run.activations.get_step_success_events()[0].step_key == "small__activations"  # one step
    assert cached.materialization.metadata["n_tokens"].value == 64 * 48
    # One run trained every item: one step, two streams (the SAE pair as a sweep, the transcoder alone), metadata
    # per partition, one data version for the range (Dagster's rule for a run over several partitions).
    trained = small_run.dictionaries
    assert trained.success and [e.step_key for e in trained.get_step_success_events()] == ["small__dictionary"]
    dictionaries = {e.partition: e.materialization for e in trained.get_asset_materialization_events()}
    assert sorted(dictionaries) == ["batchtopk", "topk", "transcoder"]
    assert len({m.tags["dagster/data_version"] for m in dictionaries.values()}) == 1
    for item, materialization in dictionaries.items():
        metadata = {k: v.value for k, v in materialization.metadata.items()}
        assert metadata["steps"] == 48 and metadata["reused"] is False and metadata["n_streams"] == 2, metadata
        assert metadata["shared_stream_with"] == (0 if item == "transcoder" else 1)
        assert Path(metadata["path"], "sae_weights.safetensors").is_file()
        assert len(metadata["weights_sha256"]) == 64
    assert dictionaries["topk"].metadata["d_sae"].value == 1152
    # Each item trained as its own settings say (a training-mode BatchTopK keeps k per token on average, like TopK,
    # so the L0s alike cannot tell them apart; the saved configs and weights can).
    for item in ("topk", "batchtopk"):
        saved = json.loads(Path(dictionaries[item].metadata["path"].value, "config.json").read_text())
        assert saved["act_fn"] == item
    assert dictionaries["topk"].metadata["weights_sha256"] != dictionaries["batchtopk"].metadata["weights_sha256"]
    for item, run in small_run.items.items():
        # The evaluation ran in a Pipes child, which read the settings file the launcher wrote next to its output.
        workdir = small_run.home / "pipelines" / "small" / "evaluation" / item
        written = EvaluateSAESettings.model_validate_json((workdir / "evaluate.pipes-settings.json").read_text())
        assert written.output_path == str(workdir / "evaluation.json") and written.sae_name == item
        assert any("[pipes] external process successfully opened dagster pipes" in str(record.user_message)
                   for record in instance.all_logs(run.run_id))  # fmt: skip
        if item == "transcoder":
            continue  # test_a_transcoder_item_trains_evaluates_and_is_analysed
        assert run.success
        evaluation = run.get_asset_materialization_events()[0].materialization.metadata
        assert 0.5 < evaluation["explained_variance"].value <= 1.0
        assert "ce_loss_recovered" in evaluation
        assert {c.check_name: c.passed for c in run.get_asset_check_evaluations()} == {
            "explained_variance_above_min": True, "dead_fraction_below_max": True, "l0_within_bounds": True
        }  # fmt: skip

    # Analyses, logit attributions and (skipped, no endpoint) interpretations of one dictionary.
    run = small_run.analyses
    assert run.success
    events = {e.asset_key.path[-1]: e.materialization.metadata for e in run.get_asset_materialization_events()}
    assert set(events) == {"feature_analyses", "logit_attributions"}
    analyses, logits = events["feature_analyses"], events["logit_attributions"]
    assert analyses["n_features"].value == 1152 and analyses["analysed_fraction"].value == 1.0
    assert 2800 < analyses["analysed_tokens"].value <= 64 * 48  # every cached window, BOS positions excluded
    assert 0.5 < analyses["alive_fraction"].value <= 1.0 and analyses["tokens_per_second"].value > 0
    assert analyses["preview"].value.count("#### Feature") == 3 and "**" in analyses["preview"].value
    assert [(c.check_name, c.passed) for c in run.get_asset_check_evaluations()] == [("features_analysed", True)]
    assert logits["n_features"].value == 1152 and "promotes:" in logits["preview"].value
    skipped = [e.asset_observation_data.asset_observation for e in run.get_asset_observation_events()]
    assert [o.asset_key.path[-1] for o in skipped] == ["interpretations"]
    assert "no LLM endpoint configured" in skipped[0].metadata["skipped"].value
    with open_store(RecordStoreConfig(sqlite_path=str(small_run.home / "pipelines/small/records.sqlite"))) as store:
        assert store.count_features_with_analysis("topk", "small") == 1152
        evaluated = small_run.items["topk"].get_asset_materialization_events()[0].materialization.metadata
        recorded = store.get_dictionary("topk", "small").metrics  # for `lm-saes list`
        assert recorded["metrics/explained_variance"] == evaluated["explained_variance"].value
        feature = store.get_feature("topk", "small", 0)
        assert feature.logits is not None and len(feature.logits.top_positive) == 10

    # Unchanged inputs: one item alone finds the sweep's run finished (its settings are the single run's) and reports
    # its weights' hash as the data version; the same range again trains nothing and keeps the range's version.
    again = dg.materialize(selected("dictionary"), partition_key="topk", instance=instance)
    materialization = again.get_asset_materialization_events()[0].materialization
    assert materialization.metadata["reused"].value is True
    assert materialization.tags["dagster/data_version"] == dictionaries["topk"].metadata["weights_sha256"].value
    both = dg.materialize(selected("dictionary"), instance=instance, tags={RANGE_START: "batchtopk", RANGE_END: "topk"})
    repeated = {e.partition: e.materialization for e in both.get_asset_materialization_events()}
    assert {item: m.metadata["reused"].value for item, m in repeated.items()} == {"batchtopk": True, "topk": True}
    assert repeated["topk"].metadata["weights_sha256"] == dictionaries["topk"].metadata["weights_sha256"]
    reused = dg.materialize(selected("evaluation", "feature_analyses", "logit_attributions"), partition_key="topk",
                            instance=instance)  # fmt: skip
    assert all(e.materialization.metadata["reused"].value is True for e in reused.get_asset_materialization_events())

    # The schedule asks for one re-analysis per materialised dictionary partition.
    schedule = defs.resolve_schedule_def("small_weekly_reanalysis")
    context = dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=datetime(2026, 11, 30, 3, tzinfo=UTC),
        repository_def=defs.get_repository_def(),
    )
    requests = list(schedule.evaluate_tick(context).run_requests)
    assert sorted(r.partition_key for r in requests) == ["batchtopk", "topk", "transcoder"]

    # Bounds the dictionary fails: the evaluation's blocking check fails, and the analysis refuses to run.
    strict = small_run_pipeline()
    strict["quality"]["min_explained_variance"] = 0.999
    strict_defs = build_definitions(write_pipelines(tmp_path / "strict", small=strict), tmp_path / "home")[0]
    strict_graph = strict_defs.resolve_asset_graph()
    strict_assets = lambda *names: [strict_graph.assets_def_for_key(key(n)) for n in names]  # noqa: E731
    failed = dg.materialize(strict_assets("evaluation"), partition_key="batchtopk", instance=instance,
                            raise_on_error=False)  # fmt: skip
    assert not failed.success
    verdicts = {c.check_name: c.passed for c in failed.get_asset_check_evaluations()}
    assert verdicts["explained_variance_above_min"] is False
    blocked = dg.materialize(strict_assets("feature_analyses"), partition_key="batchtopk", instance=instance,
                             raise_on_error=False)  # fmt: skip
    assert not blocked.success and not blocked.get_asset_materialization_events()
    failure = blocked.get_step_failure_events()[0].step_failure_data.error.message
    assert "fails the pipeline's quality bounds: explained_variance_above_min" in failure

    # New item files (a sweep dropped in): the sensor registers them and, their hook's activations being cached, asks
    # for one run over their range, in which they train together from one stream.
    (directory / "small.d").mkdir()
    extra = small_pipeline(training_tokens=512 * 8)["dictionaries"]["topk"]
    (directory / "small.d" / "extra.yaml").write_text(yaml.safe_dump(extra))
    (directory / "small.d" / "extra-k8.yaml").write_text(yaml.safe_dump({**extra, "sae": {**extra["sae"], "top_k": 8}}))
    tick = defs.resolve_sensor_def("small_dictionary_items")(
        dg.build_sensor_context(instance=instance, repository_def=defs.get_repository_def())
    )
    (added,) = [list(r.partition_keys) for r in tick.dynamic_partitions_requests]
    assert sorted(added) == ["extra", "extra-k8"]
    (request,) = tick.run_requests
    assert (request.partition_key_range.start, request.partition_key_range.end) == (added[0], added[-1])
    instance.add_dynamic_partitions("small_dictionaries", added)
    trained = dg.materialize(selected("dictionary"), instance=instance, tags=request.tags)  # defs of before
    events = {e.partition: e.materialization.metadata for e in trained.get_asset_materialization_events()}
    assert {item: (m["steps"].value, m["shared_stream_with"].value) for item, m in events.items()} == {
        "extra": (8, 1), "extra-k8": (8, 1)
    }  # fmt: skip
    assert events["extra-k8"]["l0"].value <= 8 < events["extra"]["l0"].value

    # Editing one item's settings makes only that item's dictionary stale.
    changed = small_run_pipeline()
    changed["dictionaries"]["topk"]["trainer"]["lr"] = 1e-3
    new_graph = build_definitions(write_pipelines(directory, small=changed), tmp_path / "home")[0].resolve_asset_graph()
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
        register_items(defs, "small", instance)
        before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert before.total_requested == 0
        instance.report_runless_asset_event(dg.AssetMaterialization(asset_key=key("dictionary"), partition="topk"))
        evaluated = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
        assert evaluated.get_requested_partitions(key("evaluation")) == {"topk"}
        assert evaluated.total_requested == 1  # the analyses wait for the evaluation and its checks


@pytest.mark.slow
def test_a_transcoder_item_trains_evaluates_and_is_analysed(small_run):
    """The transcoder (layer 3: mlp_in -> mlp_out) trains on pairs from the shared cache, is evaluated on held-out
    text spliced in at hook_mlp_out, and its features are analysed on the tokens of hook_mlp_in."""
    run = small_run.items["transcoder"]
    assert run.success
    (dictionary,) = [
        e.materialization.metadata
        for e in small_run.dictionaries.get_asset_materialization_events()
        if e.partition == "transcoder"
    ]
    evaluation = run.get_asset_materialization_events()[0].materialization.metadata
    assert dictionary["hook_point"].value == f"{TRANSCODER_IN} -> {TRANSCODER_OUT}"
    assert dictionary["transcoder"].value is True and dictionary["hook_point_out"].value == TRANSCODER_OUT
    assert dictionary["steps"].value == 48
    assert 0.1 < evaluation["explained_variance"].value <= 1.0, evaluation
    assert 1 <= evaluation["l0"].value <= 16  # TopK 16
    # Spliced in for the MLP's output, it keeps most of what ablating the MLP's output loses (measured: 0.78).
    assert 0.5 < evaluation["ce_loss_recovered"].value <= 1.0 and evaluation["kl_div_spliced"].value < 0.5
    assert {c.check_name: c.passed for c in run.get_asset_check_evaluations()} == {
        "explained_variance_above_min": True, "dead_fraction_below_max": True, "l0_within_bounds": True
    }  # fmt: skip

    analysed = small_run.transcoder
    assert analysed.success
    events = {e.asset_key.path[-1]: e.materialization.metadata for e in analysed.get_asset_materialization_events()}
    analyses, logits = events["feature_analyses"], events["logit_attributions"]  # hook_mlp_out writes the residual
    assert analyses["n_features"].value == 1152 and analyses["analysed_fraction"].value == 1.0
    assert 2800 < analyses["analysed_tokens"].value <= 64 * 48
    assert logits["n_features"].value == 1152 and "promotes:" in logits["preview"].value
    with open_store(RecordStoreConfig(sqlite_path=str(small_run.home / "pipelines/small/records.sqlite"))) as store:
        record = store.get_dictionary("transcoder", "small")
        assert (record.cfg["hook_point_in"], record.cfg["hook_point_out"]) == (TRANSCODER_IN, TRANSCODER_OUT)
        features = list(store.iter_features("transcoder", "small", with_samples=False))
    # TopK keeps at most 16 features per token: the analysed activation counts add up to the analysed tokens' L0.
    tokens = features[0].analyses[0].n_analyzed_tokens
    per_token = sum(feature.analyses[0].act_times for feature in features) / tokens
    assert tokens == analyses["analysed_tokens"].value and 8 < per_token <= 16


@pytest.mark.slow
def test_interpretations_through_a_real_local_llm(small_run, llm_server, monkeypatch):  # noqa: F811
    monkeypatch.setenv(LLM_BASE_URL_ENV, llm_server.base_url)
    monkeypatch.setenv(LLM_MODEL_ENV, "smollm2-135m-instruct")
    before = llm_server.chat_requests()
    run = dg.materialize(small_run.assets("interpretations"), partition_key="topk", instance=small_run.instance)
    assert run.success and not run.get_asset_observation_events()
    metadata = run.get_asset_materialization_events()[0].materialization.metadata
    stored = json.loads(Path(metadata["path"].value).read_text())
    assert metadata["interpreted"].value + metadata["failed"].value == 1, stored  # max_features: the most active
    assert metadata["llm"].value == "smollm2-135m-instruct" and metadata["endpoint"].value == llm_server.base_url
    deadline = time.monotonic() + 10  # the access log line may trail the response
    while llm_server.chat_requests() < before + metadata["requests"].value and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llm_server.chat_requests() - before == metadata["requests"].value >= 1, stored  # answered by the server
    (index,) = stored
    preview = metadata["preview"].value
    assert f"#### Feature {index}" in preview
    if stored[index]["explanation"] is not None:  # a tiny model: assert the pipeline, not its wisdom
        assert metadata["interpreted"].value == 1 and "balanced accuracy:" in preview
    else:
        assert "interpretation failed" in preview


@pytest.mark.slow
def test_materialisations_link_the_training_curves_the_density_and_the_browser_page(small_run):
    """The pictures are real, well-formed SVG files drawn from the run's numbers."""
    import xml.etree.ElementTree as ET

    from lm_saes_core.training.run_log import read_training_log

    metadata = small_run.items["topk"].asset_materializations_for_node("small__evaluation")[0].metadata
    svg = "{http://www.w3.org/2000/svg}"
    curves = ET.parse(metadata["training_curves"].value).getroot()
    lines = curves.findall(f"{svg}polyline")
    assert len(lines) == 4  # loss, EV, L0, silent fraction
    logged = read_training_log(Path(metadata["training_curves"].value).parent)
    assert [len(line.get("points").split()) for line in lines] == [len(logged)] * 4 and len(logged) >= 2
    density = ET.parse(metadata["feature_density"].value).getroot()
    bars = [int(bar.find(f"{svg}title").text.rsplit(" ", 1)[1]) for bar in density.iter(f"{svg}rect")
            if "bar" in (bar.get("class") or "")]  # fmt: skip
    evaluated = json.loads((Path(metadata["path"].value)).read_text())["frequency_histogram"]
    assert bars == [evaluated["n_dead"], *evaluated["counts"]] and sum(bars) == 576 * 2
    assert metadata["browser"].value == "http://127.0.0.1:8000/dictionaries/topk?series=small"
    assert "| explained_variance |" in metadata["summary"].value
    assert metadata["training_curves"].value in metadata["summary"].value
