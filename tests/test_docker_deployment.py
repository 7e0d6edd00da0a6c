"""The Docker deployment (deploy/docker) run for real on this machine: Dagster's storage in a throw-away Postgres
cluster (deploy/docker/postgres.sh), the project image's code server in a container, the Dagster daemon and webserver
on the host, and every run launched by the DockerRunLauncher as a container of the image, all of them mounting one
data directory at /data. Three runs of a small pipeline, each reading what the one before wrote there.

The end-to-end test needs a Docker daemon (`make docker-daemon`), the image (`make image`; LM_SAES_TEST_IMAGE names
another), Postgres server binaries (Debian's `postgresql`) and dagster-postgres in .venv (`make docker-deps`); it is
skipped, saying which is missing, otherwise. About 6-8 minutes on 2 busy CPU cores, most of it containers starting
and loading the code location. The spec tests above it need none of these."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
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
VENV_BIN = ROOT / ".venv" / "bin"
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


# ---------------------------------------------------------------- the deployment, for real


def _missing_for_a_real_deployment() -> str | None:
    """Why the end-to-end test cannot run here, or None."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as exc:  # the SDK raises several kinds; any of them means no usable daemon
        return f"no Docker daemon answers ({type(exc).__name__}); start one with `make docker-daemon`"
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


def wait_until(ready, what: str, timeout: float, log: Path | None = None, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(interval)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    pytest.fail(f"{what} not ready within {timeout:.0f}s\n{tail}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Terminate the process group we started, then kill what is left of it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Deployment:
    url: str
    data: Path
    pg: dict[str, str]
    network: str
    client: object
    instance: dg.DagsterInstance
    logs: Path
    code_server: object
    started: list[subprocess.Popen] = field(default_factory=list)


def instance_config_for_test(cpu_profile: dict, data: Path, network: str, pg_port: int) -> dict:
    """The CPU profile with the three settings that say *where* (and would clash with a real deployment on this
    machine) pointed at this test's own: its data directory instead of the `lm-saes-data` volume, its network instead
    of `lm-saes`, its Postgres port. Everything else is the shipped file."""
    config = json.loads(json.dumps(cpu_profile))
    launcher = config["run_launcher"]["config"]
    launcher["network"] = network
    launcher["container_kwargs"]["volumes"] = {str(data): {"bind": "/data", "mode": "rw"}}
    config["storage"]["postgres"]["postgres_db"]["port"] = pg_port
    return config


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as handle:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    missing = _missing_for_a_real_deployment()
    if missing:
        pytest.skip(missing)
    import docker

    client = docker.from_env()
    suffix = uuid.uuid4().hex[:8]
    root = tmp_path_factory.mktemp("docker-deployment")
    logs = root / "logs"
    logs.mkdir()
    data = root / "data"  # /data in every container: the artefact root, the caches, the pipeline files
    (data / "pipelines").mkdir(parents=True)
    (data / "pipelines" / f"{NAME}.yaml").write_text(yaml.safe_dump(PIPELINE))
    # The Postgres cluster runs as the `postgres` user, which cannot enter pytest's private temp directory.
    pg_dir = Path(tempfile.mkdtemp(prefix="lm-saes-test-pg-", dir="/var/tmp"))
    network = client.networks.create(f"lm-saes-test-{suffix}", driver="bridge")
    started: list[subprocess.Popen] = []
    code_server = None
    try:
        network.reload()
        gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]  # the host, as the containers on it see it
        pg_port = free_port()
        exports = subprocess.run(
            [str(DEPLOY / "postgres.sh"), "start", str(pg_dir), str(pg_port), f"127.0.0.1,{gateway}"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        pg = dict(line.removeprefix("export ").split("=", 1) for line in exports.splitlines())
        assert pg["DAGSTER_PG_HOST"] == gateway

        home = root / "dagster_home"
        home.mkdir()
        instance_yaml = instance_config_for_test(_load(DEPLOY / "dagster.cpu.yaml"), data, network.name, pg_port)
        (home / "dagster.yaml").write_text(yaml.safe_dump(instance_yaml))
        code_port = free_port()
        workspace = root / "workspace.yaml"
        workspace.write_text(yaml.safe_dump(
            {"load_from": [{"grpc_server": {"host": "127.0.0.1", "port": code_port, "location_name": LOCATION}}]}
        ))  # fmt: skip
        # The image's own command (the code server on :3030), told which image and settings its runs get. It shares
        # the deployment's instance (sensors run here and open it) and data directory.
        command = json.loads((ROOT / "Dockerfile").read_text().split("\nCMD ", 1)[1].strip())
        run_context = {"docker": {"env_vars": ["LM_SAES_PIPELINES=/data/pipelines", "HF_HUB_OFFLINE=1"]}}
        code_server = client.containers.run(
            IMAGE,
            command=[*command, "--container-image", IMAGE, "--container-context", json.dumps(run_context)],
            name=f"lm-saes-test-code-{suffix}",
            detach=True,
            network=network.name,
            ports={"3030/tcp": ("127.0.0.1", code_port)},
            volumes={
                str(data): {"bind": "/data", "mode": "rw"},
                str(home / "dagster.yaml"): {"bind": "/opt/dagster/dagster_home/dagster.yaml", "mode": "ro"},
            },
            environment={**pg, "LM_SAES_IMAGE": IMAGE, "LM_SAES_PIPELINES": "/data/pipelines", "HF_HUB_OFFLINE": "1"},
        )

        def code_server_answers() -> bool:
            code_server.reload()
            if code_server.status == "exited":
                pytest.fail(f"the code server exited:\n{code_server.logs().decode()[-4000:]}")
            health = [str(VENV_BIN / "dagster"), "api", "grpc-health-check", "-p", str(code_port), "-h", "127.0.0.1"]
            return subprocess.run(health, capture_output=True).returncode == 0

        wait_until(code_server_answers, "the code server container", 120, interval=2.0)
        env = {**pg, "DAGSTER_HOME": str(home), "LM_SAES_IMAGE": IMAGE, "HF_HUB_OFFLINE": "1"}
        process_env = {**os.environ, **env}
        started.append(start([str(VENV_BIN / "dagster-daemon"), "run", "-w", str(workspace)], process_env,
                             logs / "daemon.log"))  # fmt: skip
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        webserver_log = logs / "webserver.log"
        started.append(start([str(VENV_BIN / "dagster-webserver"), "-w", str(workspace), "-h", "127.0.0.1", "-p",
                              str(port)], process_env, webserver_log))  # fmt: skip
        wait_until(lambda: answers(url), "dagster-webserver", 120, webserver_log)

        def location_loaded() -> bool:
            (entry,) = graphql(url, LOCATIONS_QUERY)["workspaceOrError"]["locationEntries"]
            loaded = entry["locationOrLoadError"] or {}
            if loaded.get("__typename") == "PythonError":
                pytest.fail(f"the code location did not load: {loaded['message']}")
            return entry["loadStatus"] == "LOADED" and loaded.get("__typename") == "RepositoryLocation"

        # The code server's proxy answers at once and loads the definitions behind it (the webserver shows LOADING);
        # the first load converts the bundled model into /data/cache, once for every later container.
        wait_until(location_loaded, "the code location (the code server container)", 600, interval=3.0)
        with mock.patch.dict(os.environ, env):
            with dg.DagsterInstance.from_config(str(home)) as instance:
                yield Deployment(url, data, pg, network.name, client, instance, logs, code_server, started)
    finally:
        for process in reversed(started):
            stop(process)
        # Every container of this test: the code server and the runs' (the launcher labels them with their run).
        for container in client.containers.list(all=True, filters={"label": "dagster/run_id"}):
            if container.attrs["HostConfig"].get("NetworkMode") == network.name:
                container.remove(force=True)
        if code_server is not None:
            code_server.remove(force=True)
        network.remove()
        subprocess.run([str(DEPLOY / "postgres.sh"), "stop", str(pg_dir)], check=False)
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
        ... on ErrorEvent { error { message } } } } } }
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
    """The automation sensor would evaluate and analyse each new dictionary in runs of its own; this test launches its
    runs itself, so that the daemon starts nothing else."""
    selector = {
        "repositoryLocationName": LOCATION,
        "repositoryName": "__repository__",
        "sensorName": "lm_saes_automation",
    }
    state = graphql(url, SENSOR_QUERY, {"selector": selector})["sensorOrError"]["sensorState"]
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


