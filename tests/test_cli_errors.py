"""User errors through the CLI: one red message naming the field, value or file, exit status 2, no traceback; the
checks that the model's config can answer (hook names, widths, context length) fail before its weights load (the
"loading the weights" log line never appears); `--debug` and `LM_SAES_DEBUG=1` show the traceback; a bug keeps it."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from typer.testing import CliRunner

from lm_saes_core.analysis.autointerp.local_server import free_port
from lm_saes_core.backend import UnknownHookPointError
from lm_saes_core.cli import _Commands, app
from lm_saes_core.models import SAEConfig, SparseAutoEncoder
from lm_saes_core.store import DictionaryRecord, FeatureAnalysis, FeatureSamples, RecordStoreConfig, open_store

HOOK = "blocks.6.hook_resid_post"
LOADING = "loading the weights of model"  # logged by backend.load_model
LM_SAES = Path(sys.executable).with_name("lm-saes")


def invoke(*args: str, **env: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1", **env})


def assert_clean(result, message: str) -> None:
    """Exit status 2, the message on stderr, no traceback, and the model's weights were never loaded."""
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    assert LOADING not in result.output


def write(tmp_path: Path, name: str, settings: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def generate_settings(tmp_path: Path, **changes) -> dict:
    return {
        "model": {"model_name": "smollm2-135m"},
        "dataset": {"dataset_name_or_path": "python-docs", "split": "train[:2]"},
        "hook_points": [HOOK],
        "output_dir": str(tmp_path / "activations"),
        "batch_size": 4,
        "context_size": 32,
        "total_tokens": 128,
        **changes,
    }


def train_settings(tmp_path: Path, sae: dict, **trainer) -> dict:
    return {
        "sae": {"sae_type": "sae", "d_model": 576, "d_sae": 1152, "hook_point_in": HOOK, "hook_point_out": HOOK, **sae},
        "sae_name": "errors",
        "model": {"model_name": "smollm2-135m"},
        "datasets": {"docs": {"dataset_name_or_path": "python-docs", "split": "train[:4]"}},
        "activation_factory": {
            "sources": [{"type": "dataset", "name": "docs"}],
            "target": "activations-1d",
            "hook_points": [HOOK],
            "context_size": 64,
            "batch_size": 64,
        },
        "trainer": {"total_training_tokens": 256, "exp_result_path": str(tmp_path / "sae"), **trainer},
    }


# The four observed cases: each was a traceback, the last two after the language model had loaded -----------------
def test_a_misspelt_hook_is_named_before_the_model_loads(tmp_path, smollm2_dir):
    config = write(tmp_path, "generate.yaml", generate_settings(tmp_path, hook_points=["blocks.6.hook_resid_pots"]))
    assert_clean(
        invoke("generate", config),
        "model 'smollm2-135m' has no hook point 'blocks.6.hook_resid_pots'; closest valid names: "
        "blocks.6.hook_resid_post",
    )
    assert not (tmp_path / "activations").exists()


def test_a_context_longer_than_the_model_admits_is_refused_before_it_loads(tmp_path, smollm2_dir):
    config = write(tmp_path, "generate.yaml", generate_settings(tmp_path, context_size=16384, total_tokens=16384))
    assert_clean(
        invoke("generate", config), "context_size 16384 exceeds the maximum context of model 'smollm2-135m' (8192)"
    )


def test_a_missing_dataset_file_is_named(tmp_path, smollm2_dir):
    missing = tmp_path / "no-such-corpus.jsonl"
    settings = generate_settings(tmp_path, dataset={"dataset_name_or_path": str(missing)})
    config = write(tmp_path, "generate.yaml", settings)
    assert_clean(invoke("generate", config), f"dataset file or directory not found: {missing}")


def test_a_width_other_than_the_models_is_refused_before_it_loads(tmp_path, smollm2_dir):
    config = write(tmp_path, "train.yaml", train_settings(tmp_path, {"d_model": 512, "act_fn": "topk", "top_k": 8}))
    assert_clean(invoke("train", config), f"sae.d_model is 512 but the activations at '{HOOK}' have width 576")
    assert not (tmp_path / "sae").exists()


@pytest.mark.parametrize("act_fn", ["jumprelu", "relu"])
def test_a_dictionary_that_needs_a_sparsity_penalty_without_one_is_invalid_settings(tmp_path, act_fn):
    config = write(tmp_path, "train.yaml", train_settings(tmp_path, {"act_fn": act_fn}))
    assert_clean(
        invoke("train", config),
        f"field 'trainer.loss.sparsity_loss_type': sae.act_fn '{act_fn}' is sparse only under a sparsity penalty",
    )


def test_other_loss_settings_that_do_not_suit_the_dictionary_fail_before_the_model_loads(tmp_path, smollm2_dir):
    settings = train_settings(tmp_path, {"act_fn": "topk", "top_k": 8}, loss={"sparsity_loss_type": "l0"})
    assert_clean(
        invoke("train", write(tmp_path, "train.yaml", settings)),
        "trainer.loss: sparsity_loss_type 'l0' is for act_fn 'jumprelu', not 'topk'",
    )


def test_a_settings_error_names_the_field_and_its_value_not_the_whole_file(tmp_path):
    config = write(tmp_path, "train.yaml", train_settings(tmp_path, {"act_fn": "topk", "top_k": 8}))
    result = invoke("train", config, "--set", "model_parallel_size=5")
    assert_clean(result, "field 'model_parallel_size': sae.d_sae=1152 does not split into 5 equal feature shards")
    assert "(got 5)" in result.stderr and "python-docs" not in result.stderr


# Stores and endpoints ---------------------------------------------------------------------------------------------
def test_analyze_with_an_unreachable_mongodb_is_one_line_without_the_password(tmp_path):
    sae = SAEConfig(d_model=576, d_sae=16, hook_point_in=HOOK, hook_point_out=HOOK, act_fn="topk", top_k=4)
    sae_dir = SparseAutoEncoder.from_config(sae).save_pretrained(tmp_path / "sae")
    port = free_port()
    uri = f"mongodb://reader:s3cret@127.0.0.1:{port}/"
    settings = {
        "sae": {"pretrained_name_or_path": str(sae_dir)},
        "sae_name": "errors",
        "model": {"model_name": "smollm2-135m"},
        "datasets": {"docs": {"dataset_name_or_path": "python-docs", "split": "train[:2]"}},
        "activation_factory": {
            "sources": [{"type": "dataset", "name": "docs"}],
            "target": "activations-2d",
            "hook_points": [HOOK],
            "batch_size": 4,
        },
        "analyzer": {"total_analyzing_tokens": 1024},
        "store": {"mongo": {"mongo_uri": uri}},
    }
    result = invoke("analyze", write(tmp_path, "analyze.yaml", settings))
    assert_clean(result, f"MongoDB at mongodb://reader:***@127.0.0.1:{port}/ is unavailable")
    assert "s3cret" not in result.output


def toy_analysis(tokens: np.ndarray) -> FeatureAnalysis:
    """A feature active on the middle token of each of its contexts."""
    activations = np.zeros(tokens.shape, np.float32)
    activations[:, tokens.shape[1] // 2] = 1.0
    samples = FeatureSamples(
        name="top_activations",
        tokens=tokens,
        activations=activations,
        lengths=np.full(len(tokens), tokens.shape[1], np.int32),
        doc_index=np.arange(len(tokens), dtype=np.int64),
        doc_position=np.zeros(len(tokens), np.int64),
        dataset=["python-docs"] * len(tokens),
    )
    return FeatureAnalysis(
        name="default",
        act_times=len(tokens),
        n_analyzed_tokens=tokens.size,
        max_feature_acts=1.0,
        mean_feature_acts=1.0,
        histogram_edges=np.linspace(0, 1, 3, dtype=np.float32),
        histogram_counts=np.array([0, len(tokens)], np.int64),
        samples=[samples],
    )


def test_autointerp_against_a_refused_endpoint_stops_after_three_alike_failures(tmp_path, smollm2_dir):
    store = RecordStoreConfig(sqlite_path=str(tmp_path / "records.sqlite"))
    rng = np.random.default_rng(0)
    with open_store(store) as records:
        records.add_dictionary(DictionaryRecord("toy", "default", str(tmp_path / "sae"), {"d_sae": 5}, "smollm2-135m"))
        analyses = [toy_analysis(rng.integers(300, 5000, (6, 12))) for _ in range(5)]
        records.add_feature_analyses("toy", "default", analyses)
    endpoint = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connections are refused
    settings = {
        "sae_name": "toy",
        "model": {"model_name": "smollm2-135m"},
        "auto_interp": {"base_url": endpoint, "max_retries": 1, "retry_backoff_s": 0.01, "max_concurrent_requests": 1},
        "store": store.model_dump(mode="json"),
    }
    result = invoke("autointerp", write(tmp_path, "autointerp.yaml", settings))
    assert_clean(result, "auto-interp of 'toy': stopped after 3 features in a row failed with the same error")
    assert f"request to {endpoint} (model 'gpt-4o-mini') failed after 2 attempt(s): APIConnectionError" in " ".join(
        result.stderr.split()
    )
    with open_store(store) as records:
        interpretations = [records.get_feature("toy", "default", index).interpretation for index in range(5)]
    assert [interpretation is not None for interpretation in interpretations] == [True, True, True, False, False]
    assert all("APIConnectionError" in interpretation.error for interpretation in interpretations[:3])


# The mechanism: --debug, LM_SAES_DEBUG, bugs, a real process --------------------------------------------------
def test_debug_shows_the_user_errors_traceback(tmp_path, smollm2_dir):
    config = write(tmp_path, "generate.yaml", generate_settings(tmp_path, hook_points=["blocks.6.hook_resid_pots"]))
    for result in (invoke("--debug", "generate", config), invoke("generate", config, LM_SAES_DEBUG="1")):
        assert isinstance(result.exception, UnknownHookPointError) and result.exit_code == 1


def test_a_bug_keeps_its_traceback():
    commands = typer.Typer(cls=_Commands)

    @commands.command()
    def divide() -> None:
        print(1 / 0)

    @commands.command()
    def read() -> None:
        Path("/no/such/file").read_text()  # an OSError: the file's fault, not the code's

    divided = CliRunner().invoke(commands, ["divide"])
    assert isinstance(divided.exception, ZeroDivisionError) and divided.exit_code == 1
    missing = CliRunner().invoke(commands, ["read"])
    assert missing.exit_code == 2 and "No such file or directory: '/no/such/file'" in missing.stderr


def test_a_real_process_prints_one_red_line_and_exits_2_or_the_traceback_with_debug(tmp_path):
    config = write(tmp_path, "train.yaml", train_settings(tmp_path, {"act_fn": "jumprelu"}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    plain = subprocess.run([LM_SAES, "train", config], capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.splitlines()[0] == f"invalid settings in {config}:" and "Traceback" not in plain.stderr
    debug = subprocess.run([LM_SAES, "--debug", "train", config], capture_output=True, text=True, env=env, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "lm_saes_core.config.ConfigError: invalid settings in" in debug.stderr


def test_the_checks_pass_and_the_model_loads_when_the_settings_are_right(tmp_path, tiny_llama_dir):
    """The other tests' proof that nothing loaded is the missing log line: here it is, on a run that goes through."""
    tiny = {"model_name": str(tiny_llama_dir)}  # 3 layers of width 64
    settings = generate_settings(tmp_path, model=tiny, hook_points=["blocks.1.hook_resid_post"])
    result = invoke("generate", write(tmp_path, "generate.yaml", settings))
    assert result.exit_code == 0, result.output
    assert LOADING in result.output and "activations:" in result.stdout
    wrong = generate_settings(tmp_path / "wrong", model=tiny)
    assert_clean(invoke("generate", write(tmp_path, "wrong.yaml", wrong)), f"has no hook point '{HOOK}'")
