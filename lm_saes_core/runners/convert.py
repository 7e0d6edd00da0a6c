"""`convert_topk_to_jumprelu`: a saved TopK-family dictionary (SAE, transcoder, crosscoder, CLT) turned into a
JumpReLU one with per-feature thresholds calibrated on an activation stream (see `models.conversion`), compared with
the original on the tokens that follow the calibration ones, and saved."""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from lm_saes_core.activation.config import ActivationFactoryConfig
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.backend.base import LanguageModelConfig
from lm_saes_core.config import BaseConfig, ConfigError
from lm_saes_core.data import DatasetConfig
from lm_saes_core.evaluation import EvalConfig, Evaluator
from lm_saes_core.io import atomic_write_text
from lm_saes_core.log import setup_logging
from lm_saes_core.models import PretrainedSAE
from lm_saes_core.models.activation_functions import ACTIVATION_FUNCTIONS
from lm_saes_core.models.conversion import topk_to_jumprelu
from lm_saes_core.runners.common import check_dictionary_fits, check_model_config, load_language_model_and_datasets

logger = logging.getLogger(__name__)
COMPARED = ("metrics/l0", "metrics/explained_variance", "losses/mse_loss", "metrics/dead_fraction")


class ConvertTopKToJumpReLUSettings(BaseConfig):
    sae: PretrainedSAE
    """The TopK-family dictionary (loaded as saved, not folded)."""
    sae_name: str
    sae_series: str = "default"
    activation_factory: ActivationFactoryConfig
    """The tokens to calibrate on, then to compare the two dictionaries on."""
    model: LanguageModelConfig | None = None
    model_name: str | None = None
    datasets: dict[str, DatasetConfig | None] | None = None
    calibration_tokens: int = Field(default=65536, gt=0)
    evaluation_tokens: int = Field(default=16384, ge=0)
    """Tokens after the calibration ones on which both dictionaries are evaluated (0: no comparison)."""
    exp_result_path: str
    """Where the JumpReLU dictionary is saved (with `conversion.json`: the comparison)."""


@dataclass
class ConversionResult:
    output_path: Path
    topk_metrics: dict[str, float]
    jumprelu_metrics: dict[str, float]


def convert_topk_to_jumprelu(settings: ConvertTopKToJumpReLUSettings) -> ConversionResult:
    setup_logging()
    cfg, _ = settings.sae.read_config()
    if not ACTIVATION_FUNCTIONS[cfg.act_fn].uses_k:
        raise ConfigError(
            f"sae: {settings.sae.pretrained_name_or_path} has act_fn {cfg.act_fn!r}; only a TopK-family dictionary "
            "converts"
        )
    factory_cfg = settings.activation_factory
    check_dictionary_fits(cfg, factory_cfg)
    check_model_config(factory_cfg, settings.model, [cfg])
    language_model, datasets = load_language_model_and_datasets(factory_cfg, settings.model, settings.datasets)
    topk = settings.sae.model_copy(update={"fold_activation_scale": False}).load()
    factory = ActivationFactory(factory_cfg)
    factory.validate(language_model)
    model_name = settings.model_name or (settings.model.model_name if settings.model else None)
    stream = iter(factory.process(model=language_model, model_name=model_name, datasets=datasets))

    jumprelu = topk_to_jumprelu(topk, stream, settings.calibration_tokens)
    topk_metrics, jumprelu_metrics = {}, {}
    if settings.evaluation_tokens:
        evaluator = Evaluator(EvalConfig(total_eval_tokens=settings.evaluation_tokens, compute_downstream=False))
        held_out = _first_tokens(stream, settings.evaluation_tokens)
        topk_metrics = {key: evaluator.evaluate(topk, held_out)[key] for key in COMPARED}
        jumprelu_metrics = {key: evaluator.evaluate(jumprelu, held_out)[key] for key in COMPARED}
        logger.info(
            "TopK -> JumpReLU on %d held-out tokens:\n%s",
            settings.evaluation_tokens,
            "\n".join(f"  {k:<30} {topk_metrics[k]:.5g} -> {jumprelu_metrics[k]:.5g}" for k in COMPARED),
        )
        loss = topk_metrics["metrics/explained_variance"] - jumprelu_metrics["metrics/explained_variance"]
        if loss > 0.02:
            logger.warning(
                "the JumpReLU dictionary explains %.3f less variance than the TopK one: per-feature thresholds keep "
                "the L0 but not top-k's adaptation to each token's norm; fine-tune it (act_fn jumprelu, "
                "sparsity_loss_type l0) before relying on it",
                loss,
            )
    output = jumprelu.save_pretrained(settings.exp_result_path)
    record = {"source": settings.sae.pretrained_name_or_path, "topk": topk_metrics, "jumprelu": jumprelu_metrics}
    atomic_write_text(output / "conversion.json", json.dumps(record, indent=2))
    return ConversionResult(output, topk_metrics, jumprelu_metrics)


def _first_tokens(stream, budget: int) -> list:
    """The next batches holding `budget` tokens (kept, so both dictionaries see the same ones)."""
    batches, seen = [], 0
    for batch in stream:
        batches.append(batch)
        seen += int(batch["mask"].sum()) if "mask" in batch else len(batch["tokens"])
        if seen >= budget:  # before pulling another batch: from a dataset that costs a forward pass
            break
    return batches
