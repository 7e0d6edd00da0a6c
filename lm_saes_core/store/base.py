"""The record-store interface: one set of operations, implemented by the SQLite and MongoDB backends.

Dictionaries are keyed by (name, series); features by (dictionary, series, index). Writes are upserts so a re-run
replaces what it wrote before instead of duplicating it.
"""

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lm_saes_core.config import UserError
from lm_saes_core.store.records import (
    FEATURE_SORT_KEYS,
    DatasetRecord,
    DictionaryRecord,
    ExplanationHit,
    FeatureAnalysis,
    FeatureFilter,
    FeatureLogits,
    FeaturePage,
    FeatureRecord,
    Interpretation,
    ModelRecord,
)

MAX_PAGE_SIZE = 1000


class RecordNotFoundError(UserError, KeyError):
    """A dictionary or feature that the caller named is not in the store (the message names it)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class StoreUnavailableError(UserError, RuntimeError):
    """The configured store cannot be reached (e.g. no MongoDB server answers at the URI, which the message names)."""


class StoreSchemaError(UserError, RuntimeError):
    """A store file written by a newer lm-saes (or not a record store at all); the message names the file."""


class RecordStore(ABC):
    # models and datasets -------------------------------------------------------------------------------------
    @abstractmethod
    def add_model(self, name: str, cfg: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def get_model(self, name: str) -> ModelRecord | None: ...

    @abstractmethod
    def add_dataset(self, name: str, cfg: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def get_dataset(self, name: str) -> DatasetRecord | None: ...

    # dictionaries ----------------------------------------------------------------------------------------------
    @abstractmethod
    def add_dictionary(self, record: DictionaryRecord) -> None:
        """Insert or replace the dictionary (name, series); its feature records are kept."""

    @abstractmethod
    def get_dictionary(self, name: str, series: str = "default") -> DictionaryRecord | None: ...

    @abstractmethod
    def list_dictionaries(self, series: str | None = None) -> list[DictionaryRecord]:
        """Sorted by (series, name)."""

    @abstractmethod
    def update_dictionary_metrics(self, name: str, series: str, metrics: Mapping[str, float]) -> None:
        """Merge `metrics` into the dictionary's metrics; RecordNotFoundError when it is not stored."""

    @abstractmethod
    def remove_dictionary(self, name: str, series: str = "default") -> None:
        """Remove the dictionary and all its feature records (analyses, logits, interpretations)."""

    # features --------------------------------------------------------------------------------------------------
    @abstractmethod
    def add_feature_analyses(
        self, dictionary: str, series: str, analyses: Sequence[FeatureAnalysis], start_index: int = 0
    ) -> None:
        """Store analyses[i] as feature `start_index + i`'s analysis named `analyses[i].name`, replacing an analysis of
        the same name. The dictionary must be stored (RecordNotFoundError otherwise)."""

    @abstractmethod
    def list_analysis_names(self, dictionary: str, series: str = "default") -> list[str]: ...

    @abstractmethod
    def count_features_with_analysis(self, dictionary: str, series: str, analysis_name: str = "default") -> int: ...

    @abstractmethod
    def get_feature(self, dictionary: str, series: str, index: int) -> FeatureRecord | None: ...

    @abstractmethod
    def iter_features(
        self, dictionary: str, series: str, indices: Iterable[int] | None = None, *, with_samples: bool = True
    ) -> Iterable[FeatureRecord]:
        """Stored features in index order (only `indices` when given); without samples the pools are empty lists."""

    @abstractmethod
    def set_feature_logits(self, dictionary: str, series: str, logits: Mapping[int, FeatureLogits]) -> None:
        """Store direct-logit-attribution results by feature index (creating feature records as needed)."""

    @abstractmethod
    def set_interpretation(self, dictionary: str, series: str, index: int, interpretation: Interpretation) -> None: ...

    @abstractmethod
    def interpreted_indices(self, dictionary: str, series: str, *, successful_only: bool = True) -> set[int]:
        """Indices of features that have an interpretation (with an explanation when `successful_only`)."""

    # browsing (the feature browser's queries: never read sample pools) ----------------------------------------
    @abstractmethod
    def feature_page(
        self,
        dictionary: str,
        series: str,
        *,
        analysis_name: str = "default",
        sort: str = "index",
        descending: bool = False,
        where: FeatureFilter | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> FeaturePage:
        """One page of the dictionary's feature table: the features (with a record of any kind) matching `where`,
        sorted by `sort` (one of `FEATURE_SORT_KEYS`; features lacking the value last, ties by index), rows
        `offset` to `offset + limit`, and how many match in all. Sorting, filtering and paging happen in the store's
        query. RecordNotFoundError when the dictionary is not stored, ValueError for a bad sort key or range."""

    @abstractmethod
    def feature_frequencies(self, dictionary: str, series: str, analysis_name: str = "default") -> np.ndarray:
        """(n,) float64 act_times / n_analyzed_tokens of every feature that has the analysis, in index order (0 for
        an analysis of no tokens). RecordNotFoundError when the dictionary is not stored."""

    @abstractmethod
    def search_explanations(self, text: str, *, limit: int = 50) -> list[ExplanationHit]:
        """Features of every dictionary whose explanation contains `text` (case-insensitive, as
        `FeatureFilter.explanation_contains`), in (series, dictionary, index) order, at most `limit` of them."""

    def close(self) -> None:  # noqa: B027 (a no-op default; backends with connections override it)
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> "RecordStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def check_page_arguments(sort: str, limit: int, offset: int) -> None:
    """The arguments of `RecordStore.feature_page` every backend accepts; ValueError naming the bad one."""
    if sort not in FEATURE_SORT_KEYS:
        raise ValueError(f"unknown sort key {sort!r}; use one of {', '.join(FEATURE_SORT_KEYS)}")
    check_limit(limit)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")


def check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be in [1, {MAX_PAGE_SIZE}], got {limit}")
