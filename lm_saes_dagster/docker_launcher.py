"""The Docker deployment's run launcher: dagster-docker's `DockerRunLauncher`, whose failure to start a run's
container names the image.

Dagster reports such a failure as "Caught an unrecoverable error while dequeuing the run", with the image only deep
in the error chain (a pull URL, docker's "No such image"); a typo in the code location's `--container-image` or an
image never pushed is then hard to spot. Configured exactly as dagster-docker's (deploy/docker/dagster.yaml).
"""

import docker
from dagster import DagsterError
from dagster_docker import DockerRunLauncher as _DockerRunLauncher


class DockerRunLauncher(_DockerRunLauncher):
    def _launch_container_with_command(self, run, docker_image, command):
        try:
            return super()._launch_container_with_command(run, docker_image, command)
        except docker.errors.APIError as exc:
            raise DagsterError(
                f"could not start run {run.run_id}'s container from image {docker_image!r}: the image is not on this "
                f"Docker host and pulling it failed ({exc.explanation or exc}); check the code location's "
                "--container-image (or the `image` of run_launcher.config) and that the image was built or pushed"
            ) from exc
