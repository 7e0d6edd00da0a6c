"""How heavy steps leave the Dagster process: pod and job specs built by dagster-k8s's own functions, the deploy
YAMLs against their classes' config schemas, a real Pipes subprocess run of the training entrypoint reporting back
to a real Dagster instance, and the entrypoint as a plain command. No cluster or Docker daemon here: the only fakes
are the Kubernetes API objects handed to the real K8sRunLauncher."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest.mock import MagicMock

import dagster as dg
import pytest
import torch
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.launcher import LaunchRunContext
from dagster._core.storage.config import pg_config
from dagster_docker import DockerRunLauncher
from dagster_k8s import K8sRunLauncher
from dagster_k8s.pipes import build_pod_body
from safetensors.torch import load_file

from lm_saes_core.activation.writer import ActivationWriter, ActivationWriterConfig
from lm_saes_core.io import file_sha256
from lm_saes_core.pipes_entry import RUNNERS, USAGE
from lm_saes_core.runners.evaluate import EvaluateSAESettings
from lm_saes_core.runners.train import TrainSAESettings
from lm_saes_dagster.launch import (
    HeavyStepLauncher,
    gpu_pod_spec,
    k8s_run_tags,
    launcher_from_env,
    settings_dump,
    torchrun_command,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
HOOK = "blocks.0.hook_resid_post"
D_MODEL = 16
NODE_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


# ---------------------------------------------------------------- pure functions


def test_torchrun_command_for_one_and_several_processes():
    assert torchrun_command("train", "/w/s.json", 1) == [
        sys.executable,
        "-m",
        "lm_saes_core.pipes_entry",
        "train",
        "/w/s.json",
    ]
    multi = torchrun_command("generate", "/w/s.json", 4)
    assert Path(multi[0]) == Path(sys.executable).parent / "torchrun" and Path(multi[0]).exists()
    assert multi[1:] == [
        "--standalone",
        "--nproc-per-node",
        "4",
        "-m",
        "lm_saes_core.pipes_entry",
        "generate",
        "/w/s.json",
    ]
    assert torchrun_command("train", "s.json", 2, python="python")[0] == "torchrun"  # the image's PATH one
    with pytest.raises(ValueError, match="runner 'analyse' is unknown"):
        torchrun_command("analyse", "s.json", 1)
    with pytest.raises(ValueError, match="nproc must be at least 1, got 0"):
        torchrun_command("train", "s.json", 0)


def test_launcher_backend_comes_from_one_environment_variable():
    assert launcher_from_env({}).backend == "subprocess"
    k8s = launcher_from_env(
        {"LM_SAES_LAUNCHER": "k8s", "LM_SAES_K8S_IMAGE": "reg/lm-saes:1", "LM_SAES_K8S_NAMESPACE": "gpu"}
    )
    assert (k8s.backend, k8s.image, k8s.namespace) == ("k8s", "reg/lm-saes:1", "gpu")
    with pytest.raises(ValueError, match="LM_SAES_K8S_IMAGE"):
        launcher_from_env({"LM_SAES_LAUNCHER": "k8s"})
    with pytest.raises(ValueError, match="LM_SAES_LAUNCHER='slurm' is unknown"):
        launcher_from_env({"LM_SAES_LAUNCHER": "slurm"})
    with pytest.raises(ValueError, match="nproc=16 exceeds gpus_per_node=8"):
        HeavyStepLauncher(backend="k8s", image="x").pod_spec(16)


def test_the_runner_table_names_each_runner_once_for_the_launcher_and_the_usage_line():
    """One table (lm_saes_core.pipes_entry.RUNNERS): the launcher accepts exactly its runners, the usage line lists
    them, and each names a settings class that imports."""
    assert list(RUNNERS) == ["train", "train-crosscoder", "sweep", "evaluate", "generate", "analyze", "dla"]
    assert USAGE.endswith("{train|train-crosscoder|sweep|evaluate|generate|analyze|dla} SETTINGS_FILE")
    for runner, step in RUNNERS.items():
        assert torchrun_command(runner, "s.json", 1)[-2] == runner
        assert step.settings_class().__name__.endswith("Settings")
    assert RUNNERS["evaluate"].settings_class() is EvaluateSAESettings


def test_the_entrypoint_imports_no_runner_at_module_level():
    """The table names settings classes as "module:Class", imported when a step runs: the entrypoint module itself
    imports no runner (nor torch), so a bad command fails before they load."""
    source = (ROOT / "lm_saes_core" / "pipes_entry.py").read_text()
    module_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in module_level if "runners" in line or "torch" in line], module_level
    assert all(":" in step.settings and "runners" in step.settings for step in RUNNERS.values())


def test_the_launcher_takes_the_runners_typed_settings_and_writes_their_json_dump(activation_cache, tmp_path):
    launcher = HeavyStepLauncher()
    settings = TrainSAESettings.model_validate(train_settings(activation_cache, tmp_path / "out"))
    path = launcher.write_settings("train", settings, tmp_path / "work")
    assert path == tmp_path / "work" / "train.pipes-settings.json"
    assert TrainSAESettings.model_validate_json(path.read_text()) == settings
    with pytest.raises(TypeError, match="runner 'evaluate' takes lm_saes_core.runners.evaluate.EvaluateSAESettings"):
        launcher.write_settings("evaluate", settings, tmp_path / "work")
    with pytest.raises(TypeError, match="got dict"):
        launcher.write_settings("train", train_settings(activation_cache, tmp_path / "out"), tmp_path / "work")
    with pytest.raises(ValueError, match="runner 'analyse' is unknown"):
        launcher.write_settings("analyse", settings, tmp_path / "work")
    assert not (tmp_path / "work" / "evaluate.pipes-settings.json").exists()


# ---------------------------------------------------------------- (a) the Pipes pod, built by dagster-k8s


def test_pipes_pod_body_requests_gpus_shm_placement_and_runs_torchrun():
    launcher = HeavyStepLauncher(
        backend="k8s",
        image="reg/lm-saes:1",
        node_selector=NODE_SELECTOR,
        tolerations=TOLERATIONS,
        shm_size="32Gi",
        active_deadline_seconds=86400,
        env={"LM_SAES_HOME": "/data/lm_saes"},
        shared_volume_claim="lm-saes-data",
    )
    command = torchrun_command("train", "/data/w/train.pipes-settings.json", 4, python="python")
    # what PipesK8sClient.run does with base_pod_spec (env_vars stand for the Pipes bootstrap variables)
    pod = build_pod_body(
        pod_name="dagster-abc-train",
        image=launcher.image,
        command=command,
        env_vars={"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msg"},
        base_pod_meta=None,
        base_pod_spec=launcher.pod_spec(4),
    )
    spec, container = pod.spec, pod.spec.containers[0]
    assert container.image == "reg/lm-saes:1"
    assert container.command == ["torchrun", "--standalone", "--nproc-per-node", "4", "-m"] + [
        "lm_saes_core.pipes_entry",
        "train",
        "/data/w/train.pipes-settings.json",
    ]
    assert container.resources.limits == {"nvidia.com/gpu": "4"}
    assert {(m.name, m.mount_path) for m in container.volume_mounts} == {("dshm", "/dev/shm"), ("shared", "/data")}
    volumes = {volume.name: volume for volume in spec.volumes}
    assert volumes["dshm"].empty_dir.medium == "Memory" and volumes["dshm"].empty_dir.size_limit == "32Gi"
    assert volumes["shared"].persistent_volume_claim.claim_name == "lm-saes-data"
    assert spec.node_selector == NODE_SELECTOR
    assert [(t.key, t.operator, t.effect) for t in spec.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert spec.active_deadline_seconds == 86400 and spec.restart_policy == "Never"
    env = {var.name: var.value for var in container.env}
    assert env == {"LM_SAES_HOME": "/data/lm_saes", "DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msg"}


def test_cpu_pod_spec_asks_for_no_gpu():
    spec = gpu_pod_spec(0)
    assert spec["containers"][0]["resources"] == {} and "nodeSelector" not in spec


# ---------------------------------------------------------------- (b) the real K8sRunLauncher


@dg.op
def noop() -> None:
    pass


@dg.job
def gpu_run_job() -> None:
    noop()


class FakeBatchV1Api(MagicMock):
    """Stands in for kubernetes.client.BatchV1Api: records create_namespaced_job instead of calling a cluster."""


class FakeCoreV1Api(MagicMock):
    """Stands in for kubernetes.client.CoreV1Api (the launcher does not call it when launching)."""


def _fake_kubeconfig(path: Path) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [{"name": "fake", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        "current-context": "fake",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_k8s_run_launcher_from_deploy_yaml_turns_run_tags_into_a_gpu_job(tmp_path):
    launcher_yaml = _load(DEPLOY / "k8s" / "dagster.yaml")["run_launcher"]
    assert launcher_yaml["class"] == "K8sRunLauncher"
    processed = process_config(K8sRunLauncher.config_type(), launcher_yaml["config"])
    assert processed.success, processed.errors
    batch_api, core_api = FakeBatchV1Api(), FakeCoreV1Api()
    launcher = K8sRunLauncher(
        **{
            **processed.value,
            "load_incluster_config": False,  # no cluster here: a kubeconfig that is never contacted
            "kubeconfig_file": str(_fake_kubeconfig(tmp_path / "kubeconfig")),
            "job_image": "reg/lm-saes:1",
        },
        k8s_client_batch_api=batch_api,
        k8s_client_core_api=core_api,
    )
    tags = k8s_run_tags(
        4, cpu="16", memory="128Gi", node_selector=NODE_SELECTOR, tolerations=TOLERATIONS, active_deadline_seconds=3600
    )
    with dg.instance_for_test() as instance:
        launcher.register_instance(instance)
        run = instance.create_run_for_job(
            gpu_run_job, job_code_origin=dg.reconstructable(gpu_run_job).get_python_origin(), tags=tags
        )
        launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))

    call = batch_api.create_namespaced_job.call_args
    assert call.kwargs["namespace"] == "lm-saes"
    job = call.kwargs["body"]
    pod_spec = job.spec.template.spec
    container = pod_spec.containers[0]
    assert container.resources.requests == {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "4"}
    assert container.resources.limits == {"memory": "128Gi", "nvidia.com/gpu": "4"}
    mounts = {mount.name: mount.mount_path for mount in container.volume_mounts}
    assert mounts == {"dshm": "/dev/shm", "lm-saes-data": "/data"}  # tag and instance run_k8s_config both apply
    volumes = {volume.name: volume for volume in pod_spec.volumes}
    assert volumes["dshm"].empty_dir.medium == "Memory" and volumes["dshm"].empty_dir.size_limit == "16Gi"
    assert volumes["lm-saes-data"].persistent_volume_claim.claim_name == "lm-saes-data"
    assert pod_spec.node_selector == NODE_SELECTOR
    assert pod_spec.tolerations[0].key == "nvidia.com/gpu"
    assert pod_spec.service_account_name == "dagster"
    assert job.spec.backoff_limit == 0 and job.spec.active_deadline_seconds == 3600
    assert container.image == "reg/lm-saes:1" and container.image_pull_policy == "IfNotPresent"
    assert container.args[:3] == ["dagster", "api", "execute_run"]
    env = {var.name: var.value for var in container.env if var.value is not None}
    assert env["LM_SAES_LAUNCHER"] == "k8s"
    core_api.assert_not_called()


# ---------------------------------------------------------------- (c) deploy YAMLs against their schemas


@pytest.mark.parametrize("name", ["local", "k8s", "docker"])
def test_instance_yaml_passes_dagsters_instance_schema(name, monkeypatch):
    for var in ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB", "LM_SAES_IMAGE"):
        monkeypatch.setenv(var, "x")
    monkeypatch.setenv("DAGSTER_PG_PORT", "5432")
    config, _ = dagster_instance_config(str(DEPLOY / name))
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    assert config["run_monitoring"]["enabled"] is True
    if name != "local":
        assert process_config(pg_config(), config["storage"]["postgres"]).success


def test_local_instance_boots_on_sqlite(tmp_path):
    (tmp_path / "dagster.yaml").write_text((DEPLOY / "local" / "dagster.yaml").read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def test_docker_launcher_yaml_requests_gpus_and_shared_memory():
    launcher_yaml = _load(DEPLOY / "docker" / "dagster.yaml")["run_launcher"]
    launcher_class = getattr(importlib.import_module(launcher_yaml["module"]), launcher_yaml["class"])
    assert issubclass(launcher_class, DockerRunLauncher)  # ours: it names the image when a container cannot start
    processed = process_config(launcher_class.config_type(), {**launcher_yaml["config"], "image": "reg/lm-saes:1"})
    assert processed.success, processed.errors
    kwargs = processed.value["container_kwargs"]
    launcher = launcher_class(**processed.value)  # builds without a daemon
    assert launcher.image == "reg/lm-saes:1"
    from docker.models.containers import _create_container_args  # what docker-py does with container_kwargs

    host_config = _create_container_args({"image": "reg/lm-saes:1", "version": "1.45", **kwargs})["host_config"]
    assert host_config["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert host_config["ShmSize"] == 16 * 2**30 and host_config["IpcMode"] == "host"


def test_workspace_points_at_the_code_server_the_dockerfile_starts():
    entry = _load(DEPLOY / "k8s" / "workspace.yaml")["load_from"][0]["grpc_server"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = json.loads(dockerfile.split("\nCMD ", 1)[1].strip())
    assert cmd[:3] == ["dagster", "code-server", "start"]
    assert cmd[cmd.index("-m") + 1] == "lm_saes_dagster.definitions"
    assert cmd[cmd.index("-p") + 1] == str(entry["port"])
    assert cmd[cmd.index("--location-name") + 1] == entry["location_name"]
    assert "ARG BASE_IMAGE=python:3.11-slim" in dockerfile and "torch==" in dockerfile


# ---------------------------------------------------------------- (d, e) the entrypoint, with and without Pipes


def _synthetic_stream(n_items: int = 16, rows: int = 8, context: int = 32):
    """2-D items whose activations are sparse codes times a fixed basis, so a tiny SAE has structure to learn."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(64, D_MODEL, generator=generator)
    for i in range(n_items):
        codes = torch.relu(torch.randn(rows, context, 64, generator=generator) - 1.5)
        yield {
            HOOK: codes @ basis,
            "tokens": torch.randint(0, 1000, (rows, context), generator=generator),
            "mask": torch.ones(rows, context, dtype=torch.bool),
            "attention_mask": torch.ones(rows, context, dtype=torch.bool),
            "doc_index": torch.full((rows, context), i),
            "doc_position": torch.arange(context).repeat(rows, 1),
            "source_idx": torch.zeros(rows, context, dtype=torch.long),
        }


