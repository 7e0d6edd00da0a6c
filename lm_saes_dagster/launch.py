"""How heavy steps (the runners of `lm_saes_core.pipes_entry.RUNNERS`: generate, train, sweep, evaluate, analyze,
dla) leave the Dagster process: a Pipes subprocess locally (plain python or torchrun), a GPU pod through
`PipesK8sClient` on a cluster. The asset hands `launcher.run` the runner's typed settings (built by
`lm_saes_dagster.settings`); the child is `python -m lm_saes_core.pipes_entry RUNNER SETTINGS`, which reports one
materialization back, and the asset returns `launcher.run(...).get_materialize_result()`.

One environment variable picks the backend (`LM_SAES_LAUNCHER=subprocess|k8s`), so the same definitions run on a
laptop and on a cluster.
"""

import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Literal

import dagster as dg
from dagster._core.errors import DagsterPipesExecutionError
from dagster._core.pipes.client import PipesClientCompletedInvocation

from lm_saes_core.config import BaseConfig
from lm_saes_core.io import atomic_write_text
from lm_saes_core.pipes_entry import EXIT_USER_ERROR, RUNNERS, error_file
from lm_saes_dagster.multinode import (
    master_labels,
    node_command,
    object_name,
    rendezvous_service,
    worker_job,
    workers_running,
)

ENTRYPOINT = "lm_saes_core.pipes_entry"
DSHM_VOLUME = "dshm"
DEFAULT_GPU_TOLERATIONS: list[dict[str, Any]] = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
]


def torchrun_command(runner: str, settings_path: str | Path, nproc: int, *, python: str = sys.executable) -> list[str]:
    """The child command: `python -m ...` for one process, `torchrun --standalone` (one node, free rendezvous port)
    for several. torchrun is the one installed next to `python`; a bare `python` (in an image) means the PATH one."""
    if runner not in RUNNERS:
        raise ValueError(f"runner {runner!r} is unknown; choose one of {list(RUNNERS)}")
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    tail = ["-m", ENTRYPOINT, runner, str(settings_path)]
    if nproc == 1:
        return [python, *tail]
    directory = os.path.dirname(python)
    torchrun = os.path.join(directory, "torchrun") if directory else "torchrun"
    return [torchrun, "--standalone", "--nproc-per-node", str(nproc), *tail]


def gpu_pod_spec(
    gpus: int,
    shm_size: str = "16Gi",
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
    active_deadline_seconds: int | None = None,
    env: dict[str, str] | None = None,
    shared_volume_claim: str | None = None,
    shared_mount_path: str | None = None,
) -> dict[str, Any]:
    """A `base_pod_spec` for `PipesK8sClient.run`: N GPUs, a RAM-backed /dev/shm (NCCL and DataLoader workers break
    on the 64 MiB default; k8s has no shm field), never restarted (a crashed training run should surface, not loop).
    `shared_volume_claim` mounts the PVC that holds the settings file and the artefacts."""
    if gpus < 0:
        raise ValueError(f"gpus must be >= 0, got {gpus}")
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    mounts = [{"name": DSHM_VOLUME, "mountPath": "/dev/shm"}]
    volumes: list[dict[str, Any]] = [{"name": DSHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}]
    if shared_volume_claim:
        if not shared_mount_path:
            raise ValueError("shared_mount_path is required with shared_volume_claim")
        mounts.append({"name": "shared", "mountPath": shared_mount_path})
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": shared_volume_claim}})
    container: dict[str, Any] = {"resources": resources, "volumeMounts": mounts}
    if env:
        container["env"] = [{"name": key, "value": value} for key, value in env.items()]
    spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container], "volumes": volumes}
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = [dict(toleration) for toleration in tolerations]
    if active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = active_deadline_seconds
    return spec


def k8s_run_tags(
    gpus: int,
    *,
    cpu: str | None = None,
    memory: str | None = None,
    shm_size: str = "16Gi",
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
    active_deadline_seconds: int | None = None,
) -> dict[str, str]:
    """Run tags that make `K8sRunLauncher` put the whole run on a GPU node (when the heavy step runs inside the run
    pod instead of a Pipes pod). The value is JSON, as run tags are strings (job tags, Launchpad, API)."""
    requests: dict[str, str] = {"nvidia.com/gpu": str(gpus)}
    limits: dict[str, str] = {"nvidia.com/gpu": str(gpus)}
    if cpu:
        requests["cpu"] = cpu
    if memory:
        requests["memory"] = limits["memory"] = memory
    pod_spec_config: dict[str, Any] = {
        "volumes": [{"name": DSHM_VOLUME, "empty_dir": {"medium": "Memory", "size_limit": shm_size}}]
    }
    if node_selector:
        pod_spec_config["node_selector"] = dict(node_selector)
    if tolerations:
        pod_spec_config["tolerations"] = [dict(toleration) for toleration in tolerations]
    job_spec_config: dict[str, Any] = {"backoff_limit": 0}
    if active_deadline_seconds is not None:
        job_spec_config["active_deadline_seconds"] = active_deadline_seconds
    config = {
        "container_config": {
            "resources": {"requests": requests, "limits": limits},
            "volume_mounts": [{"name": DSHM_VOLUME, "mount_path": "/dev/shm"}],
        },
        "pod_spec_config": pod_spec_config,
        "job_spec_config": job_spec_config,
    }
    return {"dagster-k8s/config": json.dumps(config)}


