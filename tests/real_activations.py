"""Cached activations of the bundled SmolLM2 on the bundled corpus, and a held-out evaluation over such a cache, for
the tests that train on real activations."""

from pathlib import Path

from lm_saes_core import DatasetConfig, GenerateActivationsSettings, LanguageModelConfig, generate_activations
from lm_saes_core.runners.evaluate import EvaluateSAESettings, evaluate_sae


def smollm2_cache(root: Path, hook: str | list[str], split: str, tokens: int) -> Path:
    """`tokens` positions (windows of 128) of `hook` (or of several hooks) over the documents of `split` (e.g.
    "train[100:300]")."""
    settings = GenerateActivationsSettings(
        model=LanguageModelConfig(model_name="smollm2-135m"),
        dataset=DatasetConfig(dataset_name_or_path="python-docs", split=split),
        hook_points=[hook] if isinstance(hook, str) else hook,
        output_dir=str(root),
        context_size=128,
        model_batch_size=16,
        batch_size=16,
        total_tokens=tokens,
    )
    return generate_activations(settings).output_dir


def heldout_metrics(sae_dir: Path, cache: Path, hook: str, tokens: int, batch_size: int = 1024) -> dict[str, float]:
    """The saved dictionary's metrics over the first `tokens` tokens of `cache` (no language model)."""
    settings = EvaluateSAESettings.model_validate(
        {
            "sae": {"pretrained_name_or_path": str(sae_dir)},
            "sae_name": "heldout",
            "activation_factory": {
                "sources": [{"type": "activations", "name": "heldout", "path": str(cache)}],
                "target": "activations-1d",
                "hook_points": [hook],
                "batch_size": batch_size,
            },
            "eval": {"total_eval_tokens": tokens, "compute_downstream": False},
        }
    )
    return evaluate_sae(settings).metrics
