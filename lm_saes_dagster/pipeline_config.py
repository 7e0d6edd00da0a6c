"""Pipeline configs (`configs/pipelines/*.yaml`): one file describes a whole experiment, corpus to interpretations.

Every section reuses a core config class, so a pipeline file is checked exactly like a runner settings file:
unknown keys and bad values are errors naming the file and the field.
"""

from collections.abc import Callable
from pathlib import Path

from pydantic import Field, model_validator

from lm_saes_core.activation.config import BufferShuffleConfig
from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.analysis.feature_analyzer import FeatureAnalyzerConfig
from lm_saes_core.backend.base import LanguageModelConfig
from lm_saes_core.config import BaseConfig, ConfigError, load_config, read_config_file, validate_config
from lm_saes_core.data import DatasetConfig
from lm_saes_core.evaluation import EvalConfig
from lm_saes_core.models import AnySAEConfig, SparseDictionaryConfig
from lm_saes_core.models.feature_parallel import feature_parallel_problem
from lm_saes_core.models.head_parallel import head_parallel_problem
from lm_saes_core.store import RecordStoreConfig
from lm_saes_core.training import InitializerConfig, TrainerConfig


class ActivationSettings(BaseConfig):
    """How the `activations` asset caches each hook point (see GenerateActivationsSettings)."""

    context_size: int = Field(default=128, gt=1)
    total_tokens: int = Field(gt=0)
    model_batch_size: int = Field(default=16, gt=0)
    n_samples_per_chunk: int | None = Field(default=64, gt=0)
    num_workers: int = Field(default=2, ge=0)


class DictionaryItem(BaseConfig):
    """One dictionary to train on the cached activations of its hook points: `sae` is the config of any kind of
    sparse dictionary (chosen by `sae.sae_type`; "sae", an SAE or transcoder, when it is not given). Every hook the
    dictionary reads or reconstructs must be among the pipeline's `hook_points` (the activation cache holds those
    only)."""

    sae: AnySAEConfig
    initializer: InitializerConfig = Field(
        default_factory=lambda: InitializerConfig(bias_init_method="mean", grid_search_init_norm=True)
    )
    """Defaults to the data-driven initialisation (decoder bias at the data mean, decoder norm by grid search)."""
    trainer: TrainerConfig
    batch_size: int = Field(default=4096, gt=0)
    """Tokens per training step; whole contexts for a kind that reads positions (Lorsa), as is `buffer_size`."""
    buffer_size: int | None = Field(default=32768, gt=0)
    buffer_shuffle: BufferShuffleConfig = Field(default_factory=BufferShuffleConfig)
    seed: int = 42
    data_parallel_size: int = Field(default=1, ge=1)
    """Processes (GPUs) training one replica each on a slice of every batch: the step runs under torchrun."""
    model_parallel_size: int = Field(default=1, ge=1)
    """Processes (GPUs) holding a part of the dictionary's features each (SAEs and transcoders): with
    data_parallel_size, the step runs under torchrun on data_parallel_size x model_parallel_size processes."""

    head_parallel_size: int = Field(default=1, ge=1)
    """A crosscoder's heads split over this many groups of processes, each streaming only its heads' hooks: the step
    runs on data_parallel_size x head_parallel_size x model_parallel_size processes."""

    n_nodes: int = Field(default=1, ge=1)
    """Nodes (Kubernetes pods) the step's processes spread over, evenly; more than one needs the k8s launcher (see
    lm_saes_dagster/multinode.py)."""

    @model_validator(mode="after")
    def _batch_splits(self) -> "DictionaryItem":
        if self.batch_size % self.data_parallel_size:
            raise ValueError(
                f"batch_size={self.batch_size} does not split evenly over data_parallel_size={self.data_parallel_size}"
            )
        if self.n_processes % self.n_nodes:
            raise ValueError(f"n_nodes={self.n_nodes} does not divide the step's {self.n_processes} processes")
        problem = feature_parallel_problem(self.sae, self.model_parallel_size)
        if problem is not None:
            raise ValueError(f"model_parallel_size={self.model_parallel_size}: {problem}")
        problem = head_parallel_problem(self.sae, self.head_parallel_size)
        if problem is not None:
            raise ValueError(f"head_parallel_size={self.head_parallel_size}: {problem}")
        return self

    @property
    def hook_points(self) -> list[str]:
        """The hooks the item reads from the activation cache: its inputs, then the outputs it does not read (an SAE:
        [in]; a transcoder: [in, out])."""
        return self.sae.hook_points

    @property
    def hook_label(self) -> str:
        """The hooks it reads -> those it reconstructs, or the hooks alone when they are the same (metadata,
        messages): `in` for an SAE, `in -> out` for a transcoder."""
        hooks_in, hooks_out = ", ".join(self.sae.hooks_in), ", ".join(self.sae.hooks_out)
        return hooks_in if hooks_in == hooks_out else f"{hooks_in} -> {hooks_out}"

    @property
    def n_processes(self) -> int:
        return self.data_parallel_size * self.head_parallel_size * self.model_parallel_size


