"""The records the store keeps, as plain dataclasses shared by every backend and by the analysis runners.

Arrays are NumPy arrays in memory; each backend stores them compactly (npy bytes), never as lists of floats.
A feature's samples carry their token ids, so rendering a feature never re-reads or re-tokenises a dataset.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class ModelRecord:
    name: str
    cfg: dict[str, Any]


@dataclass
class DatasetRecord:
    name: str
    cfg: dict[str, Any]


@dataclass
class DictionaryRecord:
    """A trained dictionary: where its weights are and what it scored."""

    name: str
    series: str
    path: str
    cfg: dict[str, Any]
    """The dictionary's config.json contents (SAEConfig dump)."""
    model_name: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    """Evaluation metrics (EV, L0, dead fraction, ...)."""


@dataclass
class FeatureSamples:
    """One named pool of whole contexts for one feature (e.g. "top_activations", "band_0.6_0.8", "non_activating").

    Rows are sorted by the context's max activation, strongest first. Padding is cut: row i holds `lengths[i]`
    valid positions, the rest of `tokens` is 0 and of `activations` is 0."""

    name: str
    tokens: np.ndarray
    """(n, S) int32 token ids of each context."""
    activations: np.ndarray
    """(n, S) float32 feature activation at each position."""
    lengths: np.ndarray
    """(n,) int32 number of valid positions of each row."""
    doc_index: np.ndarray
    """(n,) int64 document index in its dataset."""
    doc_position: np.ndarray
    """(n,) int64 index in the document of the row's first document token (positions before it, e.g. BOS, are -1
    in the pipeline and are not documents tokens)."""
    dataset: list[str]
    """(n,) name of the dataset (activation-factory source) each row came from."""
    z_patterns: "ZPatterns | None" = None
    """Lorsa's top contexts: which source positions feed each row's peak activation. None for other pools and
    kinds."""

    def __len__(self) -> int:
        return len(self.lengths)


@dataclass
class ZPatterns:
    """Where a Lorsa feature's activation at each row's peak comes from (rows as in the pool that holds them).

    OV head i at the peak position t reads source position s <= t with contribution A[t, s] * v_i[s] (attention
    weight of its QK head times the head's value at s, value bias included); over all sources they sum to the
    pre-activation h_i[t], which is the activation there. Only the `K` sources with the largest |contribution| are
    kept, strongest first."""

    peaks: np.ndarray
    """(n,) int32 position t of each row's max activation (the first, on ties)."""
    sources: np.ndarray
    """(n, K) int32 source positions, strongest |contribution| first; -1 past a row's sources (t + 1 < K)."""
    contributions: np.ndarray
    """(n, K) float32 A[t, s] * v_i[s] of each source; 0 where `sources` is -1."""


@dataclass
class FeatureAnalysis:
    """What one analysis run found for one feature."""

    name: str
    """Analysis name ("default" unless asked otherwise)."""
    act_times: int
    """Positions where the feature is > 0."""
    n_analyzed_tokens: int
    max_feature_acts: float
    mean_feature_acts: float
    """Mean activation over the positions where it is > 0 (0 for a dead feature)."""
    histogram_edges: np.ndarray
    """(B+1,) float32 bin edges of the activation-value histogram (positive activations only)."""
    histogram_counts: np.ndarray
    """(B,) int64 counts per bin."""
    samples: list[FeatureSamples] = field(default_factory=list)
    decoder_norms: dict[str, float] | None = None
    """Dictionaries with several decoders per feature: the norm of what one unit of the feature's activation adds to
    each raw output hook it writes to, keyed by hook point in the dictionary's order (a crosscoder: every head; a
    CLT: the outputs of its layer and the later ones). None for one decoder per feature (SAE, transcoder)."""
    decoder_cosines: list[list[float]] | None = None
    """Crosscoder: (H, H) cosine similarities of the feature's decoder vectors in its heads, rows and columns in the
    order of `decoder_norms` (0 where a head's decoder is zero)."""
    location: str | None = None
    """Where the feature lives, from `decoder_norms` (see `FeatureAnalyzerConfig.location_threshold`): for a
    crosscoder "shared", "exclusive to <head>" or "shared by <head>, <head>"; for a CLT "reads <input hook>, writes
    to <output hooks>"."""

    @property
    def frequency(self) -> float:
        return self.act_times / self.n_analyzed_tokens if self.n_analyzed_tokens else 0.0

    def pool(self, name: str) -> FeatureSamples | None:
        return next((samples for samples in self.samples if samples.name == name), None)


