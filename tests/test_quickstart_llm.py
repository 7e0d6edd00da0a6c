"""`make quickstart` without an LLM endpoint: the bundled SmolLM2-135M-Instruct is served by llama.cpp on loopback
for the run (a real server process), its URL handed to the interpretations, and it is stopped by its pid; with an
endpoint configured nothing is started."""

import os
import urllib.request

import pytest
import yaml
from pipeline_fixtures import small_pipeline

from lm_saes_dagster.analysis_assets import LLM_BASE_URL_ENV, LLM_MODEL_ENV
from lm_saes_dagster.materialize import local_llm


@pytest.fixture
def pipelines(tmp_path, monkeypatch):
    directory = tmp_path / "pipelines"
    directory.mkdir()
    (directory / "small.yaml").write_text(yaml.safe_dump(small_pipeline()))
    monkeypatch.setenv("LM_SAES_PIPELINES", str(directory))
    monkeypatch.setenv(LLM_BASE_URL_ENV, "unset-by-the-test")
    monkeypatch.delenv(LLM_BASE_URL_ENV)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv(LLM_MODEL_ENV, "restored-by-the-test")
    monkeypatch.delenv(LLM_MODEL_ENV)
    return directory


def test_without_an_endpoint_the_bundled_model_serves_the_run_and_is_stopped(pipelines, tmp_path, capsys):
    server = local_llm("small", tmp_path / "llm.log")
    if server is None:
        pytest.skip(f"the bundled server cannot run here: {capsys.readouterr().out}")
    try:
        assert os.environ[LLM_BASE_URL_ENV] == server.base_url
        assert os.environ[LLM_MODEL_ENV] == "smollm2-135m-instruct"  # not the default model name of auto_interp
        with urllib.request.urlopen(f"{server.base_url}/models", timeout=10) as response:
            assert response.status == 200
        told = capsys.readouterr().out
        assert f"served by llama.cpp at {server.base_url} (pid {server.process.pid}" in told
        assert "A 135M model's labels are weak" in told
    finally:
        server.stop()
    assert server.process.poll() is not None


def test_with_an_endpoint_or_another_pipeline_nothing_is_started(pipelines, tmp_path, monkeypatch):
    assert local_llm("no-such-pipeline", tmp_path / "llm.log") is None
    monkeypatch.setenv(LLM_BASE_URL_ENV, "http://127.0.0.1:9/v1")
    assert local_llm("small", tmp_path / "llm.log") is None
    assert not (tmp_path / "llm.log").exists()