class QualityBounds(BaseConfig):
    """Bounds the evaluation must meet; failing them blocks what comes after the evaluation."""

    min_explained_variance: float = 0.7
    max_dead_fraction: float = Field(default=0.5, ge=0, le=1)
    min_l0: float = Field(default=1.0, ge=0)
    max_l0: float = Field(default=1000.0, gt=0)


class AnalysisSettings(BaseConfig):
    """The `feature_analyses` asset: analyze_sae over the cached activations of the dictionary's hook points (the
    features are encoded from its input hooks, so their contexts are the tokens there)."""

    analyzer: FeatureAnalyzerConfig | None = None
    """None: the analyzer's defaults over every cached token of the hook point."""
    batch_size: int = Field(default=16, gt=0)
    """Contexts per analysis batch."""
    min_analysed_fraction: float = Field(default=1.0, ge=0, le=1)
    """Blocking check: the fraction of the dictionary's features with a stored analysis must reach this."""
    preview_features: int = Field(default=3, ge=0)
    """Features shown in the markdown preview of the UI (the most frequently active among those active on at most 1%
    of tokens)."""


class LogitAttributionSettings(BaseConfig):
    """The `logit_attributions` asset: direct_logit_attribute of every feature. Only dictionaries that write to the
    residual stream (`blocks.<l>.hook_resid_*`, `hook_attn_out`, `hook_mlp_out`) have direct logit effects: an SAE's
    or transcoder's decoder row; a crosscoder's row in its deepest residual-stream head; the sum of a CLT feature's
    decoders over the layers it writes to (see `lm_saes_core.analysis.direct_logit`). For any other (e.g. a
    transcoder into `ln2.hook_out`) the asset is skipped with the reason recorded, not failed."""

    top_k: int = Field(default=10, gt=0)
    feature_batch_size: int = Field(default=256, gt=0)


class InterpretationSettings(BaseConfig):
    """The `interpretations` asset: auto_interp over an OpenAI-compatible endpoint.

    The endpoint is `auto_interp.base_url`, or `$LM_SAES_LLM_BASE_URL` (and `$LM_SAES_LLM_MODEL`) when set. With
    neither a base URL nor the API key variable of `auto_interp.api_key_env`, the asset is skipped, not failed."""

    auto_interp: AutoInterpConfig = Field(default_factory=AutoInterpConfig)
    max_features: int | None = Field(default=100, gt=0)
    """Interpret at most this many features: the most frequently active among those active on at most 1% of tokens
    (denser ones are rarely interpretable); None: every active feature."""


