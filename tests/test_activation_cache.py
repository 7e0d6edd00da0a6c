"""Writer and reader of cached activations on synthetic streams: round trips, exact token budgets, and every way a
cache can be broken (interrupted, truncated, tampered, full disk, unwritable directory)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from lm_saes_core.activation.cache_format import ActivationCacheError
from lm_saes_core.activation.config import ActivationFactoryConfig
from lm_saes_core.activation.factory import unshuffled_sources
from lm_saes_core.activation.reader import CachedActivations
from lm_saes_core.activation.writer import ActivationWriter, ActivationWriterConfig
from lm_saes_core.runners.consistency import CheckActivationConsistencySettings, check_activation_consistency

HOOKS = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]


def synthetic_stream(n_items=5, rows=3, context=4, dim=6, seed=0):
    """Items shaped like the factory's 2-D output; hook 2 = 2 x hook 1 so values can be checked."""
    generator = torch.Generator().manual_seed(seed)
    for i in range(n_items):
        tokens = torch.randint(0, 1000, (rows, context), generator=generator)
        activation = torch.randn(rows, context, dim, generator=generator)
        yield {
            HOOKS[0]: activation,
            HOOKS[1]: 2 * activation,
            "tokens": tokens,
            "mask": torch.ones(rows, context, dtype=torch.bool),
            "attention_mask": torch.ones(rows, context, dtype=torch.bool),
            "doc_index": torch.full((rows, context), i),
            "doc_position": torch.arange(context).repeat(rows, 1),
            "source_idx": torch.zeros(rows, context, dtype=torch.long),
        }


def write(tmp_path, **overrides):
    cfg = ActivationWriterConfig(hook_points=HOOKS, cache_dir=str(tmp_path / "cache"), **overrides)
    return ActivationWriter(cfg, provenance={"dataset_name": "synthetic"}).write(synthetic_stream())


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_round_trip_preserves_values_tokens_and_provenance(tmp_path, fmt):
    manifest = write(tmp_path, format=fmt, num_workers=2)
    assert manifest["n_chunks"] == 5 and manifest["n_tokens"] == 5 * 3 * 4
    assert manifest["hook_dims"] == {HOOKS[0]: 6, HOOKS[1]: 6} and manifest["dtype"] == "torch.float32"
    cache = CachedActivations(tmp_path / "cache")
    loaded = list(cache.iterate(num_workers=2, prefetch=2))
    for original, item in zip(synthetic_stream(), loaded, strict=True):
        for key, value in original.items():
            assert torch.equal(item[key], value), key
    sidecar = json.loads((tmp_path / "cache" / HOOKS[1] / "chunk-00000003.json").read_text())
    assert sidecar["tokens"] == loaded[3]["tokens"].tolist()
    assert sidecar["doc_index"][0][0] == 3


def test_total_tokens_is_exact_and_chunks_regroup_rows(tmp_path):
    manifest = write(tmp_path, total_generating_tokens=7 * 4, n_samples_per_chunk=2)
    assert manifest["n_tokens"] == 28
    assert [c["n_rows"] for c in manifest["chunks"]] == [2, 2, 2, 1]
    cache = CachedActivations(tmp_path / "cache")
    tokens = torch.cat([item["tokens"] for item in cache.iterate(num_workers=0)])
    expected = torch.cat([item["tokens"] for item in synthetic_stream()])[:7]
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_a_chunk_smaller_than_an_item_stores_only_its_own_rows(tmp_path, fmt):
    """Chunks cut from an item are views of it; a chunk file holds its rows, not the item's whole storage."""
    write(tmp_path, format=fmt, n_samples_per_chunk=1)
    for path in sorted((tmp_path / "cache" / HOOKS[0]).glob(f"*.{fmt}")):
        stored = torch.load(path, weights_only=True) if fmt == "pt" else load_file(path)
        for value in stored.values():
            assert value.shape[0] == 1 and value.untyped_storage().nbytes() == value.numel() * value.element_size()


def test_total_tokens_must_be_whole_rows(tmp_path):
    with pytest.raises(ValueError, match="not a whole number of rows"):
        write(tmp_path, total_generating_tokens=10)


