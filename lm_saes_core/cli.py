"""The `lm-saes` command line: `lm-saes <runner> CONFIG [--set key=value ...]`, and views of the record store
(`lm-saes show feature NAME INDEX`, `lm-saes list`, `lm-saes serve`: the feature browser).

A user error (`UserError`: settings, hooks, widths, kinds, caches, stores, endpoints; or an `OSError`: a file that is
missing or unwritable, a connection refused) is one red message and exit status 2 from any command; `--debug` (or
`LM_SAES_DEBUG=1`) shows its traceback. Any other exception is a bug and keeps its traceback."""

from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from lm_saes_core.config import UserError, load_config

USER_ERRORS = (UserError, OSError)


class _Commands(TyperGroup):
    """The top-level group: every command's user errors are reported here, once."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            if ctx.params.get("debug"):
                raise
            typer.secho(str(exc), fg="red", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    name="lm-saes", cls=_Commands, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)

ConfigPath = Annotated[Path, typer.Argument(help="Settings file (.yaml, .yml, .toml or .json)")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a setting: dotted.key=value (repeatable)")]


@app.callback()
def main(
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar="LM_SAES_DEBUG", help="Show the traceback of user errors too"),
    ] = False,
) -> None:
    """Train, evaluate and analyse sparse dictionaries on language-model activations."""


def _load_for_factories(single, several, config: Path, overrides: list[str] | None):
    """Settings of `several` (a crosscoder's `activation_factories`, one per group of heads) when the file has that
    key, else of `single` (one `activation_factory`)."""
    from lm_saes_core.config import apply_overrides, read_config_file, validate_config

    data = apply_overrides(read_config_file(config), overrides or [])
    return validate_config(several if "activation_factories" in data else single, data, source=str(config))


@app.command()
def generate(config: ConfigPath, overrides: Overrides = None) -> None:
    """Run a dataset through a language model and cache activations on disk."""
    from lm_saes_core.runners.generate import GenerateActivationsSettings, generate_activations

    settings = load_config(GenerateActivationsSettings, config, overrides)
    try:
        result = generate_activations(settings)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    typer.echo(f"activations: {result.output_dir} ({result.n_tokens} tokens, {result.n_chunks} chunks)")


@app.command()
def train(config: ConfigPath, overrides: Overrides = None) -> None:
    """Train a sparse dictionary of the kind its `sae_type` names (SAE/transcoder, crosscoder, CLT, Lorsa, ...)."""
    from lm_saes_core.runners.train import TrainCrossCoderSettings, TrainSAESettings, train_sae

    result = train_sae(_load_for_factories(TrainSAESettings, TrainCrossCoderSettings, config, overrides))
    typer.echo(_trained(result))


@app.command()
def sweep(config: ConfigPath, overrides: Overrides = None) -> None:
    """Train several dictionaries from one activation stream."""
    from lm_saes_core.runners.train import SweepSAESettings, sweep_sae

    for result in sweep_sae(load_config(SweepSAESettings, config, overrides)):
        typer.echo(_trained(result))


def _trained(result) -> str:
    done = "a finished run with these settings, reused" if result.reused else "trained"
    return f"dictionary: {result.output_path} ({result.steps} steps, {result.n_tokens} tokens; {done})"


@app.command("convert-topk-to-jumprelu")
def convert_topk_to_jumprelu(config: ConfigPath, overrides: Overrides = None) -> None:
    """Turn a saved TopK-family dictionary into a JumpReLU one with per-feature thresholds calibrated on a stream."""
    from lm_saes_core.runners.convert import ConvertTopKToJumpReLUSettings, convert_topk_to_jumprelu

    result = convert_topk_to_jumprelu(load_config(ConvertTopKToJumpReLUSettings, config, overrides))
    typer.echo(f"dictionary: {result.output_path}")
    for key, before in result.topk_metrics.items():
        typer.echo(f"{key:35s} {before:.5g} -> {result.jumprelu_metrics[key]:.5g}")


@app.command()
def evaluate(config: ConfigPath, overrides: Overrides = None) -> None:
    """Evaluate a saved dictionary (reconstruction, sparsity and, with a model, spliced language-model loss)."""
    from lm_saes_core.runners.evaluate import (
        EvaluateCrossCoderSettings,
        EvaluateSAESettings,
        evaluate_crosscoder,
        evaluate_sae,
    )

    settings = _load_for_factories(EvaluateSAESettings, EvaluateCrossCoderSettings, config, overrides)
    if isinstance(settings, EvaluateCrossCoderSettings):
        result = evaluate_crosscoder(settings)
    else:
        result = evaluate_sae(settings)
    for key, value in sorted(result.metrics.items()):
        typer.echo(f"{key:45s} {value:.6g}")


@app.command()
def analyze(config: ConfigPath, overrides: Overrides = None) -> None:
    """Analyse every feature of a dictionary (statistics and sample contexts) into the record store."""
    from lm_saes_core.runners.analyze import (
        AnalyzeCrossCoderSettings,
        AnalyzeSAESettings,
        analyze_crosscoder,
        analyze_sae,
    )

    settings = _load_for_factories(AnalyzeSAESettings, AnalyzeCrossCoderSettings, config, overrides)
    if isinstance(settings, AnalyzeCrossCoderSettings):
        analyses = analyze_crosscoder(settings)
    else:
        analyses = analyze_sae(settings)
    alive = sum(analysis.act_times > 0 for analysis in analyses)
    typer.echo(f"analysed {len(analyses)} features of {settings.sae_name} ({alive} active)")


@app.command()
def dla(config: ConfigPath, overrides: Overrides = None) -> None:
    """Direct logit attribution of every feature's decoder direction into the record store."""
    from lm_saes_core.runners.dla import DirectLogitAttributeSettings, direct_logit_attribute

    settings = load_config(DirectLogitAttributeSettings, config, overrides)
    logits = direct_logit_attribute(settings)
    typer.echo(f"attributed {len(logits)} features of {settings.sae_name}")


@app.command()
def autointerp(config: ConfigPath, overrides: Overrides = None) -> None:
    """Explain and score features with an LLM behind an OpenAI-compatible API (resumes missing features)."""
    from lm_saes_core.runners.autointerp import AutoInterpSettings, auto_interp

    result = auto_interp(load_config(AutoInterpSettings, config, overrides))
    typer.echo(
        f"interpreted {len(result.interpreted)}, failed {len(result.failed)}, "
        f"kept {len(result.skipped_existing)}, inactive {len(result.skipped_inactive)}; "
        f"{result.n_requests} requests"
    )


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
        settings = load_config(CheckActivationConsistencySettings, target, overrides)
    report = check_activation_consistency(settings)
    for problem in report.problems:
        typer.secho(f"  {problem}", fg="red", err=True)
    typer.echo(report.summary())
    raise typer.Exit(0 if report.ok else 1)


# ------------------------------------------------------------------------------------------- circuit-tracer files


@app.command("export-circuit-tracer")
def export_circuit_tracer(
    sources: Annotated[list[Path], typer.Argument(help="A saved CLT, or saved transcoders, one per block")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write (absent or empty)")],
    scan: Annotated[str | None, typer.Option(help="circuit-tracer's feature-visualisation id (config `scan`)")] = None,
    hf_repo: Annotated[
        str | None, typer.Option(help="Transcoders: list them in the config as hf://HF_REPO/layer_N.safetensors")
    ] = None,
) -> None:
    """Write a saved CLT or per-layer transcoders in circuit-tracer's format (activation scale folded in)."""
    from lm_saes_core.interop.circuit_tracer import export_circuit_tracer as export
    from lm_saes_core.models import SparseDictionary

    models = [SparseDictionary.from_pretrained(source) for source in sources]
    directory = export(models, out_dir, scan=scan, hf_repo=hf_repo)
    layers = len(models) if len(models) > 1 else len(models[0].cfg.hooks_in)
    typer.echo(f"circuit-tracer: {directory} ({layers} layers)")


@app.command("import-circuit-tracer")
def import_circuit_tracer(
    source: Annotated[Path, typer.Argument(help="A circuit-tracer directory (config.yaml beside the weights)")],
    out_dir: Annotated[Path, typer.Argument(help="Where to save the dictionary (transcoders: OUT_DIR/layer_N)")],
    hook_in: Annotated[
        str | None, typer.Option(help="Our input hooks, e.g. blocks.{layer}.hook_resid_mid (default: the config's)")
    ] = None,
    hook_out: Annotated[
        str | None, typer.Option(help="Our output hooks, e.g. blocks.{layer}.hook_mlp_out (default: the config's)")
    ] = None,
) -> None:
    """Save a circuit-tracer CLT or transcoder set as our dictionaries."""
    from lm_saes_core.interop.circuit_tracer import import_circuit_tracer as load

    imported = load(source, hook_points_in=hook_in, hook_points_out=hook_out)
    if isinstance(imported, list):
        saved = [model.save_pretrained(out_dir / f"layer_{layer}") for layer, model in enumerate(imported)]
    else:
        saved = [imported.save_pretrained(out_dir)]
    for path in saved:
        typer.echo(f"dictionary: {path}")


# ------------------------------------------------------------------------------------------- record-store views

show_app = typer.Typer(no_args_is_help=True, help="Show records of the record store.")
app.add_typer(show_app, name="show")

StorePath = Annotated[
    Path | None, typer.Option("--store-path", help="SQLite record store [default: $LM_SAES_HOME/records.sqlite]")
]
MongoUri = Annotated[str | None, typer.Option("--mongo-uri", help="Read the MongoDB record store at this URI")]
MongoDb = Annotated[str, typer.Option("--mongo-db", help="MongoDB database (with --mongo-uri)")]


def _open_store(store_path: Path | None, mongo_uri: str | None, mongo_db: str, *, read_only: bool = False):
    """`read_only`: the SQLite file (the default one too) must exist and is opened as a `mode=ro` URI."""
    from lm_saes_core.config import MongoDBConfig
    from lm_saes_core.store import RecordStoreConfig, open_store

    if store_path is not None and mongo_uri is not None:
        raise UserError("give either --store-path (SQLite) or --mongo-uri (MongoDB), not both")
    mongo = MongoDBConfig(mongo_uri=mongo_uri, mongo_db=mongo_db) if mongo_uri is not None else None
    cfg = RecordStoreConfig(mongo=mongo, sqlite_path=str(store_path) if store_path is not None else None)
    if mongo is None and (store_path is not None or read_only) and not cfg.resolved_sqlite_path().is_file():
        raise UserError(f"no record store at {cfg.resolved_sqlite_path()}")
    return open_store(cfg, read_only=read_only)


@show_app.command("feature")
def show_feature(
    name: Annotated[str, typer.Argument(help="Dictionary name")],
    index: Annotated[
        int, typer.Argument(help="Feature index (0 <= INDEX < d_sae; a CLT's: layer * d_sae + feature of the layer)")
    ],
    series: Annotated[str, typer.Option("--series", "-s", help="Dictionary series")] = "default",
    analysis: Annotated[
        str | None, typer.Option("--analysis", "-a", help="Analysis name [default: 'default', else the first]")
    ] = None,
    samples: Annotated[int, typer.Option("--samples", "-n", min=0, help="Top contexts to show")] = 5,
    other_samples: Annotated[
        int, typer.Option("--other-samples", min=0, help="Contexts to show of each other pool (bands, ...)")
    ] = 2,
    window: Annotated[
        int, typer.Option("--window", "-r", min=0, help="Tokens shown each side of a context's max")
    ] = 20,
    store_path: StorePath = None,
    mongo_uri: MongoUri = None,
    mongo_db: MongoDb = "mechinterp",
) -> None:
    """Print one feature: where it lives (crosscoder, CLT), statistics, explanation, top contexts with activating
    tokens highlighted (a Lorsa's with the source tokens feeding each context's max), DLA tokens."""
    from rich.console import Console

    from lm_saes_core.analysis.render import analysed_feature_count, feature_view, load_tokenizer

    with _open_store(store_path, mongo_uri, mongo_db) as store:
        dictionary = store.get_dictionary(name, series)
        if dictionary is None:
            known = ", ".join(f"{d.name} ({d.series})" for d in store.list_dictionaries()) or "none"
            raise UserError(f"no dictionary {name!r} in series {series!r}; stored dictionaries: {known}")
        d_sae, n_features = dictionary.cfg.get("d_sae"), analysed_feature_count(dictionary.cfg)
        if index < 0 or (n_features is not None and index >= n_features):
            has = f"d_sae {d_sae}" if n_features == d_sae else f"{n_features} features ({d_sae} per layer)"
            raise UserError(
                f"feature index {index} is out of range: dictionary {name!r} has {has} (0 <= INDEX < {n_features})"
            )
        feature = store.get_feature(name, series, index)
        if feature is None:
            raise UserError(
                f"feature {index} of {name!r} (series {series!r}) has no records yet: run the analysis first"
            )
        names = [item.name for item in feature.analyses]
        if analysis is not None and analysis not in names:
            known = ", ".join(names) or "none"
            raise UserError(f"feature {index} of {name!r} has no analysis {analysis!r}; it has: {known}")
        chosen = feature.analysis(analysis or "default") or (feature.analyses[0] if feature.analyses else None)
        tokenizer, note = load_tokenizer(store, dictionary) if chosen is not None else (None, "")
    console = Console()
    markers = console.color_system is None or console.no_color
    console.print(
        feature_view(
            feature,
            dictionary,
            chosen,
            tokenizer,
            note,
            n_samples=samples,
            n_other_samples=other_samples,
            window=window,
            markers=markers,
        )
    )


@app.command("list")
def list_dictionaries(
    series: Annotated[str | None, typer.Option("--series", "-s", help="Only this series")] = None,
    store_path: StorePath = None,
    mongo_uri: MongoUri = None,
    mongo_db: MongoDb = "mechinterp",
) -> None:
    """Print the stored dictionaries with their evaluation metrics and how many features each analysis covered."""
    from rich.console import Console

    from lm_saes_core.analysis.render import dictionaries_table

    with _open_store(store_path, mongo_uri, mongo_db) as store:
        dictionaries = store.list_dictionaries(series)
        analysed = {
            (d.series, d.name): {
                analysis: store.count_features_with_analysis(d.name, d.series, analysis)
                for analysis in store.list_analysis_names(d.name, d.series)
            }
            for d in dictionaries
        }
    if not dictionaries:
        typer.echo("no dictionaries stored" + (f" in series {series!r}" if series else ""))
        return
    Console().print(dictionaries_table(dictionaries, analysed))


@app.command()
def serve(
    store_path: Annotated[
        Path | None,
        typer.Option("--store-path", "--store", help="SQLite record store [default: $LM_SAES_HOME/records.sqlite]"),
    ] = None,
    mongo_uri: MongoUri = None,
    mongo_db: MongoDb = "mechinterp",
    host: Annotated[
        str, typer.Option(help="Address to listen on (loopback by default; 0.0.0.0 exposes it)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on")] = 8000,
    dagster_url: Annotated[
        str | None, typer.Option(help="Dagster webserver that dictionaries made by a pipeline link to")
    ] = "http://127.0.0.1:3000",
) -> None:
    """Browse the record store in a web browser, read-only: dictionaries, sortable feature tables, feature pages with
    coloured contexts, search of explanations, and the same data as JSON under /api."""
    import uvicorn

    from lm_saes_core.browser import create_app

    with _open_store(store_path, mongo_uri, mongo_db, read_only=True) as store:
        typer.echo(f"serving {store!r} read-only at http://{host}:{port}/ (Ctrl-C stops)")
        uvicorn.run(create_app(store, dagster_url=dagster_url), host=host, port=port, log_level="info")


if __name__ == "__main__":
    app()
