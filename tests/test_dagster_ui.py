"""The Dagster UI on a real webserver: the code location serves the pipeline's lineage and checks over GraphQL, a run
launched the way the UI launches it materialises the first assets, and headless Chromium renders the lineage page."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from pipeline_fixtures import small_pipeline

ROOT = Path(__file__).resolve().parents[1]
WEBSERVER = ROOT / ".venv" / "bin" / "dagster-webserver"
CHROMIUM = Path("/usr/bin/chromium")
NAME = "ui"
# 1k cached tokens and one dictionary trained on 4k tokens: the UI test only needs the graph and a short run.
tiny_pipeline = small_pipeline(
    NAME, cached_tokens=64 * 16, training_tokens=512 * 8, act_fns=("topk",), buffer_size=1024
)
ASSETS = (
    "corpus", "tokens", "activations", "dictionary", "evaluation", "feature_analyses", "logit_attributions",
    "interpretations",
)  # fmt: skip
SOURCES = ("item_config",)  # observable source: each dictionary item's settings
CHECKS = {
    "tokens_consistent_across_hooks",
    "explained_variance_above_min",
    "dead_fraction_below_max",
    "l0_within_bounds",
    "features_analysed",
}
# The webserver alone runs no daemon: runs must start at launch, not wait in a queue. The NUX modal would cover
# the screenshot.
INSTANCE_YAML = {
    "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"},
    "telemetry": {"enabled": False},
    "nux": {"enabled": False},
}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=2400,1400",
    "--virtual-time-budget=15000",
]

ASSET_NODES_QUERY = """
{ assetNodes { assetKey { path } dependencyKeys { path }
    assetChecksOrError { __typename ... on AssetChecks { checks { name } } } } }
"""
LOCATIONS_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name
    locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""
LAUNCH_MUTATION = """
mutation($executionParams: ExecutionParams!) {
  launchRun(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message stack }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
  }
}
"""
RUN_QUERY = """
query($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status } ... on PythonError { message } } }
"""
RUN_LOGS_QUERY = """
query($runId: ID!) { logsForRun(runId: $runId, limit: 500) { __typename
    ... on EventConnection { events { __typename ... on MessageEvent { message stepKey } } } } }
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    assert "errors" not in body, body["errors"]
    return body["data"]


