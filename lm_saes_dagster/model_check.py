"""Check a pipeline against its language model at definition load, from the model's `config.json` only.

Dagster imports the code location often, so loading weights here is out of the question; the model's config says how
many layers it has and its width, which is enough to know the HuggingFace backend's hook names and the residual
width a dictionary must match. When no config is available locally (a hub model not downloaded yet, a path that
only exists on the cluster), the check is skipped with a note and the model is checked when a step loads it.
"""

import difflib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from lm_saes_core.backend.base import LanguageModelConfig
from lm_saes_core.config import ConfigError
from lm_saes_dagster.pipeline_config import PipelineConfig

logger = logging.getLogger(__name__)

RESIDUAL_WIDTH_SUFFIXES = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
"""Hook points that live in the residual stream's width (d_model) on every backend."""


@dataclass(frozen=True)
class ModelShape:
    """What `config.json` says about a causal LM: enough to name its hook points without loading it."""

    model_type: str
    n_layers: int
    d_model: int
    config_dir: Path


def local_config_dir(cfg: LanguageModelConfig) -> tuple[Path | None, str]:
    """The local directory holding the model's `config.json`, or None and why there is none. Never downloads: a hub
    model is looked up in the local HF cache only. The bundled model is converted once (as its first step would)."""
    from lm_saes_core.backend.registry import BUNDLED_MODEL, ModelNotAvailableError, bundled_model_dir

    if cfg.model_from_pretrained_path is not None:
        path = Path(cfg.model_from_pretrained_path).expanduser()
        return (path, "") if (path / "config.json").is_file() else (None, f"{path} has no config.json here")
    if cfg.model_name == BUNDLED_MODEL:
        try:
            return bundled_model_dir(cfg), ""
        except ModelNotAvailableError as exc:
            return None, str(exc)
    local = Path(cfg.model_name).expanduser()
    if local.is_dir() or cfg.model_name.startswith(("/", ".", "~")):
        return (local, "") if (local / "config.json").is_file() else (None, f"{local} has no config.json here")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(cfg.model_name, "config.json", cache_dir=cfg.cache_dir)
    if isinstance(cached, str):
        return Path(cached).parent, ""
    return None, f"hub model {cfg.model_name!r} is not in the local Hugging Face cache"


def model_shape(config_dir: Path) -> ModelShape:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_dir)
    text = config.get_text_config()
    return ModelShape(config.model_type, int(text.num_hidden_layers), int(text.hidden_size), config_dir)


def uses_huggingface_backend(cfg: LanguageModelConfig, shape: ModelShape) -> bool:
    """The same choice as `lm_saes_core.backend.resolve_backend`, made from the config already read."""
    from lm_saes_core.backend.huggingface import LAYOUTS

    return cfg.backend == "huggingface" or (cfg.backend == "auto" and shape.model_type in LAYOUTS)


def huggingface_hook_points(n_layers: int) -> list[str]:
    """The HuggingFace backend's hook names for an `n_layers` model (what its `hook_points` lists once loaded)."""
    from lm_saes_core.backend.huggingface import hook_point_names

    return hook_point_names(n_layers)


def check_pipeline_model(cfg: PipelineConfig, source: str | Path) -> str | None:
    """Raise ConfigError (naming `source` and the field) when a hook point or a dictionary's width does not fit the
    model; return a note when the model's config is not available locally and nothing was checked."""
    config_dir, why = local_config_dir(cfg.model)
    if config_dir is None:
        note = f"{source}: hook points and widths not checked at load ({why}); they are checked when the model loads"
        logger.info(note)
        return note
    shape = model_shape(config_dir)
    problems = []
    huggingface = uses_huggingface_backend(cfg.model, shape)
    valid = huggingface_hook_points(shape.n_layers) if huggingface else None
    for index, hook in enumerate(cfg.hook_points):
        layer = re.match(r"blocks\.(\d+)\.", hook)
        if valid is not None and hook not in valid:
            near = difflib.get_close_matches(hook, valid, n=4, cutoff=0.6)
            hint = f"; closest: {', '.join(near)}" if near else ""
            problems.append(
                f"hook_points.{index}: model {cfg.model.model_name!r} ({shape.n_layers} layers) has no hook point "
                f"{hook!r}{hint}"
            )
        elif layer and int(layer.group(1)) >= shape.n_layers:
            problems.append(
                f"hook_points.{index}: {hook!r} names layer {layer.group(1)}, but model {cfg.model.model_name!r} has "
                f"{shape.n_layers} layers (0-{shape.n_layers - 1})"
            )
    for name, item in cfg.dictionaries.items():
        # Every HuggingFace-backend hook has the residual width; elsewhere only the residual-stream hooks are known.
        # The kind says which of its fields sets each hook's width (e.g. a transcoder's output: d_out when set).
        for hook, width, field in item.sae.hook_widths():
            if (hook.endswith(RESIDUAL_WIDTH_SUFFIXES) or huggingface) and width != shape.d_model:
                problems.append(
                    f"dictionaries.{name}.sae.{field}: {width} does not match the width of {hook!r} in model "
                    f"{cfg.model.model_name!r} ({shape.d_model})"
                )
    if problems:
        raise ConfigError("\n".join([f"invalid settings in {source}:", *(f"  {p}" for p in problems)]))
    return None
