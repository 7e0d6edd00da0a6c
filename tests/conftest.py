"""Shared session fixtures: the real bundled SmolLM2 behind both backends, and a tiny random Llama.

Everything is lazy: a test that asks for none of these fixtures loads no model. The bundled model is converted
once into the lm_saes cache (`$LM_SAES_CACHE`, default ~/.cache/lm_saes) and reused by later sessions.
"""

from pathlib import Path

import pytest
import torch

from lm_saes_core.backend import (
    HuggingFaceLanguageModel,
    LanguageModelConfig,
    TransformerLensLanguageModel,
    resolve_model_dir,
)


@pytest.fixture(scope="session")
def smollm2_config() -> LanguageModelConfig:
    return LanguageModelConfig(model_name="smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_config: LanguageModelConfig) -> Path:
    """The converted safetensors directory of the bundled model (converted on first use)."""
    return resolve_model_dir(smollm2_config)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_config: LanguageModelConfig, smollm2_dir: Path) -> HuggingFaceLanguageModel:
    return HuggingFaceLanguageModel(smollm2_config)


@pytest.fixture(scope="session")
def smollm2_tl(smollm2_config: LanguageModelConfig, smollm2_dir: Path) -> TransformerLensLanguageModel:
    return TransformerLensLanguageModel(smollm2_config)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 3-layer, width-64 random Llama with the SmolLM2 tokenizer (same vocabulary, so token ids are shared)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