class HeavyStepLauncher(dg.ConfigurableResource):
    """Runs `lm_saes_core.pipes_entry RUNNER SETTINGS` under Dagster Pipes, here or in a GPU pod."""

    backend: Literal["subprocess", "k8s"] = "subprocess"
    image: str | None = None
    """Container image of the heavy step (k8s); the code-location image built from the Dockerfile works."""
    namespace: str | None = None
    """Namespace of the GPU pods; None = the current one (in cluster) or "default"."""
    gpus_per_node: int = 8
    """The most GPUs one pod may ask for: nproc above this is an error (one pod is one node)."""
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, str]] = DEFAULT_GPU_TOLERATIONS
    shm_size: str = "16Gi"
    active_deadline_seconds: int = 7 * 24 * 3600
    env: dict[str, str] = {}
    """Extra environment of the child (both backends), e.g. LM_SAES_HOME, HF_HOME, WANDB_MODE."""
    shared_volume_claim: str | None = None
    """k8s: PVC mounted in the GPU pod at `shared_mount_path`; `workdir` and the settings' paths must lie on it."""
    shared_mount_path: str = "/data"

    def write_settings(self, runner: str, settings: BaseConfig, workdir: str | Path) -> Path:
        """The settings' JSON dump, checked to be the runner's own settings class (a mismatch fails here, before a
        process or pod starts). Written atomically, so a pod or process never reads half a file; named apart from
        the runners' own files."""
        if runner not in RUNNERS:
            raise ValueError(f"runner {runner!r} is unknown; choose one of {list(RUNNERS)}")
        expected = RUNNERS[runner].settings_class()
        if not isinstance(settings, expected):
            raise TypeError(
                f"runner {runner!r} takes {expected.__module__}.{expected.__name__}, got {type(settings).__name__}: "
                "build it with lm_saes_dagster.settings"
            )
        path = Path(workdir) / f"{runner}.pipes-settings.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings_dump(settings), indent=2))
        return path

    def pod_spec(self, nproc: int) -> dict[str, Any]:
        if nproc > self.gpus_per_node:
            raise ValueError(
                f"nproc={nproc} exceeds gpus_per_node={self.gpus_per_node}: one pod runs on one node; lower "
                "data_parallel_size x model_parallel_size or raise gpus_per_node"
            )
        return gpu_pod_spec(
            nproc,
            self.shm_size,
            self.node_selector,
            self.tolerations,
            self.active_deadline_seconds,
            self.env,
            self.shared_volume_claim,
            self.shared_mount_path if self.shared_volume_claim else None,
        )

    def run(
        self,
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        runner: str,
        settings: BaseConfig,
        *,
        nproc: int = 1,
        nnodes: int = 1,
        workdir: str | Path,
        asset_key: str | None = None,
    ) -> PipesClientCompletedInvocation:
        """Run the step on `nproc` processes over `nnodes` nodes (k8s: one pod each) and wait. `asset_key` (user
        string, e.g. "pipe/dictionary") picks which asset the child reports when the step materializes several."""
        extras = {"asset_key": asset_key} if asset_key else None
        if nnodes > 1 and (self.backend != "k8s" or nproc % nnodes):
            why = "needs the k8s backend (LM_SAES_LAUNCHER=k8s)" if self.backend != "k8s" else (
                f"needs the {nproc} processes to split evenly over the nodes")  # fmt: skip
            raise ValueError(f"a step on n_nodes={nnodes} {why}")
        if self.backend == "subprocess":
            settings_path = self.write_settings(runner, settings, workdir)
            error_file(settings_path).unlink(missing_ok=True)  # an earlier attempt's cause is not this one's
            command = torchrun_command(runner, settings_path, nproc)
            try:
                return dg.PipesSubprocessClient().run(
                    context=context, command=command, env=self.env or None, extras=extras
                )
            except DagsterPipesExecutionError as exc:
                raise step_failure(_step_name(context), runner, str(exc), error_file(settings_path)) from None
        if not self.image:
            raise ValueError("image: the k8s backend needs the heavy step's image (set LM_SAES_K8S_IMAGE)")
        from dagster_k8s import PipesK8sClient

        if nnodes > 1:
            return self._run_on_nodes(context, runner, settings, nproc // nnodes, nnodes, workdir, extras)
        pod_spec = self.pod_spec(nproc)
        command = torchrun_command(runner, self.write_settings(runner, settings, workdir), nproc, python="python")
        return PipesK8sClient().run(
            context=context,
            image=self.image,
            command=command,
            namespace=self.namespace,
            base_pod_spec=pod_spec,
            extras=extras,
        )

    def _run_on_nodes(self, context, runner, settings, per_node: int, nnodes: int, workdir, extras):
        """Node 0 as the Pipes pod, nodes 1 .. N-1 as an indexed Job, joined through a headless Service (see
        `lm_saes_dagster.multinode`)."""
        from dagster_k8s import PipesK8sClient

        name = object_name(context.run_id, _step_name(context))
        entrypoint = ["-m", ENTRYPOINT, runner, str(self.write_settings(runner, settings, workdir))]
        pod_spec = self.pod_spec(per_node)
        namespace = self.namespace or _current_namespace()
        workers = worker_job(name, self.image, node_command(entrypoint, nnodes, per_node, name, None), pod_spec,
                             nnodes - 1)  # fmt: skip
        with workers_running(rendezvous_service(name), workers, namespace):
            return PipesK8sClient().run(
                context=context,
                image=self.image,
                command=node_command(entrypoint, nnodes, per_node, name, 0),
                namespace=namespace,
                base_pod_meta={"labels": master_labels(name)},
                base_pod_spec=pod_spec,
                extras=extras,
            )


def _current_namespace() -> str:
    """The namespace this process runs in (in a cluster), else "default"."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.is_file() else "default"


def settings_dump(settings: BaseConfig) -> dict[str, Any]:
    """The settings as JSON for the child, whose reading gives back the same settings: the initializer sections hold
    only the fields that were given, since the initializer tells a step asked for explicitly (an error when the kind
    lacks it) from one left at its default (skipped then)."""
    dump = settings.model_dump(mode="json")
    items = getattr(settings, "items", None) or []  # a sweep's
    holders = [(dump, settings), *zip(dump.get("items") or [], items, strict=True)]
    for data, holder in holders:
        initializer = getattr(holder, "initializer", None)
        if initializer is not None:
            data["initializer"] = initializer.model_dump(mode="json", exclude_unset=True)
    return dump


def _step_name(context: dg.AssetExecutionContext | dg.OpExecutionContext) -> str:
    op_context = getattr(context, "op_execution_context", context)
    name = op_context.op_def.name
    return f"{name}[{context.partition_key}]" if context.has_partition_key else name


def step_failure(step: str, runner: str, pipes_error: str, cause_file: Path) -> dg.Failure:
    """What a failed heavy step tells the person looking at the run: the step, how its process ended (exit status or
    signal) and the cause it recorded. A user error (exit status 2: settings, inputs, stores) fails for good, since a
    retry would fail the same way; anything else (a killed process, an evicted pod, a crash) may be retried, and a
    retried training step continues from its newest checkpoint."""
    match = re.search(r"code (-?\d+)", pipes_error)
    code = int(match.group(1)) if match else None
    cause = cause_file.read_text().strip() if cause_file.is_file() else ""
    if code == EXIT_USER_ERROR:
        message = f"step {step!r} ({runner}) stopped on a user error: {cause or pipes_error}"
        return dg.Failure(message, allow_retries=False)
    signal_number = -code if code is not None and code < 0 else (code - 128 if code and 128 < code < 160 else None)
    if signal_number is not None:
        try:
            name = signal.Signals(signal_number).name
        except ValueError:
            name = f"signal {signal_number}"
        why = " (out of memory, a cancelled run or an evicted pod)" if name == "SIGKILL" else ""
        return dg.Failure(
            f"step {step!r} ({runner}): its process was killed by {name}{why}, exit status {code}; a retry continues "
            "from the newest checkpoint",
            metadata={"exit_status": code, "signal": name},
        )
    return dg.Failure(
        f"step {step!r} ({runner}) failed with exit status {code}: {cause or pipes_error}",
        metadata={"exit_status": code if code is not None else -1},
    )


def launcher_from_env(environ: dict[str, str] | None = None) -> HeavyStepLauncher:
    """`LM_SAES_LAUNCHER` = subprocess (default) | k8s; k8s reads `LM_SAES_K8S_IMAGE` and `LM_SAES_K8S_NAMESPACE`."""
    environ = dict(os.environ if environ is None else environ)
    backend = environ.get("LM_SAES_LAUNCHER", "subprocess").strip() or "subprocess"
    if backend == "subprocess":
        return HeavyStepLauncher()
    if backend == "k8s":
        image = environ.get("LM_SAES_K8S_IMAGE")
        if not image:
            raise ValueError("LM_SAES_LAUNCHER=k8s needs LM_SAES_K8S_IMAGE (the image the GPU pods run)")
        return HeavyStepLauncher(backend="k8s", image=image, namespace=environ.get("LM_SAES_K8S_NAMESPACE") or None)
    raise ValueError(f"LM_SAES_LAUNCHER={backend!r} is unknown; use 'subprocess' (default) or 'k8s'")
