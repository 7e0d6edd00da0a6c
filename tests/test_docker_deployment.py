"""The Docker deployment (deploy/docker) run for real on this machine, started and stopped by `make deploy-docker` and
`make deploy-docker-down` (deploy/docker/deploy.py): Dagster's storage in a Postgres cluster (postgres.sh), the project
image's code server in a container, the Dagster daemon and webserver on the host, and every run launched by the
DockerRunLauncher as a container of the image, all of them mounting one data directory at /data.

The slow tests need a Docker daemon (`make docker-daemon`), the image (`make image`; LM_SAES_TEST_IMAGE names
another), Postgres server binaries (Debian's `postgresql`) and dagster-postgres in .venv (`make docker-deps`); they are
skipped, saying which is missing, otherwise. About 4.5 minutes on 2 shared CPU cores with the image built, most of
it containers starting and loading the code location. The spec tests above them need none of these."""

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster_docker import DockerRunLauncher
from pipeline_fixtures import HOOK, small_pipeline

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "docker"
IMAGE = os.environ.get("LM_SAES_TEST_IMAGE", "lm-saes:latest")
NAME = "small"
ITEM = "topk"
LOCATION = "lm_saes"
# 1k cached tokens, one TopK dictionary trained on 4k; bounds any tiny dictionary meets, so the evaluation's blocking
# checks let the analysis run (its quality is the subject of tests/test_dagster_pipeline.py, not of this one).
PIPELINE = small_pipeline(NAME, cached_tokens=64 * 16, training_tokens=512 * 8, act_fns=(ITEM,), buffer_size=1024)
PIPELINE["quality"] = {"min_explained_variance": -1.0, "max_dead_fraction": 1.0, "min_l0": 0.0, "max_l0": 1e9}
PIPELINE["analysis"] = {"min_analysed_fraction": 0.0}
RUN_TIMEOUT = 600.0
TEST_INSTANCE = {"run_monitoring": {"poll_interval_seconds": 2}}
"""Over the shipped profile: a dead run container is noticed in seconds (the profile polls every minute)."""


