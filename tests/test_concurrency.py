"""Several processes on one SQLite record store, as two Dagster runs use it: two writer processes (spawned, each
writing analyses, DLA logits and interpretations of its own dictionary, opening the store anew for each step) and a
reader process polling while they write. Every record's value is a function of (dictionary, feature, version), so the
reader can tell a complete record (of version 1 or 2) from a torn one."""

import multiprocessing
import queue
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

from lm_saes_core.store import (
    DictionaryRecord,
    FeatureAnalysis,
    FeatureLogits,
    FeatureRecord,
    FeatureSamples,
    Interpretation,
    InterpretationScore,
    LogitToken,
)
from lm_saes_core.store.sqlite import SQLiteRecordStore

SERIES = "runs"
DICTIONARIES = ("run-a", "run-b")
N_FEATURES = 96
WORK_S = 0.002  # a runner's work between two writes
BATCH = 8  # features per add_feature_analyses / set_feature_logits call, as the analyzer and DLA write them
VERSIONS = (1, 2)  # a first run, then a re-run that replaces every record
ROWS, WIDTH = 8, 32  # one sample pool of 8 contexts x 32 tokens: ~2 KB of blob per feature


def expected_analysis(dictionary: str, index: int, version: int) -> FeatureAnalysis:
    seed = (DICTIONARIES.index(dictionary) * 1000 + index) * 10 + version
    rng = np.random.default_rng(seed)
    samples = FeatureSamples(
        name="top_activations",
        tokens=rng.integers(0, 49152, (ROWS, WIDTH)).astype(np.int32),
        activations=rng.random((ROWS, WIDTH), dtype=np.float32),
        lengths=np.full(ROWS, WIDTH, dtype=np.int32),
        doc_index=np.arange(ROWS, dtype=np.int64) + seed,
        doc_position=np.zeros(ROWS, dtype=np.int64),
        dataset=["corpus"] * ROWS,
    )
    return FeatureAnalysis(
        name="default",
        act_times=seed,
        n_analyzed_tokens=100_000,
        max_feature_acts=float(version),
        mean_feature_acts=float(index),
        histogram_edges=np.linspace(0, version, 5, dtype=np.float32),
        histogram_counts=np.full(4, seed, dtype=np.int64),
        samples=[samples],
    )


def expected_logits(dictionary: str, index: int, version: int) -> FeatureLogits:
    top = [
        LogitToken(token_id=index * 10 + rank, token=f"{dictionary}:{index}:{rank}", logit=version + rank / 10)
        for rank in range(3)
    ]
    return FeatureLogits(top_positive=top, top_negative=[LogitToken(index, f"v{version}", -float(version))])


def expected_interpretation(dictionary: str, index: int, version: int) -> Interpretation:
    score = InterpretationScore("detection", 0.5 + version / 10, 0.5, 1.0, 0.5, 10 * version, version == 2)
    return Interpretation(
        explanation=f"{dictionary} feature {index} v{version}",
        model="local-llm",
        scores=[score],
        details={"version": version, "response": "x" * (100 * version)},
    )


def write_dictionary(path: str, dictionary: str) -> None:
    """One 'Dagster run': for each version, an analysis step, a DLA step and an interpretation step, each opening
    the store as its own runner would."""
    features = range(N_FEATURES)
    for version in VERSIONS:
        with SQLiteRecordStore(path) as store:
            store.add_dictionary(DictionaryRecord(dictionary, SERIES, f"/weights/{dictionary}", {"d_sae": N_FEATURES}))
            for start in range(0, N_FEATURES, BATCH):
                batch = [expected_analysis(dictionary, index, version) for index in features[start : start + BATCH]]
                store.add_feature_analyses(dictionary, SERIES, batch, start_index=start)
                time.sleep(WORK_S)
        with SQLiteRecordStore(path) as store:
            for start in range(0, N_FEATURES, BATCH):
                logits = {i: expected_logits(dictionary, i, version) for i in features[start : start + BATCH]}
                store.set_feature_logits(dictionary, SERIES, logits)
                time.sleep(WORK_S)
        with SQLiteRecordStore(path) as store:
            for index in features:  # auto-interp stores each feature as soon as it is done
                store.set_interpretation(dictionary, SERIES, index, expected_interpretation(dictionary, index, version))
                time.sleep(WORK_S)


def writer_process(path: str, dictionary: str, start, errors: multiprocessing.Queue) -> None:
    try:
        start.wait(timeout=120)
        write_dictionary(path, dictionary)
    except BaseException:
        errors.put(f"writer {dictionary}: {traceback.format_exc()}")
        raise


