"""Loading the text datasets that activations are generated from.

One entry point, `load_dataset`, resolves `dataset_name_or_path` in this order:
1. a bundled corpus name (`python-docs`), built offline on first use;
2. a local `save_to_disk` directory (a `Dataset`, or a `DatasetDict` from which `split` is taken);
3. a local file (.txt, .json/.jsonl, .parquet, .arrow, .csv) or a directory of such files;
4. otherwise a Hugging Face Hub dataset name.
A name that looks like a path but does not exist is a FileNotFoundError, never a confusing Hub error.
`split` accepts the HF slice syntax (`train[:90%]`, `train[90%:]`, `train[:1000]`) in every mode: rows are
documents, so the two halves of a percentage split are disjoint held-out sets of whole documents.
"""

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import field_validator

from lm_saes_core.config import BaseConfig
from lm_saes_core.corpus import BUNDLED_DATASETS, read_corpus_meta

if TYPE_CHECKING:  # `datasets` is imported where a dataset is loaded: it costs ~1 s of every process's start-up
    import datasets

# File suffix -> the `datasets` packaged builder that reads it.
FILE_BUILDERS = {
    ".txt": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
}
SAVED_DATASET_FILES = ("dataset_info.json", "state.json")
SAVED_DATASET_DICT_FILE = "dataset_dict.json"
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}


class DatasetConfig(BaseConfig):
    """Which documents to read and which column holds their text."""

    dataset_name_or_path: str = "python-docs"
    # HF datasets cache for Hub names and local files; also the root of built bundled corpora
    # (default: `lm_saes_cache()/corpora`).
    cache_dir: str | None = None
    # Force `datasets.load_from_disk`; a directory holding a saved dataset is recognised without it.
    is_dataset_on_disk: bool = False
    split: str = "train"
    text_field: str = "text"
    name: str | None = None  # Hub config name (e.g. "wikitext-103-raw-v1")
    # How a .txt file becomes documents: one per line, per blank-line separated paragraph, or the whole file.
    # Paragraphs keep prose together without making a whole book a single document.
    sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    # Visit the documents of the split in a random order fixed by this seed (None: stored order). Row indices
    # (`doc_index` of cached activations) then refer to this order, which the same config always reproduces.
    shuffle_seed: int | None = None

    @field_validator("dataset_name_or_path", "split", "text_field")
    @classmethod
    def not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


def is_saved_dataset(path: Path) -> bool:
    saved_dataset = all((path / name).is_file() for name in SAVED_DATASET_FILES)
    return path.is_dir() and (saved_dataset or (path / SAVED_DATASET_DICT_FILE).is_file())


def looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else path-shaped is meant as a local path."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in FILE_BUILDERS
    )


def select_split(dataset: "datasets.Dataset | datasets.DatasetDict", split: str, source: str) -> "datasets.Dataset":
    """Apply HF split syntax (`train[:90%]+train[-10:]`) to a loaded dataset, row by row and deterministically.

    A single saved `Dataset` is its own only split: it answers to `train` and to the split name it was saved with.
    """
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        parts = dict(dataset)
    else:
        parts = {name: dataset for name in {"train", str(dataset.split or "train")}}
    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in parts.items()})
    except (ValueError, AssertionError) as exc:
        raise ValueError(f"split {split!r} does not apply to {source} (splits: {sorted(parts)}): {exc}") from None
    pieces = []
    for instruction in instructions:
        part = parts[instruction.splitname]
        if (instruction.from_, instruction.to) == (0, len(part)):
            pieces.append(part)
        else:
            pieces.append(part.select(range(instruction.from_, instruction.to)))
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


def data_files_in(directory: Path) -> tuple[str, list[str]]:
    """The builder and sorted files of a directory of data files (hidden files and folders are ignored)."""
    files = sorted(
        path
        for path in directory.rglob("*")
        if path.is_file()
        and path.suffix.lower() in FILE_BUILDERS
        and not any(part.startswith(".") for part in path.relative_to(directory).parts)
    )
    builders = {FILE_BUILDERS[path.suffix.lower()] for path in files}
    if not files:
        known = ", ".join(sorted(FILE_BUILDERS))
        raise FileNotFoundError(f"directory {directory} holds no saved dataset and no data files ({known})")
    if len(builders) > 1:
        suffixes = sorted({path.suffix for path in files})
        raise ValueError(f"directory {directory} mixes data file types {suffixes}; keep one type per directory")
    return builders.pop(), [str(path) for path in files]


def load_local_files(path: Path, cfg: DatasetConfig) -> "datasets.Dataset":
    import datasets

    if path.is_dir():
        builder, files = data_files_in(path)
    elif path.suffix.lower() in FILE_BUILDERS:
        builder, files = FILE_BUILDERS[path.suffix.lower()], [str(path)]
    else:
        raise ValueError(f"unsupported data file type '{path.suffix}' for {path}; use one of {sorted(FILE_BUILDERS)}")
    options = {"sample_by": cfg.sample_by} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files=files, split=cfg.split, cache_dir=cfg.cache_dir, **options)


