"""One feature from stored analysis to `Interpretation`: build examples, explain, score.

A failure that belongs to one feature (the endpoint timed out, the reply was unusable, the feature has no usable
examples) becomes that feature's `Interpretation.error`; it never ends the run.
"""

import asyncio
import time
from typing import Any

import numpy as np

from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.analysis.autointerp.examples import TOP_POOL, FeatureExamples, build_examples
from lm_saes_core.analysis.autointerp.explain import explain
from lm_saes_core.analysis.autointerp.llm import LLMClient, LLMError
from lm_saes_core.analysis.autointerp.score import ScorerOutcome, detection, fuzzing
from lm_saes_core.store.records import FeatureAnalysis, Interpretation

# Each random stream gets its own key, so turning a scorer on or off does not change what the others draw.
_EXAMPLES_STREAM, _DETECTION_STREAM, _FUZZING_STREAM = 0, 1, 2


class FeatureInterpreter:
    def __init__(self, cfg: AutoInterpConfig, llm: LLMClient, tokenizer):
        self.cfg = cfg
        self.llm = llm
        self.tokenizer = tokenizer

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, index, stream])

    def _failed(self, error: str, details: dict[str, Any]) -> Interpretation:
        return Interpretation(explanation=None, model=self.cfg.model, error=error, details=details)

    async def interpret(self, index: int, analysis: FeatureAnalysis) -> Interpretation:
        started = time.monotonic()
        examples = build_examples(analysis, self.tokenizer, self.cfg, self._rng(index, _EXAMPLES_STREAM))
        details: dict[str, Any] = {
            "analysis": analysis.name,
            "n_shown": len(examples.shown),
            "n_held_out": len(examples.held_out),
            "n_non_activating": len(examples.non_activating),
        }
        if not examples.shown:
            return self._failed(f"analysis {analysis.name!r} has no activating context in pool {TOP_POOL!r}", details)
        try:
            explanation, details["explanation"] = await explain(self.llm, examples.shown, self.cfg)
        except LLMError as error:
            details["explanation"] = {"error": str(error), "attempts": error.attempts}
            return self._failed(f"explanation: {error}", details)
        if explanation is None:
            return self._failed(f"explanation: {details['explanation']['error']}", details)

        scoring = (self._score(name, index, explanation.text, examples) for name in self.cfg.scorers)
        outcomes = await asyncio.gather(*scoring)
        details["scorers"] = {outcome.method: outcome.details for outcome in outcomes}
        scores = [outcome.score for outcome in outcomes if outcome.score is not None]
        details["passed"] = any(score.passed for score in scores)
        details["elapsed_s"] = round(time.monotonic() - started, 3)
        errors = [f"{outcome.method}: {outcome.error}" for outcome in outcomes if outcome.error]
        return Interpretation(
            explanation=explanation.text,
            model=self.cfg.model,
            scores=scores,
            error="; ".join(errors) or None,
            details=details,
        )

    async def _score(self, method: str, index: int, explanation: str, examples: FeatureExamples) -> ScorerOutcome:
        try:
            if method == "detection":
                rng = self._rng(index, _DETECTION_STREAM)
                return await detection(self.llm, explanation, examples.held_out, examples.non_activating, self.cfg, rng)
            if method == "fuzzing":
                rng = self._rng(index, _FUZZING_STREAM)
                return await fuzzing(self.llm, explanation, examples.held_out, self.cfg, rng)
        except LLMError as error:
            return ScorerOutcome(method, None, {"error": str(error), "attempts": error.attempts}, error=str(error))
        raise ValueError(f"unknown scorer {method!r}; known: detection, fuzzing")
