"""Auto-interpretation of dictionary features: an LLM behind an OpenAI-compatible API explains each feature from its
strongest contexts, then is scored on held-out contexts (detection and fuzzing)."""

from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.analysis.autointerp.interpreter import FeatureInterpreter
from lm_saes_core.analysis.autointerp.llm import LLMClient, LLMError

__all__ = ["AutoInterpConfig", "FeatureInterpreter", "LLMClient", "LLMError"]
