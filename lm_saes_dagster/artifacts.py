"""Where pipeline artefacts live, and how a heavy step reuses an output made from the same inputs instead of running
again (`reuse_or_launch`)."""

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from lm_saes_core.config import BaseConfig
from lm_saes_core.io import atomic_write_text, file_sha256
from lm_saes_core.models.base import WEIGHTS_FILE
from lm_saes_dagster.launch import HeavyStepLauncher


class ArtifactRoot(dg.ConfigurableResource):
    """Where pipeline artefacts live: `<path>/<pipeline>/<asset>/<partition>`, and each pipeline's record store."""

    path: str

    def dir(self, pipeline: str, asset: str, partition: str | None = None) -> Path:
        directory = Path(self.path) / pipeline / asset
        return directory / partition if partition else directory

    def activation_cache(self, pipeline: str) -> Path:
        """The pipeline's activation cache: every hook point (one subdirectory each) from one forward pass."""
        return self.dir(pipeline, "activations", "all-hooks")

    def dictionary(self, pipeline: str, item: str) -> Path:
        """Where an item's trained dictionary is saved (`save_pretrained`'s directory)."""
        return self.dir(pipeline, "dictionary", item)

    def store_path(self, pipeline: str) -> Path:
        """The pipeline's SQLite record store (feature analyses, logits, interpretations) unless it sets mongo."""
        return Path(self.path) / pipeline / "records.sqlite"


class InputsStamp:
    """What an output was computed from (a weights file's hash, the settings, the code version): a matching stamp
    means the output can be reused. Cleared before recomputing and written after the output, so a crash never leaves
    a stamp over a stale output."""

    def __init__(self, path: Path, weights: Path, settings: BaseConfig, code_version: str):
        self.path = path
        payload = file_sha256(weights) + json.dumps(settings.model_dump(mode="json"), sort_keys=True) + code_version
        self.key = hashlib.sha256(payload.encode()).hexdigest()

    def matches(self) -> bool:
        return self.path.is_file() and self.path.read_text() == self.key

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, self.key)


@dataclass(frozen=True)
class StepOutcome:
    reused: bool
    reported: dg.MaterializeResult | None
    """What the child process reported (metadata, data version); None when the outputs were reused."""


def reuse_or_launch(
    context: dg.AssetExecutionContext,
    launcher: HeavyStepLauncher,
    runner: str,
    settings: BaseConfig,
    *,
    dictionary: Path,
    stamp: Path,
    outputs: Sequence[Path],
    workdir: Path,
    code_version: str,
    complete: Callable[[], bool] | None = None,
    keep_report: Callable[[dg.MaterializeResult], None] | None = None,
) -> StepOutcome:
    """Run a step over a trained dictionary (evaluation, analysis, DLA) unless its outputs were already made from the
    same weights, settings and code: reused when the stamp matches, every file of `outputs` exists and `complete()`
    (e.g. "the record store holds every feature") agrees. Otherwise the stamp is cleared, the runner runs through
    the launcher (its settings file goes to `workdir`), `keep_report` saves what only the child reported (an output
    of its own), and the stamp is written last."""
    inputs = InputsStamp(stamp, dictionary / WEIGHTS_FILE, settings, code_version)
    if inputs.matches() and all(path.is_file() for path in outputs) and (complete is None or complete()):
        return StepOutcome(reused=True, reported=None)
    inputs.clear()
    reported = launcher.run(context, runner, settings, workdir=workdir).get_materialize_result()
    if keep_report is not None:
        keep_report(reported)
    inputs.write()
    return StepOutcome(reused=False, reported=reported)
