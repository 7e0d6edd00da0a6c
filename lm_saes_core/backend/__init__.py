"""Language-model backends: token ids in, activations at TransformerLens-named hook points out.

Importing this package only imports torch; transformers and transformer_lens load when a model does.
"""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from lm_saes_core.backend.base import LanguageModel, LanguageModelConfig, ModelShape, UnknownHookPointError
from lm_saes_core.backend.huggingface import LAYOUTS, ConfigShape, HuggingFaceLanguageModel
from lm_saes_core.backend.registry import ModelNotAvailableError, resolve_model_dir
from lm_saes_core.backend.transformer_lens import TransformerLensLanguageModel

__all__ = [
    "json_model_config",
    "HuggingFaceLanguageModel",
    "LanguageModel",
    "LanguageModelConfig",
    "ModelNotAvailableError",
    "ModelShape",
    "TransformerLensLanguageModel",
    "UnknownHookPointError",
    "load_model",
    "read_model_shape",
    "resolve_backend",
]

logger = logging.getLogger(__name__)


def resolve_backend(cfg: LanguageModelConfig) -> str:
    """`cfg.backend`, with "auto" meaning the HuggingFace backend for the layer layouts it knows (faster, sdpa
    attention) and the TransformerLens bridge for everything else."""
    if cfg.backend != "auto":
        return cfg.backend
    return _backend_for(cfg, _model_config(cfg).model_type)


def _backend_for(cfg: LanguageModelConfig, model_type: str) -> str:
    if cfg.backend != "auto":
        return cfg.backend
    return "huggingface" if model_type in LAYOUTS else "transformer_lens"


def _model_config(cfg: LanguageModelConfig):
    """The model's config: read from config.json as JSON when it holds all that the checks before a run read (a
    process that trains or analyses from cached activations never needs transformers, whose config classes take
    ~3.5 s to import); otherwise transformers' `AutoConfig`."""
    path = resolve_model_dir(cfg)
    return json_model_config(path / "config.json") or _auto_config(path)


def _auto_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


_SHAPE_KEYS = {"gpt2": ("n_layer", "n_embd", "n_positions")}
"""model_type -> its config.json's names for (layers, width, context), where they are not transformers' usual ones."""
_USUAL_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "max_position_embeddings")


class JsonModelConfig(SimpleNamespace):
    """The fields of a config.json of a layout the HuggingFace backend knows, under transformers' attribute names."""

    def get_text_config(self) -> "JsonModelConfig":
        return self


def json_model_config(path: Path) -> JsonModelConfig | None:
    """`path` (a config.json) as a `JsonModelConfig`, or None when it is missing, unreadable or lacks a field (then
    transformers' defaults apply: ask `AutoConfig`). Other model types give their `model_type` alone."""
    try:
        fields = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    if not isinstance(model_type, str):
        return None
    if model_type not in LAYOUTS:
        return JsonModelConfig(model_type=model_type)
    names = _SHAPE_KEYS.get(model_type, _USUAL_SHAPE_KEYS)
    values = [fields.get(name) for name in names]
    if not all(isinstance(value, int) and value > 0 for value in values):
        return None
    return JsonModelConfig(model_type=model_type, **dict(zip(_USUAL_SHAPE_KEYS, values, strict=True)))


def read_model_shape(cfg: LanguageModelConfig) -> ModelShape | None:
    """The model's hook points, widths and context length from its config.json alone (no weights), or None when
    its backend cannot tell before the model is built: the TransformerLens bridge names its hooks only once loaded."""
    config = _model_config(cfg)
    if _backend_for(cfg, config.model_type) != "huggingface":
        return None
    return ConfigShape(cfg, config)


def load_model(cfg: LanguageModelConfig) -> LanguageModel:
    backend = resolve_backend(cfg)
    logger.info("loading the weights of model %r (backend %s)", cfg.model_name, backend)
    if backend == "huggingface":
        return HuggingFaceLanguageModel(cfg)
    return TransformerLensLanguageModel(cfg)