def wait_for_server(url: str, server: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"dagster-webserver exited with {server.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"dagster-webserver did not answer /server_info within {timeout}s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Terminate the process group we started (the webserver and its code server), then kill what is left."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
    try:  # The code server child may outlive the webserver by a moment.
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def webserver(tmp_path) -> Iterator[str]:
    """A dagster-webserver on a free loopback port serving only the tiny pipeline, stopped by its pid afterwards."""
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / f"{NAME}.yaml").write_text(yaml.safe_dump(tiny_pipeline))
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(yaml.safe_dump(INSTANCE_YAML))
    env = {
        **os.environ,
        "LM_SAES_PIPELINES": str(pipelines),
        "LM_SAES_HOME": str(tmp_path / "home"),
        "DAGSTER_HOME": str(dagster_home),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    port = free_port()
    log = tmp_path / "webserver.log"
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            [str(WEBSERVER), "-m", "lm_saes_dagster.definitions", "-h", "127.0.0.1", "-p", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_server(url, server, log)
        yield url
    finally:
        stop(server)


def launch_and_wait(url: str, location: str, asset_names: list[str], timeout: float = 120.0) -> str:
    """Launch the implicit asset job on the given assets, as the UI's Materialize button does; wait for SUCCESS."""
    params = {
        "selector": {
            "repositoryLocationName": location,
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": [NAME, name]} for name in asset_names],
        },
        "runConfigData": {"execution": {"config": {"in_process": {}}}},
    }
    launched = graphql(url, LAUNCH_MUTATION, {"executionParams": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline, status = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status = graphql(url, RUN_QUERY, {"runId": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            break
        time.sleep(1.0)
    if status != "SUCCESS":
        events = graphql(url, RUN_LOGS_QUERY, {"runId": run_id})["logsForRun"].get("events", [])
        messages = "\n".join(f"{e.get('stepKey')}: {e.get('message')}" for e in events)
        pytest.fail(f"run {run_id} ended {status} (timeout {timeout}s):\n{messages[-6000:]}")
    return run_id


def chromium(url: str, profile: Path, *action: str) -> subprocess.CompletedProcess:
    """Headless Chromium on `url` with the flags that work on this machine, then `action` (screenshot, DOM dump)."""
    return subprocess.run(
        [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *action, url],
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.mark.slow
def test_webserver_serves_lineage_launches_runs_and_renders_the_graph(webserver, tmp_path):
    entries = graphql(webserver, LOCATIONS_QUERY)["workspaceOrError"]["locationEntries"]
    assert [e["locationOrLoadError"]["__typename"] for e in entries] == ["RepositoryLocation"], entries
    location = entries[0]["name"]

    nodes = graphql(webserver, ASSET_NODES_QUERY)["assetNodes"]
    by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    assert set(by_key) == {f"{NAME}/{name}" for name in ASSETS + SOURCES}
    parents = {key: {"/".join(d["path"]) for d in node["dependencyKeys"]} for key, node in by_key.items()}
    assert parents == {
        f"{NAME}/corpus": set(),
        f"{NAME}/tokens": {f"{NAME}/corpus"},
        f"{NAME}/activations": {f"{NAME}/tokens"},
        f"{NAME}/dictionary": {f"{NAME}/activations", f"{NAME}/item_config"},
        f"{NAME}/evaluation": {f"{NAME}/dictionary"},
        f"{NAME}/feature_analyses": {f"{NAME}/dictionary", f"{NAME}/evaluation"},
        f"{NAME}/logit_attributions": {f"{NAME}/feature_analyses"},
        f"{NAME}/interpretations": {f"{NAME}/feature_analyses"},
        f"{NAME}/item_config": set(),
    }
    checks = {
        key: {c["name"] for c in node["assetChecksOrError"]["checks"]}
        for key, node in by_key.items()
        if node["assetChecksOrError"]["__typename"] == "AssetChecks"
    }
    assert checks[f"{NAME}/activations"] == {"tokens_consistent_across_hooks"}
    assert checks[f"{NAME}/evaluation"] == CHECKS - {"tokens_consistent_across_hooks", "features_analysed"}
    assert checks[f"{NAME}/feature_analyses"] == {"features_analysed"}
    assert set().union(*checks.values()) == CHECKS

    launch_and_wait(webserver, location, ["corpus", "tokens"])
    tokens_file = tmp_path / "home" / "pipelines" / NAME / "tokens" / "tokens.safetensors"
    assert tokens_file.is_file()
    materialized = graphql(
        webserver,
        "query($k: AssetKeyInput!) { assetOrError(assetKey: $k) { ... on Asset { assetMaterializations(limit: 1) "
        "{ metadataEntries { label ... on IntMetadataEntry { intValue } } } } } }",
        {"k": {"path": [NAME, "tokens"]}},
    )["assetOrError"]["assetMaterializations"]
    assert len(materialized) == 1
    metadata = {e["label"]: e.get("intValue") for e in materialized[0]["metadataEntries"]}
    assert metadata["n_windows"] == 16 and metadata["context_size"] == 64

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run `make ui-deps` (Debian package chromium) for the screenshot")
    png = tmp_path / "dagster-lineage.png"
    # The group page in its code location draws the detailed graph; `/asset-groups/<name>` shows the global one.
    page = f"{webserver}/locations/{location}/asset-groups/{NAME}"
    result = chromium(page, tmp_path / "chromium-profile", f"--screenshot={png}")
    assert png.is_file(), f"chromium wrote no screenshot (exit {result.returncode}):\n{result.stderr[-4000:]}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000, "screenshot too small to show the lineage graph"
    if os.environ.get("LM_SAES_SAVE_SCREENSHOTS") == "1":
        (ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
        shutil.copy(png, ROOT / "tests" / "artifacts" / "dagster-lineage.png")
    # The rendered page, not a loading spinner: every asset node is drawn and the two materialised ones say so.
    dom = chromium(page, tmp_path / "chromium-profile", "--dump-dom").stdout
    assert all(f">{name}<" in dom for name in ASSETS), dom[-2000:]
    assert dom.count(">Materialized<") == 2, dom[-2000:]