def analysis_version(actual: FeatureAnalysis, dictionary: str, index: int) -> int:
    """The version `actual` is, exactly, in every field and sample array; AssertionError for a torn record."""
    version = int(actual.max_feature_acts)
    assert version in VERSIONS, f"{dictionary}[{index}]: analysis of unknown version {actual.max_feature_acts}"
    expected = expected_analysis(dictionary, index, version)
    for key in ("name", "act_times", "n_analyzed_tokens", "max_feature_acts", "mean_feature_acts"):
        assert getattr(actual, key) == getattr(expected, key), f"{dictionary}[{index}] v{version}: {key}"
    np.testing.assert_array_equal(actual.histogram_edges, expected.histogram_edges)
    np.testing.assert_array_equal(actual.histogram_counts, expected.histogram_counts)
    (got,), (want,) = actual.samples, expected.samples
    for key in ("tokens", "activations", "lengths", "doc_index", "doc_position"):
        assert getattr(got, key).dtype == getattr(want, key).dtype
        np.testing.assert_array_equal(getattr(got, key), getattr(want, key), err_msg=f"{dictionary}[{index}] {key}")
    return version


def check_record(record: FeatureRecord) -> tuple[int, int, int]:
    """(analysis, logits, interpretation) versions of a complete-or-absent record (0 = not written yet)."""
    dictionary, index = record.dictionary, record.index
    versions = [0, 0, 0]
    if record.analyses:
        (analysis,) = record.analyses
        versions[0] = analysis_version(analysis, dictionary, index)
    if record.logits is not None:
        versions[1] = int(-record.logits.top_negative[0].logit)
        assert record.logits == expected_logits(dictionary, index, versions[1]), f"{dictionary}[{index}] logits"
    if record.interpretation is not None:
        versions[2] = record.interpretation.details["version"]
        expected = expected_interpretation(dictionary, index, versions[2])
        assert record.interpretation == expected, f"{dictionary}[{index}] interpretation"
    return tuple(versions)


def reader_process(path: str, start, stop, states: multiprocessing.Queue, errors: multiprocessing.Queue) -> None:
    """Read while the writers write, until `stop` is set (then once more): each poll reads a few random features
    of each dictionary, every tenth poll all of them, checking each record. Reports the number of polls and the
    distinct (analysis, logits, interpretation) versions seen of one feature (0: not written yet)."""
    try:
        seen: set[tuple[int, int, int]] = set()
        rng = np.random.default_rng(0)
        polls = 0
        start.wait(timeout=120)
        with SQLiteRecordStore(path) as store:
            while True:
                last = stop.is_set()
                for dictionary in DICTIONARIES:
                    if store.get_dictionary(dictionary, SERIES) is None:
                        continue
                    if polls % 10 == 0 or last:
                        records = list(store.iter_features(dictionary, SERIES))
                        assert [record.index for record in records] == list(range(len(records)))
                    else:
                        indices = rng.choice(N_FEATURES, 4, replace=False).tolist()
                        records = [store.get_feature(dictionary, SERIES, index) for index in indices]
                    seen.update(check_record(record) for record in records if record is not None)
                polls += 1
                if last:
                    break
        states.put((polls, seen))
    except BaseException:
        errors.put(f"reader: {traceback.format_exc()}")
        raise


def join_all(processes: list, timeout_s: float) -> None:
    """Wait for the processes; kill those still running after `timeout_s` (their exit code then fails the test)."""
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(timeout=max(deadline - time.monotonic(), 0.1))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()


def drain(q: multiprocessing.Queue) -> list:
    items = []
    while True:
        try:
            items.append(q.get(timeout=0.1))
        except queue.Empty:
            return items


