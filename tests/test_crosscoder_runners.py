"""The seed's crosscoder and CLT runners: `activation_factories` with a model per group of heads (a base model and a
"fine-tuned" copy, both tiny local Llamas with the SmolLM2 tokenizer), merged batch by batch; training, evaluation and
analysis through them, from Python and the CLI."""

import json
import logging

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lm_saes_core.analysis import FeatureAnalyzerConfig
from lm_saes_core.cli import app
from lm_saes_core.config import ConfigError
from lm_saes_core.data import DatasetConfig
from lm_saes_core.evaluation import EvalConfig
from lm_saes_core.models import CrossCoder, PretrainedSAE, load_sparse_dictionary
from lm_saes_core.runners import (
    AnalyzeCrossCoderSettings,
    EvaluateCrossCoderSettings,
    HeadGroupFactory,
    TrainCLTSettings,
    TrainCrossCoderSettings,
    analyze_crosscoder,
    evaluate_crosscoder,
    train_clt,
    train_crosscoder,
)
from lm_saes_core.runners.head_groups import load_head_groups, merged_stream
from lm_saes_core.store import RecordStoreConfig, open_store

HOOK = "blocks.1.hook_resid_post"
HEADS = [f"base/{HOOK}", f"tuned/{HOOK}"]
DOCS = {"docs": DatasetConfig(dataset_name_or_path="python-docs", split="train[:40]")}


@pytest.fixture(scope="module")
def tuned_llama_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama 'fine-tuned': every weight moved by 20% noise (same tokenizer, so the same token ids)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * parameter.std() * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("tuned_llama")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return path


def factories(tiny_llama_dir, tuned_llama_dir, target="activations-1d", batch_size=256, **fields) -> list[dict]:
    common = {"sources": [{"type": "dataset", "name": "docs"}], "target": target, "hook_points": [HOOK],
              "batch_size": batch_size, "context_size": 32, "model_batch_size": 16} | fields  # fmt: skip
    return [
        common | {"name": "base"},
        common | {"name": "tuned", "model": {"model_name": str(tuned_llama_dir)}},
    ]


def train_settings(tmp_path, tiny_llama_dir, tuned_llama_dir, steps=200) -> dict:
    return {
        "sae": {"sae_type": "crosscoder", "d_model": 64, "d_sae": 256, "heads": HEADS, "act_fn": "topk", "top_k": 16},
        "sae_name": "diff",
        "trainer": {
            "total_training_tokens": steps * 256,
            "lr": 4e-3,
            "log_frequency": 20,
            "n_checkpoints": 0,
            "exp_result_path": str(tmp_path / "diff"),
        },  # fmt: skip
        "activation_factories": factories(tiny_llama_dir, tuned_llama_dir, buffer_size=1024),
        "model": {"model_name": str(tiny_llama_dir)},
        "datasets": {name: cfg.model_dump() for name, cfg in DOCS.items()},
    }


def test_merged_batches_hold_each_models_own_activations_of_the_same_tokens(tiny_llama_dir, tuned_llama_dir):
    from lm_saes_core.backend import LanguageModelConfig, load_model

    cfgs = [HeadGroupFactory(**f) for f in factories(tiny_llama_dir, tuned_llama_dir, "activations-2d", 2)]
    groups = load_head_groups(cfgs, LanguageModelConfig(model_name=str(tiny_llama_dir)), None, DOCS)
    assert groups[0].model is not groups[1].model and groups[1].model_name == str(tuned_llama_dir)
    batch = next(merged_stream(groups, epochs=False))
    assert set(batch) >= {*HEADS, "tokens", "mask"} and HOOK not in batch
    for name, directory in (("base", tiny_llama_dir), ("tuned", tuned_llama_dir)):
        model = load_model(LanguageModelConfig(model_name=str(directory)))
        expected = model.activations(batch["tokens"], batch["attention_mask"], [HOOK])[HOOK]
        mask = batch["mask"]
        torch.testing.assert_close(batch[f"{name}/{HOOK}"][mask], expected[mask], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch[HEADS[0]], batch[HEADS[1]])  # two models, not one twice


def test_factories_that_disagree_are_refused_by_name(tiny_llama_dir, tuned_llama_dir):
    from lm_saes_core.backend import LanguageModelConfig

    unnamed = [{k: v for k, v in f.items() if k != "name"} for f in factories(tiny_llama_dir, tuned_llama_dir)]
    with pytest.raises(ValueError, match=r"both produce 'blocks.1.hook_resid_post': give each factory a `name`"):
        EvaluateCrossCoderSettings(sae={"pretrained_name_or_path": "x"}, sae_name="x", activation_factories=unnamed)
    uneven = factories(tiny_llama_dir, tuned_llama_dir)
    uneven[1]["batch_size"] = 128
    with pytest.raises(ValueError, match=r"activation_factories\[1\].batch_size is 128"):
        EvaluateCrossCoderSettings(sae={"pretrained_name_or_path": "x"}, sae_name="x", activation_factories=uneven)
    # Shuffled with different seeds: the same documents in another order, found at the first batch.
    shuffled = factories(tiny_llama_dir, tuned_llama_dir, buffer_size=512)
    shuffled[1]["buffer_shuffle"] = {"perm_seed": 7}
    base = LanguageModelConfig(model_name=str(tiny_llama_dir))
    groups = load_head_groups([HeadGroupFactory(**f) for f in shuffled], base, None, DOCS)
    with pytest.raises(ValueError, match=r"activation_factories\[1\] yielded other tokens .* in batch 0"):
        next(merged_stream(groups, epochs=False))


