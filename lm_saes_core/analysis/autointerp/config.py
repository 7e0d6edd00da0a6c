"""`AutoInterpConfig`: which OpenAI-compatible endpoint to ask, how hard to push it, and how examples are built."""

from typing import Literal

from pydantic import Field, model_validator

from lm_saes_core.config import BaseConfig

ScorerName = Literal["detection", "fuzzing"]


class AutoInterpConfig(BaseConfig):
    # endpoint ------------------------------------------------------------------------------------------------------
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. `http://127.0.0.1:8080/v1` for a local llama.cpp server; None = OpenAI."""
    model: str = "gpt-4o-mini"
    """Model name sent with every request (used for explanation and scoring)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key; the key itself never appears in a config file. A local server
    (`base_url` set) needs none when the variable is unset."""
    json_response_format: bool = True
    """Send `response_format={"type": "json_object"}` (OpenAI and llama.cpp's server support it; turn it off for
    servers that reject the field)."""
    temperature: float = Field(default=0.0, ge=0.0)
    max_tokens_explanation: int = Field(default=400, gt=0)
    max_tokens_scoring: int = Field(default=400, gt=0)

    # request handling ------------------------------------------------------------------------------------------------
    max_concurrent_requests: int = Field(default=8, gt=0)
    """Requests in flight at once (also the number of features worked on at once)."""
    requests_per_minute: float | None = Field(default=None, gt=0)
    """Space request starts at least 60/rpm seconds apart; None = no limit."""
    request_timeout_s: float = Field(default=60.0, gt=0)
    """Wall-clock limit of one request, connection to last byte."""
    max_retries: int = Field(default=3, ge=0)
    """Retries after a timeout, a connection error, a 429 or a 5xx; other errors are not retried."""
    retry_backoff_s: float = Field(default=1.0, ge=0)
    """Wait before the first retry; doubled on each further retry (capped at 60 s)."""

    # examples --------------------------------------------------------------------------------------------------------
    n_activating_examples: int = Field(default=7, gt=0)
    """Strongest contexts of "top_activations" shown to the explainer (never used for scoring)."""
    n_non_activating_examples: int = Field(default=20, ge=0)
    """Contexts read from the "non_activating" pool (negatives for detection)."""
    use_band_pools: bool = True
    """Also draw held-out activating examples from the "band_<lo>_<hi>" pools, so scoring sees weaker activations."""
    activation_threshold: float = Field(default=0.7, gt=0.0, le=1.0)
    """Highlight tokens whose activation is at least this fraction of their example's max."""
    max_length: int = Field(default=50, gt=0)
    """Tokens per example window, centred on the example's strongest activation."""
    include_cot: bool = True
    """Ask the explainer to reason in a few short steps before answering."""

    # scoring ---------------------------------------------------------------------------------------------------------
    scorers: list[ScorerName] = Field(default_factory=lambda: ["detection", "fuzzing"])
    detection_n_examples: int = Field(default=5, gt=0)
    """Held-out activating examples, and as many non-activating ones, judged by the detection scorer."""
    fuzzing_n_correct: int = Field(default=5, ge=0)
    """Held-out activating examples shown with their true highlights."""
    fuzzing_n_incorrect: int = Field(default=2, ge=0)
    """Held-out activating examples whose highlights are moved onto tokens where the feature is silent."""
    pass_threshold: float = Field(default=0.7, ge=0.0, le=1.0)
    """A scorer passes when its balanced accuracy reaches this."""
    seed: int = 0
    """Seeds example sampling, shuffles and fuzzing highlights (per feature, so order of completion is irrelevant)."""

    @model_validator(mode="after")
    def _check_scorers(self) -> "AutoInterpConfig":
        if len(set(self.scorers)) != len(self.scorers):
            raise ValueError(f"scorers lists a scorer twice: {self.scorers}")
        if "fuzzing" in self.scorers and self.fuzzing_n_correct + self.fuzzing_n_incorrect == 0:
            raise ValueError("fuzzing_n_correct + fuzzing_n_incorrect must be > 0 when the fuzzing scorer is on")
        return self
