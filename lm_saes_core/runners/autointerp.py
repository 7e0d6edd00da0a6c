"""`auto_interp`: explain and score a dictionary's analysed features with an LLM behind an OpenAI-compatible API.

Reads the feature analyses from the record store, writes each feature's `Interpretation` back as soon as that feature
is done (so an interrupted run keeps its finished work), and on a re-run asks only about the features that have no
successful interpretation yet. Failures that are the endpoint's rather than a feature's (it is down, it does not serve
the model) fail every feature alike: the run stops after a few in a row, or when every feature failed so, with
`RepeatedFailureError`.
"""

import asyncio
import logging
from dataclasses import dataclass, field

import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.analysis.autointerp.interpreter import FeatureInterpreter
from lm_saes_core.analysis.autointerp.llm import LLMClient, resolve_api_key
from lm_saes_core.backend.base import LanguageModelConfig
from lm_saes_core.config import BaseConfig, UserError
from lm_saes_core.log import setup_logging
from lm_saes_core.store import RecordNotFoundError, RecordStore, RecordStoreConfig, open_store
from lm_saes_core.store.records import FeatureRecord

logger = logging.getLogger(__name__)


class AutoInterpSettings(BaseConfig):
    sae_name: str
    sae_series: str = "default"
    model: LanguageModelConfig
    """The model whose token ids the analyses hold; only its tokenizer is loaded."""
    auto_interp: AutoInterpConfig
    features: list[int] | None = None
    """Feature indices to interpret; None = every feature whose analysis saw it active (max activation > 0)."""
    analysis_name: str = "default"
    store: RecordStoreConfig = Field(default_factory=RecordStoreConfig)
    overwrite_existing: bool = False
    """Interpret again features that already have a successful interpretation."""
    stop_after_same_failures: int | None = Field(default=3, ge=1)
    """Stop the run when this many features in a row fail with the same error (an endpoint that is down or does not
    serve the model fails every feature alike); None never stops early. The features finished before stay stored."""


@dataclass
class AutoInterpResult:
    interpreted: list[int] = field(default_factory=list)
    """Features that got an explanation and all their scores in this run."""
    failed: dict[int, str] = field(default_factory=dict)
    """Features attempted in this run that ended with an error (stored; a re-run retries them)."""
    skipped_existing: list[int] = field(default_factory=list)
    """Already successfully interpreted (kept as they were)."""
    skipped_inactive: list[int] = field(default_factory=list)
    """Requested, but without an analysis of that name or never active in it."""
    mean_balanced_accuracy: dict[str, float] = field(default_factory=dict)
    """Per scorer, over the features scored in this run."""
    n_requests: int = 0
    """HTTP requests sent to the endpoint (retries included)."""

    @property
    def attempted(self) -> list[int]:
        return sorted([*self.interpreted, *self.failed])


class RepeatedFailureError(UserError, RuntimeError):
    """Features failed one after another with one and the same error (the message quotes it): a cause common to all
    of them, such as an endpoint that is down. `result` holds what the run did; its finished features are stored."""

    def __init__(self, message: str, result: AutoInterpResult):
        super().__init__(message)
        self.result = result


@dataclass
class _Plan:
    pending: list[int]
    skipped_existing: list[int]
    skipped_inactive: list[int]


def is_done(record: FeatureRecord) -> bool:
    """A successful interpretation: an explanation and no error (a scorer that failed leaves an error)."""
    interpretation = record.interpretation
    return interpretation is not None and interpretation.explanation is not None and interpretation.error is None


def _plan(store: RecordStore, settings: AutoInterpSettings) -> _Plan:
    name, series = settings.sae_name, settings.sae_series
    dictionary = store.get_dictionary(name, series)
    if dictionary is None:
        stored = [f"{d.name} ({d.series})" for d in store.list_dictionaries()]
        raise RecordNotFoundError(
            f"sae_name: dictionary {name!r} (series {series!r}) is not in the record store; stored dictionaries: "
            f"{', '.join(stored) or 'none'}"
        )
    analysis_names = store.list_analysis_names(name, series)
    if settings.analysis_name not in analysis_names:
        raise RecordNotFoundError(
            f"analysis_name: dictionary {name!r} (series {series!r}) has no analysis {settings.analysis_name!r}; "
            f"stored analyses: {', '.join(analysis_names) or 'none (run analyze_sae first)'}"
        )
    if dictionary.model_name is not None and dictionary.model_name != settings.model.model_name:
        logger.warning(
            "dictionary %r was recorded with model %r but its token ids will be decoded with the tokenizer of %r",
            name,
            dictionary.model_name,
            settings.model.model_name,
        )
    d_sae = dictionary.cfg.get("d_sae")
    if settings.features is not None and d_sae is not None:
        outside = [index for index in settings.features if not 0 <= index < d_sae]
        if outside:
            raise ValueError(f"features: {outside} are not feature indices of {name!r} (d_sae={d_sae})")

    plan = _Plan([], [], [])
    found: set[int] = set()
    for record in store.iter_features(name, series, settings.features, with_samples=False):
        found.add(record.index)
        analysis = record.analysis(settings.analysis_name)
        if analysis is None or analysis.max_feature_acts <= 0:
            plan.skipped_inactive.append(record.index)
        elif is_done(record) and not settings.overwrite_existing:
            plan.skipped_existing.append(record.index)
        else:
            plan.pending.append(record.index)
    plan.skipped_inactive += sorted(set(settings.features or ()) - found)
    return plan