@pytest.fixture(scope="module")
def activation_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("launch-cache") / "cache"
    manifest = ActivationWriter(ActivationWriterConfig(hook_points=[HOOK], cache_dir=str(root))).write(
        _synthetic_stream()
    )
    assert manifest["n_tokens"] == 16 * 8 * 32
    return root


def train_settings(cache: Path, out: Path) -> dict:
    return {
        "sae": {
            "sae_type": "sae",
            "d_model": D_MODEL,
            "expansion_factor": 4,
            "hook_point_in": HOOK,
            "hook_point_out": HOOK,
            "act_fn": "topk",
            "top_k": 4,
        },
        "sae_name": "tiny",
        "activation_factory": {
            "sources": [{"type": "activations", "name": "synthetic", "path": str(cache)}],
            "target": "activations-1d",
            "hook_points": [HOOK],
            "batch_size": 128,
        },
        "initializer": {"bias_init_method": "mean", "grid_search_init_norm": True},
        "trainer": {
            "lr": 5e-3,
            "lr_warm_up_steps": 0,
            "total_training_tokens": 128 * 20,
            "log_frequency": 5,
            "n_checkpoints": 0,
            "exp_result_path": str(out),
        },
    }


def test_pipes_subprocess_run_reports_the_childs_materialization(activation_cache, tmp_path):
    out = tmp_path / "dictionary"
    settings = TrainSAESettings.model_validate(train_settings(activation_cache, out))

    @dg.asset
    def dictionary(context: dg.AssetExecutionContext, launcher: HeavyStepLauncher) -> dg.MaterializeResult:
        return launcher.run(context, "train", settings, workdir=str(tmp_path / "work")).get_materialize_result()

    with dg.instance_for_test() as instance:
        result = dg.materialize([dictionary], instance=instance, resources={"launcher": HeavyStepLauncher()})
        assert result.success
        (event,) = result.get_asset_materialization_events()
        materialization = event.materialization
        latest = instance.get_latest_materialization_event(dg.AssetKey("dictionary"))

    weights = out / "sae_weights.safetensors"
    assert weights.is_file() and load_file(weights)["W_E"].shape == (D_MODEL, 4 * D_MODEL)
    metadata = materialization.metadata
    assert metadata["steps"].value == 20 and metadata["n_tokens"].value == 128 * 20
    assert 0.0 < metadata["l0"].value <= 4.0  # topk keeps at most k=4 latents per token
    assert 0.3 < metadata["explained_variance"].value < 1.0  # 0.64 measured: 20 steps learn real structure
    assert metadata["output_path"].value == str(out)
    assert materialization.tags["dagster/data_version"] == file_sha256(weights)
    assert latest.asset_materialization.tags["dagster/data_version"] == file_sha256(weights)
    written = json.loads((tmp_path / "work" / "train.pipes-settings.json").read_text())
    assert written == settings_dump(settings)  # the full dump, initializer sections as given
    assert TrainSAESettings.model_validate(written) == settings


