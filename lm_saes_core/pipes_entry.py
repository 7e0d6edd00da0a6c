"""`python -m lm_saes_core.pipes_entry RUNNER SETTINGS_FILE`: run one heavy step in its own process.

Dagster launches this (locally through `PipesSubprocessClient`, on a cluster in a GPU pod through `PipesK8sClient`,
under `torchrun` for several GPUs). When started by Dagster Pipes, rank 0 reports ONE materialization with small
numeric metadata and a data version (sha256 of the step's main output file); the other ranks only compute, since
they share rank 0's message channel. Without Pipes it is a plain command. Only the light `dagster_pipes` package is
imported here, never `dagster`.

`RUNNERS` is the one list of steps: the Dagster launcher and the usage line take their names from it. Each entry names
its settings class ("module:Class"), imported only when that step runs, so no runner is imported at module level.
"""

import importlib
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dagster_pipes import PipesContext, PipesEnvVarParamsLoader, open_dagster_pipes

from lm_saes_core.config import BaseConfig, ConfigError, UserError, load_config
from lm_saes_core.io import atomic_write_text, file_sha256

logger = logging.getLogger(__name__)


@dataclass
class StepReport:
    """What rank 0 tells Dagster: small metadata and the file whose content hash is the data version (a step with
    several main files, a sweep, gives the version itself)."""

    metadata: dict[str, Any]
    main_file: Path | None
    data_version: str | None = None


def _numbers(values: dict[str, float], keys: list[str] | None = None) -> dict[str, float]:
    """`metrics/explained_variance` -> `explained_variance`; non-finite values are dropped (Dagster plots numbers)."""
    picked = values if keys is None else {key: values[key] for key in keys if key in values}
    return {
        key.removeprefix("metrics/"): float(value)
        for key, value in picked.items()
        if isinstance(value, int | float) and math.isfinite(value)
    }


def _path(value: Path | str) -> dict[str, Any]:
    return {"raw_value": str(value), "type": "path"}


WEIGHTS_FILE = "sae_weights.safetensors"


def _train_summary(result) -> dict[str, Any]:
    """Steps, tokens, whether a finished run was reused and from which step a killed one was continued (0: from the
    start), and the last logged metrics."""
    metrics = _numbers(result.last_metrics, ["metrics/explained_variance", "metrics/l0", "losses/mse_loss"])
    resumed = result.resumed_from_step is not None
    return {
        "steps": result.steps,
        "n_tokens": result.n_tokens,
        "reused": result.reused,
        "resumed": resumed,
        "resumed_from_step": result.resumed_from_step if resumed else 0,
        **metrics,
    }


def _run_train(settings: BaseConfig) -> StepReport:
    from lm_saes_core.runners.train import train_sae

    result = train_sae(settings)
    metadata = {**_train_summary(result), "output_path": _path(result.output_path)}
    return StepReport(metadata, Path(settings.trainer.exp_result_path) / WEIGHTS_FILE)


def _run_sweep(settings: BaseConfig) -> StepReport:
    """Per item (by `sae_name`) its summary and the sha256 of its weights, as one JSON value; the data version is the
    hash of the items' weight hashes in item order."""
    import hashlib

    from lm_saes_core.runners.train import sweep_sae

    results = sweep_sae(settings)
    items = {}
    for item, result in zip(settings.items, results, strict=True):
        weights = Path(item.trainer.exp_result_path) / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"sweep item {item.sae_name!r} finished but {weights} does not exist")
        items[item.sae_name] = {
            **_train_summary(result),
            "weights_sha256": file_sha256(weights),
            "output_path": str(result.output_path),
        }
    version = hashlib.sha256("".join(entry["weights_sha256"] for entry in items.values()).encode()).hexdigest()
    metadata = {
        "n_items": len(items),
        "trained": sum(not entry["reused"] for entry in items.values()),
        "items": {"raw_value": items, "type": "json"},
    }
    return StepReport(metadata, None, data_version=version)


def _run_evaluate(settings: BaseConfig) -> StepReport:
    from lm_saes_core.runners.evaluate import evaluate_sae

    if settings.output_path is None:
        raise ConfigError("output_path: evaluate needs a file for the metrics JSON (its hash is the data version)")
    result = evaluate_sae(settings)
    metrics = _numbers({key: value for key, value in result.metrics.items() if key.startswith("metrics/")})
    return StepReport({**metrics, "output_path": _path(settings.output_path)}, Path(settings.output_path))


def _run_generate(settings: BaseConfig) -> StepReport:
    from lm_saes_core.runners.generate import generate_activations

    result = generate_activations(settings)
    metadata = {
        "n_tokens": result.n_tokens,
        "n_chunks": result.n_chunks,
        "bytes": result.bytes_on_disk,
        "reused": result.reused,
        "output_path": _path(result.output_dir),
    }
    return StepReport(metadata, result.manifest_path)


