"""The real local OpenAI-compatible server (`lm_saes_core.analysis.autointerp.local_server`: llama.cpp serving the
bundled SmolLM2-135M-Instruct GGUF) as a module-scoped fixture for the auto-interp tests, skipped with the reason when
it cannot start here."""

import pytest

from lm_saes_core.analysis.autointerp.local_server import LocalServerUnavailableError, start_local_server


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory: pytest.TempPathFactory):
    """The running server for one test module; skipped with the reason when it cannot start here."""
    try:
        server = start_local_server(tmp_path_factory.mktemp("llm_server") / "server.log")
    except LocalServerUnavailableError as error:
        pytest.skip(f"local LLM server unavailable: {error}")
    with server:
        yield server