def offline_requested() -> bool:
    """`datasets` reads the offline switches once at import; a switch set later in the process counts too."""
    import datasets

    env = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return datasets.config.HF_HUB_OFFLINE or any(value.upper() in TRUE_VALUES for value in env)


def load_from_hub(cfg: DatasetConfig) -> "datasets.Dataset":
    import datasets

    name = cfg.dataset_name_or_path
    offline = offline_requested()
    was_offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline  # no network retries when offline was asked for after import
    try:
        return datasets.load_dataset(name, cfg.name, split=cfg.split, cache_dir=cfg.cache_dir)
    except ConnectionError as exc:
        if offline:
            raise ConnectionError(
                f"dataset {name!r} is not a bundled dataset ({', '.join(BUNDLED_DATASETS)}), not a local path, "
                "and not in the Hugging Face cache; offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE), "
                "so it cannot be downloaded. Use a bundled dataset or a local file."
            ) from exc
        raise ConnectionError(f"cannot reach the Hugging Face Hub for dataset {name!r}: {exc}") from exc
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise FileNotFoundError(f"dataset {name!r} is neither a local path nor a Hub dataset: {exc}") from exc
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline


def bundled_dir(cfg: DatasetConfig) -> Path:
    build = BUNDLED_DATASETS[cfg.dataset_name_or_path]
    return build(cfg.cache_dir) if cfg.cache_dir is not None else build()


def load_unsharded(cfg: DatasetConfig) -> "datasets.Dataset":
    import datasets

    name = cfg.dataset_name_or_path
    if name in BUNDLED_DATASETS:
        return select_split(datasets.load_from_disk(str(bundled_dir(cfg))), cfg.split, f"bundled dataset {name!r}")
    path = Path(name).expanduser()
    if cfg.is_dataset_on_disk or is_saved_dataset(path):
        if not path.exists():
            raise FileNotFoundError(f"dataset directory not found: {path} (dataset_name_or_path={name!r})")
        return select_split(datasets.load_from_disk(str(path)), cfg.split, str(path))
    if path.exists():
        return load_local_files(path, cfg)
    if looks_like_path(name):
        raise FileNotFoundError(f"dataset file or directory not found: {path} (dataset_name_or_path={name!r})")
    return load_from_hub(cfg)


def check_shard(shard_idx: int | None, n_shards: int | None) -> None:
    if (shard_idx is None) != (n_shards is None):
        raise ValueError(
            f"give both shard_idx and n_shards or neither (got shard_idx={shard_idx}, n_shards={n_shards})"
        )
    if n_shards is not None and n_shards < 1:
        raise ValueError(f"n_shards must be at least 1, got {n_shards}")
    if n_shards is not None and not 0 <= shard_idx < n_shards:
        raise ValueError(f"shard_idx must be in [0, {n_shards}) for n_shards={n_shards}, got {shard_idx}")


def load_dataset(cfg: DatasetConfig, shard_idx: int | None = None, n_shards: int | None = None) -> "datasets.Dataset":
    """The documents of `cfg` (after `split`), or the contiguous shard `shard_idx` of `n_shards` of them."""
    check_shard(shard_idx, n_shards)
    dataset = load_unsharded(cfg)
    if cfg.text_field not in dataset.column_names:
        raise ValueError(
            f"text_field {cfg.text_field!r} is not a column of dataset {cfg.dataset_name_or_path!r}; "
            f"available columns: {dataset.column_names}"
        )
    if cfg.shuffle_seed is not None:
        dataset = dataset.shuffle(seed=cfg.shuffle_seed, keep_in_memory=True)
    if n_shards is not None:
        dataset = dataset.shard(n_shards, shard_idx, contiguous=True)
    return dataset


def dataset_fingerprint(cfg: DatasetConfig, shard_idx: int | None = None, n_shards: int | None = None) -> str:
    """A short stable identifier of the loaded documents, for provenance.

    Bundled corpora: `python-docs@<sha256 of the texts, 16 hex>` plus the split and shard when they are not the
    whole corpus. Other datasets: the fingerprint `datasets` gives the loaded (split, sharded) dataset.
    """
    loaded = load_dataset(cfg, shard_idx, n_shards)  # validates split, shard and text field alike
    if cfg.dataset_name_or_path not in BUNDLED_DATASETS:
        return loaded._fingerprint
    fingerprint = f"{cfg.dataset_name_or_path}@{read_corpus_meta(bundled_dir(cfg))['corpus_fingerprint'][:16]}"
    if cfg.split != "train":
        fingerprint += f"[{cfg.split}]"
    if cfg.shuffle_seed is not None:
        fingerprint += f"~shuffled{cfg.shuffle_seed}"
    if n_shards is not None:
        fingerprint += f"#shard{shard_idx}of{n_shards}"
    return fingerprint