def _entry(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lm_saes_core.pipes_entry", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )


def test_entrypoint_runs_as_a_plain_command(activation_cache, tmp_path):
    settings_file = tmp_path / "train.json"
    settings_file.write_text(json.dumps(train_settings(activation_cache, tmp_path / "out")))
    done = _entry("train", str(settings_file))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "sae_weights.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "train_result.json").read_text())["steps"] == 20

    # Under torchrun every rank inherits the Pipes variables; only rank 0 may open the channel. A broken channel
    # shows who opens it (the finished run above is reused, so these runs are quick).
    broken_pipes = {**os.environ, "DAGSTER_PIPES_CONTEXT": "not-base64-json", "DAGSTER_PIPES_MESSAGES": "x"}
    assert _entry("train", str(settings_file), env={**broken_pipes, "RANK": "1"}).returncode == 0
    assert _entry("train", str(settings_file), env={**broken_pipes, "RANK": "0"}).returncode == 1


def test_entrypoint_rejects_bad_settings_and_runners_with_named_errors(activation_cache, tmp_path):
    data = train_settings(activation_cache, tmp_path / "out")
    data["trainer"]["learning_rate"] = 0.1  # not a field: lr is
    settings_file = tmp_path / "bad.json"
    settings_file.write_text(json.dumps(data))
    done = _entry("train", str(settings_file))
    assert done.returncode == 2
    assert "unknown key 'trainer.learning_rate'" in done.stderr and str(settings_file) in done.stderr
    assert not (tmp_path / "out").exists()

    missing = _entry("train", str(tmp_path / "nowhere.json"))
    assert missing.returncode == 2 and "config file not found" in missing.stderr
    unknown = _entry("analyse", str(settings_file))
    assert unknown.returncode == 2 and "runner 'analyse' is unknown" in unknown.stderr
    assert _entry("train").returncode == 2


def test_entrypoint_reports_a_user_error_with_exit_2_and_leaves_its_cause_for_the_launcher(tmp_path):
    data = train_settings(tmp_path / "no-cache-here", tmp_path / "out")
    settings_file = tmp_path / "train.pipes-settings.json"
    settings_file.write_text(json.dumps(data))
    done = _entry("train", str(settings_file))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "lm_saes_core.pipes_entry: activation cache directory not found" in done.stderr
    assert "no-cache-here" in (tmp_path / "train.pipes-error.txt").read_text()


def test_a_failing_child_fails_the_asset_with_the_childs_error(tmp_path):
    settings = TrainSAESettings.model_validate(train_settings(tmp_path / "no-cache-here", tmp_path / "out"))

    @dg.asset
    def dictionary(context: dg.AssetExecutionContext, launcher: HeavyStepLauncher) -> dg.MaterializeResult:
        return launcher.run(context, "train", settings, workdir=str(tmp_path / "work")).get_materialize_result()

    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [dictionary], instance=instance, resources={"launcher": HeavyStepLauncher()}, raise_on_error=False
        )
        assert not result.success
        records = instance.all_logs(result.run_id)
    closed = [r.dagster_event for r in records if r.message == "[pipes] external process pipes closed with exception"]
    child_error = closed[0].engine_event_data.error  # the child's own exception, carried back by Pipes
    assert "no-cache-here" in child_error.message
    failure = result.get_step_failure_events()[0].step_failure_data
    assert failure.user_failure_data.description == (
        f"step 'dictionary' (train) stopped on a user error: activation cache directory not found: "
        f"{tmp_path / 'no-cache-here'}"
    )