def test_two_writer_processes_and_a_reader_share_one_sqlite_store(tmp_path: Path):
    path = str(tmp_path / "records.sqlite")
    context = multiprocessing.get_context("spawn")
    errors, states, stop = context.Queue(), context.Queue(), context.Event()
    barrier = context.Barrier(1 + len(DICTIONARIES))  # the store file does not exist yet: all three create/open it
    reader = context.Process(target=reader_process, args=(path, barrier, stop, states, errors))
    writers = [context.Process(target=writer_process, args=(path, name, barrier, errors)) for name in DICTIONARIES]
    for process in [reader, *writers]:
        process.start()
    start = time.monotonic()
    join_all(writers, timeout_s=240)
    writing_s = time.monotonic() - start
    stop.set()
    join_all([reader], timeout_s=120)
    failures = drain(errors)
    assert not failures, "\n".join(failures)
    assert [process.exitcode for process in [reader, *writers]] == [0, 0, 0]
    ((polls, seen),) = drain(states)

    # Every record of both runs is there, at its last version.
    with SQLiteRecordStore(path) as store:
        assert [d.name for d in store.list_dictionaries(SERIES)] == sorted(DICTIONARIES)
        for dictionary in DICTIONARIES:
            records = list(store.iter_features(dictionary, SERIES))
            assert [record.index for record in records] == list(range(N_FEATURES))
            assert {check_record(record) for record in records} == {(2, 2, 2)}
            assert store.count_features_with_analysis(dictionary, SERIES) == N_FEATURES
            assert store.interpreted_indices(dictionary, SERIES) == set(range(N_FEATURES))
    # The reader really read while the writers wrote: it saw features part-way through their runs.
    assert (2, 2, 2) in seen
    assert len(seen - {(2, 2, 2)}) >= 3, f"{polls} polls in {writing_s:.1f}s of writing saw only {sorted(seen)}"


N_FILES = 60


def create_stores(directory: str, worker: int, start, errors: multiprocessing.Queue) -> None:
    """Open each of N_FILES new store files at the same moment as the other workers (and close it at once, as a
    runner that finds nothing to do does), then record a model in each."""
    for file in range(N_FILES):
        start.wait(timeout=60)
        try:
            SQLiteRecordStore(Path(directory) / f"records-{file}.sqlite").close()
        except Exception:  # recorded, and the next file is tried in step with the others
            errors.put(f"worker {worker}, file {file}: {traceback.format_exc()}")
    for file in range(N_FILES):
        with SQLiteRecordStore(Path(directory) / f"records-{file}.sqlite") as store:
            store.add_model(f"worker-{worker}", {"file": file})


def test_processes_creating_one_new_store_at_the_same_moment_all_open_it(tmp_path: Path):
    """Switching a new file to WAL while another process does the same is refused by SQLite at once ("database is
    locked", its busy handler not consulted) in a few percent of such races; the store retries instead."""
    context = multiprocessing.get_context("spawn")
    errors, workers = context.Queue(), 4
    start = context.Barrier(workers)
    processes = [context.Process(target=create_stores, args=(str(tmp_path), w, start, errors)) for w in range(workers)]
    for process in processes:
        process.start()
    join_all(processes, timeout_s=240)
    failures = drain(errors)
    assert not failures, f"{len(failures)} of {workers * N_FILES} opens failed, the first:\n{failures[0]}"
    assert [process.exitcode for process in processes] == [0] * workers
    for file in range(N_FILES):
        with SQLiteRecordStore(tmp_path / f"records-{file}.sqlite") as store:
            assert [store.get_model(f"worker-{w}").cfg for w in range(workers)] == [{"file": file}] * workers


@pytest.mark.parametrize("holder", ["write", "exclusive"])
def test_a_writer_waits_for_a_lock_held_by_another_process(tmp_path: Path, holder: str):
    """A process holding the file's lock for a second (a long write, or an exclusive lock as a checkpoint takes)
    delays the other's open and write; it does not make them fail."""
    import sqlite3
    import subprocess
    import sys

    path = tmp_path / "records.sqlite"
    SQLiteRecordStore(path).close()
    lock = "PRAGMA locking_mode=EXCLUSIVE; BEGIN EXCLUSIVE;" if holder == "exclusive" else "BEGIN IMMEDIATE;"
    script = (
        "import sqlite3, sys, time\n"
        f"conn = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        f'conn.executescript({lock!r} + \' INSERT INTO models VALUES ("held", "{{}}");\')\n'
        "print('locked', flush=True)\n"
        "time.sleep(1.5)\n"
        "conn.execute('COMMIT')\n"
        "conn.close()\n"
    )
    holder_process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder_process.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with SQLiteRecordStore(path, busy_timeout_s=30) as store:
            store.add_model("waited", {"a": 1})
            waited_s = time.monotonic() - start
            assert store.get_model("held") is not None and store.get_model("waited").cfg == {"a": 1}
    finally:
        holder_process.wait(timeout=30)
    assert holder_process.returncode == 0
    assert waited_s > 0.5  # it did wait for the holder's commit
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM models").fetchone()[0] == 2
