"""Language-model backends: token ids in, activations at TransformerLens-named hook points out.

Importing this package only imports torch; transformers and transformer_lens load when a model does.
"""

import logging

from lm_saes_core.backend.base import LanguageModel, LanguageModelConfig, ModelShape, UnknownHookPointError
from lm_saes_core.backend.huggingface import LAYOUTS, ConfigShape, HuggingFaceLanguageModel
from lm_saes_core.backend.registry import ModelNotAvailableError, resolve_model_dir
from lm_saes_core.backend.transformer_lens import TransformerLensLanguageModel

__all__ = [
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
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_dir(cfg))


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