def wait_for_success(deployment: Deployment, run_id: str) -> None:
    status = None

    def finished() -> bool:
        nonlocal status
        status = graphql(deployment.url, RUN_QUERY, {"runId": run_id})["runOrError"]["status"]
        return status in ("SUCCESS", "FAILURE", "CANCELED")

    wait_until(finished, f"run {run_id}", RUN_TIMEOUT, deployment.logs / "daemon.log", interval=2.0)
    if status != "SUCCESS":
        events = graphql(deployment.url, RUN_LOGS_QUERY, {"runId": run_id})["logsForRun"].get("events", [])
        messages = "\n".join(
            f"{e.get('stepKey')}: {e.get('message')} {(e.get('error') or {}).get('message', '')}" for e in events
        )
        daemon = (deployment.logs / "daemon.log").read_text()[-3000:]
        pytest.fail(f"run {run_id} ended {status}:\n{messages[-8000:]}\ndaemon log:\n{daemon}")


@pytest.mark.slow
def test_runs_are_containers_of_the_image_sharing_postgres_and_the_data_volume(deployment):
    import psycopg2

    from lm_saes_core.store import RecordStoreConfig, open_store

    stop_automation(deployment.url)
    deployment.instance.add_dynamic_partitions(f"{NAME}_dictionaries", [ITEM])
    runs = {}
    for assets, partition in ((["corpus", "tokens"], None), (["activations"], HOOK),
                              (["dictionary", "evaluation", "feature_analyses"], ITEM)):  # fmt: skip
        run_id = launch(deployment, assets, partition)
        wait_for_success(deployment, run_id)
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
    def latest(asset: str, partition: str | None = None):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey([NAME, asset]), asset_partitions=[partition] if partition else None
            ),
            limit=1,
        ).records
        return records[0]

    assert latest("tokens").run_id == runs["tokens"]
    assert latest("activations", HOOK).run_id == runs["activations"]
    dictionary = latest("dictionary", ITEM)
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
