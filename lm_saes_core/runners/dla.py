"""`direct_logit_attribute`: the tokens each feature of a saved dictionary promotes and suppresses through the
language model's unembedding (see `lm_saes_core.analysis.direct_logit` for what exactly is computed, and which
decoders make a crosscoder's or a CLT's feature direction), written to the record store and optionally to a JSON
file."""

import json
import logging
from dataclasses import asdict
from pathlib import Path

from pydantic import Field

from lm_saes_core.analysis.direct_logit import (
    DirectLogitAttributorConfig,
    attribute_directions,
    check_attributable,
    feature_directions,
)
from lm_saes_core.backend.base import LanguageModelConfig
from lm_saes_core.config import BaseConfig
from lm_saes_core.io import atomic_write_text
from lm_saes_core.log import setup_logging
from lm_saes_core.models import PretrainedSAE
from lm_saes_core.store import DictionaryRecord, FeatureLogits, RecordStore, RecordStoreConfig, open_store

logger = logging.getLogger(__name__)


class DirectLogitAttributeSettings(BaseConfig):
    sae: PretrainedSAE
    """The dictionary; a dataset-wise one is folded on load (`fold_activation_scale`, default true) so W_D is raw."""
    sae_name: str
    sae_series: str = "default"
    model: LanguageModelConfig
    """The language model whose unembedding reads the decoder directions (the one the dictionary was trained on)."""
    top_k: int = Field(default=10, gt=0)
    """Promoted and suppressed tokens kept per feature."""
    feature_batch_size: int = Field(default=256, gt=0)
    """Features attributed at once (memory: feature_batch_size x d_vocab x 4 bytes)."""
    head: str | None = None
    """A crosscoder's head (hook point) whose decoder rows are attributed; None: its deepest head on the residual
    stream. One head per run, because a stored feature holds one list of promoted and suppressed tokens. Other kinds
    have nothing to choose (a CLT attributes the sum of a feature's decoders over the layers it writes to)."""
    store: RecordStoreConfig = Field(default_factory=RecordStoreConfig)
    output_path: str | None = None
    """Also write the results as JSON here."""


def direct_logit_attribute(settings: DirectLogitAttributeSettings) -> dict[int, FeatureLogits]:
    """Attribute every feature of `settings.sae`, store the results on its feature records, return them by index."""
    setup_logging()
    sae_cfg, saved_cfg = settings.sae.read_config()
    hooks = check_attributable(sae_cfg, head=settings.head)  # the kind and the hook names, before any heavy work
    # The store opens (an unreachable MongoDB fails here) before the model loads.
    with open_store(settings.store) as store:
        from lm_saes_core.backend import load_model

        model = load_model(settings.model)
        check_attributable(sae_cfg, model, settings.head)  # the model's hooks and width
        # Folding puts a dataset-wise dictionary's decoder rows into the model's raw activation space.
        sae = settings.sae.model_copy(update={"fold_activation_scale": True}).load()
        directions = feature_directions(sae, hooks)
        logger.info(
            "direct logit attribution of %s (%d features, decoders to %s%s) through %s",
            settings.sae_name,
            len(directions),
            ", ".join(hooks),
            ", summed" if len(hooks) > 1 else "",
            settings.model.model_name,
        )
        cfg = DirectLogitAttributorConfig(top_k=settings.top_k, feature_batch_size=settings.feature_batch_size)
        results = dict(enumerate(attribute_directions(directions, model, cfg)))
        _ensure_records(store, settings, saved_cfg)
        store.set_feature_logits(settings.sae_name, settings.sae_series, results)
    if settings.output_path is not None:
        _write_json(settings, results, hooks)
    return results


def _ensure_records(store: RecordStore, settings: DirectLogitAttributeSettings, saved_cfg: dict) -> None:
    """The feature records hang off a dictionary record (and the model record lets `show feature` decode tokens)."""
    model_name = settings.model.model_name
    if store.get_model(model_name) is None:
        store.add_model(model_name, settings.model.model_dump(mode="json", exclude={"device"}))
    path = settings.sae.source()
    stored = store.get_dictionary(settings.sae_name, settings.sae_series)
    if stored is None:
        store.add_dictionary(
            DictionaryRecord(
                name=settings.sae_name, series=settings.sae_series, path=path, cfg=saved_cfg, model_name=model_name
            )
        )
    elif stored.path != path:
        logger.warning(
            "dictionary %s/%s is stored with path %s, but the logits were computed from %s",
            settings.sae_series,
            settings.sae_name,
            stored.path,
            path,
        )


def _write_json(settings: DirectLogitAttributeSettings, results: dict[int, FeatureLogits], hooks: list[str]) -> None:
    record = {
        "sae_name": settings.sae_name,
        "sae_series": settings.sae_series,
        "sae_path": settings.sae.pretrained_name_or_path,
        "model_name": settings.model.model_name,
        "top_k": settings.top_k,
        # The output hooks whose decoder rows made the directions (summed over a CLT feature's layers t >= s).
        "attributed_hooks": hooks,
        "summed": len(hooks) > 1,
        "features": {str(index): asdict(logits) for index, logits in results.items()},
    }
    Path(settings.output_path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(settings.output_path, json.dumps(record, indent=1, ensure_ascii=False))
