"""Secrets given through the environment never leave it: sentinel values of an LLM API key, a rejected API key, a
MongoDB password and a W&B API key are planted in the environment of real `lm-saes` runs (auto-interp against the
real local LLM server, which demands the key; auto-interp with a key it rejects; a store at an unreachable MongoDB;
a training run logging to W&B offline), then every byte they wrote (output directories, settings dumps, the record
store, the W&B run directory, stdout and stderr, error messages and tracebacks) is searched for them."""

import json
import os
import subprocess
import sys
import threading
import traceback
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_autointerp import analysis_of, contexts, tokenizer  # noqa: F401 - module-scoped fixtures

from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.analysis.autointerp.local_server import LocalServerUnavailableError, free_port, start_local_server
from lm_saes_core.backend import LanguageModelConfig
from lm_saes_core.config import ConfigError, MongoDBConfig
from lm_saes_core.runners.autointerp import AutoInterpSettings, RepeatedFailureError, auto_interp
from lm_saes_core.store import DictionaryRecord, RecordStoreConfig, StoreUnavailableError, open_store

HOOK = "blocks.3.hook_resid_post"
PASSWORD_ENV = "LM_SAES_TEST_MONGO_PASSWORD"


def sentinels() -> dict[str, str]:
    tag = uuid.uuid4().hex
    return {
        "OPENAI_API_KEY": f"sk-sentinel-{tag}",
        "LM_SAES_TEST_REJECTED_KEY": f"sk-rejected-{tag}",
        PASSWORD_ENV: f"pw/sentinel@{tag}:x",  # characters a URI must quote
        "WANDB_API_KEY": tag[:8] + "sentinel" + tag[:24],  # 40 characters, like a real one
    }


def forms(secret: str) -> set[str]:
    """The ways a secret could be written out: as is, or quoted for a URL."""
    return {secret, urllib.parse.quote_plus(secret), urllib.parse.quote(secret, safe="")}


def leaks(secrets: dict[str, str], outputs: dict[str, bytes]) -> list[str]:
    return [
        f"{variable} in {where}"
        for where, data in outputs.items()
        for variable, secret in secrets.items()
        if any(form.encode() in data for form in forms(secret))
    ]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in root.rglob("*") if path.is_file() and not path.is_symlink()}


def lm_saes(*args: str, env: dict[str, str], cwd: Path, timeout_s: float = 240) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "lm-saes"), *args]
    return subprocess.run(command, capture_output=True, env=env, cwd=cwd, timeout=timeout_s)


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def two_features(tokenizer, contexts) -> list:  # noqa: F811 - fixtures imported above
    """Features firing on " the" and on " of"."""
    tokens, lengths = contexts[0], contexts[1]
    pieces = {int(token): tokenizer.decode([int(token)]).strip().lower() for token in np.unique(tokens)}
    valid = (np.arange(tokens.shape[1])[None, :] > 0) & (np.arange(tokens.shape[1])[None, :] < lengths[:, None])
    analyses = []
    for word in ("the", "of"):
        fires = np.vectorize(lambda token, word=word: pieces[int(token)] == word)(tokens) & valid
        analyses.append(analysis_of(contexts, np.where(fires, 0.8, 0).astype(np.float32)))
    return analyses