def test_the_written_settings_keep_which_initializer_steps_were_asked_for(tmp_path):
    """A step left at its default is skipped on a kind that lacks it, one given explicitly is an error: the child
    must read the same distinction back from the file (a full dump would make every default explicit)."""
    from lm_saes_core.training.initializer import InitializerConfig

    settings = TrainSAESettings.model_validate(train_settings(tmp_path / "cache", tmp_path / "out"))
    settings.initializer = InitializerConfig(grid_search_init_norm=False)
    written = HeavyStepLauncher().write_settings("train", settings, tmp_path)
    child = TrainSAESettings.model_validate_json(written.read_text())
    assert child.initializer.model_fields_set == {"grid_search_init_norm"}
    assert child.model_dump() == settings.model_dump()


# ---------------------------------------------------------------- several nodes (spec-tested: no cluster here)


def test_a_two_node_step_is_a_pipes_pod_an_indexed_job_and_a_headless_service():
    """2 nodes x 4 GPUs: node 0 (the Pipes pod, global rank 0, which reports) and an indexed Job of one worker whose
    node rank is 1 + its completion index, all joined at the Service's DNS name on the rendezvous port."""
    import kubernetes
    from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

    def model(cls, manifest):  # the manifest (camelCase, as applied to a cluster) read as the client's model
        return k8s_model_from_dict(cls, k8s_snake_case_dict(cls, manifest))

    from lm_saes_dagster.multinode import (
        RENDEZVOUS_PORT,
        master_labels,
        node_command,
        object_name,
        rendezvous_service,
        worker_job,
    )

    name = object_name("0f3c9a7e-1234-4bcd", "pipe__dictionary[TopK_k32]")
    assert name == "lm-saes-0f3c9a7e-pipe-dictionary-topk-k32" and len(object_name("a" * 36, "x" * 99)) <= 52
    launcher = HeavyStepLauncher(backend="k8s", image="reg/lm-saes:1", shared_volume_claim="lm-saes-data")
    pod_spec = launcher.pod_spec(4)
    entrypoint = ["-m", "lm_saes_core.pipes_entry", "train", "/data/w/train.pipes-settings.json"]
    service = model(kubernetes.client.V1Service, rendezvous_service(name))
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses
    assert service.spec.selector == master_labels(name) and service.spec.ports[0].port == RENDEZVOUS_PORT
    job = model(
        kubernetes.client.V1Job,
        worker_job(name, launcher.image, node_command(entrypoint, 2, 4, name, None), pod_spec, 1),
    )
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism) == ("Indexed", 1, 1)
    assert job.spec.backoff_limit == 0 and job.spec.template.spec.restart_policy == "Never"
    worker = job.spec.template.spec.containers[0]
    assert worker.image == "reg/lm-saes:1" and worker.resources.limits == {"nvidia.com/gpu": "4"}
    assert worker.command[:2] == ["sh", "-c"] and worker.command[2].startswith("exec torchrun --nnodes=2 ")
    assert f"--master-addr={name} --master-port={RENDEZVOUS_PORT}" in worker.command[2]
    assert '--node-rank="$((JOB_COMPLETION_INDEX + 1))" -m lm_saes_core.pipes_entry train' in worker.command[2]
    # the selector finds node 0 and not the workers
    assert not set(master_labels(name).items()) <= set(job.spec.template.metadata.labels.items())
    master = build_pod_body(pod_name="dagster-abc", image=launcher.image,
                            command=node_command(entrypoint, 2, 4, name, 0), env_vars={},
                            base_pod_meta={"labels": master_labels(name)}, base_pod_spec=pod_spec)  # fmt: skip
    assert set(master_labels(name).items()) <= set(master.metadata.labels.items())
    assert master.spec.containers[0].command == [
        "torchrun", "--nnodes=2", "--nproc-per-node=4", f"--master-addr={name}", f"--master-port={RENDEZVOUS_PORT}",
        "--node-rank=0", *entrypoint,
    ]  # fmt: skip


