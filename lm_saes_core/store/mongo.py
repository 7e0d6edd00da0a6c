"""The production record store: MongoDB (collections models, datasets, dictionaries, features).

A feature is one document `{dictionary, series, index, analyses: [...], logits?, interpretation?}`. Analyses are a
list of subdocuments with a unique `name`: a re-run `$pull`s the old entry and `$push`es the new one in the same
ordered bulk write, so there are never two analyses of one name, and reading without samples is a plain projection
(`analyses.samples`). Arrays are `np.save` bytes (BSON binary). An analysis whose encoded size exceeds
`gridfs_threshold_bytes` keeps its sample pools in one GridFS file (`samples_file` holds its id) so the feature
document stays under MongoDB's 16 MB limit; the file's metadata names (dictionary, series, index, analysis) so it is
deleted with the analysis it belongs to. `read_only=True` (the feature browser) creates no indices.
"""

import re
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import gridfs
import numpy as np
import pymongo
from pymongo import UpdateMany
from pymongo.errors import PyMongoError

from lm_saes_core.config import MongoDBConfig, redact_credentials, scrub_secrets
from lm_saes_core.store import codec
from lm_saes_core.store.base import (
    RecordNotFoundError,
    RecordStore,
    StoreUnavailableError,
    check_limit,
    check_page_arguments,
)
from lm_saes_core.store.records import (
    DatasetRecord,
    DictionaryRecord,
    ExplanationHit,
    FeatureAnalysis,
    FeatureFilter,
    FeatureLogits,
    FeaturePage,
    FeatureRecord,
    FeatureSummary,
    Interpretation,
    ModelRecord,
)

GRIDFS_THRESHOLD_BYTES = 12 * 2**20
"""Analyses larger than this (encoded) keep their samples in GridFS; MongoDB documents are capped at 16 MB."""


_READ_CHUNK = 256  # features fetched per query while iterating
_URI_PASSWORD = re.compile(r"^[a-z+]+://[^:@/]*:([^@/]*)@")
_SORT_FIELDS = {
    "index": "index",
    "frequency": "frequency",
    "max_activation": "max_feature_acts",
    "explanation": "explanation",
    "score": "score",
}


def _summary_stages(dictionary: str, series: str, analysis_name: str) -> list[dict[str, Any]]:
    """Aggregation stages turning the dictionary's feature documents into feature-table rows (no samples): index,
    the analysis' scalars (absent without it), frequency, explanation, score (mean balanced accuracy), scores."""
    analysis = {
        "$arrayElemAt": [
            {"$filter": {"input": {"$ifNull": ["$analyses", []]}, "cond": {"$eq": ["$$this.name", analysis_name]}}},
            0,
        ]
    }
    n_tokens = "$analysis.n_analyzed_tokens"
    return [
        {"$match": {"dictionary": dictionary, "series": series}},
        {"$project": {"analyses.samples": 0, "interpretation.details": 0}},
        {"$project": {"_id": 0, "index": 1, "interpretation": 1, "analysis": analysis}},
        {
            "$project": {
                "index": 1,
                "act_times": "$analysis.act_times",
                "n_analyzed_tokens": n_tokens,
                "max_feature_acts": "$analysis.max_feature_acts",
                "mean_feature_acts": "$analysis.mean_feature_acts",
                "location": "$analysis.decoder.location",
                "frequency": {
                    "$cond": [
                        {"$gt": [n_tokens, 0]},
                        {"$divide": ["$analysis.act_times", n_tokens]},
                        {"$cond": [{"$eq": [n_tokens, 0]}, 0.0, None]},
                    ]
                },
                "explanation": "$interpretation.explanation",
                "score": {"$avg": "$interpretation.scores.balanced_accuracy"},
                "scores": "$interpretation.scores",
            }
        },
    ]