def test_epoch_shuffle_is_a_seeded_permutation_of_chunks(tmp_path):
    write(tmp_path)
    cache = CachedActivations(tmp_path / "cache")
    order = [int(item["doc_index"][0, 0]) for item in cache.iterate(shuffle_seed=3, epoch=0)]
    assert sorted(order) == [0, 1, 2, 3, 4] and order != [0, 1, 2, 3, 4]
    assert order == [int(i["doc_index"][0, 0]) for i in cache.iterate(shuffle_seed=3, epoch=0)]
    assert order != [int(i["doc_index"][0, 0]) for i in cache.iterate(shuffle_seed=3, epoch=1)]


def test_training_without_a_buffer_is_in_document_order_unless_the_cache_was_written_shuffled(tmp_path):
    ordered, shuffled = tmp_path / "ordered", tmp_path / "shuffled"
    for root, settings in ((ordered, {"buffer_size": None}), (shuffled, {"buffer_size": 4096})):
        cfg = ActivationWriterConfig(hook_points=HOOKS, cache_dir=str(root))
        ActivationWriter(cfg, provenance={"settings": settings}).write(synthetic_stream())
    assert not CachedActivations(ordered).written_shuffled and CachedActivations(shuffled).written_shuffled
    sources = [{"type": "activations", "name": name, "path": str(tmp_path / name)} for name in ("ordered", "shuffled")]
    sources += [{"type": "dataset", "name": "corpus"}, {"type": "activations", "name": "gone", "path": "/nowhere"}]
    factory = {"sources": sources, "target": "activations-2d", "hook_points": HOOKS, "batch_size": 8}
    # a cache that cannot be opened is left to the error reading it gives
    assert unshuffled_sources(ActivationFactoryConfig(**factory)) == ["ordered", "corpus"]
    assert unshuffled_sources(ActivationFactoryConfig(**factory, buffer_size=64)) == []
    # these caches are 2-D: read as tokens, each shuffled context still yields its tokens in order
    as_tokens = ActivationFactoryConfig(**{**factory, "target": "activations-1d"})
    assert unshuffled_sources(as_tokens) == ["ordered", "shuffled", "corpus"]


def test_hook_subset_and_explicit_hook_directories(tmp_path):
    write(tmp_path)
    root = tmp_path / "cache"
    only_second = CachedActivations({"resid": str(root / HOOKS[1])})
    item = next(only_second.iterate())
    first = next(synthetic_stream())
    assert set(item) >= {"resid", "tokens"} and torch.equal(item["resid"], first[HOOKS[1]])
    with pytest.raises(ActivationCacheError, match="'blocks.9.hook_resid_post' is not in the cache"):
        CachedActivations(root, hook_points=["blocks.9.hook_resid_post"])


def test_consistency_check_passes_then_pinpoints_a_tampered_chunk(tmp_path):
    write(tmp_path)
    root = tmp_path / "cache"
    report = check_activation_consistency(CheckActivationConsistencySettings(path=str(root)))
    assert report.ok and report.n_chunks == 5, report.problems
    # tamper with one token of chunk 2 in the second hook's file
    from safetensors.torch import load_file, save_file

    path = root / HOOKS[1] / "chunk-00000002.safetensors"
    tensors = load_file(str(path))
    tensors["tokens"][1, 3] += 1
    save_file(tensors, str(path))
    sidecar_path = path.with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["file_bytes"] = path.stat().st_size
    sidecar_path.write_text(json.dumps(sidecar))
    report = check_activation_consistency(CheckActivationConsistencySettings(paths={h: str(root / h) for h in HOOKS}))
    assert not report.ok
    assert (report.first_mismatch.hook_point, report.first_mismatch.chunk) == (HOOKS[1], "chunk-00000002")
    assert report.first_mismatch.position == (1, 3)