def test_the_workers_and_service_exist_only_while_node_0_runs(monkeypatch, tmp_path):
    """The lifecycle, against a fake Kubernetes API (named so: no cluster can run here) and a node 0 that fails: the
    Service and the Job are created before node 0 starts and deleted after it ends, failed or not."""
    import kubernetes
    from dagster_k8s import PipesK8sClient

    calls = []

    class FakeKubernetesApi:  # stands in for CoreV1Api and BatchV1Api
        def __getattr__(self, method):
            return lambda *args, **kwargs: calls.append((method, args[0] if "delete" in method else args[1]["kind"]))

    def node_0_fails(self, **kwargs):
        calls.append(("pipes pod", kwargs["command"][-5]))
        raise RuntimeError("node 0 failed")

    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", FakeKubernetesApi)
    monkeypatch.setattr(kubernetes.client, "BatchV1Api", FakeKubernetesApi)
    monkeypatch.setattr(PipesK8sClient, "run", node_0_fails)
    launcher = HeavyStepLauncher(backend="k8s", image="reg/lm-saes:1", namespace="ml")
    context = MagicMock(run_id="0f3c9a7e-1234", has_partition_key=False)
    context.op_execution_context.op_def.name = "dictionary"
    settings = EvaluateSAESettings.model_validate(
        {"sae": {"pretrained_name_or_path": str(tmp_path)}, "sae_name": "x",
         "activation_factory": {"sources": [{"type": "activations", "name": "c", "path": str(tmp_path)}],
                                "target": "activations-2d", "hook_points": ["h"], "batch_size": 4}}
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="node 0 failed"):
        launcher.run(context, "evaluate", settings, nproc=8, nnodes=2, workdir=tmp_path)
    name = "lm-saes-0f3c9a7e-dictionary"
    assert calls == [
        ("create_namespaced_service", "Service"), ("create_namespaced_job", "Job"), ("pipes pod", "--node-rank=0"),
        ("delete_namespaced_job", f"{name}-workers"), ("delete_namespaced_service", name),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="a step on n_nodes=2 needs the k8s backend"):
        HeavyStepLauncher().run(context, "evaluate", settings, nproc=8, nnodes=2, workdir=tmp_path)
    with pytest.raises(ValueError, match="needs the 9 processes to split evenly over the nodes"):
        launcher.run(context, "evaluate", settings, nproc=9, nnodes=2, workdir=tmp_path)


