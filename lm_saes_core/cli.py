"""The `lm-saes` command line: `lm-saes <runner> CONFIG [--set key=value ...]`."""

from pathlib import Path
from typing import Annotated

import typer

from lm_saes_core.config import ConfigError, load_config

app = typer.Typer(name="lm-saes", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

ConfigPath = Annotated[Path, typer.Argument(help="Settings file (.yaml, .yml, .toml or .json)")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a setting: dotted.key=value (repeatable)")]


def _load(cls, config: Path, overrides: list[str] | None):
    try:
        return load_config(cls, config, overrides)
    except ConfigError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def generate(config: ConfigPath, overrides: Overrides = None) -> None:
    """Run a dataset through a language model and cache activations on disk."""
    from lm_saes_core.runners.generate import GenerateActivationsSettings, generate_activations

    settings = _load(GenerateActivationsSettings, config, overrides)
    try:
        result = generate_activations(settings)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    typer.echo(f"activations: {result.output_dir} ({result.n_tokens} tokens, {result.n_chunks} chunks)")


@app.command()
def train(config: ConfigPath, overrides: Overrides = None) -> None:
    """Train a sparse dictionary (SAE or transcoder) on an activation stream."""
    from lm_saes_core.runners.train import TrainSAESettings, train_sae

    result = train_sae(_load(TrainSAESettings, config, overrides))
    typer.echo(f"dictionary: {result.output_path} ({result.steps} steps, {result.n_tokens} tokens)")


@app.command()
def sweep(config: ConfigPath, overrides: Overrides = None) -> None:
    """Train several dictionaries from one activation stream."""
    from lm_saes_core.runners.train import SweepSAESettings, sweep_sae

    for result in sweep_sae(_load(SweepSAESettings, config, overrides)):
        typer.echo(f"dictionary: {result.output_path} ({result.steps} steps, {result.n_tokens} tokens)")


@app.command()
def evaluate(config: ConfigPath, overrides: Overrides = None) -> None:
    """Evaluate a saved dictionary (reconstruction, sparsity and, with a model, spliced language-model loss)."""
    from lm_saes_core.runners.evaluate import EvaluateSAESettings, evaluate_sae

    result = evaluate_sae(_load(EvaluateSAESettings, config, overrides))
    for key, value in sorted(result.metrics.items()):
        typer.echo(f"{key:45s} {value:.6g}")


@app.command("check-activations")
def check_activations(
    target: Annotated[Path, typer.Argument(help="A cache directory, or a settings file")],
    overrides: Overrides = None,
) -> None:
    """Check that every hook point of a cache holds the same tokens; exit 1 on the first problem."""
    from lm_saes_core.runners.consistency import CheckActivationConsistencySettings, check_activation_consistency

    if target.is_dir():
        settings = CheckActivationConsistencySettings(path=str(target))
    else:
        settings = _load(CheckActivationConsistencySettings, target, overrides)
    report = check_activation_consistency(settings)
    for problem in report.problems:
        typer.secho(f"  {problem}", fg="red", err=True)
    typer.echo(report.summary())
    raise typer.Exit(0 if report.ok else 1)


if __name__ == "__main__":
    app()
