"""The Docker deployment on this machine, up or down: `make deploy-docker` and `make deploy-docker-down`.

    python deploy/docker/deploy.py up [--state DIR] [--image IMAGE] [--port PORT] [--network NAME] [--data DATA]
                                      [--pg-dir DIR] [--env NAME=VALUE ...] [--no-build]
    python deploy/docker/deploy.py down [--state DIR]

`up` starts, in this order: a Docker daemon if none answers (`make docker-daemon`), the image (`make image`, cached
layers reused), the network, a Postgres cluster in DIR/postgres on a free loopback port (postgres.sh), the image's
code server (a container, on a free loopback port), `dagster-daemon` and `dagster-webserver` on 127.0.0.1, and then
prints the UI's link. Each thing it starts is written to DIR/state.json as it starts (pid, container id, network id),
and `down` stops exactly those: never the data (volume or directory), the image, the Postgres cluster's files, a
network or a dockerd that was there before. While the deployment is up, `up` only says so.

tests/test_docker_deployment.py starts its deployment with this same `up` (its own network, data directory, ports
and a shorter run-monitoring interval), so the test and `make deploy-docker` cannot drift apart.
"""

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parents[1]
BIN = Path(sys.executable).parent  # the virtual environment's dagster-daemon and dagster-webserver
NETWORK, VOLUME = "lm-saes", "lm-saes-data"  # what deploy/docker/dagster*.yaml name
LOCATION = "lm_saes"
DOCKERD_PID = Path("/run/lm-saes-dockerd.pid")  # written by `make docker-daemon`
PASSED_THROUGH = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE")
"""Set for `up`, these reach the code server and every run too."""


class DeployError(RuntimeError):
    """Something `up` needs is missing or did not start; the message names it."""


@dataclass
class Options:
    state: Path
    image: str = "lm-saes:latest"
    profile: str | None = None
    """'gpu' (dagster.yaml) or 'cpu' (dagster.cpu.yaml); None: DAGSTER_PROFILE, else 'cpu' without nvidia-smi."""
    port: int = 3000
    """The webserver's port on 127.0.0.1; 0 for a free one."""
    network: str = NETWORK
    data: str = VOLUME
    """Mounted at /data in the code server and every run: a volume name, or an absolute host directory."""
    pg_dir: Path | None = None
    """The Postgres cluster; default STATE/postgres. The server runs as `postgres`, which must reach it."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment of the code server and of every run (e.g. LM_SAES_PIPELINES=/data/pipelines)."""
    instance: dict = field(default_factory=dict)
    """Settings merged over the profile's (the test shortens run monitoring's poll interval)."""
    build: bool = True


# ---------------------------------------------------------------- the pieces


def choose_profile(requested: str | None) -> tuple[str, str]:
    """The instance profile and why: the CPU one where runs cannot get GPUs."""
    requested = requested or os.environ.get("DAGSTER_PROFILE") or None
    if requested not in (None, "cpu", "gpu"):
        raise DeployError(f"DAGSTER_PROFILE={requested!r}: use 'cpu' or 'gpu'")
    if requested:
        return requested, f"DAGSTER_PROFILE={requested}"
    if shutil.which("nvidia-smi") is None:
        return "cpu", "no nvidia-smi on PATH; DAGSTER_PROFILE=gpu overrides"
    return "gpu", "nvidia-smi found; DAGSTER_PROFILE=cpu overrides"


def profile_file(profile: str) -> Path:
    return DEPLOY / ("dagster.cpu.yaml" if profile == "cpu" else "dagster.yaml")


def merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def instance_config(profile: str, network: str = NETWORK, data: str = VOLUME, overrides: dict | None = None) -> dict:
    """The shipped profile, with only what `up` was told to change: the network, the data at /data, `overrides`."""
    config = yaml.safe_load(profile_file(profile).read_text())
    launcher = config["run_launcher"]["config"]
    launcher["network"] = network
    launcher["container_kwargs"]["volumes"] = {data: {"bind": "/data", "mode": "rw"}}
    return merge(config, overrides or {})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def alive(pid: int | None, program: str) -> bool:
    """`pid` runs `program` (not a reused pid, not a zombie)."""
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z" and program in cmdline