def test_a_pipeline_item_spreads_its_processes_evenly_over_its_nodes():
    from lm_saes_dagster.pipeline_config import DictionaryItem

    item = {"sae": {"sae_type": "sae", "d_model": 8, "d_sae": 32, "hook_point_in": "h", "hook_point_out": "h",
                    "act_fn": "topk", "top_k": 4}, "trainer": {"total_training_tokens": 1024}}  # fmt: skip
    spread = DictionaryItem.model_validate({**item, "data_parallel_size": 4, "model_parallel_size": 2, "n_nodes": 2})
    assert (spread.n_processes, spread.n_nodes) == (8, 2)
    with pytest.raises(ValueError, match=r"n_nodes=3 does not divide the step's 8 processes"):
        DictionaryItem.model_validate({**item, "data_parallel_size": 4, "model_parallel_size": 2, "n_nodes": 3})
    heads = {**item, "sae": {"sae_type": "crosscoder", "d_model": 8, "d_sae": 32, "heads": ["a", "b", "c", "d"],
                             "act_fn": "topk", "top_k": 4}}  # fmt: skip
    assert DictionaryItem.model_validate({**heads, "head_parallel_size": 2, "model_parallel_size": 2}).n_processes == 4
    with pytest.raises(ValueError, match="crosscoder's 4 heads do not split into 3 equal groups"):
        DictionaryItem.model_validate({**heads, "head_parallel_size": 3})
    with pytest.raises(ValueError, match="sae_type 'sae' has none"):
        DictionaryItem.model_validate({**item, "head_parallel_size": 2})