@dataclass
class LogitToken:
    token_id: int
    token: str
    logit: float


@dataclass
class FeatureLogits:
    """Direct logit attribution of one feature's decoder direction."""

    top_positive: list[LogitToken]
    top_negative: list[LogitToken]


@dataclass
class InterpretationScore:
    """One scorer's verdict on an explanation (detection or fuzzing)."""

    method: str
    accuracy: float
    balanced_accuracy: float
    precision: float
    recall: float
    n_examples: int
    passed: bool


@dataclass
class Interpretation:
    explanation: str | None
    """None when the LLM failed for this feature; `error` says why."""
    model: str
    scores: list[InterpretationScore] = field(default_factory=list)
    error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    """Prompts and raw responses, kept for inspection."""


@dataclass
class FeatureRecord:
    dictionary: str
    series: str
    index: int
    analyses: list[FeatureAnalysis] = field(default_factory=list)
    logits: FeatureLogits | None = None
    interpretation: Interpretation | None = None

    def analysis(self, name: str = "default") -> FeatureAnalysis | None:
        return next((analysis for analysis in self.analyses if analysis.name == name), None)


# ------------------------------------------------------------------------------------------------ browsing queries

FEATURE_SORT_KEYS = ("index", "frequency", "max_activation", "explanation", "score")
"""What `RecordStore.feature_page` sorts by. Features lacking the value (no analysis, no explanation, no score) come
last in either direction; ties are broken by index."""


@dataclass
class FeatureFilter:
    """Which features of a dictionary `RecordStore.feature_page` returns. Every condition given must hold; one on a
    value the feature lacks excludes it. Ranges are half-open, [min, max), so adjacent histogram bars never share a
    feature."""

    min_frequency: float | None = None
    """act_times / n_analyzed_tokens >= this."""
    max_frequency: float | None = None
    """act_times / n_analyzed_tokens < this."""
    min_max_activation: float | None = None
    """max_feature_acts >= this."""
    max_max_activation: float | None = None
    """max_feature_acts < this."""
    explanation_contains: str | None = None
    """A substring of the explanation, case-insensitive (ASCII letters on SQLite, all letters on MongoDB)."""
    min_score: float | None = None
    """The explanation's score (see `FeatureSummary.score`) >= this."""


@dataclass
class FeatureSummary:
    """One row of a dictionary's feature table: an analysis' scalars and the explanation, without samples."""

    index: int
    act_times: int | None
    n_analyzed_tokens: int | None
    max_feature_acts: float | None
    mean_feature_acts: float | None
    explanation: str | None
    score: float | None
    """The mean balanced accuracy of the explanation's scorers (detection, fuzzing); None when unscored."""
    scores: dict[str, float] = field(default_factory=dict)
    """Balanced accuracy by scorer."""
    location: str | None = None
    """Where a crosscoder's or CLT's feature writes (`FeatureAnalysis.location`)."""

    @property
    def frequency(self) -> float | None:
        if self.n_analyzed_tokens is None or self.act_times is None:
            return None
        return self.act_times / self.n_analyzed_tokens if self.n_analyzed_tokens else 0.0


@dataclass
class FeaturePage:
    total: int
    """Features matching the filter, over all pages."""
    rows: list[FeatureSummary]


@dataclass
class ExplanationHit:
    """A feature whose explanation matched a search."""

    dictionary: str
    series: str
    index: int
    explanation: str
    score: float | None