class PipelineConfig(BaseConfig):
    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    """Asset key prefix and group name (letters, digits and underscores)."""
    model: LanguageModelConfig
    dataset: DatasetConfig
    eval_dataset: DatasetConfig
    """Held-out documents for the evaluation (split by document from `dataset`)."""
    hook_points: list[str] = Field(min_length=1)
    activations: ActivationSettings
    dictionaries: dict[str, DictionaryItem] = Field(min_length=1)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    quality: QualityBounds = Field(default_factory=QualityBounds)
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    logit_attribution: LogitAttributionSettings = Field(default_factory=LogitAttributionSettings)
    interpretation: InterpretationSettings = Field(default_factory=InterpretationSettings)
    store: RecordStoreConfig | None = None
    """Record store of the analyses; None: SQLite at `<artefact root>/<pipeline>/records.sqlite`."""

    @model_validator(mode="after")
    def _items_use_pipeline_hooks(self) -> "PipelineConfig":
        for name, item in self.dictionaries.items():
            problem = item_problem(name, item, self.hook_points)
            if problem:
                raise ValueError(f"dictionaries.{name}{problem}")
        return self


def item_problem(name: str, item: DictionaryItem, hook_points: list[str]) -> str | None:
    """Why an item cannot be part of a pipeline with these hook points (".field: reason"), or None."""
    if not name.replace("-", "").replace("_", "").isalnum():
        return ": item names use letters, digits, '-' and '_' only"
    sae = item.sae
    for hook in sae.hook_points:
        if hook not in hook_points:
            why = (
                f": the dictionary reads all of its hooks ({', '.join(sae.hook_points)}) from the activation cache, "
                "which holds the pipeline's hook_points only; add it there"
                if len(sae.hook_points) > 1
                else ""
            )
            return (
                f".sae.{hook_field(sae, hook)}: hook point {hook!r} is not one of the pipeline's hook_points "
                f"{hook_points}{why}"
            )
    return None


def hook_field(sae: SparseDictionaryConfig, hook: str) -> str:
    """The config field that names `hook` (e.g. `hook_point_out`, or `hook_points.2` in a list), for messages; the
    first such field (an SAE names its one hook twice: `hook_point_in`)."""
    for field in type(sae).model_fields:
        value = getattr(sae, field)
        if value == hook:
            return field
        if isinstance(value, list | tuple) and hook in value:
            return f"{field}.{list(value).index(hook)}"
    return "hook_points"  # derived by the kind from other fields: the dictionary's hook points


def load_pipeline(path: str | Path) -> PipelineConfig:
    return load_config(PipelineConfig, path)


def items_dir(pipeline_file: str | Path) -> Path:
    """Where extra dictionary items of a pipeline live: `configs/pipelines/<name>.d/<item>.yaml`, one item per file."""
    path = Path(pipeline_file)
    return path.with_name(f"{path.stem}.d")


def load_item_files(
    cfg: PipelineConfig, directory: Path, check: Callable[[PipelineConfig, Path], object] | None = None
) -> tuple[PipelineConfig, dict[Path, str]]:
    """`cfg` with the items of `directory/*.yaml` added (the file name is the item name), and the errors of the files
    that do not validate against this pipeline (they are left out; the other items still load). `check(cfg, file)`
    may refuse an item further (raising ConfigError), e.g. against the model's hook points."""
    dictionaries, errors = dict(cfg.dictionaries), {}
    files = sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]) if directory.is_dir() else []
    for path in files:
        if path.stem in cfg.dictionaries:
            errors[path] = f"invalid settings in {path}: item {path.stem!r} is already defined in the pipeline file"
            continue
        try:
            item = validate_config(DictionaryItem, read_config_file(path), source=str(path))
            problem = item_problem(path.stem, item, cfg.hook_points)
            if problem:
                raise ConfigError(f"invalid settings in {path}:\n  {problem.removeprefix('.').removeprefix(': ')}")
            if check is not None:
                check(cfg.model_copy(update={"dictionaries": {path.stem: item}}), path)
        except ConfigError as exc:
            errors[path] = str(exc)
            continue
        dictionaries[path.stem] = item
    return cfg.model_copy(update={"dictionaries": dictionaries}), errors
