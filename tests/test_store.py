"""One contract suite for the record store, run against SQLite, MongoDB through mongomock, and a real MongoDB server
when LM_SAES_TEST_MONGO_URI is set; plus backend-specific checks (schema version, GridFS, unreachable server) and the
file export."""

import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import mongomock
import numpy as np
import pytest

from lm_saes_core.config import MongoDBConfig
from lm_saes_core.io import TMP_MARKER
from lm_saes_core.store import (
    DictionaryRecord,
    FeatureAnalysis,
    FeatureLogits,
    FeatureSamples,
    Interpretation,
    InterpretationScore,
    LogitToken,
    RecordNotFoundError,
    RecordStoreConfig,
    StoreSchemaError,
    StoreUnavailableError,
    open_store,
)
from lm_saes_core.store.export import read_analysis_export, read_export_meta, write_analysis_export
from lm_saes_core.store.mongo import MongoRecordStore
from lm_saes_core.store.sqlite import SCHEMA_VERSION, SQLiteRecordStore

MONGO_URI = os.environ.get("LM_SAES_TEST_MONGO_URI")
BACKENDS = [
    "sqlite",
    "mongomock",
    pytest.param(
        "mongo", marks=pytest.mark.skipif(not MONGO_URI, reason="LM_SAES_TEST_MONGO_URI is not set (no MongoDB server)")
    ),
]


@pytest.fixture
def mongomock_gridfs(monkeypatch):
    """Let pymongo's gridfs accept mongomock databases for this test only (what `mongomock.gridfs.
    enable_gridfs_integration` does, but undone afterwards)."""
    from gridfs.synchronous import grid_file
    from mongomock.gridfs import _create_grid_out_cursor
    from pymongo.collection import Collection
    from pymongo.database import Database

    monkeypatch.setattr(grid_file, "Database", (Database, mongomock.Database))
    monkeypatch.setattr(grid_file, "Collection", (Collection, mongomock.Collection))
    monkeypatch.setattr(grid_file, "GridOutCursor", _create_grid_out_cursor)


@pytest.fixture(params=BACKENDS)
def make_store(request, tmp_path):
    """A factory of stores over the same storage: calling it again reopens what the previous call wrote."""
    opened = []
    if request.param == "sqlite":
        path = tmp_path / "nested" / "records.sqlite"

        def make(**kwargs):
            return SQLiteRecordStore(path, **kwargs)

    elif request.param == "mongomock":
        request.getfixturevalue("mongomock_gridfs")
        client = mongomock.MongoClient()

        def make(**kwargs):
            return MongoRecordStore(client=client, db="lm_saes_test", **kwargs)

    else:
        db = f"lm_saes_test_{uuid.uuid4().hex[:8]}"

        def make(**kwargs):
            return MongoRecordStore(MONGO_URI, db, **kwargs)

    def tracked(**kwargs):
        store = make(**kwargs)
        opened.append(store)
        return store

    tracked.backend = request.param
    yield tracked
    if request.param == "mongo" and opened:
        opened[0]._client.drop_database(db)
    for store in opened:
        store.close()


@pytest.fixture
def store(make_store):
    return make_store()


def make_samples(rng: np.random.Generator, name: str, n: int, width: int) -> FeatureSamples:
    lengths = rng.integers(1, width + 1, n).astype(np.int32)
    tokens = rng.integers(0, 49152, (n, width)).astype(np.int32)
    activations = rng.random((n, width), dtype=np.float32)
    for row, length in enumerate(lengths):
        tokens[row, length:] = 0
        activations[row, length:] = 0
    return FeatureSamples(
        name=name,
        tokens=tokens,
        activations=activations,
        lengths=lengths,
        doc_index=rng.integers(0, 10**9, n).astype(np.int64),
        doc_position=rng.integers(0, 4096, n).astype(np.int64),
        dataset=[f"corpus-{i % 2}" for i in range(n)],
    )


def make_analysis(seed: int, name: str = "default", pools: int = 2, n: int = 3, width: int = 8) -> FeatureAnalysis:
    rng = np.random.default_rng(seed)
    act_times = int(rng.integers(0, 1000))
    return FeatureAnalysis(
        name=name,
        act_times=act_times,
        n_analyzed_tokens=10_000,
        max_feature_acts=float(rng.random() * 10),
        mean_feature_acts=float(rng.random()),
        histogram_edges=np.linspace(0, 1 + seed, 5, dtype=np.float32),
        histogram_counts=rng.integers(0, 100, 4).astype(np.int64),
        samples=[make_samples(rng, f"pool_{p}", n, width) for p in range(pools)],
    )


