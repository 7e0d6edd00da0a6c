"""The Dagster code location loaded by `workspace.yaml`: one asset group per `configs/pipelines/*.yaml`.

Adding a YAML file adds a pipeline; adding `configs/pipelines/<name>.d/<item>.yaml` adds a dictionary item to it. A
file that does not validate, or whose hook points or dictionary widths do not fit the model (checked from the model's
config.json, never its weights), is reported (file and field) and left out; the other pipelines and items still load.

Environment: `LM_SAES_PIPELINES` (directory of pipeline files), `LM_SAES_HOME` (artefact root; pipelines write under
`<LM_SAES_HOME>/pipelines`) and `LM_SAES_LAUNCHER` (`subprocess`, the default, or `k8s`: where heavy steps run; see
`lm_saes_dagster.launch`).
"""

import logging
import os
import warnings
from pathlib import Path

import dagster as dg

from lm_saes_core.config import ConfigError, lm_saes_home
from lm_saes_dagster.artifacts import ArtifactRoot
from lm_saes_dagster.launch import launcher_from_env
from lm_saes_dagster.model_check import check_pipeline_model
from lm_saes_dagster.pipeline import ItemLoader, build_pipeline_defs
from lm_saes_dagster.pipeline_config import DictionaryItem, PipelineConfig, items_dir, load_item_files, load_pipeline

logger = logging.getLogger(__name__)
DEFAULT_PIPELINES = Path(__file__).resolve().parents[1] / "configs" / "pipelines"


def pipeline_files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


def pipelines_directory() -> Path:
    return Path(os.environ.get("LM_SAES_PIPELINES", DEFAULT_PIPELINES))


def pipeline_config(name: str) -> PipelineConfig | None:
    """The valid pipeline called `name` in the pipelines directory, or None."""
    for path in pipeline_files(pipelines_directory()):
        try:
            cfg = load_pipeline(path)
        except ConfigError:
            continue
        if cfg.name == name:
            return cfg
    return None


def build_definitions(directory: Path, artifact_root: Path) -> tuple[dg.Definitions, dict[Path, str]]:
    """Definitions of every valid pipeline file in `directory`, and the errors of the invalid ones."""
    pipelines, errors = [], {}
    for path in pipeline_files(directory):
        try:
            cfg = load_pipeline(path)
            check_pipeline_model(cfg, path)  # hook names and widths from the model's config.json; no weights
        except ConfigError as exc:
            _report(errors, path, "pipeline", str(exc))
            continue
        loader = item_loader(cfg, path)
        items, item_errors = loader()
        for item_path, error in item_errors.items():
            _report(errors, item_path, "dictionary item", error)
        pipelines.append(build_pipeline_defs(cfg.model_copy(update={"dictionaries": items}), loader))
    automation = dg.AutomationConditionSensorDefinition(
        "lm_saes_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING
    )
    common = dg.Definitions(
        sensors=[automation],
        resources={"artifacts": ArtifactRoot(path=str(artifact_root / "pipelines")), "launcher": launcher_from_env()},
    )
    return dg.Definitions.merge(common, *pipelines), errors


def item_loader(cfg: PipelineConfig, path: Path) -> ItemLoader:
    """Reads the pipeline's items afresh: its own plus `<name>.d/*.yaml`, each checked like the pipeline file."""

    def load() -> tuple[dict[str, DictionaryItem], dict[Path, str]]:
        full, errors = load_item_files(cfg, items_dir(path), check_pipeline_model)
        return dict(full.dictionaries), errors

    return load


def _report(errors: dict[Path, str], path: Path, what: str, error: str) -> None:
    errors[path] = error
    message = f"{what} {path} was not loaded:\n{error}"
    logger.error(message)
    warnings.warn(message, stacklevel=3)


defs, load_errors = build_definitions(pipelines_directory(), lm_saes_home().resolve())