def test_secrets_from_the_environment_appear_in_no_output_of_a_run(tmp_path: Path, two_features: list):
    secrets = sentinels()
    env = os.environ | secrets | {"LM_SAES_HOME": str(tmp_path / "home"), "TQDM_DISABLE": "1", "COLUMNS": "200"}
    env |= {"WANDB_MODE": "offline", "WANDB_SILENT": "false"}
    try:  # the server answers only requests that carry the sentinel key
        server = start_local_server(tmp_path / "server.log", n_ctx=1024, n_threads=1, api_key=secrets["OPENAI_API_KEY"])
    except LocalServerUnavailableError as error:
        pytest.skip(f"local LLM server unavailable: {error}")
    outputs: dict[str, bytes] = {}

    store_path = tmp_path / "records.sqlite"
    with open_store(RecordStoreConfig(sqlite_path=str(store_path))) as store:
        for name in ("words", "words-rejected"):
            store.add_dictionary(DictionaryRecord(name, "default", str(tmp_path), {"d_sae": 2}, "smollm2-135m"))
            store.add_feature_analyses(name, "default", two_features)
    interp = {
        "base_url": server.base_url,
        "model": "smollm2-135m-instruct",
        "scorers": [],
        "n_activating_examples": 3,
        "max_length": 12,
        "include_cot": False,
        "max_tokens_explanation": 32,
        "max_concurrent_requests": 1,
        "max_retries": 0,
    }
    autointerp = {
        "sae_name": "words",
        "model": {"model_name": "smollm2-135m"},
        "auto_interp": interp,
        "store": {"sqlite_path": str(store_path)},
    }
    train = {
        "sae": {
            "sae_type": "sae",
            "d_model": 576,
            "d_sae": 1152,
            "hook_point_in": HOOK,
            "hook_point_out": HOOK,
            "act_fn": "topk",
            "top_k": 16,
        },
        "sae_name": "secret-free",
        "model": {"model_name": "smollm2-135m"},
        "datasets": {"docs": {"dataset_name_or_path": "python-docs", "split": "train[:4]"}},
        "activation_factory": {
            "sources": [{"type": "dataset", "name": "docs"}],
            "target": "activations-1d",
            "hook_points": [HOOK],
            "context_size": 64,
            "batch_size": 64,
        },
        "trainer": {
            "total_training_tokens": 256,
            "log_frequency": 2,
            "checkpoint_every_steps": 2,
            "exp_result_path": str(tmp_path / "sae"),
        },
        "wandb": {"wandb_project": "secrets", "wandb_mode": "offline", "wandb_dir": str(tmp_path / "wandb-runs")},
    }
    (tmp_path / "wandb-runs").mkdir()
    # Training runs beside the auto-interp runs (it never talks to the LLM server).
    training = subprocess.Popen(
        [str(Path(sys.executable).parent / "lm-saes"), "train", str(write_yaml(tmp_path / "train.yaml", train))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    try:
        # 1. The key is sent (the server would refuse the requests otherwise), and stored nowhere.
        run = lm_saes("autointerp", str(write_yaml(tmp_path / "interp.yaml", autointerp)), env=env, cwd=tmp_path)
        outputs |= {"autointerp stdout": run.stdout, "autointerp stderr": run.stderr}
        assert run.returncode == 0, run.stderr.decode()
        assert b"interpreted" in run.stdout and b"2 requests" in run.stdout, run.stdout.decode()

        # 2. A key the server rejects: every feature fails with HTTP 401, and the run ends with that error.
        rejected = autointerp | {
            "sae_name": "words-rejected",
            "auto_interp": interp | {"api_key_env": "LM_SAES_TEST_REJECTED_KEY"},
        }
        config = write_yaml(tmp_path / "interp-rejected.yaml", rejected)
        run = lm_saes("--debug", "autointerp", str(config), env=env, cwd=tmp_path)  # with the traceback
        outputs |= {"rejected stdout": run.stdout, "rejected stderr": run.stderr}
        assert run.returncode != 0 and b"HTTP 401" in run.stderr and b"RepeatedFailureError" in run.stderr
    finally:
        server.stop()

    # 3. A MongoDB store whose password comes from the environment, at an address where no server answers.
    mongo = {"mongo_uri": f"mongodb://lm_saes@127.0.0.1:{free_port()}/", "mongo_password_env": PASSWORD_ENV}
    config = write_yaml(tmp_path / "interp-mongo.yaml", autointerp | {"store": {"mongo": mongo}})
    run = lm_saes("--debug", "autointerp", str(config), env=env, cwd=tmp_path)
    outputs |= {"mongo stdout": run.stdout, "mongo stderr": run.stderr}
    assert run.returncode != 0 and b"StoreUnavailableError" in run.stderr, run.stderr.decode()
    assert b"mongodb://lm_saes@127.0.0.1" in run.stderr or b"mongodb://lm_saes:***@127.0.0.1" in run.stderr

    # 4. The training run with W&B offline: settings dump, checkpoints, weights, the W&B run files.
    stdout, stderr = training.communicate(timeout=240)
    outputs |= {"train stdout": stdout, "train stderr": stderr}
    assert training.returncode == 0, stderr.decode()
    assert (tmp_path / "sae" / "train_settings.json").is_file() and (tmp_path / "sae" / "train_result.json").is_file()
    assert list((tmp_path / "wandb-runs" / "wandb").glob("offline-run-*/run-*.wandb"))

    with open_store(RecordStoreConfig(sqlite_path=str(store_path))) as store:
        stored = [store.get_feature("words", "default", index).interpretation for index in (0, 1)]
        rejected = [store.get_feature("words-rejected", "default", index).interpretation for index in (0, 1)]
    assert all(interpretation.details["explanation"].get("response") for interpretation in stored)
    assert all("HTTP 401" in interpretation.error for interpretation in rejected)

    outputs |= files_under(tmp_path)  # every file written: store (and its WAL), outputs, W&B, server log, ...
    assert any("wandb-runs" in where for where in outputs) and str(store_path) in outputs
    assert not leaks(secrets, outputs)


def test_a_mongodb_password_from_the_environment_reaches_the_client_and_no_message(monkeypatch):
    password = sentinels()[PASSWORD_ENV]
    monkeypatch.setenv(PASSWORD_ENV, password)
    cfg = MongoDBConfig(mongo_uri="mongodb://lm_saes@127.0.0.1:1/?authSource=admin", mongo_password_env=PASSWORD_ENV)
    # What the client gets: the password, quoted for the URI.
    quoted = urllib.parse.quote_plus(password)
    assert cfg.connection_uri() == f"mongodb://lm_saes:{quoted}@127.0.0.1:1/?authSource=admin"
    # What everything else gets: the settings dump names the variable only; the error names the host, not the password.
    assert password not in cfg.model_dump_json() and PASSWORD_ENV in cfg.model_dump_json()
    with pytest.raises(StoreUnavailableError) as failure:
        open_store(RecordStoreConfig(mongo=cfg))
    shown = [str(failure.value), repr(failure.value), "".join(traceback.format_exception(failure.value))]
    assert "127.0.0.1:1" in shown[0] and "lm_saes" in shown[0]
    assert not leaks({PASSWORD_ENV: password}, {f"message {i}": text.encode() for i, text in enumerate(shown)})

    # Named errors: a password variable without a user in the URI, or with a password in it too; an unset variable.
    for uri in ("mongodb://127.0.0.1:1/", "mongodb://lm_saes:inline-pw@127.0.0.1:1/"):
        with pytest.raises(ValueError, match="(?s)mongo_uri.*must name the user and no password") as failure:
            MongoDBConfig(mongo_uri=uri, mongo_password_env=PASSWORD_ENV)
        assert "inline-pw" not in str(failure.value)
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(ConfigError, match=f"mongo_password_env: the environment variable {PASSWORD_ENV} holds no"):
        open_store(RecordStoreConfig(mongo=cfg))


# An endpoint that quotes the rejected key back (fake: the real llama.cpp server answers 401 without quoting it, but
# gateways and some providers do, and OpenAI quotes part of it) ------------------------------------------------------
class _KeyEchoingHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {key}", "code": "invalid_api_key"}})
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args) -> None:
        pass


def test_an_endpoint_quoting_the_key_back_does_not_get_it_into_the_store_or_the_error(
    tmp_path: Path, two_features: list, monkeypatch, caplog
):
    key = sentinels()["OPENAI_API_KEY"]
    monkeypatch.setenv("LM_SAES_TEST_ECHOED_KEY", key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeyEchoingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    store_cfg = RecordStoreConfig(sqlite_path=str(tmp_path / "records.sqlite"))
    with open_store(store_cfg) as store:
        store.add_dictionary(DictionaryRecord("words", "default", str(tmp_path), {"d_sae": 2}, "smollm2-135m"))
        store.add_feature_analyses("words", "default", two_features)
    interp = AutoInterpConfig(
        base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
        api_key_env="LM_SAES_TEST_ECHOED_KEY",
        scorers=[],
        max_retries=0,
    )
    settings = AutoInterpSettings(
        sae_name="words", model=LanguageModelConfig(model_name="smollm2-135m"), auto_interp=interp, store=store_cfg
    )
    try:
        with caplog.at_level("DEBUG", logger="lm_saes_core"), pytest.raises(RepeatedFailureError) as failure:
            auto_interp(settings)
    finally:
        server.shutdown()
        server.server_close()
    message = str(failure.value)
    assert "HTTP 401" in message and "Incorrect API key provided: ***" in message
    shown = {
        "message": message.encode(),
        "traceback": "".join(traceback.format_exception(failure.value)).encode(),
        "log": caplog.text.encode(),
        **files_under(tmp_path),
    }
    assert not leaks({"LM_SAES_TEST_ECHOED_KEY": key}, shown)


def test_a_pipeline_hands_its_heavy_steps_the_password_variable_never_the_password(tmp_path, monkeypatch):
    """The pipeline's store settings reach the analysis child as the variable's name (the child inherits the
    environment, so its client gets the password); the settings file Dagster writes never holds the password."""
    from pipeline_fixtures import small_pipeline

    from lm_saes_core.pipes_entry import runner_named
    from lm_saes_dagster.launch import HeavyStepLauncher
    from lm_saes_dagster.pipeline_config import PipelineConfig
    from lm_saes_dagster.settings import analyze_settings

    secret = f"pw-{uuid.uuid4().hex}"
    monkeypatch.setenv("LM_SAES_TEST_MONGO_PASSWORD", secret)
    pipeline = small_pipeline()
    pipeline["store"] = {"mongo": {"mongo_uri": "mongodb://analyst@db.internal:27017/", "mongo_db": "features",
                                   "mongo_password_env": "LM_SAES_TEST_MONGO_PASSWORD"}}  # fmt: skip
    cfg = PipelineConfig.model_validate(pipeline)
    item = cfg.dictionaries["topk"]
    settings = analyze_settings(cfg, "topk", item, tmp_path / "d", tmp_path / "c", tmp_path / "o", cfg.store, "default")
    written = HeavyStepLauncher().write_settings("analyze", settings, tmp_path)
    assert secret not in written.read_text()
    child = runner_named("analyze").settings_class().model_validate_json(written.read_text())
    assert child.store.mongo.mongo_password_env == "LM_SAES_TEST_MONGO_PASSWORD"
    assert child.store.mongo.connection_uri() == f"mongodb://analyst:{secret}@db.internal:27017/"