def _filter_query(where: FeatureFilter) -> dict[str, Any]:
    query: dict[str, Any] = {}
    for field, low, high in (
        ("frequency", where.min_frequency, where.max_frequency),
        ("max_feature_acts", where.min_max_activation, where.max_max_activation),
        ("score", where.min_score, None),
    ):
        bounds = {key: float(value) for key, value in (("$gte", low), ("$lt", high)) if value is not None}
        if bounds:
            query[field] = bounds
    if where.explanation_contains:
        query["explanation"] = {"$regex": re.escape(where.explanation_contains), "$options": "i"}
    return query


class MongoRecordStore(RecordStore):
    def __init__(
        self,
        uri: str = "mongodb://localhost:27017/",
        db: str = "mechinterp",
        *,
        client: Any = None,
        server_selection_timeout_ms: int = 3000,
        gridfs_threshold_bytes: int = GRIDFS_THRESHOLD_BYTES,
        read_only: bool = False,
    ):
        """`client` injects a ready client (e.g. `mongomock.MongoClient()`); otherwise one is made for `uri` and must
        answer a ping within `server_selection_timeout_ms`, else StoreUnavailableError (before any heavy work). The
        URI's password is never kept, logged or quoted: `uri` here is the redacted one."""
        self.uri = redact_credentials(uri) if client is None else f"{type(client).__module__}.{type(client).__name__}"
        self.gridfs_threshold_bytes = gridfs_threshold_bytes
        self._owns_client = client is None
        self._gridfs_lock = threading.Lock()
        try:
            if client is None:
                client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=server_selection_timeout_ms)
            self._client = client
            client.admin.command("ping")
        except PyMongoError as exc:
            if self._owns_client and client is not None:
                client.close()
            quoted_password = _URI_PASSWORD.match(uri)
            password = urllib.parse.unquote_plus(quoted_password.group(1)) if quoted_password else None
            detail = scrub_secrets(str(exc), [password])
            error = StoreUnavailableError(
                f"MongoDB at {self.uri} is unavailable (no answer to a ping within {server_selection_timeout_ms} ms, "
                f"or an invalid URI): {detail}"
            )
            raise error from (exc if detail == str(exc) else None)  # a cause that quotes the password is not kept
        self._db = client[db]
        self.db_name = db
        self._models = self._db["models"]
        self._datasets = self._db["datasets"]
        self._dictionaries = self._db["dictionaries"]
        self._features = self._db["features"]
        self._gridfs_files = self._db["fs.files"]
        if read_only:
            return
        self._models.create_index("name", unique=True)
        self._datasets.create_index("name", unique=True)
        self._dictionaries.create_index([("name", 1), ("series", 1)], unique=True)
        self._dictionaries.create_index("series")
        self._features.create_index([("dictionary", 1), ("series", 1), ("index", 1)], unique=True)
        self._gridfs_files.create_index([("metadata.dictionary", 1), ("metadata.series", 1), ("metadata.index", 1)])

    @classmethod
    def from_config(cls, cfg: MongoDBConfig, **kwargs: Any) -> "MongoRecordStore":
        """`kwargs` as the constructor's (e.g. `read_only=True`)."""
        return cls(cfg.connection_uri(), cfg.mongo_db, **kwargs)

    def __repr__(self) -> str:
        return f"MongoRecordStore({self.uri!r}, {self.db_name!r})"

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # plumbing ------------------------------------------------------------------------------------------------
    def _gridfs(self) -> gridfs.GridFS:
        with self._gridfs_lock:  # made on first use: most stores never hold a document large enough to need it
            if not hasattr(self, "_fs"):
                self._fs = gridfs.GridFS(self._db)
            return self._fs

    def _missing_dictionary(self, name: str, series: str) -> RecordNotFoundError:
        return RecordNotFoundError(
            f"dictionary {name!r} (series {series!r}) is not in the record store {self.uri} (database "
            f"{self.db_name!r}); add it first"
        )

    def _require_dictionary(self, name: str, series: str) -> None:
        if self._dictionaries.find_one({"name": name, "series": series}, {"_id": 1}) is None:
            raise self._missing_dictionary(name, series)

    # models and datasets -------------------------------------------------------------------------------------
    def add_model(self, name: str, cfg: Mapping[str, Any]) -> None:
        self._models.replace_one({"name": name}, {"name": name, "cfg": dict(cfg)}, upsert=True)

    def get_model(self, name: str) -> ModelRecord | None:
        doc = self._models.find_one({"name": name})
        return ModelRecord(name=name, cfg=dict(doc["cfg"])) if doc else None

    def add_dataset(self, name: str, cfg: Mapping[str, Any]) -> None:
        self._datasets.replace_one({"name": name}, {"name": name, "cfg": dict(cfg)}, upsert=True)

    def get_dataset(self, name: str) -> DatasetRecord | None:
        doc = self._datasets.find_one({"name": name})
        return DatasetRecord(name=name, cfg=dict(doc["cfg"])) if doc else None

    # dictionaries ----------------------------------------------------------------------------------------------
    def add_dictionary(self, record: DictionaryRecord) -> None:
        doc = codec.dictionary_to_doc(record)
        self._dictionaries.replace_one({"name": record.name, "series": record.series}, doc, upsert=True)

    def get_dictionary(self, name: str, series: str = "default") -> DictionaryRecord | None:
        doc = self._dictionaries.find_one({"name": name, "series": series})
        return codec.dictionary_from_doc(doc) if doc else None

    def list_dictionaries(self, series: str | None = None) -> list[DictionaryRecord]:
        query = {} if series is None else {"series": series}
        docs = self._dictionaries.find(query).sort([("series", 1), ("name", 1)])
        return [codec.dictionary_from_doc(doc) for doc in docs]

    def update_dictionary_metrics(self, name: str, series: str, metrics: Mapping[str, float]) -> None:
        doc = self._dictionaries.find_one({"name": name, "series": series}, {"metrics": 1})
        if doc is None:
            raise self._missing_dictionary(name, series)
        merged = dict(doc.get("metrics") or {}) | {str(key): float(value) for key, value in metrics.items()}
        self._dictionaries.update_one({"name": name, "series": series}, {"$set": {"metrics": merged}})

    def remove_dictionary(self, name: str, series: str = "default") -> None:
        self._features.delete_many({"dictionary": name, "series": series})
        files = self._gridfs_files.find({"metadata.dictionary": name, "metadata.series": series}, {"_id": 1})
        for file_id in [doc["_id"] for doc in files]:
            self._gridfs().delete(file_id)
        self._dictionaries.delete_one({"name": name, "series": series})

    # features --------------------------------------------------------------------------------------------------
    def add_feature_analyses(
        self, dictionary: str, series: str, analyses: Sequence[FeatureAnalysis], start_index: int = 0
    ) -> None:
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        self._require_dictionary(dictionary, series)
        operations = []
        written: set[tuple[int, str]] = set()
        new_files = []
        for offset, analysis in enumerate(analyses):
            index = start_index + offset
            doc = codec.analysis_to_doc(analysis)
            if len(codec.pack_document(doc)) > self.gridfs_threshold_bytes:
                metadata = {"dictionary": dictionary, "series": series, "index": index, "analysis": analysis.name}
                file_id = self._gridfs().put(codec.pack_samples(analysis.samples), metadata=metadata)
                new_files.append(file_id)
                doc = codec.analysis_stats(analysis) | {"samples": [], "samples_file": file_id}
            key = {"dictionary": dictionary, "series": series, "index": index}
            # Keys are unique (index), so UpdateMany touches one document; mongomock's bulk builder rejects the
            # `sort` argument that pymongo >= 4.11 passes for UpdateOne.
            operations.append(UpdateMany(key, {"$pull": {"analyses": {"name": analysis.name}}}, upsert=True))
            operations.append(UpdateMany(key, {"$push": {"analyses": doc}}))
            written.add((index, analysis.name))
        if operations:
            self._features.bulk_write(operations, ordered=True)
        # GridFS files of the analyses just replaced (an earlier, larger run of the same name) are now unreferenced.
        query = {
            "metadata.dictionary": dictionary,
            "metadata.series": series,
            "metadata.index": {"$gte": start_index, "$lt": start_index + len(analyses)},
        }
        stale = [
            doc["_id"]
            for doc in self._gridfs_files.find(query, {"_id": 1, "metadata": 1})
            if doc["_id"] not in new_files and (doc["metadata"]["index"], doc["metadata"]["analysis"]) in written
        ]
        for file_id in stale:
            self._gridfs().delete(file_id)

    def list_analysis_names(self, dictionary: str, series: str = "default") -> list[str]:
        return sorted(self._features.distinct("analyses.name", {"dictionary": dictionary, "series": series}))

    def count_features_with_analysis(self, dictionary: str, series: str, analysis_name: str = "default") -> int:
        return self._features.count_documents(
            {"dictionary": dictionary, "series": series, "analyses.name": analysis_name}
        )

    def _feature_from_doc(self, doc: Mapping[str, Any], with_samples: bool) -> FeatureRecord:
        analyses = []
        for analysis in sorted(doc.get("analyses", []), key=lambda item: item["name"]):
            samples = None if with_samples else []
            if with_samples and "samples_file" in analysis:
                samples = codec.unpack_samples(self._gridfs().get(analysis["samples_file"]).read())
            analyses.append(codec.analysis_from_doc(analysis, samples=samples))
        logits, interpretation = doc.get("logits"), doc.get("interpretation")
        return FeatureRecord(
            dictionary=doc["dictionary"],
            series=doc["series"],
            index=int(doc["index"]),
            analyses=analyses,
            logits=codec.logits_from_doc(logits) if logits is not None else None,
            interpretation=codec.interpretation_from_doc(interpretation) if interpretation is not None else None,
        )

    def get_feature(self, dictionary: str, series: str, index: int) -> FeatureRecord | None:
        doc = self._features.find_one({"dictionary": dictionary, "series": series, "index": int(index)})
        return self._feature_from_doc(doc, with_samples=True) if doc else None

    def iter_features(
        self, dictionary: str, series: str, indices: Iterable[int] | None = None, *, with_samples: bool = True
    ) -> Iterable[FeatureRecord]:
        """Raises RecordNotFoundError at once when the dictionary is not stored. Reads in chunks of indices rather
        than through one long-lived cursor, which the server would time out while a slow consumer (auto-interp)
        works between batches."""
        self._require_dictionary(dictionary, series)
        query: dict[str, Any] = {"dictionary": dictionary, "series": series}
        if indices is None:
            wanted = sorted(int(doc["index"]) for doc in self._features.find(query, {"_id": 0, "index": 1}))
        else:
            wanted = sorted({int(index) for index in indices})
        projection = None if with_samples else {"analyses.samples": 0}

        def records() -> Iterator[FeatureRecord]:
            for start in range(0, len(wanted), _READ_CHUNK):
                chunk_query = query | {"index": {"$in": wanted[start : start + _READ_CHUNK]}}
                docs = list(self._features.find(chunk_query, projection).sort("index", 1))
                for doc in docs:
                    yield self._feature_from_doc(doc, with_samples)

        return records()

    def set_feature_logits(self, dictionary: str, series: str, logits: Mapping[int, FeatureLogits]) -> None:
        self._require_dictionary(dictionary, series)
        operations = [
            UpdateMany(
                {"dictionary": dictionary, "series": series, "index": int(index)},
                {"$set": {"logits": codec.logits_to_doc(value)}},
                upsert=True,
            )
            for index, value in logits.items()
        ]
        if operations:
            self._features.bulk_write(operations, ordered=False)

    def set_interpretation(self, dictionary: str, series: str, index: int, interpretation: Interpretation) -> None:
        self._require_dictionary(dictionary, series)
        self._features.update_one(
            {"dictionary": dictionary, "series": series, "index": int(index)},
            {"$set": {"interpretation": codec.interpretation_to_doc(interpretation)}},
            upsert=True,
        )

    def interpreted_indices(self, dictionary: str, series: str, *, successful_only: bool = True) -> set[int]:
        query: dict[str, Any] = {"dictionary": dictionary, "series": series}
        if successful_only:
            query["interpretation.explanation"] = {"$ne": None}
        else:
            query["interpretation"] = {"$exists": True}
        return {int(doc["index"]) for doc in self._features.find(query, {"index": 1})}

    # browsing ------------------------------------------------------------------------------------------------
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
        """One aggregation: feature-table rows, the filter, then a $facet of the count and the sorted page (a
        `missing` key first in the sort puts features lacking the value last in either direction)."""
        check_page_arguments(sort, limit, offset)
        self._require_dictionary(dictionary, series)
        field = _SORT_FIELDS[sort]
        direction = -1 if descending else 1
        missing = {"$cond": [{"$eq": [{"$ifNull": [f"${field}", None]}, None]}, 1, 0]}
        rows = [
            {"$addFields": {"missing": missing}},
            {"$sort": {"missing": 1, field: direction} | ({} if field == "index" else {"index": 1})},
            {"$skip": offset},
            {"$limit": limit},
        ]
        pipeline = _summary_stages(dictionary, series, analysis_name) + [
            {"$match": _filter_query(where or FeatureFilter())},
            {"$facet": {"total": [{"$count": "n"}], "rows": rows}},
        ]
        result = next(iter(self._features.aggregate(pipeline)))
        summaries = [
            FeatureSummary(
                index=int(doc["index"]),
                act_times=doc.get("act_times"),
                n_analyzed_tokens=doc.get("n_analyzed_tokens"),
                max_feature_acts=doc.get("max_feature_acts"),
                mean_feature_acts=doc.get("mean_feature_acts"),
                explanation=doc.get("explanation"),
                score=doc.get("score"),
                scores={item["method"]: item["balanced_accuracy"] for item in doc.get("scores") or []},
                location=doc.get("location"),
            )
            for doc in result["rows"]
        ]
        return FeaturePage(total=result["total"][0]["n"] if result["total"] else 0, rows=summaries)

    def feature_frequencies(self, dictionary: str, series: str, analysis_name: str = "default") -> np.ndarray:
        self._require_dictionary(dictionary, series)
        pipeline = _summary_stages(dictionary, series, analysis_name) + [
            {"$match": {"frequency": {"$ne": None}}},
            {"$sort": {"index": 1}},
            {"$project": {"_id": 0, "frequency": 1}},
        ]
        return np.array([float(doc["frequency"]) for doc in self._features.aggregate(pipeline)], dtype=np.float64)

    def search_explanations(self, text: str, *, limit: int = 50) -> list[ExplanationHit]:
        check_limit(limit)
        query = {"interpretation.explanation": {"$regex": re.escape(text), "$options": "i"}}
        projection = {"_id": 0, "dictionary": 1, "series": 1, "index": 1, "interpretation.explanation": 1}
        projection["interpretation.scores.balanced_accuracy"] = 1
        docs = self._features.find(query, projection).sort([("series", 1), ("dictionary", 1), ("index", 1)])
        hits = []
        for doc in docs.limit(int(limit)):
            accuracies = [score["balanced_accuracy"] for score in doc["interpretation"].get("scores") or []]
            score = sum(accuracies) / len(accuracies) if accuracies else None
            hits.append(
                ExplanationHit(
                    doc["dictionary"], doc["series"], int(doc["index"]), doc["interpretation"]["explanation"], score
                )
            )
        return hits