def _run_analyze(settings: BaseConfig) -> StepReport:
    import time

    from lm_saes_core.runners.analyze import analyze_sae
    from lm_saes_core.store.export import analysis_export_path

    if settings.output_dir is None:
        raise ConfigError("output_dir: analyze needs an export directory (the export's hash is the data version)")
    started = time.perf_counter()
    analyses = analyze_sae(settings)
    seconds = time.perf_counter() - started
    n_tokens = analyses[0].n_analyzed_tokens if analyses else 0
    metadata = {
        "n_features": len(analyses),
        "alive_features": sum(analysis.act_times > 0 for analysis in analyses),
        "analysed_tokens": n_tokens,
        "tokens_per_second": n_tokens / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
    }
    path = analysis_export_path(
        settings.output_dir, settings.sae_name, settings.sae_series, settings.analysis_name, len(analyses)
    )
    return StepReport({**metadata, "output_path": _path(path)}, path)


def _run_dla(settings: BaseConfig) -> StepReport:
    from lm_saes_core.runners.dla import direct_logit_attribute

    if settings.output_path is None:
        raise ConfigError("output_path: dla needs a file for the results JSON (its hash is the data version)")
    results = direct_logit_attribute(settings)
    return StepReport(
        {"n_features": len(results), "output_path": _path(settings.output_path)}, Path(settings.output_path)
    )


@dataclass(frozen=True)
class Runner:
    """One heavy step: its settings class, named "module:Class" and imported only when the step runs (so a bad
    command fails fast, before the runners and their dependencies load), and the function that runs it."""

    settings: str
    run: Callable[[Any], StepReport]

    def settings_class(self) -> type[BaseConfig]:
        module, _, name = self.settings.partition(":")
        return getattr(importlib.import_module(module), name)


RUNNERS: dict[str, Runner] = {
    "train": Runner("lm_saes_core.runners.train:TrainSAESettings", _run_train),
    "train-crosscoder": Runner("lm_saes_core.runners.train:TrainCrossCoderSettings", _run_train),
    "sweep": Runner("lm_saes_core.runners.train:SweepSAESettings", _run_sweep),
    "evaluate": Runner("lm_saes_core.runners.evaluate:EvaluateSAESettings", _run_evaluate),
    "generate": Runner("lm_saes_core.runners.generate:GenerateActivationsSettings", _run_generate),
    "analyze": Runner("lm_saes_core.runners.analyze:AnalyzeSAESettings", _run_analyze),
    "dla": Runner("lm_saes_core.runners.dla:DirectLogitAttributeSettings", _run_dla),
}
"""Every step this entrypoint runs, by the name its command line (and the Dagster launcher) uses."""

USAGE = f"usage: python -m lm_saes_core.pipes_entry {{{'|'.join(RUNNERS)}}} SETTINGS_FILE"


def runner_named(name: str) -> Runner:
    if name not in RUNNERS:
        raise ConfigError(f"runner {name!r} is unknown; choose one of {sorted(RUNNERS)}")
    return RUNNERS[name]


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run_step(runner: str, settings_file: str | Path, pipes: PipesContext | None = None) -> StepReport:
    """Validate the settings file, run the step and, given a Pipes context, report its materialization."""
    step = runner_named(runner)
    settings = load_config(step.settings_class(), settings_file)
    report = step.run(settings)
    if report.main_file is not None and not report.main_file.is_file():
        raise FileNotFoundError(f"{runner} finished but its main output {report.main_file} does not exist")
    if pipes is not None:
        asset_key = pipes.extras.get("asset_key") if pipes.extras else None
        version = report.data_version or file_sha256(report.main_file)
        pipes.report_asset_materialization(metadata=report.metadata, data_version=version, asset_key=asset_key)
    return report


EXIT_USER_ERROR = 2
"""The exit status of a step that failed on a user error (settings, files, stores, endpoints): running it again
unchanged fails the same way, so the launcher does not retry it."""


def error_file(settings_file: str | Path) -> Path:
    """Where a failed step leaves its one-line cause beside its settings file, for the launcher to report."""
    settings_file = Path(settings_file)
    return settings_file.with_name(settings_file.name.replace(".pipes-settings.json", "") + ".pipes-error.txt")


def _record_error(settings_file: str, message: str) -> None:
    try:
        atomic_write_text(error_file(settings_file), message + "\n")
    except OSError:
        pass  # the message is on stderr too


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(USAGE, file=sys.stderr)
        return 2
    runner, settings_file = args
    # Every torchrun rank inherits the Pipes env vars, but the message channel is one file/stream: rank 0 speaks.
    use_pipes = is_rank_zero() and PipesEnvVarParamsLoader().is_dagster_pipes_process()
    try:
        with open_dagster_pipes() if use_pipes else nullcontext() as pipes:
            run_step(runner, settings_file, pipes)
    except UserError as exc:
        print(f"lm_saes_core.pipes_entry: {exc}", file=sys.stderr)
        if is_rank_zero():
            _record_error(settings_file, str(exc))
        return EXIT_USER_ERROR
    except Exception as exc:
        traceback.print_exc()
        message = f"{runner} failed: {type(exc).__name__}: {exc}"
        print(f"lm_saes_core.pipes_entry: {message}", file=sys.stderr)
        if is_rank_zero():
            _record_error(settings_file, message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