def stop_pid(pid: int, program: str, timeout: float = 30.0, group: bool = True) -> bool:
    """SIGTERM to the process (its group when it leads one), SIGKILL after `timeout`; reaps it if it is our child."""
    if not alive(pid, program):
        return False
    kill = os.killpg if group and os.getpgid(pid) == pid else os.kill
    kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid, program) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.2)
    if alive(pid, program):
        kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: init reaps it


def wait_until(ready, what: str, timeout: float, interval: float = 1.0, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(interval)
    tail = f"\n{log}:\n{log.read_text()[-3000:]}" if log and log.exists() else ""
    raise DeployError(f"{what} did not answer within {timeout:.0f}s{tail}")


def docker_client():
    """The Docker SDK's client, or None when no daemon answers."""
    import docker

    try:
        client = docker.from_env()
        client.ping()
        return client
    except Exception:  # DockerException, requests' ConnectionError, ...: no usable daemon
        return None


def make(*targets: str) -> None:
    """A target of the project's Makefile; variables given to the outer `make` reach it through MAKEFLAGS."""
    subprocess.run([os.environ.get("MAKE", "make"), "--no-print-directory", "-C", str(ROOT), *targets], check=True)


def postgres_reachable(pg_dir: Path) -> None:
    """Run as root, postgres.sh runs the server as `postgres`, which must be able to enter every parent of the
    cluster's directory (a home directory or pytest's temporary directory often forbids it)."""
    if os.geteuid() != 0:
        return
    for parent in pg_dir.resolve().parents:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise DeployError(
                f"the postgres user cannot enter {parent} (mode {parent.stat().st_mode & 0o777:o}), so it cannot use "
                f"{pg_dir}: choose a Postgres directory elsewhere (--pg-dir, DEPLOY_PG_DIR=/var/lib/lm-saes-postgres)"
            )


# ---------------------------------------------------------------- state


def state_file(state: Path) -> Path:
    return state / "state.json"


def read_state(state: Path) -> dict | None:
    path = state_file(state)
    return json.loads(path.read_text()) if path.exists() else None


def write_state(state: Path, record: dict) -> None:
    path = state_file(state)
    path.touch(mode=0o600)  # it holds the Postgres password
    path.write_text(json.dumps(record, indent=2, sort_keys=True))


def is_up(record: dict | None) -> bool:
    """Every process and container the state lists still runs."""
    if not record or not all(alive(record.get(name), name) for name in ("dagster-daemon", "dagster-webserver")):
        return False
    client = docker_client()
    try:
        return client is not None and client.containers.get(record["code_server"]["id"]).status == "running"
    except Exception:  # NotFound, or no code_server in the record
        return False


# ---------------------------------------------------------------- up and down


def up(options: Options, say=print) -> dict:
    """Start the deployment (or say it is up already) and return its state record."""
    state = options.state = options.state.resolve()
    record = read_state(state)
    if is_up(record):
        say(f"The Docker deployment in {state} is already up: {record['url']}")
        return record
    if record:
        say(f"{state_file(state)} lists a deployment that is not fully up; stopping what is left of it")
        down(state, say)
    profile, why = choose_profile(options.profile)
    if not (BIN / "dagster-daemon").exists() or importlib.util.find_spec("dagster_postgres") is None:
        raise DeployError(f"dagster-daemon or dagster-postgres is missing next to {sys.executable}: `make docker-deps`")
    pg_dir = (options.pg_dir or state / "postgres").resolve()
    postgres_reachable(pg_dir)
    if options.port and port_in_use(options.port):
        raise DeployError(f"port {options.port} on 127.0.0.1 is in use (`make ui`?): choose another, DEPLOY_PORT=N")
    state.mkdir(parents=True, exist_ok=True)
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    record = {"profile": profile, "image": options.image, "data": options.data}
    write_state(state, record)
    try:
        _start(options, record, profile, why, pg_dir, logs, say)
    except BaseException:
        say(f"the deployment did not come up; stopping what {state_file(state)} lists")
        down(state, say)
        raise
    return record


def _start(options: Options, record: dict, profile: str, why: str, pg_dir: Path, logs: Path, say) -> None:
    state = options.state
    say(f"profile: {profile} ({profile_file(profile).relative_to(ROOT)}: {why})")
    client = docker_client()
    if client is None:
        if shutil.which("dockerd") is None and shutil.which("apt-get") is None:
            raise DeployError("docker: no daemon answers and dockerd is not installed (nor apt-get to install it)")
        say("no Docker daemon answers: starting one (make docker-daemon)")
        make("docker-daemon")
        client = docker_client()
        if client is None:
            raise DeployError("docker: `make docker-daemon` ran, yet no daemon answers: /var/log/lm-saes-dockerd.log")
        record["dockerd"] = int(DOCKERD_PID.read_text())
        write_state(state, record)
    if options.build:
        make("image", f"IMAGE={options.image}")
    import docker

    try:
        client.images.get(options.image)
    except docker.errors.ImageNotFound:
        raise DeployError(f"image {options.image} does not exist: `make image IMAGE={options.image}`") from None

    networks = client.networks.list(names=[options.network])
    network = next((n for n in networks if n.name == options.network), None)
    if network is None:
        network = client.networks.create(options.network, driver="bridge")
        record["network"] = {"id": network.id, "name": options.network}  # ours: `down` removes it
        write_state(state, record)
    network.reload()
    gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]  # the host, as containers on the network see it

    pg_port = free_port()
    record["postgres"] = {"dir": str(pg_dir), "port": pg_port}
    write_state(state, record)
    started = subprocess.run(
        [str(DEPLOY / "postgres.sh"), "start", str(pg_dir), str(pg_port), f"127.0.0.1,{gateway}"],
        capture_output=True, text=True, env={**os.environ, "PG_FSYNC": "on"},  # the run history outlives a crash
    )  # fmt: skip
    if started.returncode:
        raise DeployError(f"Postgres did not start in {pg_dir}:\n{started.stderr}\nlog: {pg_dir / 'postgres.log'}")
    pg = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
    record["pg"] = pg
    write_state(state, record)

    home = state / "dagster_home"
    home.mkdir(exist_ok=True)
    config = instance_config(profile, options.network, options.data, options.instance)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run_env = {**{name: os.environ[name] for name in PASSED_THROUGH if name in os.environ}, **options.env}

    # The image's own command (the code server), told which image and environment its runs get. It shares the
    # instance (sensors run in it and open it) and the data.
    command = json.loads((ROOT / "Dockerfile").read_text().split("\nCMD ", 1)[1].strip())
    context = {"docker": {"env_vars": [f"{name}={value}" for name, value in run_env.items()]}}
    code_port = free_port()
    code_server = client.containers.run(
        options.image,
        command=[*command, "--container-image", options.image, "--container-context", json.dumps(context)],
        name=f"lm-saes-code-{uuid.uuid4().hex[:8]}",
        detach=True,
        network=options.network,
        ports={"3030/tcp": ("127.0.0.1", code_port)},
        volumes={
            options.data: {"bind": "/data", "mode": "rw"},
            str((home / "dagster.yaml").resolve()): {"bind": "/opt/dagster/dagster_home/dagster.yaml", "mode": "ro"},
        },
        environment={**pg, "LM_SAES_IMAGE": options.image, **run_env},
    )
    record["code_server"] = {"id": code_server.id, "name": code_server.name, "port": code_port}
    write_state(state, record)

    def code_server_answers() -> bool:
        code_server.reload()
        if code_server.status == "exited":
            raise DeployError(f"the code server exited:\n{code_server.logs().decode()[-3000:]}")
        health = [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(code_port), "-h", "127.0.0.1"]
        return subprocess.run(health, capture_output=True).returncode == 0

    wait_until(code_server_answers, f"the code server ({code_server.name})", 180, interval=2.0)
    workspace = state / "workspace.yaml"
    workspace.write_text(yaml.safe_dump(
        {"load_from": [{"grpc_server": {"host": "127.0.0.1", "port": code_port, "location_name": LOCATION}}]}
    ))  # fmt: skip

    env = {**os.environ, **pg, "DAGSTER_HOME": str(home.resolve()), "LM_SAES_IMAGE": options.image}
    record["dagster-daemon"] = spawn([str(BIN / "dagster-daemon"), "run", "-w", str(workspace)], env,
                                     logs / "daemon.log")  # fmt: skip
    write_state(state, record)
    port = options.port or free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "dagster-webserver"), "-w", str(workspace), "-h", "127.0.0.1", "-p", str(port)]
    record["dagster-webserver"] = spawn(command, env, logs / "webserver.log")
    record["url"] = url
    write_state(state, record)
    wait_until(lambda: answers(url), "dagster-webserver", 180, log=logs / "webserver.log")
    say(f"The Dagster UI: {url}")
    say(f"  state {state_file(state)}, logs {logs}/ and `docker logs {code_server.name}`; Postgres {pg_dir}")
    say(f"  runs: containers of {options.image} on network {options.network}, {options.data} at /data")
    say("  the code location loads in the background (the first time it converts the model into /data/cache)")
    say("  stop it: make deploy-docker-down")


