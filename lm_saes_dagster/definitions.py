"""The Dagster code location loaded by `workspace.yaml`: one asset group per `configs/pipelines/*.yaml`.

Adding a YAML file adds a pipeline. A file that does not validate is reported (file and field) and left out; the
other pipelines still load. Environment: `LM_SAES_PIPELINES` (directory of pipeline files), `LM_SAES_HOME`
(artefact root; pipelines write under `<LM_SAES_HOME>/pipelines`) and `LM_SAES_LAUNCHER` (`subprocess`, the
default, or `k8s`: where heavy steps run; see `lm_saes_dagster.launch`).
"""

import logging
import os
import warnings
from pathlib import Path

import dagster as dg

from lm_saes_core.config import ConfigError, lm_saes_home
from lm_saes_dagster.launch import launcher_from_env
from lm_saes_dagster.pipeline import ArtifactRoot, build_pipeline_defs
from lm_saes_dagster.pipeline_config import load_pipeline

logger = logging.getLogger(__name__)
DEFAULT_PIPELINES = Path(__file__).resolve().parents[1] / "configs" / "pipelines"


def pipeline_files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


def build_definitions(directory: Path, artifact_root: Path) -> tuple[dg.Definitions, dict[Path, str]]:
    """Definitions of every valid pipeline file in `directory`, and the errors of the invalid ones."""
    pipelines, errors = [], {}
    for path in pipeline_files(directory):
        try:
            pipelines.append(build_pipeline_defs(load_pipeline(path)))
        except ConfigError as exc:
            errors[path] = str(exc)
            message = f"pipeline {path} was not loaded:\n{exc}"
            logger.error(message)
            warnings.warn(message, stacklevel=2)
    automation = dg.AutomationConditionSensorDefinition(
        "lm_saes_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING
    )
    common = dg.Definitions(
        sensors=[automation],
        resources={"artifacts": ArtifactRoot(path=str(artifact_root / "pipelines")), "launcher": launcher_from_env()},
    )
    return dg.Definitions.merge(common, *pipelines), errors


defs, load_errors = build_definitions(
    Path(os.environ.get("LM_SAES_PIPELINES", DEFAULT_PIPELINES)), lm_saes_home().resolve()
)
