"""A heavy step on several Kubernetes nodes: one torchrun per node, joined by a static rendezvous.

Node 0 is the Dagster Pipes pod (`PipesK8sClient`), so the process of global rank 0, which alone reports to Dagster,
runs where Pipes reads the messages. Nodes 1 .. N-1 are an indexed Job (node rank = 1 + its completion index), and
a headless Service named after the step gives node 0 the stable DNS name the others connect to (its address is
published before the pod is ready: torchrun on node 0 listens before any readiness could be declared).

Why an indexed Job and a Service, not the Kubeflow PyTorchJob or JobSet: both are custom resources that a cluster
must have installed (an operator or a controller), while Jobs and Services are in every cluster, and the Pipes pod
keeps its place as the step's reporter. The worker Job and the Service are removed when the step ends, however it
ends. The manifests are plain dicts checked against the Kubernetes models by the tests (no cluster runs here).
"""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

RENDEZVOUS_PORT = 29500
ROLE_LABEL = "lm-saes/role"
STEP_LABEL = "lm-saes/step"


def object_name(run_id: str, step: str) -> str:
    """A DNS-1123 name for the step's Kubernetes objects, unique per run: `lm-saes-<run id[:8]>-<step>`, at most
    52 characters (the Job controller appends a pod suffix to a Job's name)."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", step.lower()).strip("-")
    return f"lm-saes-{run_id[:8].lower()}-{cleaned}"[:52].rstrip("-")


def node_command(
    entrypoint: list[str], nnodes: int, nproc_per_node: int, master: str, node_rank: int | None
) -> list[str]:
    """torchrun on one node of `nnodes`; `node_rank` None is a worker's: 1 + the Job's completion index, read from
    the environment by a shell."""
    flags = [f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}", f"--master-addr={master}",
             f"--master-port={RENDEZVOUS_PORT}"]  # fmt: skip
    if node_rank is not None:
        return ["torchrun", *flags, f"--node-rank={node_rank}", *entrypoint]
    line = " ".join(["exec torchrun", *flags, '--node-rank="$((JOB_COMPLETION_INDEX + 1))"', *entrypoint])
    return ["sh", "-c", line]


def master_labels(name: str) -> dict[str, str]:
    return {STEP_LABEL: name, ROLE_LABEL: "master"}


def rendezvous_service(name: str) -> dict[str, Any]:
    """The headless Service whose DNS name (`name`) is node 0's address."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {STEP_LABEL: name}},
        "spec": {
            "clusterIP": "None",
            "selector": master_labels(name),
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}],
        },
    }


def worker_job(name: str, image: str, command: list[str], pod_spec: dict[str, Any], workers: int) -> dict[str, Any]:
    """Nodes 1 .. workers: an indexed Job, never retried (a lost node fails the step; a retry of the step resumes it
    from its newest checkpoint)."""
    spec = {**pod_spec, "containers": [{**pod_spec["containers"][0], "name": "worker", "image": image,
                                        "command": command}]}  # fmt: skip
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{name}-workers", "labels": {STEP_LABEL: name}},
        "spec": {
            "completionMode": "Indexed",
            "completions": workers,
            "parallelism": workers,
            "backoffLimit": 0,
            "template": {"metadata": {"labels": {STEP_LABEL: name, ROLE_LABEL: "worker"}}, "spec": spec},
        },
    }


@contextmanager
def workers_running(service: dict[str, Any], job: dict[str, Any], namespace: str) -> Iterator[None]:
    """Create the rendezvous Service and the worker Job for the duration of the block (node 0 runs inside it), then
    delete both, with the Job's pods, whether the step succeeded or not."""
    import kubernetes

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    core, batch = kubernetes.client.CoreV1Api(), kubernetes.client.BatchV1Api()
    core.create_namespaced_service(namespace, service)
    try:
        batch.create_namespaced_job(namespace, job)
        try:
            yield
        finally:
            batch.delete_namespaced_job(job["metadata"]["name"], namespace, propagation_policy="Foreground")
    finally:
        core.delete_namespaced_service(service["metadata"]["name"], namespace)