# ---------------------------------------------------------------- the deploy files (no Docker needed)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_cpu_profile_is_the_shipped_config_without_device_requests():
    gpu, cpu = _load(DEPLOY / "dagster.yaml"), _load(DEPLOY / "dagster.cpu.yaml")
    requests = gpu["run_launcher"]["config"]["container_kwargs"].pop("device_requests")
    assert requests == [{"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}]
    assert cpu == gpu
    from docker.models.containers import _create_container_args  # what docker-py does with container_kwargs

    for config in (_load(DEPLOY / "dagster.yaml"), cpu):
        launcher = config["run_launcher"]["config"]
        processed = process_config(DockerRunLauncher.config_type(), {**launcher, "image": "reg/lm-saes:1"})
        assert processed.success, processed.errors
        args = _create_container_args({"image": "reg/lm-saes:1", "version": "1.41", **launcher["container_kwargs"]})
        assert args["host_config"]["Binds"] == ["lm-saes-data:/data:rw"]
    assert "DeviceRequests" not in args["host_config"]  # the CPU profile's, the last one built
    classes = (cpu["run_coordinator"]["class"], cpu["run_launcher"]["class"])
    assert classes == ("QueuedRunCoordinator", "DockerRunLauncher")
    assert cpu["run_monitoring"]["enabled"] and cpu["run_retries"] == {
        "enabled": True, "max_retries": 2, "retry_on_asset_or_op_failure": False
    }  # fmt: skip


def test_the_image_installs_dependencies_before_the_sources_and_keeps_pip_settings_out_of_its_layers():
    dockerfile = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines()]
    assert lines.index("ARG BASE_IMAGE=python:3.11-slim") < lines.index("FROM ${BASE_IMAGE}")  # users' default
    order = ["source=deploy/docker/wheelhouse", "COPY pyproject.toml", "pip install -r", "COPY README.md",
             "COPY lm_saes_core", "pip install --no-deps --no-build-isolation -e ."]  # fmt: skip
    positions = [dockerfile.index(text) for text in order]
    assert positions == sorted(positions)
    assert "pip.conf" not in dockerfile and "--mount=type=secret,id=pip-conf" in dockerfile
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert {".git", ".venv", ".lm_saes", "build"} <= set(ignored) and "deploy" not in ignored


def _pip_build_config():
    spec = importlib.util.spec_from_file_location("pip_build_config", DEPLOY / "pip_build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_builds_pip_settings_keep_network_indexes_and_the_ca_and_drop_local_paths(tmp_path):
    ca = tmp_path / "proxy-ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = {
        "index-url": "https://pypi.example.org/simple",
        "extra-index-url": "file:///opt/pypi/simple https://mirror.example.org/simple",
        "find-links": "/opt/wheels",
        "constraint": "/etc/xdg/pip/constraints.txt",
        "trusted-host": "mirror.example.org",
        "cert": str(ca),
    }
    config = _pip_build_config().build_config(settings, tmp_path)
    assert dict(config["global"]) == {
        "index-url": "https://pypi.example.org/simple",
        "extra-index-url": "https://mirror.example.org/simple",
        "trusted-host": "mirror.example.org",
        "cert": "/run/secrets/pip-ca",
    }
    assert (tmp_path / "pip-ca.crt").read_text() == ca.read_text()
    with pytest.raises(FileNotFoundError, match="nowhere.crt"):
        _pip_build_config().build_config({"cert": str(tmp_path / "nowhere.crt")}, tmp_path)


def _deploy():
    spec = importlib.util.spec_from_file_location("deploy", DEPLOY / "deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


deploy = _deploy()


def test_deploy_writes_the_shipped_profile_changing_only_what_it_is_told(monkeypatch):
    for profile in ("gpu", "cpu"):
        assert deploy.instance_config(profile) == _load(deploy.profile_file(profile))  # `make deploy-docker`
    shipped = _load(DEPLOY / "dagster.cpu.yaml")
    config = deploy.instance_config("cpu", "net-1", "/srv/data", TEST_INSTANCE)
    launcher = config["run_launcher"]["config"]
    assert launcher.pop("network") == "net-1" and shipped["run_launcher"]["config"].pop("network") == deploy.NETWORK
    assert launcher["container_kwargs"].pop("volumes") == {"/srv/data": {"bind": "/data", "mode": "rw"}}
    shipped["run_launcher"]["config"]["container_kwargs"].pop("volumes")
    assert config.pop("run_monitoring") == {**shipped.pop("run_monitoring"), "poll_interval_seconds": 2}
    assert config == shipped
    assert shipped["storage"]["postgres"]["postgres_db"]["port"] == {"env": "DAGSTER_PG_PORT"}  # postgres.sh's port

    monkeypatch.delenv("DAGSTER_PROFILE", raising=False)
    monkeypatch.setattr(deploy.shutil, "which", lambda name: None)
    assert deploy.choose_profile(None)[0] == "cpu"
    monkeypatch.setattr(deploy.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert deploy.choose_profile(None)[0] == "gpu"
    monkeypatch.setenv("DAGSTER_PROFILE", "cpu")
    assert deploy.choose_profile(None) == ("cpu", "DAGSTER_PROFILE=cpu")
    monkeypatch.setenv("DAGSTER_PROFILE", "tpu")
    with pytest.raises(deploy.DeployError, match="DAGSTER_PROFILE='tpu'"):
        deploy.choose_profile(None)


def test_down_stops_exactly_the_processes_its_state_lists(tmp_path):
    def process(name: str) -> subprocess.Popen:  # a `sleep` that shows as `name` in /proc/PID/cmdline
        return subprocess.Popen(["bash", "-c", f"exec -a {name} sleep 300"], start_new_session=True)

    daemon, webserver, bystander = process("dagster-daemon"), process("dagster-webserver"), process("dagster-daemon")
    impostor = subprocess.Popen(["sleep", "300"])  # the webserver's pid reused by something else
    try:
        listed = {"dagster-daemon": daemon.pid, "dagster-webserver": webserver.pid}
        wait_until(lambda: all(deploy.alive(pid, name) for name, pid in listed.items()), "the processes", 10)
        (tmp_path / "state.json").write_text(json.dumps(listed))
        assert deploy.is_up(deploy.read_state(tmp_path)) is False  # no code server container: not up
        messages = []
        deploy.down(tmp_path, messages.append)
        assert daemon.poll() is not None and webserver.poll() is not None
        assert bystander.poll() is None  # the same program, not listed: left alone
        assert not (tmp_path / "state.json").exists()
        (tmp_path / "state.json").write_text(json.dumps({"dagster-webserver": impostor.pid}))
        deploy.down(tmp_path, messages.append)
        assert impostor.poll() is None
        deploy.down(tmp_path, messages.append)
        assert messages[-1] == f"nothing to stop: no {tmp_path / 'state.json'}"
    finally:
        for leftover in (daemon, webserver, bystander, impostor):
            leftover.kill()
            leftover.wait()


# ---------------------------------------------------------------- the deployment, for real


def _missing_for_a_real_deployment() -> str | None:
    """Why the end-to-end tests cannot run here, or None."""
    client = deploy.docker_client()
    if client is None:
        return "no Docker daemon answers; start one with `make docker-daemon`"
    import docker

    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        without_hub = "make base-image image BASE_IMAGE=lm-saes-base:bookworm"
        return f"image {IMAGE} is not built: `make image` (without Docker Hub: `{without_hub}`)"
    if importlib.util.find_spec("dagster_postgres") is None:
        return "dagster-postgres is not installed in .venv; `make docker-deps`"
    if not list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")) and not os.environ.get("PG_BIN"):
        return "no Postgres server binaries (apt-get install postgresql, or set PG_BIN)"
    return None


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


def wait_until(ready, what: str, timeout: float, log: Path | None = None, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(interval)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    pytest.fail(f"{what} not ready within {timeout:.0f}s\n{tail}")


@dataclass
class Deployment:
    url: str
    data: Path
    pg: dict[str, str]
    network: str
    client: object
    instance: dg.DagsterInstance
    logs: Path


def remove_run_containers(client, network: str) -> None:
    """The containers the launcher started for runs on `network` (it labels them with their run)."""
    for container in client.containers.list(all=True, filters={"label": "dagster/run_id"}):
        if container.attrs["HostConfig"].get("NetworkMode") == network:
            container.remove(force=True)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    """`make deploy-docker`'s own `up`, on this test's network, data directory, Postgres directory and free ports, with
    run monitoring polling every 2 s; stopped by its `down`."""
    missing = _missing_for_a_real_deployment()
    if missing:
        pytest.skip(missing)
    client = deploy.docker_client()
    root = tmp_path_factory.mktemp("docker-deployment")
    data = root / "data"  # /data in every container: the artefact root, the caches, the pipeline files
    (data / "pipelines").mkdir(parents=True)
    (data / "pipelines" / f"{NAME}.yaml").write_text(yaml.safe_dump(PIPELINE))
    # The Postgres cluster runs as the `postgres` user, which cannot enter pytest's private temp directory.
    pg_dir = Path(tempfile.mkdtemp(prefix="lm-saes-test-pg-", dir="/var/tmp"))
    network = f"lm-saes-test-{uuid.uuid4().hex[:8]}"
    options = deploy.Options(
        state=root / "deploy", image=IMAGE, profile="cpu", port=0, network=network, data=str(data), pg_dir=pg_dir,
        env={"LM_SAES_PIPELINES": "/data/pipelines", "HF_HUB_OFFLINE": "1"}, instance=TEST_INSTANCE, build=False,
    )  # fmt: skip
    try:
        state = deploy.up(options)
        assert state["pg"]["DAGSTER_PG_HOST"] != "127.0.0.1"  # the network's gateway: the runs reach it there
        url = state["url"]

        def location_loaded() -> bool:
            (entry,) = graphql(url, LOCATIONS_QUERY)["workspaceOrError"]["locationEntries"]
            loaded = entry["locationOrLoadError"] or {}
            if loaded.get("__typename") == "PythonError":
                pytest.fail(f"the code location did not load: {loaded['message']}")
            return entry["loadStatus"] == "LOADED" and loaded.get("__typename") == "RepositoryLocation"

        # The code server's proxy answers at once and loads the definitions behind it (the webserver shows LOADING);
        # the first load converts the bundled model into /data/cache, once for every later container.
        wait_until(location_loaded, "the code location (the code server container)", 600, interval=3.0)
        home = options.state / "dagster_home"
        with mock.patch.dict(os.environ, {**state["pg"], "DAGSTER_HOME": str(home), "LM_SAES_IMAGE": IMAGE}):
            with dg.DagsterInstance.from_config(str(home)) as instance:
                yield Deployment(url, data, state["pg"], network, client, instance, options.state / "logs")
    finally:
        remove_run_containers(client, network)  # before `down`, which removes the network they are attached to
        deploy.down(options.state)
        shutil.rmtree(pg_dir, ignore_errors=True)


LOCATIONS_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
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
query($runId: ID!) { logsForRun(runId: $runId, limit: 1000) { __typename
    ... on EventConnection { events { __typename ... on MessageEvent { message stepKey }
        ... on ErrorEvent { error { message errorChain { error { message } } } } } } } }
"""
SENSOR_QUERY = """
query($selector: SensorSelector!) { sensorOrError(sensorSelector: $selector) { __typename
    ... on Sensor { sensorState { id status } } } }
"""
STOP_SENSOR_MUTATION = """
mutation($id: String!) { stopSensor(id: $id) { __typename
    ... on StopSensorMutationResult { instigationState { status } } } }
"""


def stop_automation(url: str) -> None:
    """The automation sensor would evaluate and analyse each new dictionary in runs of its own; these tests launch
    their runs themselves, so that the daemon starts nothing else."""
    selector = {
        "repositoryLocationName": LOCATION,
        "repositoryName": "__repository__",
        "sensorName": "lm_saes_automation",
    }
    state = graphql(url, SENSOR_QUERY, {"selector": selector})["sensorOrError"]["sensorState"]
    if state["status"] != "STOPPED":
        stopped = graphql(url, STOP_SENSOR_MUTATION, {"id": state["id"]})["stopSensor"]
        assert stopped["instigationState"]["status"] == "STOPPED", stopped


def launch(deployment: Deployment, assets: list[str], partition: str | None = None) -> str:
    """Launch the implicit asset job on `assets`, as the UI's Materialize button does; it waits in the queue."""
    params = {
        "selector": {
            "repositoryLocationName": LOCATION,
            "repositoryName": "__repository__",
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": [NAME, asset]} for asset in assets],
        },
        "runConfigData": {"execution": {"config": {"in_process": {}}}},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}] if partition else []},
    }
    launched = graphql(deployment.url, LAUNCH_MUTATION, {"executionParams": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    assert launched["run"]["status"] == "QUEUED"  # the QueuedRunCoordinator: the daemon starts it
    return launched["run"]["runId"]


def run_status(deployment: Deployment, run_id: str) -> str:
    return graphql(deployment.url, RUN_QUERY, {"runId": run_id})["runOrError"]["status"]


def run_messages(deployment: Deployment, run_id: str) -> list[str]:
    """Every message the UI shows for the run: each event's, and each error's along its chain."""
    events = graphql(deployment.url, RUN_LOGS_QUERY, {"runId": run_id})["logsForRun"].get("events", [])
    messages = []
    for event in events:
        messages.append(f"{event['__typename']} {event.get('stepKey')}: {event.get('message')}")
        error = event.get("error") or {}
        messages += [error.get("message", "")] + [link["error"]["message"] for link in error.get("errorChain", [])]
    return messages


def wait_for_status(deployment: Deployment, run_id: str, expected: str = "SUCCESS", timeout: float = RUN_TIMEOUT):
    status = None

    def finished() -> bool:
        nonlocal status
        status = run_status(deployment, run_id)
        return status in ("SUCCESS", "FAILURE", "CANCELED")

    wait_until(finished, f"run {run_id}", timeout, deployment.logs / "daemon.log", interval=2.0)
    if status != expected:
        messages = "\n".join(run_messages(deployment, run_id))
        daemon = (deployment.logs / "daemon.log").read_text()[-3000:]
        pytest.fail(f"run {run_id} ended {status}, not {expected}:\n{messages[-8000:]}\ndaemon log:\n{daemon}")


def latest(instance: dg.DagsterInstance, asset: str, partition: str | None = None):
    partitions = [partition] if partition else None
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey([NAME, asset]), asset_partitions=partitions), limit=1
    ).records
    return records[0]


def data_version(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> str:
    return latest(instance, asset, partition).asset_materialization.tags["dagster/data_version"]


def local_run(root: Path, cache: Path) -> dict[str, str]:
    """The same pipeline's corpus, tokens and activations materialised in this process on a throw-away instance,
    with artefacts under `root` (heavy steps in subprocesses, as in the containers): their data versions.

    The corpus and model cache is the deployment's (`cache`): the bundled corpus is the running interpreter's stdlib
    prose, built once per Python minor version, and the image's Python (Debian's 3.11.2 in lm-saes-base:bookworm) is
    not this one, so a corpus built here would hold other documents and every version would differ for that alone."""
    from lm_saes_dagster.definitions import build_definitions

    (root / "pipelines").mkdir(parents=True)
    (root / "pipelines" / f"{NAME}.yaml").write_text(yaml.safe_dump(PIPELINE))
    defs, errors = build_definitions(root / "pipelines", root / "lm_saes")
    assert errors == {}
    graph = defs.resolve_asset_graph()
    assets = [graph.assets_def_for_key(dg.AssetKey([NAME, name])) for name in ("corpus", "tokens", "activations")]
    with dg.instance_for_test() as instance, mock.patch.dict(os.environ, {"LM_SAES_CACHE": str(cache)}):
        assert dg.materialize(assets[:2], instance=instance).success
        assert dg.materialize(assets[2:], partition_key=HOOK, instance=instance).success
        return {"corpus": data_version(instance, "corpus"), "tokens": data_version(instance, "tokens"),
                "activations": data_version(instance, "activations", HOOK)}  # fmt: skip


@pytest.mark.slow
def test_make_deploy_docker_starts_it_once_and_down_stops_only_what_it_started(tmp_path):
    """The make targets themselves, as a user runs them (with this test's state, data, network and port, and an image
    tag of its own, built by `make image` from the cached layers and untagged at the end)."""
    missing = _missing_for_a_real_deployment()
    if missing:
        pytest.skip(missing)
    import docker

    client = deploy.docker_client()
    suffix = uuid.uuid4().hex[:8]
    image, network, port = f"lm-saes:deploy-test-{suffix}", f"lm-saes-test-{suffix}", deploy.free_port()
    state, data = tmp_path / "state", tmp_path / "data"
    data.mkdir()
    (data / "mine.txt").write_text("the user's data")
    pg_dir = Path(tempfile.mkdtemp(prefix="lm-saes-test-pg-", dir="/var/tmp"))
    # The base `make image` needs here: Docker Hub's python:3.11-slim where it is present, else the bootstrapped one.
    base = next((b for b in ("python:3.11-slim", "lm-saes-base:bookworm") if client.images.list(name=b)), None)
    variables = [f"IMAGE={image}", f"DEPLOY_DIR={state}", f"DEPLOY_PORT={port}", f"DEPLOY_NETWORK={network}",
                 f"DEPLOY_DATA={data}", f"DEPLOY_PG_DIR={pg_dir}"]  # fmt: skip
    variables += [f"BASE_IMAGE={base}"] if base else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DAGSTER_PROFILE": ""}

    def make(target: str) -> str:
        done = subprocess.run(["make", "--no-print-directory", target, *variables], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        assert done.returncode == 0, f"make {target}:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
        return done.stdout

    record = None
    try:
        output = make("deploy-docker")
        url = f"http://127.0.0.1:{port}"
        assert f"The Dagster UI: {url}" in output
        profile = "cpu" if shutil.which("nvidia-smi") is None else "gpu"
        assert f"profile: {profile} (" in output
        assert deploy.answers(url)
        record = json.loads((state / "state.json").read_text())
        assert record["url"] == url and record["image"] == image and "dockerd" not in record  # one answered already
        assert client.containers.get(record["code_server"]["id"]).status == "running"
        assert client.networks.get(record["network"]["id"]).name == network

        again = make("deploy-docker")
        assert f"already up: {url}" in again
        assert json.loads((state / "state.json").read_text()) == record  # nothing started twice

        down = make("deploy-docker-down")
        assert "stopped dagster-webserver" in down and "stopped Postgres" in down
        for program in ("dagster-daemon", "dagster-webserver"):
            assert not deploy.alive(record[program], program)
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(record["code_server"]["id"])
        with pytest.raises(docker.errors.NotFound):
            client.networks.get(record["network"]["id"])
        assert not (pg_dir / "data" / "postmaster.pid").exists() and (pg_dir / "data" / "PG_VERSION").exists()
        assert not deploy.answers(url) and not (state / "state.json").exists()
        assert (data / "mine.txt").read_text() == "the user's data"  # the data stays, and so do
        client.images.get(image)  # the image
        client.ping()  # and the Docker daemon, which it did not start
        record = None
    finally:
        if record is not None:  # a failed assertion above: stop what it started all the same
            deploy.down(state)
        if client.images.list(name=image):
            client.images.remove(image)  # the tag only: its layers are lm-saes:latest's
        shutil.rmtree(pg_dir, ignore_errors=True)


@pytest.mark.slow
def test_runs_are_containers_of_the_image_sharing_postgres_and_the_data_volume(deployment, tmp_path):
    import psycopg2
    import torch
    from safetensors.torch import load_file

    from lm_saes_core.store import RecordStoreConfig, open_store

    stop_automation(deployment.url)
    deployment.instance.add_dynamic_partitions(f"{NAME}_dictionaries", [ITEM])
    runs = {}
    for assets, partition in ((["corpus", "tokens"], None), (["activations"], HOOK),
                              (["dictionary", "evaluation", "feature_analyses"], ITEM)):  # fmt: skip
        run_id = launch(deployment, assets, partition)
        wait_for_status(deployment, run_id)
        runs[assets[-1]] = run_id

    # Each run was its own container of the image, on the deployment's network, with the data volume at /data.
    instance = deployment.instance
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    containers = {}
    for run_id in runs.values():
        run = instance.get_run_by_id(run_id)
        assert run.tags["dagster/image"] == IMAGE
        container = deployment.client.containers.get(run.tags["docker/container_id"])
        assert container.labels["dagster/run_id"] == run_id
        assert container.attrs["Config"]["Image"] == IMAGE and container.attrs["State"]["ExitCode"] == 0
        assert container.attrs["Config"]["Cmd"][:3] == ["dagster", "api", "execute_run"]
        assert container.attrs["HostConfig"]["NetworkMode"] == deployment.network
        assert {(m["Source"], m["Destination"]) for m in container.attrs["Mounts"]} == {(str(deployment.data), "/data")}
        containers[run_id] = container.id
    assert len(set(containers.values())) == 3
    daemon_log = (deployment.logs / "daemon.log").read_text()
    assert "caught an error" not in daemon_log.lower(), daemon_log[-4000:]  # no sensor or dequeue error on the way

    # Runs and events are rows in Postgres, written by the containers and read back here and by the webserver.
    pg = deployment.pg
    with psycopg2.connect(host="127.0.0.1", port=pg["DAGSTER_PG_PORT"], user=pg["DAGSTER_PG_USER"],
                          password=pg["DAGSTER_PG_PASSWORD"], dbname=pg["DAGSTER_PG_DB"]) as connection:  # fmt: skip
        with connection.cursor() as cursor:
            cursor.execute("SELECT run_id, status FROM runs")
            statuses = dict(cursor.fetchall())
            cursor.execute(
                "SELECT run_id, count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
                "GROUP BY run_id"
            )
            materializations = dict(cursor.fetchall())
    assert {statuses[run_id] for run_id in runs.values()} == {"SUCCESS"}
    assert len(statuses) == 3  # nothing else ran: no retries, no automation
    assert materializations == {runs["tokens"]: 2, runs["activations"]: 1, runs["feature_analyses"]: 3}

    # Each run read the one before's materialisations from the shared volume.
    assert latest(instance, "tokens").run_id == runs["tokens"]
    assert latest(instance, "activations", HOOK).run_id == runs["activations"]
    dictionary = latest(instance, "dictionary", ITEM)
    assert dictionary.run_id == runs["feature_analyses"]
    assert str(dictionary.asset_materialization.metadata["path"].value).startswith("/data/lm_saes/pipelines/small/")

    # The artefacts and the record store are on the volume (here: the data directory mounted at /data).
    pipeline_root = deployment.data / "lm_saes" / "pipelines" / NAME
    assert (pipeline_root / "activations" / "all-hooks" / HOOK).is_dir()
    assert list((pipeline_root / "dictionary" / ITEM).glob("*.safetensors"))
    assert (deployment.data / "cache" / "models" / "smollm2-135m").is_dir()  # converted once, by the code server
    with open_store(RecordStoreConfig(sqlite_path=str(pipeline_root / "records.sqlite"))) as store:
        assert store.get_dictionary(ITEM, NAME) is not None
        assert store.count_features_with_analysis(ITEM, NAME) > 0

    # The same settings run locally give the same data versions: the corpus record and the tokens are the same bytes,
    # and the activation cache's version leaves out where it was written (lm_saes_dagster.pipeline.cache_version).
    local = local_run(tmp_path, deployment.data / "cache")
    docker_versions = {"corpus": data_version(instance, "corpus"), "tokens": data_version(instance, "tokens"),
                       "activations": data_version(instance, "activations", HOOK)}  # fmt: skip
    assert local == docker_versions
    cache = Path("activations") / "all-hooks"
    # ... and the activations themselves agree (the same torch wheel on the same CPU).
    for chunk in sorted((pipeline_root / cache / HOOK).glob("*.safetensors")):
        ours = load_file(tmp_path / "lm_saes" / "pipelines" / NAME / cache / HOOK / chunk.name)
        torch.testing.assert_close(ours, load_file(chunk))  # bitwise equal on this machine


@pytest.mark.slow
def test_a_run_whose_container_is_killed_is_failed_by_run_monitoring_and_retried(deployment):
    stop_automation(deployment.url)
    run_id = launch(deployment, ["corpus", "tokens"])
    container_id = None

    def started() -> bool:
        nonlocal container_id
        container_id = deployment.instance.get_run_by_id(run_id).tags.get("docker/container_id")
        status = run_status(deployment, run_id)
        assert status in ("QUEUED", "STARTING", "STARTED"), f"run {run_id} ended {status} before it could be killed"
        return status == "STARTED" and container_id is not None

    wait_until(started, f"run {run_id} in its container", 300, deployment.logs / "daemon.log", interval=0.5)
    deployment.client.containers.get(container_id).kill()  # SIGKILL: the run worker dies without a word

    wait_for_status(deployment, run_id, "FAILURE", timeout=120)
    failure = [m for m in run_messages(deployment, run_id) if m.startswith("RunFailureEvent")]
    assert failure and "Container status is exited" in failure[-1], failure  # run monitoring's verdict
    retries = []

    def retried() -> bool:
        retries[:] = deployment.instance.get_runs(dg.RunsFilter(tags={"dagster/parent_run_id": run_id}))
        return bool(retries)

    wait_until(retried, f"a retry of run {run_id}", 120, deployment.logs / "daemon.log")
    (retry,) = retries
    assert retry.tags["dagster/retry_number"] == "1" and retry.tags["dagster/root_run_id"] == run_id
    wait_for_status(deployment, retry.run_id)
    retry = deployment.instance.get_run_by_id(retry.run_id)
    assert retry.tags["docker/container_id"] != container_id  # a new container of the same image
    assert retry.tags["dagster/image"] == IMAGE


@pytest.mark.slow
def test_a_run_whose_image_is_missing_fails_naming_the_image(deployment):
    """A code location that names an image the daemon cannot find or pull (a typo in --container-image, an image
    removed or never pushed): the launch fails, and the run's failure says which image."""
    from dagster._core.storage.dagster_run import DagsterRunStatus
    from dagster._core.utils import make_new_run_id
    from dagster._record import copy

    stop_automation(deployment.url)
    instance = deployment.instance
    template = next(iter(instance.get_runs(limit=1)), None)
    if template is None:  # this test alone: one run through the code location to copy
        template = instance.get_run_by_id(launch(deployment, ["corpus"]))
        wait_for_status(deployment, template.run_id)
    missing = f"lm-saes-missing-{uuid.uuid4().hex[:8]}:nope"
    origin = template.job_code_origin
    origin = origin._replace(repository_origin=origin.repository_origin._replace(container_image=missing))
    tags = {k: v for k, v in template.tags.items() if not k.startswith(("docker/", "dagster/image", "dagster/retry"))}
    run = copy(
        template, run_id=make_new_run_id(), status=DagsterRunStatus.NOT_STARTED, job_code_origin=origin,
        parent_run_id=None, root_run_id=None, tags={**tags, "dagster/max_retries": "0"},  # no retry of this one
    )  # fmt: skip
    instance.add_run(run)
    instance.submit_run(run.run_id, workspace=None)  # queued, like a launch from the UI; the daemon launches it

    wait_for_status(deployment, run.run_id, "FAILURE", timeout=120)
    messages = run_messages(deployment, run.run_id)
    # Dagster's engine event says "Caught an unrecoverable error while dequeuing the run"; its error (the UI's error
    # dialog) is our launcher's, which names the image (lm_saes_dagster/docker_launcher.py), then docker's own.
    assert any(m.startswith("EngineEvent") and "error while dequeuing the run" in m for m in messages), messages
    assert any(f"container from image {missing!r}: the image is not on this Docker host" in m for m in messages), (
        messages
    )
    assert any(f"No such image: {missing}" in message for message in messages), messages
    assert not deployment.client.containers.list(all=True, filters={"label": f"dagster/run_id={run.run_id}"})
