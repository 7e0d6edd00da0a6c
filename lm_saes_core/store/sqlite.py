"""The default record store: one SQLite file (standard library), safe for several threads and processes.

WAL journal mode and a busy timeout let several processes (Dagster runs) write the same file; one connection guarded
by a lock serves the threads of a process (auto-interp workers). Every write is one short IMMEDIATE transaction, so a
reader sees a record as it was before or after it, never half written. SQLite sometimes answers "database is locked"
at once instead of waiting on its busy handler (processes opening a new file at the same moment, each switching it
to WAL): opening and starting a transaction, which change nothing when refused, are retried until the busy timeout is
spent. Analysis statistics are columns (where a crosscoder's or CLT's feature writes: a JSON column, NULL for other
kinds) and the sample pools a separate BLOB, so listing features without samples never reads the large blobs. The
feature browser's queries (`feature_page`, `feature_frequencies`, `search_explanations`) read covering indices only:
the analyses' scalars, and each feature's explanation and score, kept as columns beside its interpretation. Files of
an older schema version are migrated on opening. `read_only=True` opens the file as a `mode=ro` URI (the feature
browser): nothing is created, migrated or written, and a file of another schema version is a named error.
"""

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from lm_saes_core.store import codec
from lm_saes_core.store.base import (
    RecordNotFoundError,
    RecordStore,
    StoreSchemaError,
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

SCHEMA_VERSION = 3

# The feature browser's covering indices: its table sorts, filters and counts features without reading the rows,
# which hold large sample pools (analyses) and JSON documents (features).
_BROWSE_INDICES = (
    """CREATE INDEX IF NOT EXISTS feature_analyses_stats ON feature_analyses
        (dictionary, series, name, idx, act_times, n_analyzed_tokens, max_feature_acts, mean_feature_acts)""",
    "CREATE INDEX IF NOT EXISTS features_browse ON features (dictionary, series, idx, explanation, score)",
)

_TABLES = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, cfg TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS datasets (name TEXT PRIMARY KEY, cfg TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS dictionaries (
        name TEXT NOT NULL, series TEXT NOT NULL, path TEXT NOT NULL, cfg TEXT NOT NULL, model_name TEXT,
        metrics TEXT NOT NULL, PRIMARY KEY (name, series))""",
    # explanation and score: copies of the interpretation's explanation and mean balanced accuracy, to sort by
    """CREATE TABLE IF NOT EXISTS features (
        dictionary TEXT NOT NULL, series TEXT NOT NULL, idx INTEGER NOT NULL, logits TEXT, interpretation TEXT,
        explanation TEXT, score REAL, PRIMARY KEY (dictionary, series, idx))""",
    """CREATE TABLE IF NOT EXISTS feature_analyses (
        dictionary TEXT NOT NULL, series TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL,
        act_times INTEGER NOT NULL, n_analyzed_tokens INTEGER NOT NULL, max_feature_acts REAL NOT NULL,
        mean_feature_acts REAL NOT NULL, histogram_edges BLOB NOT NULL, histogram_counts BLOB NOT NULL,
        samples BLOB NOT NULL, decoder TEXT, PRIMARY KEY (dictionary, series, idx, name))""",
    *_BROWSE_INDICES,
)

# Schema upgrades: _MIGRATIONS[v] turns a version-v file into version v + 1 (statements run in one transaction).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 2: where a feature's decoders write (JSON of `codec.decoder_to_doc`; NULL for one decoder per feature)
    1: ("ALTER TABLE feature_analyses ADD COLUMN decoder TEXT",),
    # 3: the explanation and score columns, filled from the stored interpretations, and the browser's indices
    2: (
        "ALTER TABLE features ADD COLUMN explanation TEXT",
        "ALTER TABLE features ADD COLUMN score REAL",
        """UPDATE features SET explanation = json_extract(interpretation, '$.explanation'),
            score = (SELECT AVG(json_extract(item.value, '$.balanced_accuracy'))
                FROM json_each(interpretation, '$.scores') AS item)
            WHERE interpretation IS NOT NULL""",
        *_BROWSE_INDICES,
    ),
}

_READ_CHUNK = 256  # features per read transaction while iterating (the lock is released between chunks)

_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_RETRY_DELAY_S = (0.001, 0.05)  # first and largest wait between retries of a step SQLite refused as busy


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _BUSY_CODES  # extended codes (SQLITE_BUSY_RECOVERY, ...) keep the primary low byte
    return "locked" in str(exc) or "busy" in str(exc)


_STATS_COLUMNS = (
    "idx, name, act_times, n_analyzed_tokens, max_feature_acts, mean_feature_acts, histogram_edges, histogram_counts, "
    "decoder"
)


# Row sources of the feature table, each read from covering indices alone (the planner would otherwise pick the primary
# keys and read every row, with its sample pools or JSON documents). Parameters: analysis name, dictionary, series.
_FREQUENCY = """CASE WHEN a.n_analyzed_tokens > 0 THEN CAST(a.act_times AS REAL) / a.n_analyzed_tokens
    WHEN a.n_analyzed_tokens = 0 THEN 0.0 END"""
# Every feature: the scalars of one analysis (NULL without it), the explanation and its score.
_SUMMARY_ROWS = f"""
    SELECT f.idx AS idx, a.max_feature_acts AS max_activation, {_FREQUENCY} AS frequency,
        f.explanation AS explanation, f.score AS score
    FROM features AS f INDEXED BY features_browse
        LEFT JOIN feature_analyses AS a INDEXED BY feature_analyses_stats
        ON a.dictionary = f.dictionary AND a.series = f.series AND a.idx = f.idx AND a.name = ?
    WHERE f.dictionary = ? AND f.series = ?"""
# The features that have the analysis, without their explanations: every feature when all have it.
_ANALYSIS_ROWS = f"""
    SELECT a.idx AS idx, a.max_feature_acts AS max_activation, {_FREQUENCY} AS frequency
    FROM feature_analyses AS a INDEXED BY feature_analyses_stats
    WHERE a.name = ? AND a.dictionary = ? AND a.series = ?"""
# Every feature, without analysis scalars (the analysis name parameter, unused, keeps the sources' parameters alike).
_INTERPRETATION_ROWS = """
    SELECT f.idx AS idx, f.explanation AS explanation, f.score AS score
    FROM features AS f INDEXED BY features_browse
    WHERE ? IS NOT NULL AND f.dictionary = ? AND f.series = ?"""
_SORT_COLUMNS = {
    "index": "idx",
    "frequency": "frequency",
    "max_activation": "max_activation",
    "explanation": "explanation",
    "score": "score",
}


def _like_pattern(text: str) -> str:
    """`text` as a LIKE pattern matching any string that contains it (with ESCAPE '\\')."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _filter_sql(where: FeatureFilter) -> tuple[str, list]:
    """The WHERE clause over `_SUMMARY_ROWS`' columns for `where`, and its parameters."""
    conditions, params = [], []
    for column, operator, value in (
        ("frequency", ">=", where.min_frequency),
        ("frequency", "<", where.max_frequency),
        ("max_activation", ">=", where.min_max_activation),
        ("max_activation", "<", where.max_max_activation),
        ("score", ">=", where.min_score),
    ):
        if value is not None:
            conditions.append(f"{column} {operator} ?")
            params.append(float(value))
    if where.explanation_contains:
        conditions.append("explanation LIKE ? ESCAPE '\\'")
        params.append(_like_pattern(where.explanation_contains))
    return (" WHERE " + " AND ".join(conditions)) if conditions else "", params


class SQLiteRecordStore(RecordStore):
    def __init__(self, path: str | Path, *, busy_timeout_s: float = 60.0, read_only: bool = False):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self.read_only = read_only
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if read_only:
                self._conn = sqlite3.connect(
                    f"{self.path.resolve().as_uri()}?mode=ro",
                    uri=True,
                    timeout=busy_timeout_s,
                    isolation_level=None,
                    check_same_thread=False,
                )
                with self._transaction(write=False) as conn:
                    self._check_version(conn)
            else:
                self._conn = sqlite3.connect(
                    self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
                )
                conn = self._conn
                self._retry_while_busy(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone())
                conn.execute("PRAGMA synchronous=NORMAL")  # durable at each WAL checkpoint; safe against corruption
                with self._transaction(write=True) as conn:
                    self._create_or_migrate(conn)
        except sqlite3.OperationalError as exc:  # locked past the timeout, unreadable, ...
            self.close()
            raise StoreUnavailableError(f"cannot open the record store {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # e.g. "file is not a database"
            self.close()
            raise StoreSchemaError(f"{self.path} is not a usable lm-saes record store: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SQLiteRecordStore({str(self.path)!r})"

    # plumbing ------------------------------------------------------------------------------------------------
    def _retry_while_busy(self, step):
        """`step()`, run again while SQLite refuses it as busy or locked, for at most the busy timeout (then the
        error is raised). Only for steps that change nothing when refused."""
        deadline = time.monotonic() + self.busy_timeout_s
        delay, max_delay = _RETRY_DELAY_S
        while True:
            try:
                return step()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() >= deadline:
                    raise
            time.sleep(delay)
            delay = min(2 * delay, max_delay)

    def _begin(self, conn: sqlite3.Connection, write: bool) -> None:
        """Start a transaction that holds its lock: the write lock (IMMEDIATE), or a read snapshot taken by a first
        read (a deferred BEGIN takes none), so the statements that follow are not refused as busy."""
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        if write:
            return
        try:
            conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction under the thread lock; IMMEDIATE for writes so concurrent writers queue on the busy
        timeout instead of failing when a read lock would have to be upgraded."""
        with self._lock:
            if self._conn is None:
                raise RuntimeError(f"the record store {self.path} is closed")
            conn = self._conn
            self._retry_while_busy(lambda: self._begin(conn, write))
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _schema_version(self, conn: sqlite3.Connection) -> int | None:
        """The file's schema version (None for a new, empty file); StoreSchemaError when newer than this code."""
        has_version_table = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
        ).fetchone()
        version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] if has_version_table else None
        if version is not None and version > SCHEMA_VERSION:
            raise StoreSchemaError(
                f"the record store {self.path} has schema version {version}, newer than this lm-saes supports "
                f"({SCHEMA_VERSION}); upgrade lm-saes or point the store at another file"
            )
        return version

    def _check_version(self, conn: sqlite3.Connection) -> None:
        """Read-only opening: the file must already be a record store of this schema version."""
        version = self._schema_version(conn)
        if version is None:
            raise StoreSchemaError(f"{self.path} is not an lm-saes record store (it has no schema_version table)")
        if version < SCHEMA_VERSION:
            raise StoreSchemaError(
                f"the record store {self.path} has schema version {version}, older than this lm-saes ({SCHEMA_VERSION})"
                f", and was opened read-only; upgrade it by opening it once for writing, e.g. `lm-saes list "
                f"--store-path {self.path}`"
            )

    def _create_or_migrate(self, conn: sqlite3.Connection) -> None:
        version = self._schema_version(conn)
        if version is None:
            for statement in _TABLES:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            return
        while version < SCHEMA_VERSION:
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
            version += 1
            conn.execute("UPDATE schema_version SET version = ?", (version,))

    def _missing_dictionary(self, name: str, series: str) -> RecordNotFoundError:
        return RecordNotFoundError(
            f"dictionary {name!r} (series {series!r}) is not in the record store {self.path}; add it first"
        )

    def _require_dictionary(self, conn: sqlite3.Connection, name: str, series: str) -> None:
        if not conn.execute("SELECT 1 FROM dictionaries WHERE name = ? AND series = ?", (name, series)).fetchone():
            raise self._missing_dictionary(name, series)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # models and datasets -------------------------------------------------------------------------------------
    def add_model(self, name: str, cfg: Mapping[str, Any]) -> None:
        with self._transaction(write=True) as conn:
            conn.execute("INSERT OR REPLACE INTO models (name, cfg) VALUES (?, ?)", (name, json.dumps(dict(cfg))))

    def get_model(self, name: str) -> ModelRecord | None:
        with self._transaction(write=False) as conn:
            row = conn.execute("SELECT cfg FROM models WHERE name = ?", (name,)).fetchone()
        return ModelRecord(name=name, cfg=json.loads(row[0])) if row else None

    def add_dataset(self, name: str, cfg: Mapping[str, Any]) -> None:
        with self._transaction(write=True) as conn:
            conn.execute("INSERT OR REPLACE INTO datasets (name, cfg) VALUES (?, ?)", (name, json.dumps(dict(cfg))))

    def get_dataset(self, name: str) -> DatasetRecord | None:
        with self._transaction(write=False) as conn:
            row = conn.execute("SELECT cfg FROM datasets WHERE name = ?", (name,)).fetchone()
        return DatasetRecord(name=name, cfg=json.loads(row[0])) if row else None

    # dictionaries ----------------------------------------------------------------------------------------------
    def add_dictionary(self, record: DictionaryRecord) -> None:
        doc = codec.dictionary_to_doc(record)
        values = (doc["name"], doc["series"], doc["path"], json.dumps(doc["cfg"]), doc["model_name"])
        with self._transaction(write=True) as conn:
            # An upsert, not INSERT OR REPLACE: the row is updated in place and its features stay.
            conn.execute(
                """INSERT INTO dictionaries (name, series, path, cfg, model_name, metrics) VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (name, series) DO UPDATE SET path = excluded.path, cfg = excluded.cfg,
                model_name = excluded.model_name, metrics = excluded.metrics""",
                (*values, json.dumps(doc["metrics"])),
            )

    @staticmethod
    def _dictionary_from_row(row: tuple) -> DictionaryRecord:
        name, series, path, cfg, model_name, metrics = row
        doc = {"name": name, "series": series, "path": path, "cfg": json.loads(cfg), "model_name": model_name}
        return codec.dictionary_from_doc(doc | {"metrics": json.loads(metrics)})

    def get_dictionary(self, name: str, series: str = "default") -> DictionaryRecord | None:
        with self._transaction(write=False) as conn:
            row = conn.execute(
                "SELECT name, series, path, cfg, model_name, metrics FROM dictionaries WHERE name = ? AND series = ?",
                (name, series),
            ).fetchone()
        return self._dictionary_from_row(row) if row else None

    def list_dictionaries(self, series: str | None = None) -> list[DictionaryRecord]:
        query = "SELECT name, series, path, cfg, model_name, metrics FROM dictionaries"
        params: tuple = ()
        if series is not None:
            query, params = query + " WHERE series = ?", (series,)
        with self._transaction(write=False) as conn:
            rows = conn.execute(query + " ORDER BY series, name", params).fetchall()
        return [self._dictionary_from_row(row) for row in rows]

    def update_dictionary_metrics(self, name: str, series: str, metrics: Mapping[str, float]) -> None:
        with self._transaction(write=True) as conn:
            row = conn.execute(
                "SELECT metrics FROM dictionaries WHERE name = ? AND series = ?", (name, series)
            ).fetchone()
            if row is None:
                raise self._missing_dictionary(name, series)
            merged = json.loads(row[0]) | {str(key): float(value) for key, value in metrics.items()}
            conn.execute(
                "UPDATE dictionaries SET metrics = ? WHERE name = ? AND series = ?", (json.dumps(merged), name, series)
            )

    def remove_dictionary(self, name: str, series: str = "default") -> None:
        with self._transaction(write=True) as conn:
            for table, column in (
                ("feature_analyses", "dictionary"),
                ("features", "dictionary"),
                ("dictionaries", "name"),
            ):
                conn.execute(f"DELETE FROM {table} WHERE {column} = ? AND series = ?", (name, series))

    # features --------------------------------------------------------------------------------------------------
    def add_feature_analyses(
        self, dictionary: str, series: str, analyses: Sequence[FeatureAnalysis], start_index: int = 0
    ) -> None:
        if start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {start_index}")
        rows = []
        for offset, analysis in enumerate(analyses):  # encode outside the lock: other threads keep working
            stats = codec.analysis_stats(analysis)
            decoder = stats.get("decoder")
            rows.append(
                (
                    dictionary,
                    series,
                    start_index + offset,
                    stats["name"],
                    stats["act_times"],
                    stats["n_analyzed_tokens"],
                    stats["max_feature_acts"],
                    stats["mean_feature_acts"],
                    stats["histogram_edges"],
                    stats["histogram_counts"],
                    codec.pack_samples(analysis.samples),
                    json.dumps(decoder) if decoder is not None else None,
                )
            )
        with self._transaction(write=True) as conn:
            self._require_dictionary(conn, dictionary, series)
            conn.executemany(
                "INSERT OR IGNORE INTO features (dictionary, series, idx) VALUES (?, ?, ?)", (row[:3] for row in rows)
            )
            conn.executemany(
                """INSERT OR REPLACE INTO feature_analyses (dictionary, series, idx, name, act_times,
                n_analyzed_tokens, max_feature_acts, mean_feature_acts, histogram_edges, histogram_counts, samples,
                decoder) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                rows,
            )

    def list_analysis_names(self, dictionary: str, series: str = "default") -> list[str]:
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT DISTINCT name FROM feature_analyses WHERE dictionary = ? AND series = ? ORDER BY name",
                (dictionary, series),
            ).fetchall()
        return [row[0] for row in rows]

    def count_features_with_analysis(self, dictionary: str, series: str, analysis_name: str = "default") -> int:
        with self._transaction(write=False) as conn:
            return conn.execute(
                "SELECT COUNT(*) FROM feature_analyses WHERE dictionary = ? AND series = ? AND name = ?",
                (dictionary, series, analysis_name),
            ).fetchone()[0]

    def _load_features(
        self, conn: sqlite3.Connection, dictionary: str, series: str, indices: Sequence[int], with_samples: bool
    ) -> list[FeatureRecord]:
        marks = ", ".join("?" * len(indices))
        where = f"WHERE dictionary = ? AND series = ? AND idx IN ({marks})"
        params = (dictionary, series, *indices)
        records = {}
        for index, logits, interpretation in conn.execute(
            f"SELECT idx, logits, interpretation FROM features {where} ORDER BY idx", params
        ):
            records[index] = FeatureRecord(
                dictionary=dictionary,
                series=series,
                index=index,
                logits=codec.logits_from_doc(json.loads(logits)) if logits is not None else None,
                interpretation=(
                    codec.interpretation_from_doc(json.loads(interpretation)) if interpretation is not None else None
                ),
            )
        columns = _STATS_COLUMNS + (", samples" if with_samples else "")
        for row in conn.execute(f"SELECT {columns} FROM feature_analyses {where} ORDER BY idx, name", params):
            keys = ("name", "act_times", "n_analyzed_tokens", "max_feature_acts", "mean_feature_acts")
            doc = dict(zip(keys, row[1:6], strict=True)) | {"histogram_edges": row[6], "histogram_counts": row[7]}
            if row[8] is not None:
                doc["decoder"] = json.loads(row[8])
            samples = codec.unpack_samples(row[9]) if with_samples else []
            records[row[0]].analyses.append(codec.analysis_from_doc(doc, samples=samples))
        return list(records.values())

    def get_feature(self, dictionary: str, series: str, index: int) -> FeatureRecord | None:
        with self._transaction(write=False) as conn:
            found = self._load_features(conn, dictionary, series, [int(index)], with_samples=True)
        return found[0] if found else None

    def iter_features(
        self, dictionary: str, series: str, indices: Iterable[int] | None = None, *, with_samples: bool = True
    ) -> Iterable[FeatureRecord]:
        """Raises RecordNotFoundError at once when the dictionary is not stored. Reads in chunks, releasing the lock
        between them, so the caller may write (e.g. interpretations) while iterating."""
        with self._transaction(write=False) as conn:
            self._require_dictionary(conn, dictionary, series)
            if indices is None:
                wanted = [
                    row[0]
                    for row in conn.execute(
                        "SELECT idx FROM features WHERE dictionary = ? AND series = ? ORDER BY idx",
                        (dictionary, series),
                    )
                ]
            else:
                wanted = sorted({int(index) for index in indices})

        def chunks() -> Iterator[FeatureRecord]:
            for start in range(0, len(wanted), _READ_CHUNK):
                with self._transaction(write=False) as conn:
                    chunk = wanted[start : start + _READ_CHUNK]
                    records = self._load_features(conn, dictionary, series, chunk, with_samples)
                yield from records

        return chunks()

    def set_feature_logits(self, dictionary: str, series: str, logits: Mapping[int, FeatureLogits]) -> None:
        rows = [
            (dictionary, series, int(index), json.dumps(codec.logits_to_doc(value))) for index, value in logits.items()
        ]
        with self._transaction(write=True) as conn:
            self._require_dictionary(conn, dictionary, series)
            conn.executemany(
                """INSERT INTO features (dictionary, series, idx, logits) VALUES (?, ?, ?, ?)
                ON CONFLICT (dictionary, series, idx) DO UPDATE SET logits = excluded.logits""",
                rows,
            )

    def set_interpretation(self, dictionary: str, series: str, index: int, interpretation: Interpretation) -> None:
        value = json.dumps(codec.interpretation_to_doc(interpretation))
        accuracies = [score.balanced_accuracy for score in interpretation.scores]
        score = sum(accuracies) / len(accuracies) if accuracies else None
        with self._transaction(write=True) as conn:
            self._require_dictionary(conn, dictionary, series)
            conn.execute(
                """INSERT INTO features (dictionary, series, idx, interpretation, explanation, score)
                VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (dictionary, series, idx) DO UPDATE SET
                interpretation = excluded.interpretation, explanation = excluded.explanation, score = excluded.score""",
                (dictionary, series, int(index), value, interpretation.explanation, score),
            )

    def interpreted_indices(self, dictionary: str, series: str, *, successful_only: bool = True) -> set[int]:
        condition = "json_extract(interpretation, '$.explanation') IS NOT NULL" if successful_only else "1"
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT idx FROM features WHERE dictionary = ? AND series = ? AND interpretation IS NOT NULL "
                f"AND {condition}",
                (dictionary, series),
            ).fetchall()
        return {row[0] for row in rows}

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
        """In one read transaction: the page's indices (ORDER BY, LIMIT, OFFSET over the narrowest row source that
        has the sort and filter columns), the count of matches, and the page's rows in full."""
        check_page_arguments(sort, limit, offset)
        where = where or FeatureFilter()
        condition, filter_params = _filter_sql(where)
        column = _SORT_COLUMNS[sort]
        direction = "DESC" if descending else "ASC"
        order = f"idx {direction}" if column == "idx" else f"({column} IS NULL), {column} {direction}, idx"
        on_analysis = sort in ("frequency", "max_activation") or any(
            bound is not None
            for bound in (where.min_frequency, where.max_frequency, where.min_max_activation, where.max_max_activation)
        )
        on_interpretation = sort in ("explanation", "score") or bool(where.explanation_contains)
        on_interpretation |= where.min_score is not None
        params = [analysis_name, dictionary, series, *filter_params]
        with self._transaction(write=False) as conn:
            self._require_dictionary(conn, dictionary, series)
            n_features = conn.execute(
                "SELECT COUNT(*) FROM features INDEXED BY features_browse WHERE dictionary = ? AND series = ?",
                (dictionary, series),
            ).fetchone()[0]
            rows_sql = _INTERPRETATION_ROWS
            if on_analysis:
                n_analysed = conn.execute(
                    f"SELECT COUNT(*) FROM ({_ANALYSIS_ROWS})", (analysis_name, dictionary, series)
                ).fetchone()[0]
                every_feature = n_analysed == n_features  # analysed features are a subset of the features
                rows_sql = _ANALYSIS_ROWS if every_feature and not on_interpretation else _SUMMARY_ROWS
            indices = [
                row[0]
                for row in conn.execute(
                    f"SELECT idx FROM ({rows_sql}){condition} ORDER BY {order} LIMIT ? OFFSET ?",
                    (*params, limit, offset),
                )
            ]
            if condition:
                total = conn.execute(f"SELECT COUNT(*) FROM ({rows_sql}){condition}", params).fetchone()[0]
            else:
                total = n_features
            marks = ", ".join("?" * len(indices))
            rows = conn.execute(
                f"""SELECT f.idx, a.act_times, a.n_analyzed_tokens, a.max_feature_acts, a.mean_feature_acts,
                f.explanation, f.score, json_extract(f.interpretation, '$.scores'),
                json_extract(a.decoder, '$.location')
                FROM features AS f LEFT JOIN feature_analyses AS a
                    ON a.dictionary = f.dictionary AND a.series = f.series AND a.idx = f.idx AND a.name = ?
                WHERE f.dictionary = ? AND f.series = ? AND f.idx IN ({marks})""",
                (analysis_name, dictionary, series, *indices),
            ).fetchall()
        by_index = {row[0]: row for row in rows}
        summaries = []
        for index in indices:
            _, act_times, n_tokens, max_act, mean_act, explanation, score, scores, location = by_index[index]
            summaries.append(
                FeatureSummary(
                    index=index,
                    act_times=act_times,
                    n_analyzed_tokens=n_tokens,
                    max_feature_acts=max_act,
                    mean_feature_acts=mean_act,
                    explanation=explanation,
                    score=score,
                    scores={item["method"]: item["balanced_accuracy"] for item in json.loads(scores or "[]")},
                    location=location,
                )
            )
        return FeaturePage(total=total, rows=summaries)

    def feature_frequencies(self, dictionary: str, series: str, analysis_name: str = "default") -> np.ndarray:
        with self._transaction(write=False) as conn:
            self._require_dictionary(conn, dictionary, series)
            cursor = conn.execute(
                f"SELECT frequency FROM ({_ANALYSIS_ROWS}) ORDER BY idx", (analysis_name, dictionary, series)
            )
            return np.fromiter((row[0] for row in cursor), dtype=np.float64)

    def search_explanations(self, text: str, *, limit: int = 50) -> list[ExplanationHit]:
        check_limit(limit)
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                """SELECT dictionary, series, idx, explanation, score FROM features INDEXED BY features_browse
                WHERE explanation LIKE ? ESCAPE '\\' ORDER BY series, dictionary, idx LIMIT ?""",
                (_like_pattern(text), int(limit)),
            ).fetchall()
        return [ExplanationHit(*row) for row in rows]