def test_a_crosscoder_across_two_models_trains_evaluates_and_analyses(tmp_path, tiny_llama_dir, tuned_llama_dir,
                                                                       caplog):  # fmt: skip
    settings = TrainCrossCoderSettings.model_validate(train_settings(tmp_path, tiny_llama_dir, tuned_llama_dir))
    result = train_crosscoder(settings)
    metrics = result.last_metrics
    # Measured: per-head training EV 0.88 / 0.87 after 60 steps of 256 tokens.
    for head in HEADS:
        assert metrics[f"crosscoder_metrics/{head}/explained_variance"] > 0.75, metrics
    model = load_sparse_dictionary(result.output_path)
    assert type(model) is CrossCoder and model.cfg.heads == HEADS

    eval_factories = factories(tiny_llama_dir, tuned_llama_dir, "activations-2d", 4)
    common = {"sae": PretrainedSAE(pretrained_name_or_path=str(result.output_path)), "sae_name": "diff",
              "activation_factories": eval_factories, "model": {"model_name": str(tiny_llama_dir)},
              "datasets": DOCS}  # fmt: skip
    logging.getLogger("lm_saes_core").addHandler(caplog.handler)  # it does not propagate to the root logger
    with caplog.at_level(logging.WARNING, logger="lm_saes_core"):
        evaluation = evaluate_crosscoder(EvaluateCrossCoderSettings(**common, eval=EvalConfig(total_eval_tokens=2000)))
    assert "downstream metrics skipped: the heads come from several models" in caplog.text
    assert evaluation.metrics["details/n_tokens"] == 2000 and "metrics/ce_loss_spliced" not in evaluation.metrics
    for head in HEADS:  # held-out documents are harder than the training window's
        assert evaluation.metrics[f"crosscoder_metrics/{head}/explained_variance"] > 0.6, evaluation.metrics
        assert evaluation.metrics[f"crosscoder_metrics/{head}/l0"] <= 16

    store = RecordStoreConfig(sqlite_path=str(tmp_path / "store.db"))
    analyses = analyze_crosscoder(
        AnalyzeCrossCoderSettings(**common, store=store, analyzer=FeatureAnalyzerConfig(total_analyzing_tokens=2000))
    )
    assert len(analyses) == 256 and sum(a.act_times > 0 for a in analyses) > 50
    assert {a.location for a in analyses if a.act_times > 0} <= {"shared", *(f"exclusive to {h}" for h in HEADS)}
    with open_store(store) as opened:
        assert opened.get_dictionary("diff", "default").model_name == str(tiny_llama_dir)


def test_the_cli_trains_a_crosscoder_from_activation_factories(tmp_path, tiny_llama_dir, tuned_llama_dir):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(train_settings(tmp_path, tiny_llama_dir, tuned_llama_dir, steps=10)))
    result = CliRunner().invoke(app, ["train", str(config)])
    assert result.exit_code == 0, result.output
    assert f"dictionary: {tmp_path / 'diff'} (10 steps, 2560 tokens; trained)" in result.output
    assert json.loads((tmp_path / "diff" / "config.json").read_text())["heads"] == HEADS
    # A head that no factory produces: one line naming it and what the factories do produce.
    result = CliRunner().invoke(
        app, ["train", str(config), "--set", "sae.heads=[base/x, tuned/blocks.1.hook_resid_post]"]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "sae hook point(s) ['base/x'] are not produced by the activation factories" in result.output


def test_the_seed_runner_names_insist_on_their_kind(tmp_path):
    settings = TrainCLTSettings(
        sae={"d_model": 4, "d_sae": 8, "hook_point_in": "a", "hook_point_out": "a", "act_fn": "topk", "top_k": 2},
        sae_name="x",
        trainer={"total_training_tokens": 100, "exp_result_path": str(tmp_path)},
        activation_factory={
            "sources": [{"type": "activations", "name": "c", "path": str(tmp_path)}],
            "target": "activations-1d",
            "hook_points": ["a"],
            "batch_size": 10,
        },  # fmt: skip
    )
    with pytest.raises(ConfigError, match="sae.sae_type is 'sae', but this runner trains sae_type 'clt'"):
        train_clt(settings)
    with pytest.raises(ConfigError, match="this runner trains sae_type 'crosscoder'"):
        train_crosscoder(settings)