def load_tokenizer(cfg: LanguageModelConfig):
    from transformers import AutoTokenizer

    from lm_saes_core.backend.registry import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(cfg))


async def _interpret_pending(
    store: RecordStore, settings: AutoInterpSettings, pending: list[int], tokenizer, result: AutoInterpResult
) -> None:
    cfg = settings.auto_interp
    name, series = settings.sae_name, settings.sae_series
    llm = LLMClient(cfg)
    interpreter = FeatureInterpreter(cfg, llm, tokenizer)
    # Features in flight are bounded too, so only that many features' samples are in memory at once.
    slots = asyncio.Semaphore(cfg.max_concurrent_requests)

    async def interpret(index: int):
        async with slots:
            record = store.get_feature(name, series, index)
            if record is None or record.analysis(settings.analysis_name) is None:
                raise RecordNotFoundError(f"feature {index} of {name!r} lost its analysis during the run")
            return index, await interpreter.interpret(index, record.analysis(settings.analysis_name))

    tasks = [asyncio.create_task(interpret(index)) for index in pending]
    balanced: dict[str, list[float]] = {}
    same_failures: list[str] = []  # the errors of the features that failed last, in a row and alike
    try:
        with tqdm(total=len(tasks), desc=f"auto-interp {name}", unit="feature") as bar:
            for next_done in asyncio.as_completed(tasks):
                index, interpretation = await next_done
                store.set_interpretation(name, series, index, interpretation)
                if interpretation.error is None:
                    result.interpreted.append(index)
                    same_failures.clear()
                else:
                    result.failed[index] = interpretation.error
                    logger.debug("feature %d failed: %s", index, interpretation.error)
                    if same_failures[-1:] != [interpretation.error]:
                        same_failures.clear()
                    same_failures.append(interpretation.error)
                for score in interpretation.scores:
                    balanced.setdefault(score.method, []).append(score.balanced_accuracy)
                bar.update(1)
                bar.set_postfix(failed=len(result.failed))
                if settings.stop_after_same_failures and len(same_failures) >= settings.stop_after_same_failures:
                    break  # the features still pending stay uninterpreted (a re-run asks about them)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        result.n_requests = llm.n_requests
        await llm.close()
    result.interpreted.sort()
    result.mean_balanced_accuracy = {method: float(np.mean(values)) for method, values in balanced.items()}
    stopped = len(result.attempted) < len(pending)
    if stopped or (not result.interpreted and len(set(result.failed.values())) == 1):
        what = f"stopped after {len(same_failures)} features in a row" if stopped else "every feature attempted"
        raise RepeatedFailureError(
            f"auto-interp of {name!r}: {what} failed with the same error ({len(result.interpreted)} interpreted and "
            f"{len(result.failed)} failed features are stored; a re-run retries the rest): {same_failures[-1]}",
            result,
        )


def auto_interp(settings: AutoInterpSettings) -> AutoInterpResult:
    """Interpret the selected features of `settings.sae_name` and store one `Interpretation` per feature."""
    setup_logging()
    resolve_api_key(settings.auto_interp)  # a missing key fails here, before the store or the tokenizer is touched
    with open_store(settings.store) as store:
        plan = _plan(store, settings)
        result = AutoInterpResult(skipped_existing=plan.skipped_existing, skipped_inactive=plan.skipped_inactive)
        if plan.pending:
            tokenizer = load_tokenizer(settings.model)
            asyncio.run(_interpret_pending(store, settings, plan.pending, tokenizer, result))
    scores = ", ".join(f"{method} {value:.3f}" for method, value in sorted(result.mean_balanced_accuracy.items()))
    logger.info(
        "auto-interp of %s (%s): %d interpreted, %d failed, %d already done, %d inactive or unanalysed; "
        "mean balanced accuracy: %s; %d requests to %s",
        settings.sae_name,
        settings.sae_series,
        len(result.interpreted),
        len(result.failed),
        len(result.skipped_existing),
        len(result.skipped_inactive),
        scores or "n/a",
        result.n_requests,
        settings.auto_interp.base_url or "the OpenAI API",
    )
    for index, error in list(result.failed.items())[:5]:
        logger.info("  feature %d failed: %s", index, error)
    return result