def test_cli_check_exits_non_zero_on_mismatch(tmp_path):
    write(tmp_path)
    root = tmp_path / "cache"
    ok = subprocess.run([sys.executable, "-m", "lm_saes_core.cli", "check-activations", str(root)], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    (root / HOOKS[0] / "chunk-00000004.safetensors").unlink()
    bad = subprocess.run(
        [sys.executable, "-m", "lm_saes_core.cli", "check-activations", str(root)], capture_output=True
    )
    assert bad.returncode == 1 and b"chunk-00000004.safetensors" in bad.stderr


def test_truncated_or_corrupted_chunk_names_the_file(tmp_path):
    write(tmp_path)
    root = tmp_path / "cache"
    path = root / HOOKS[0] / "chunk-00000001.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    cache = CachedActivations(root)
    with pytest.raises(ActivationCacheError, match=r"chunk-00000001.safetensors has \d+ bytes but \d+ were written"):
        list(cache.iterate(num_workers=2))
    path.write_bytes(b"\x00" * len(data))  # right size, garbage bytes
    with pytest.raises(ActivationCacheError, match="chunk-00000001.safetensors cannot be read"):
        list(cache.iterate(num_workers=0))
    report = check_activation_consistency(CheckActivationConsistencySettings(path=str(root)))
    assert not report.ok and "chunk-00000001.safetensors" in report.problems[0]


def test_interrupted_write_leaves_nothing_that_looks_complete_and_rerun_cleans(tmp_path):
    def interrupted():
        for i, item in enumerate(synthetic_stream()):
            if i == 3:
                raise KeyboardInterrupt
            yield item

    cfg = ActivationWriterConfig(hook_points=HOOKS, cache_dir=str(tmp_path / "cache"), num_workers=2)
    with pytest.raises(KeyboardInterrupt):
        ActivationWriter(cfg).write(interrupted())
    root = tmp_path / "cache"
    assert not (root / "manifest.json").exists()
    assert not [p for p in root.rglob("*") if p.name.startswith(".tmp-")]
    with pytest.raises(ActivationCacheError, match="no manifest"):
        CachedActivations(root)
    manifest = ActivationWriter(cfg).write(synthetic_stream(n_items=2))
    assert manifest["n_chunks"] == 2
    assert sorted(p.name for p in (root / HOOKS[0]).iterdir()) == [
        "chunk-00000000.json",
        "chunk-00000000.safetensors",
        "chunk-00000001.json",
        "chunk-00000001.safetensors",
    ]


def test_complete_cache_is_not_overwritten_without_asking(tmp_path):
    write(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a complete activation cache"):
        write(tmp_path)
    assert write(tmp_path, overwrite=True)["n_chunks"] == 5


def test_unwritable_output_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cfg = ActivationWriterConfig(hook_points=HOOKS, cache_dir=str(blocker / "cache"))
    with pytest.raises(PermissionError, match="a-file/cache is not writable"):
        ActivationWriter(cfg).write(synthetic_stream())


def test_full_disk_mid_write_leaves_no_complete_looking_files(tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: writes past it fail with an OSError."""
    code = textwrap.dedent(
        f"""
        import resource, signal, torch
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from lm_saes_core.activation.writer import ActivationWriter, ActivationWriterConfig
        def stream():
            for i in range(6):
                rows = 64 if i == 4 else 1  # the fifth chunk is far bigger than the others
                yield {{"h": torch.randn(rows, 8, 64), "tokens": torch.zeros(rows, 8, dtype=torch.long)}}
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))
        cfg = ActivationWriterConfig(hook_points=["h"], cache_dir={str(tmp_path / "cache")!r})
        try:
            ActivationWriter(cfg).write(stream())
        except OSError as exc:
            print("ERROR:", exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERROR:" in out.stdout and "chunk-00000004.safetensors failed" in out.stdout, out.stdout + out.stderr
    root = tmp_path / "cache"
    assert not (root / "manifest.json").exists()
    names = sorted(p.name for p in (root / "h").iterdir())
    assert "chunk-00000004.safetensors" not in names and not [n for n in names if n.startswith(".tmp-")]


def test_factory_labels_rows_of_several_cached_sources_with_its_own_source_index(tmp_path):
    from lm_saes_core.activation.config import ActivationFactoryActivationsSource, ActivationFactoryConfig
    from lm_saes_core.activation.factory import ActivationFactory

    for name in ("a", "b"):  # both caches recorded source index 0 when they were generated
        cfg = ActivationWriterConfig(hook_points=HOOKS, cache_dir=str(tmp_path / name))
        ActivationWriter(cfg, provenance={"dataset_name": name}).write(synthetic_stream())
    factory = ActivationFactory(
        ActivationFactoryConfig(
            sources=[
                ActivationFactoryActivationsSource(name=name, path=str(tmp_path / name), num_workers=0)
                for name in ("a", "b")
            ],
            target="activations-2d",
            hook_points=HOOKS,
            batch_size=3,
        )
    )
    labels = torch.cat([item["source_idx"][:, 0] for item in factory.process()])
    assert sorted(labels.tolist()) == [0] * 15 + [1] * 15
