"""Where pipeline artefacts live, and the stamps that let a step reuse an output made from the same inputs."""

import hashlib
import json
from pathlib import Path

import dagster as dg

from lm_saes_core.io import atomic_write_text, file_sha256


class ArtifactRoot(dg.ConfigurableResource):
    """Where pipeline artefacts live: `<path>/<pipeline>/<asset>/<partition>`, and each pipeline's record store."""

    path: str

    def dir(self, pipeline: str, asset: str, partition: str | None = None) -> Path:
        directory = Path(self.path) / pipeline / asset
        return directory / partition if partition else directory

    def activation_cache(self, pipeline: str) -> Path:
        """The pipeline's activation cache: every hook point (one subdirectory each) from one forward pass."""
        return self.dir(pipeline, "activations", "all-hooks")

    def store_path(self, pipeline: str) -> Path:
        """The pipeline's SQLite record store (feature analyses, logits, interpretations) unless it sets mongo."""
        return Path(self.path) / pipeline / "records.sqlite"


class InputsStamp:
    """What an output was computed from (a weights file's hash, the settings, the code version): a matching stamp
    means the output can be reused. Cleared before recomputing and written after the output, so a crash never leaves
    a stamp over a stale output."""

    def __init__(self, path: Path, weights: Path, settings: dict, code_version: str):
        self.path = path
        payload = file_sha256(weights) + json.dumps(settings, sort_keys=True) + code_version
        self.key = hashlib.sha256(payload.encode()).hexdigest()

    def matches(self) -> bool:
        return self.path.is_file() and self.path.read_text() == self.key

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, self.key)
