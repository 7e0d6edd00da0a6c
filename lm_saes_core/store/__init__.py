"""Records of models, datasets, dictionaries and feature analyses: one interface (`RecordStore`), two backends
(embedded SQLite under the artefact root by default, MongoDB when `RecordStoreConfig.mongo` is set)."""

from pathlib import Path

from lm_saes_core.config import BaseConfig, MongoDBConfig, lm_saes_home
from lm_saes_core.store.base import RecordNotFoundError, RecordStore, StoreSchemaError, StoreUnavailableError
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
    FeatureSamples,
    FeatureSummary,
    Interpretation,
    InterpretationScore,
    LogitToken,
    ModelRecord,
)


class RecordStoreConfig(BaseConfig):
    """Which record store a runner reads and writes. Default: SQLite at `$LM_SAES_HOME/records.sqlite`."""

    mongo: MongoDBConfig | None = None
    sqlite_path: str | None = None
    """SQLite file (ignored when `mongo` is set); default `<artefact root>/records.sqlite`."""

    def resolved_sqlite_path(self) -> Path:
        return Path(self.sqlite_path) if self.sqlite_path else lm_saes_home() / "records.sqlite"


def open_store(cfg: RecordStoreConfig | None = None, *, read_only: bool = False) -> RecordStore:
    """Open (and create if needed) the configured store. An unreachable MongoDB raises `StoreUnavailableError` here,
    before any heavy work. `read_only`: open an existing store without creating, migrating or writing anything (an
    SQLite file as a `mode=ro` URI, MongoDB without creating indices)."""
    cfg = cfg or RecordStoreConfig()
    if cfg.mongo is not None:
        from lm_saes_core.store.mongo import MongoRecordStore

        return MongoRecordStore.from_config(cfg.mongo, read_only=read_only)
    from lm_saes_core.store.sqlite import SQLiteRecordStore

    return SQLiteRecordStore(cfg.resolved_sqlite_path(), read_only=read_only)


__all__ = [
    "FEATURE_SORT_KEYS",
    "DatasetRecord",
    "DictionaryRecord",
    "ExplanationHit",
    "FeatureAnalysis",
    "FeatureFilter",
    "FeatureLogits",
    "FeaturePage",
    "FeatureRecord",
    "FeatureSamples",
    "FeatureSummary",
    "Interpretation",
    "InterpretationScore",
    "LogitToken",
    "ModelRecord",
    "RecordNotFoundError",
    "RecordStore",
    "RecordStoreConfig",
    "StoreSchemaError",
    "StoreUnavailableError",
    "open_store",
]