def assert_array_identical(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


def assert_analysis_equal(actual: FeatureAnalysis, expected: FeatureAnalysis, *, with_samples: bool = True) -> None:
    for key in ("name", "act_times", "n_analyzed_tokens", "max_feature_acts", "mean_feature_acts"):
        assert getattr(actual, key) == getattr(expected, key), key
    assert_array_identical(actual.histogram_edges, expected.histogram_edges)
    assert_array_identical(actual.histogram_counts, expected.histogram_counts)
    if not with_samples:
        assert actual.samples == []
        return
    assert [pool.name for pool in actual.samples] == [pool.name for pool in expected.samples]
    for got, want in zip(actual.samples, expected.samples, strict=True):
        for key in ("tokens", "activations", "lengths", "doc_index", "doc_position"):
            assert_array_identical(getattr(got, key), getattr(want, key))
        assert got.dataset == want.dataset


def dictionary(name: str = "sae", series: str = "test", **kwargs) -> DictionaryRecord:
    return DictionaryRecord(name=name, series=series, path=f"/weights/{name}", cfg={"d_sae": 16, "k": 4}, **kwargs)


def interpretation(explanation: str | None, passed: bool = True) -> Interpretation:
    score = InterpretationScore(
        method="detection",
        accuracy=0.8,
        balanced_accuracy=0.75,
        precision=0.9,
        recall=0.6,
        n_examples=20,
        passed=passed,
    )
    return Interpretation(
        explanation=explanation,
        model="local-llm",
        scores=[score] if explanation else [],
        error=None if explanation else "timeout",
        details={"prompt": "Explain", "responses": ["a", "b"]},
    )


# contract ------------------------------------------------------------------------------------------------------
def test_models_and_datasets_are_upserted(store):
    assert store.get_model("gpt2") is None and store.get_dataset("pile") is None
    store.add_model("gpt2", {"d_model": 768})
    store.add_model("gpt2", {"d_model": 1024, "n_layers": 12})
    store.add_dataset("pile", {"path": "/data/pile", "is_tokenized": False})
    assert store.get_model("gpt2").cfg == {"d_model": 1024, "n_layers": 12}
    assert store.get_dataset("pile").cfg == {"path": "/data/pile", "is_tokenized": False}


def test_dictionaries_add_get_list_update(store):
    store.add_dictionary(dictionary("b", "s1", model_name="gpt2", metrics={"l0": 4.0}))
    store.add_dictionary(dictionary("a", "s1"))
    store.add_dictionary(dictionary("c", "s0"))
    assert [(d.series, d.name) for d in store.list_dictionaries()] == [("s0", "c"), ("s1", "a"), ("s1", "b")]
    assert [d.name for d in store.list_dictionaries(series="s1")] == ["a", "b"]
    assert store.list_dictionaries(series="nothing") == []
    assert store.get_dictionary("b", "s1") == dictionary("b", "s1", model_name="gpt2", metrics={"l0": 4.0})
    assert store.get_dictionary("b", "s0") is None

    store.update_dictionary_metrics("b", "s1", {"explained_variance": 0.91, "l0": np.float32(5.5)})
    assert store.get_dictionary("b", "s1").metrics == {"l0": 5.5, "explained_variance": pytest.approx(0.91)}
    with pytest.raises(RecordNotFoundError, match="'zzz'"):
        store.update_dictionary_metrics("zzz", "s1", {"l0": 1.0})


def test_remove_dictionary_cascades_and_readding_keeps_features(store):
    store.add_dictionary(dictionary())
    store.add_dictionary(dictionary("other"))
    store.add_feature_analyses("sae", "test", [make_analysis(0), make_analysis(1)])
    store.add_feature_analyses("other", "test", [make_analysis(2)])
    store.set_feature_logits("sae", "test", {5: FeatureLogits(top_positive=[], top_negative=[])})
    store.set_interpretation("sae", "test", 0, interpretation("dogs"))

    store.add_dictionary(dictionary(metrics={"l0": 3.0}))  # replacing the record keeps its features
    assert store.get_dictionary("sae", "test").metrics == {"l0": 3.0}
    assert store.count_features_with_analysis("sae", "test") == 2

    store.remove_dictionary("sae", "test")
    assert store.get_dictionary("sae", "test") is None
    store.add_dictionary(dictionary())
    assert store.get_feature("sae", "test", 0) is None
    assert list(store.iter_features("sae", "test")) == []
    assert store.count_features_with_analysis("sae", "test") == 0
    assert store.interpreted_indices("sae", "test", successful_only=False) == set()
    assert store.count_features_with_analysis("other", "test") == 1  # other dictionaries untouched
    store.remove_dictionary("never-added", "test")  # no-op


def test_feature_analyses_round_trip_exactly(store):
    store.add_dictionary(dictionary())
    analyses = [make_analysis(seed) for seed in range(3)]
    analyses[1].histogram_edges = analyses[1].histogram_edges.astype(np.float64)  # dtypes travel per array
    analyses[2].samples = []  # a dead feature has no pools
    store.add_feature_analyses("sae", "test", analyses, start_index=10)

    assert store.get_feature("sae", "test", 0) is None
    for offset, expected in enumerate(analyses):
        feature = store.get_feature("sae", "test", 10 + offset)
        assert (feature.dictionary, feature.series, feature.index) == ("sae", "test", 10 + offset)
        assert [analysis.name for analysis in feature.analyses] == ["default"]
        assert_analysis_equal(feature.analysis("default"), expected)
        assert feature.logits is None and feature.interpretation is None
    assert store.count_features_with_analysis("sae", "test", "default") == 3
    assert store.count_features_with_analysis("sae", "test", "other") == 0
    assert store.list_analysis_names("sae", "test") == ["default"]


def test_reanalysis_replaces_same_name_and_keeps_other_names(store):
    store.add_dictionary(dictionary())
    store.add_feature_analyses("sae", "test", [make_analysis(0), make_analysis(1)])
    store.add_feature_analyses("sae", "test", [make_analysis(5, name="long_context")], start_index=1)
    rerun = [make_analysis(10), make_analysis(11)]
    store.add_feature_analyses("sae", "test", rerun)

    first, second = store.get_feature("sae", "test", 0), store.get_feature("sae", "test", 1)
    assert [analysis.name for analysis in first.analyses] == ["default"]
    assert [analysis.name for analysis in second.analyses] == ["default", "long_context"]
    assert_analysis_equal(first.analysis("default"), rerun[0])
    assert_analysis_equal(second.analysis("default"), rerun[1])
    assert_analysis_equal(second.analysis("long_context"), make_analysis(5, name="long_context"))
    assert store.count_features_with_analysis("sae", "test") == 2
    assert store.count_features_with_analysis("sae", "test", "long_context") == 1
    assert store.list_analysis_names("sae", "test") == ["default", "long_context"]


def test_iter_features_order_indices_and_without_samples(store):
    store.add_dictionary(dictionary())
    store.add_feature_analyses("sae", "test", [make_analysis(seed) for seed in range(4, 8)], start_index=4)
    store.add_feature_analyses("sae", "test", [make_analysis(seed) for seed in range(4)])
    assert [feature.index for feature in store.iter_features("sae", "test")] == list(range(8))

    picked = list(store.iter_features("sae", "test", indices=[6, 1, 6, 99, 3]))
    assert [feature.index for feature in picked] == [1, 3, 6]
    assert_analysis_equal(picked[2].analysis(), make_analysis(6))

    light = list(store.iter_features("sae", "test", indices=range(2, 4), with_samples=False))
    assert [feature.index for feature in light] == [2, 3]
    assert_analysis_equal(light[0].analysis(), make_analysis(2), with_samples=False)
    assert light[1].analysis().frequency == make_analysis(3).act_times / 10_000


def test_logits_and_interpretations_round_trip(store):
    store.add_dictionary(dictionary())
    store.add_feature_analyses("sae", "test", [make_analysis(0), make_analysis(1)])
    logits = {
        1: FeatureLogits(
            top_positive=[LogitToken(token_id=42, token=" dog", logit=3.25), LogitToken(7, "cat", 1.5)],
            top_negative=[LogitToken(token_id=9, token="\n", logit=-2.0)],
        ),
        7: FeatureLogits(top_positive=[LogitToken(1, "a", 0.5)], top_negative=[]),  # no analysis yet
    }
    store.set_feature_logits("sae", "test", logits)
    store.set_interpretation("sae", "test", 0, interpretation("mentions of dogs"))
    store.set_interpretation("sae", "test", 1, interpretation(None))
    store.set_interpretation("sae", "test", 3, interpretation("plural nouns", passed=False))

    assert store.get_feature("sae", "test", 1).logits == logits[1]
    assert store.get_feature("sae", "test", 7).logits == logits[7]
    assert store.get_feature("sae", "test", 7).analyses == []
    assert store.get_feature("sae", "test", 0).interpretation == interpretation("mentions of dogs")
    assert store.get_feature("sae", "test", 1).interpretation == interpretation(None)
    assert store.get_feature("sae", "test", 1).analysis() is not None  # the analysis survives the other writes
    assert store.interpreted_indices("sae", "test") == {0, 3}
    assert store.interpreted_indices("sae", "test", successful_only=False) == {0, 1, 3}
    assert [feature.index for feature in store.iter_features("sae", "test")] == [0, 1, 3, 7]

    store.set_interpretation("sae", "test", 1, interpretation("retried: cats"))
    assert store.interpreted_indices("sae", "test") == {0, 1, 3}
    assert store.get_feature("sae", "test", 1).logits == logits[1]


def test_unknown_dictionary_is_a_named_error(store):
    store.add_dictionary(dictionary("sae", "other-series"))
    with pytest.raises(RecordNotFoundError, match="'sae'.*'test'"):
        store.add_feature_analyses("sae", "test", [make_analysis(0)])
    with pytest.raises(RecordNotFoundError, match="'missing'"):
        store.set_feature_logits("missing", "test", {0: FeatureLogits([], [])})
    with pytest.raises(RecordNotFoundError, match="'missing'"):
        store.set_interpretation("missing", "test", 0, interpretation("x"))
    with pytest.raises(RecordNotFoundError, match="'missing'"):
        store.iter_features("missing", "test")
    assert store.get_feature("missing", "test", 0) is None
    assert store.count_features_with_analysis("missing", "test") == 0


def test_store_reopened_keeps_data(make_store):
    first = make_store()
    first.add_dictionary(dictionary(metrics={"l0": 2.0}))
    first.add_feature_analyses("sae", "test", [make_analysis(0)])
    first.set_interpretation("sae", "test", 0, interpretation("dogs"))
    first.close()
    second = make_store()
    assert second.get_dictionary("sae", "test").metrics == {"l0": 2.0}
    feature = second.get_feature("sae", "test", 0)
    assert_analysis_equal(feature.analysis(), make_analysis(0))
    assert feature.interpretation == interpretation("dogs")


def test_writes_from_threads_and_while_iterating(store):
    """Auto-interp writes interpretations from worker threads, possibly while iterating over the features."""
    store.add_dictionary(dictionary())
    n = 300  # more than one SQLite read chunk
    store.add_feature_analyses("sae", "test", [make_analysis(0, pools=0)] * n)
    seen = []
    for feature in store.iter_features("sae", "test", with_samples=False):
        store.set_interpretation("sae", "test", feature.index, interpretation(f"feature {feature.index}"))
        seen.append(feature.index)
    assert seen == list(range(n))

    def write(worker: int) -> None:
        for index in range(worker, n, 4):
            store.set_interpretation("sae", "test", index, interpretation(None))

    threads = [threading.Thread(target=write, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.interpreted_indices("sae", "test") == set()
    assert store.interpreted_indices("sae", "test", successful_only=False) == set(range(n))


# SQLite --------------------------------------------------------------------------------------------------------
def test_sqlite_file_is_wal_and_shared_by_two_connections(tmp_path):
    path = tmp_path / "a" / "b" / "records.sqlite"
    one, two = SQLiteRecordStore(path), SQLiteRecordStore(path)  # e.g. two Dagster run processes
    one.add_dictionary(dictionary())
    two.add_feature_analyses("sae", "test", [make_analysis(0)])
    one.add_feature_analyses("sae", "test", [make_analysis(1)], start_index=1)
    assert [feature.index for feature in two.iter_features("sae", "test")] == [0, 1]
    one.close()
    two.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]


def test_sqlite_newer_schema_version_is_a_named_error(tmp_path):
    path = tmp_path / "records.sqlite"
    SQLiteRecordStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreSchemaError, match=f"{path}.*schema version {SCHEMA_VERSION + 1}"):
        SQLiteRecordStore(path)


def test_sqlite_other_file_is_a_named_error(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("not a database, just text " * 100)
    with pytest.raises(StoreSchemaError, match=str(path)):
        SQLiteRecordStore(path)


def test_closed_store_refuses_work(tmp_path):
    store = SQLiteRecordStore(tmp_path / "records.sqlite")
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        store.list_dictionaries()


# open_store ----------------------------------------------------------------------------------------------------
def test_open_store_defaults_to_sqlite_under_the_artefact_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_SAES_HOME", str(tmp_path / "home"))
    with open_store() as store:
        assert isinstance(store, SQLiteRecordStore)
        store.add_model("m", {})
    assert (tmp_path / "home" / "records.sqlite").is_file()
    with open_store(RecordStoreConfig(sqlite_path=str(tmp_path / "x" / "r.sqlite"))) as store:
        assert store.path == tmp_path / "x" / "r.sqlite" and store.get_model("m") is None


def test_unreachable_mongo_fails_fast_naming_the_uri():
    start = time.perf_counter()
    with pytest.raises(StoreUnavailableError, match="mongodb://127.0.0.1:1/"):
        MongoRecordStore("mongodb://127.0.0.1:1/", server_selection_timeout_ms=300)
    assert time.perf_counter() - start < 5
    with pytest.raises(StoreUnavailableError) as error:
        open_store(RecordStoreConfig(mongo=MongoDBConfig(mongo_uri="mongodb://reader:s3cret@127.0.0.1:1/")))
    assert "127.0.0.1:1" in str(error.value) and "s3cret" not in str(error.value)


def test_mongo_indices():
    store = MongoRecordStore(client=mongomock.MongoClient(), db="indices")
    features = store._db["features"].index_information()
    dictionaries = store._db["dictionaries"].index_information()
    assert any(
        info.get("unique") and info["key"] == [("dictionary", 1), ("series", 1), ("index", 1)]
        for info in features.values()
    )
    assert any(info.get("unique") and info["key"] == [("name", 1), ("series", 1)] for info in dictionaries.values())
    assert any(info["key"] == [("series", 1)] for info in dictionaries.values())


def test_mongo_large_analysis_goes_to_gridfs(make_store):
    if make_store.backend == "sqlite":
        pytest.skip("GridFS is a MongoDB mechanism")
    store = make_store(gridfs_threshold_bytes=20_000)
    files = store._db["fs.files"]
    store.add_dictionary(dictionary())
    big, small = make_analysis(0, n=20, width=64), make_analysis(1)  # ~20 kB of arrays per pool vs < 1 kB
    store.add_feature_analyses("sae", "test", [big, small])
    assert files.count_documents({}) == 1
    assert store._db["features"].find_one({"index": 0})["analyses"][0]["samples"] == []
    assert_analysis_equal(store.get_feature("sae", "test", 0).analysis(), big)
    assert_analysis_equal(store.get_feature("sae", "test", 1).analysis(), small)
    assert_analysis_equal(
        next(iter(store.iter_features("sae", "test", with_samples=False))).analysis(), big, with_samples=False
    )

    bigger = make_analysis(2, n=30, width=64)
    old_file = files.find_one({})["_id"]
    store.add_feature_analyses("sae", "test", [bigger])  # the replaced analysis' file is deleted
    assert [doc["_id"] for doc in files.find({})] != [old_file] and files.count_documents({}) == 1
    assert_analysis_equal(store.get_feature("sae", "test", 0).analysis(), bigger)
    store.add_feature_analyses("sae", "test", [small])
    assert files.count_documents({}) == 0

    store.add_feature_analyses("sae", "test", [big])
    store.remove_dictionary("sae", "test")
    assert files.count_documents({}) == 0 and store._db["fs.chunks"].count_documents({}) == 0


# export --------------------------------------------------------------------------------------------------------
def test_export_round_trip(tmp_path):
    analyses = [make_analysis(seed, name="long") for seed in range(4)]
    analyses[1].samples = []
    analyses[2].histogram_counts = analyses[2].histogram_counts.astype(np.int32)  # mixed dtypes stay exact
    path = write_analysis_export(tmp_path / "out", "sae", "test", "long", analyses, start_index=100)
    assert path == tmp_path / "out" / "test" / "sae" / "long_analysis_4_features.npz"
    back = read_analysis_export(path)
    assert len(back) == 4
    for got, want in zip(back, analyses, strict=True):
        assert_analysis_equal(got, want)
    meta = read_export_meta(path)
    assert (meta["dictionary"], meta["series"], meta["start_index"]) == ("sae", "test", 100)
    assert [feature["index"] for feature in meta["features"]] == [100, 101, 102, 103]
    with np.load(path, allow_pickle=False) as archive:  # plain numpy opens it without pickle
        assert archive["tokens.data"].dtype == np.uint8 and len(archive.files) < 30


def test_export_failed_write_leaves_no_partial_file(tmp_path):
    good = [make_analysis(0)]
    path = write_analysis_export(tmp_path, "sae", "test", "default", good)
    bad = make_analysis(1)
    bad.samples[1].dataset = ["x"] * len(bad.samples[1])
    bad.samples[1].doc_index = np.array([object()] * 3, dtype=object)  # cannot be written without pickle
    with pytest.raises(ValueError, match="doc_index"):
        write_analysis_export(tmp_path, "sae", "test", "default", [bad])
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert not any(TMP_MARKER in p.name for p in Path(tmp_path).rglob("*"))
    assert_analysis_equal(read_analysis_export(path)[0], good[0])
    with pytest.raises(ValueError, match="series '../x'"):
        write_analysis_export(tmp_path, "sae", "../x", "default", good)
