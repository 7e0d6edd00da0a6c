"""Language-model backends: token ids in, activations at TransformerLens-named hook points out.

Importing this package only imports torch; transformers and transformer_lens load when a model does.
"""

from lm_saes_core.backend.base import LanguageModel, LanguageModelConfig, UnknownHookPointError
from lm_saes_core.backend.huggingface import LAYOUTS, HuggingFaceLanguageModel
from lm_saes_core.backend.registry import ModelNotAvailableError, resolve_model_dir
from lm_saes_core.backend.transformer_lens import TransformerLensLanguageModel

__all__ = [
    "HuggingFaceLanguageModel",
    "LanguageModel",
    "LanguageModelConfig",
    "ModelNotAvailableError",
    "TransformerLensLanguageModel",
    "UnknownHookPointError",
    "load_model",
    "resolve_backend",
]


def resolve_backend(cfg: LanguageModelConfig) -> str:
    """`cfg.backend`, with "auto" meaning the HuggingFace backend for the layer layouts it knows (faster, sdpa
    attention) and the TransformerLens bridge for everything else."""
    if cfg.backend != "auto":
        return cfg.backend
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(resolve_model_dir(cfg)).model_type
    return "huggingface" if model_type in LAYOUTS else "transformer_lens"


def load_model(cfg: LanguageModelConfig) -> LanguageModel:
    if resolve_backend(cfg) == "huggingface":
        return HuggingFaceLanguageModel(cfg)
    return TransformerLensLanguageModel(cfg)
