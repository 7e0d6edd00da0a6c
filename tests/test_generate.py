"""generate_activations and check_activation_consistency end to end on the real SmolLM2 and the bundled corpus."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lm_saes_core import (
    CachedActivations,
    CheckActivationConsistencySettings,
    DatasetConfig,
    GenerateActivationsSettings,
    LanguageModelConfig,
    check_activation_consistency,
    generate_activations,
    load_dataset,
)
from lm_saes_core.backend import UnknownHookPointError

HOOKS = ["blocks.3.hook_resid_post", "blocks.6.hook_resid_post"]
CONTEXT = 64
# fp32 on CPU: our hooks read the very tensors the transformers forward computes; observed difference is 0,
# the tolerance allows for a different (but equally valid) kernel choice between batch shapes.
ATOL = 1e-4

pytestmark = pytest.mark.slow


def settings(tmp_path: Path, **overrides) -> GenerateActivationsSettings:
    base = dict(
        model=LanguageModelConfig(model_name="smollm2-135m"),
        dataset=DatasetConfig(dataset_name_or_path="python-docs", split="train[:200]"),
        hook_points=HOOKS,
        output_dir=str(tmp_path / "activations"),
        context_size=CONTEXT,
        model_batch_size=4,
        batch_size=4,
        total_tokens=12 * CONTEXT,
        num_workers=1,
    )
    return GenerateActivationsSettings(**{**base, **overrides})


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def generated_2d(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen2d")
    result = generate_activations(settings(tmp))
    return result, CachedActivations(result.output_dir)


def test_2d_activations_equal_a_direct_transformers_forward(generated_2d, hf_model):
    result, cache = generated_2d
    assert result.n_tokens == 12 * CONTEXT  # total_tokens honoured exactly
    assert cache.hook_points == HOOKS and cache.hook_dims == {h: 576 for h in HOOKS}
    items = list(cache.iterate())
    tokens = torch.cat([item["tokens"] for item in items])
    attention = torch.cat([item["attention_mask"] for item in items])
    assert tokens.shape == (12, CONTEXT) and (tokens[:, 0] == 1).all()  # BOS <|im_start|> leads each window
    with torch.no_grad():
        hidden = hf_model(tokens, attention_mask=attention.long(), output_hidden_states=True).hidden_states
    for hook, layer in zip(HOOKS, (3, 6), strict=True):
        ours = torch.cat([item[hook] for item in items])
        valid = attention.bool()
        assert torch.allclose(ours[valid], hidden[layer + 1][valid], atol=ATOL), hook
        assert ours[valid].abs().max() > 1  # real activations, not zeros


def test_provenance_traces_every_position_back_to_its_document(generated_2d, smollm2_dir):
    from transformers import AutoTokenizer

    _, cache = generated_2d
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    dataset = load_dataset(DatasetConfig(dataset_name_or_path="python-docs", split="train[:200]"))
    item = next(cache.iterate())
    mask = item["mask"]
    assert mask.sum() > 0 and not mask[:, 0].any()  # BOS never counts as a document token
    checked = 0
    for row in range(item["tokens"].shape[0]):
        doc = int(item["doc_index"][row, 1])
        doc_tokens = tokenizer(dataset[doc]["text"], add_special_tokens=False)["input_ids"]
        for col in torch.nonzero(mask[row]).flatten().tolist():
            assert item["doc_index"][row, col] == doc
            assert doc_tokens[int(item["doc_position"][row, col])] == int(item["tokens"][row, col])
            checked += 1
    assert checked > 100


def test_1d_shuffled_activations_are_a_permutation_of_the_2d_tokens(tmp_path):
    """Over the same two documents, 1-D shuffled generation yields every document token of the 2-D generation
    exactly once, with the same activation, in an order fixed by the seed."""
    two_docs = DatasetConfig(dataset_name_or_path="python-docs", split="train[:2]")
    whole = dict(dataset=two_docs, total_tokens=None)
    cache_2d = CachedActivations(generate_activations(settings(tmp_path / "2d", **whole)).output_dir)
    items = list(cache_2d.iterate())
    mask = torch.cat([item["mask"] for item in items])
    expected = {
        (int(d), int(p)): v
        for d, p, v in zip(
            torch.cat([item["doc_index"] for item in items])[mask],
            torch.cat([item["doc_position"] for item in items])[mask],
            torch.cat([item[HOOKS[1]] for item in items])[mask],
            strict=True,
        )
    }
    one_d = dict(whole, target="activations-1d", batch_size=32, buffer_size=512, buffer_shuffle={"perm_seed": 7})
    first = generate_activations(settings(tmp_path / "a", **one_d))
    second = generate_activations(settings(tmp_path / "b", **one_d))
    rows = list(CachedActivations(first.output_dir).iterate())
    keys = [(int(d), int(p)) for item in rows for d, p in zip(item["doc_index"], item["doc_position"], strict=True)]
    assert len(expected) > 1000
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == set(expected)  # nothing lost or repeated
    values = torch.cat([item[HOOKS[1]] for item in rows])
    for key, value in zip(keys, values, strict=True):
        assert torch.allclose(value, expected[key], atol=ATOL)
    assert all(item[HOOKS[0]].shape == item[HOOKS[1]].shape for item in rows)  # both hooks from one forward
    first_batch_docs = {key[0] for key in keys[:32]}
    first_batch_positions = [key[1] for key in keys[:32]]
    assert len(first_batch_docs) > 1 or first_batch_positions != sorted(first_batch_positions)  # mixed
    again = torch.cat([item["doc_position"] for item in CachedActivations(second.output_dir).iterate()])
    assert torch.equal(again, torch.tensor([k[1] for k in keys]))  # same seed, same order


def test_rerun_with_same_settings_reuses_and_different_settings_refuse(generated_2d):
    result, _ = generated_2d
    again = generate_activations(settings(result.output_dir.parent))
    assert again.reused and again.n_tokens == result.n_tokens
    with pytest.raises(FileExistsError, match="already holds a complete activation cache"):
        generate_activations(settings(result.output_dir.parent, total_tokens=4 * CONTEXT))


def test_consistency_check_passes_on_generated_data(generated_2d):
    result, _ = generated_2d
    report = check_activation_consistency(CheckActivationConsistencySettings(path=str(result.output_dir)))
    assert report.ok and report.n_chunks == 3 and report.n_tokens == 12 * CONTEXT, report.problems


def test_wrong_hook_name_lists_the_valid_ones_near_it(tmp_path):
    with pytest.raises(UnknownHookPointError, match="blocks.6.hook_resid_post"):
        generate_activations(settings(tmp_path, hook_points=["blocks.6.hook_resid_psot"]))
    assert not (tmp_path / "activations" / "manifest.json").exists()


def test_context_longer_than_the_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="context_size 16384 exceeds the maximum context"):
        generate_activations(settings(tmp_path, context_size=16384, total_tokens=16384))


def test_missing_dataset_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-corpus.jsonl"
    with pytest.raises(FileNotFoundError, match="no-such-corpus.jsonl"):
        generate_activations(settings(tmp_path, dataset=DatasetConfig(dataset_name_or_path=str(missing))))


def _write_config(tmp_path: Path, **overrides) -> Path:
    data = settings(tmp_path, **overrides).model_dump(mode="json")
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_generate_then_check(tmp_path):
    config = _write_config(tmp_path, hook_points=HOOKS[1:], total_tokens=4 * CONTEXT)
    out = subprocess.run(
        [sys.executable, "-m", "lm_saes_core.cli", "generate", str(config), "--set", "format=pt"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((tmp_path / "activations" / "manifest.json").read_text())
    assert manifest["format"] == "pt" and manifest["n_tokens"] == 4 * CONTEXT
    assert "expected size on disk" in out.stdout + out.stderr
    check = subprocess.run(
        [sys.executable, "-m", "lm_saes_core.cli", "check-activations", str(tmp_path / "activations")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0 and "consistent" in check.stdout


def test_ctrl_c_during_generation_leaves_no_complete_cache_and_rerun_finishes(tmp_path):
    config = _write_config(tmp_path, hook_points=HOOKS[1:], total_tokens=400 * CONTEXT, model_batch_size=2)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "lm_saes_core.cli", "generate", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        # A suite started in the background (`cmd &` in a script) ignores SIGINT, and so would this child; Python
        # only turns SIGINT into KeyboardInterrupt when it starts with the default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    chunk_dir = tmp_path / "activations" / HOOKS[1]
    deadline = time.time() + 300
    while time.time() < deadline and not list(chunk_dir.glob("chunk-*.safetensors")):
        time.sleep(0.2)
    assert list(chunk_dir.glob("chunk-*.safetensors")), "generation never started writing"
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0].decode()
    assert process.returncode == 130, output[-2000:]
    assert "interrupted" in output
    root = tmp_path / "activations"
    assert not (root / "manifest.json").exists()
    assert not list(root.rglob(".tmp-*"))
    report = check_activation_consistency(CheckActivationConsistencySettings(path=str(root)))
    assert not report.ok and "no manifest" in report.problems[0]
    result = generate_activations(settings(tmp_path, hook_points=HOOKS[1:], total_tokens=8 * CONTEXT))
    assert result.n_tokens == 8 * CONTEXT
    assert sorted(p.name for p in chunk_dir.glob("*.safetensors")) == [
        "chunk-00000000.safetensors",
        "chunk-00000001.safetensors",
    ]


def test_cached_activations_feed_the_same_factory_as_a_dataset(generated_2d, smollm2_hf):
    """A cache written from the dataset, read back through the factory, gives what the dataset source gives."""
    from lm_saes_core import ActivationFactory, ActivationFactoryConfig

    result, _ = generated_2d
    common = dict(target="activations-1d", hook_points=HOOKS, batch_size=100, context_size=CONTEXT, model_batch_size=4)
    from_cache = ActivationFactory(
        ActivationFactoryConfig(
            sources=[{"type": "activations", "name": "c", "path": str(result.output_dir)}], **common
        )
    ).process()
    from_dataset = ActivationFactory(
        ActivationFactoryConfig(sources=[{"type": "dataset", "name": "d"}], **common)
    ).process(model=smollm2_hf, datasets={"d": load_dataset(DatasetConfig(split="train[:200]"))})
    cached = list(from_cache)
    n_cached = sum(len(b["tokens"]) for b in cached)
    live = []
    for batch in from_dataset:
        live.append(batch)
        if sum(len(b["tokens"]) for b in live) >= n_cached:
            break
    for key in ("tokens", "doc_index", "doc_position", *HOOKS):
        a = torch.cat([b[key] for b in cached])
        b = torch.cat([b[key] for b in live])[:n_cached]
        assert torch.allclose(a.float(), b.float(), atol=ATOL), key
    assert [len(b["tokens"]) for b in cached[:-1]] == [100] * (len(cached) - 1)


def test_tokens_target_needs_no_forward_pass():
    from lm_saes_core import ActivationFactory, ActivationFactoryConfig
    from lm_saes_core.backend import load_model

    class TokenizerOnly:  # a model whose forward must never run
        def __init__(self, model):
            self.cfg, self.tokenizer = model.cfg, model.tokenizer
            self.bos_token_id, self.pad_token_id = model.bos_token_id, model.pad_token_id

        def activations(self, *args):
            raise AssertionError("the tokens target ran the model")

    model = TokenizerOnly(load_model(LanguageModelConfig(backend="huggingface")))
    factory = ActivationFactory(
        ActivationFactoryConfig(
            sources=[{"type": "dataset", "name": "d"}],
            target="tokens",
            hook_points=HOOKS,
            batch_size=8,
            context_size=CONTEXT,
        )
    )
    batch = next(factory.process(model=model, datasets={"d": load_dataset(DatasetConfig(split="train[:5]"))}))
    assert batch["tokens"].shape == (8, CONTEXT) and set(batch) >= {"mask", "doc_index", "doc_position"}


def test_sharded_generation_writes_disjoint_documents_that_read_as_one_cache(tmp_path):
    four_docs = DatasetConfig(dataset_name_or_path="python-docs", split="train[:4]")
    for shard in (0, 1):
        generate_activations(
            settings(
                tmp_path,
                dataset=four_docs,
                hook_points=HOOKS[1:],
                n_shards=2,
                start_shard=shard,
                total_tokens=4 * CONTEXT,
            )
        )
    root = tmp_path / "activations"
    assert sorted(p.name for p in root.glob("manifest*.json")) == [
        "manifest-shard-00000.json",
        "manifest-shard-00001.json",
    ]
    cache = CachedActivations(root)
    assert cache.n_tokens == 4 * CONTEXT and [c["name"] for c in cache.chunks][0] == "shard-0-chunk-00000000"
    docs_by_shard = [set(), set()]
    for chunk, item in zip(cache.chunks, cache.iterate(), strict=True):
        shard = int(chunk["name"].split("-")[1])
        docs_by_shard[shard] |= set(item["doc_index"][item["mask"]].tolist())
    assert docs_by_shard[0] and docs_by_shard[1] and not docs_by_shard[0] & docs_by_shard[1]
    assert min(docs_by_shard[1]) >= 2  # shard 1 holds documents 2-3 of the split, indexed as in the full split
    report = check_activation_consistency(CheckActivationConsistencySettings(path=str(root)))
    assert report.ok, report.problems