def spawn(command: list[str], env: dict[str, str], log: Path) -> int:
    """A process in its own session (so `down` stops it and its children by its pid), output to `log`."""
    with open(log, "ab") as handle:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        ).pid


def down(state: Path, say=print) -> None:
    """Stop what the state file lists, newest first; the data, the image and the cluster's files stay."""
    state = state.resolve()
    record = read_state(state)
    if record is None:
        say(f"nothing to stop: no {state_file(state)}")
        return
    for program in ("dagster-webserver", "dagster-daemon"):
        if record.get(program) and stop_pid(record[program], program):
            say(f"stopped {program} (pid {record[program]})")
    client = docker_client()
    if client is None and (record.get("code_server") or record.get("network")):
        say("docker: no daemon answers, so the code server container and the network are left as they are")
    if client is not None and record.get("code_server"):
        try:
            client.containers.get(record["code_server"]["id"]).remove(force=True)
            say(f"removed the code server container {record['code_server']['name']}")
        except Exception as exc:  # NotFound: already gone
            say(f"code server container: {type(exc).__name__}")
    if client is not None and record.get("network"):
        try:
            client.networks.get(record["network"]["id"]).remove()
            say(f"removed network {record['network']['name']}")
        except Exception as exc:  # NotFound, or run containers still attached
            say(f"network {record['network']['name']} not removed: {exc}")
    if record.get("postgres"):
        command = [str(DEPLOY / "postgres.sh"), "stop", record["postgres"]["dir"]]
        stopped = subprocess.run(command, capture_output=True, text=True)
        say(f"stopped Postgres ({record['postgres']['dir']} kept)" if not stopped.returncode else stopped.stderr)
    if record.get("dockerd") and stop_pid(record["dockerd"], "dockerd", timeout=60, group=False):
        say(f"stopped the dockerd it had started (pid {record['dockerd']})")
    state_file(state).unlink()
    say(f"kept: the data ({record.get('data')}), the image ({record.get('image')}), logs in {state / 'logs'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--state", type=Path, default=ROOT / ".lm_saes" / "deploy-docker")
    parser.add_argument("--image", default="lm-saes:latest")
    parser.add_argument("--port", type=int, default=3000, help="the webserver's port on 127.0.0.1; 0: a free one")
    parser.add_argument("--network", default=NETWORK)
    parser.add_argument("--data", default=VOLUME, help="volume name or absolute directory mounted at /data")
    parser.add_argument("--pg-dir", type=Path, help="the Postgres cluster's directory [default: STATE/postgres]")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="for the code server and runs")
    parser.add_argument("--no-build", dest="build", action="store_false", help="use the image as it is")
    args = parser.parse_args(argv)
    if args.command == "down":
        down(args.state)
        return 0
    if not (args.data.startswith("/") or "/" not in args.data):
        raise SystemExit(f"--data {args.data!r}: a volume name or an absolute directory")
    env = dict(item.split("=", 1) for item in args.env)
    options = Options(args.state, args.image, None, args.port, args.network, args.data, args.pg_dir, env,
                      build=args.build)  # fmt: skip
    try:
        up(options)
    except (DeployError, subprocess.CalledProcessError) as exc:
        print(f"deploy-docker: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
