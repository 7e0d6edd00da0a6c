"""Direct logit attribution of crosscoders and CLTs on fixed weights whose answer is known: a crosscoder feature is
read through one head's decoder (the deepest residual-stream head unless `head` names another), a CLT feature of
layer s through the sum of its decoders to the outputs of layers t >= s (numbered s * d_sae + i, as the analysis
numbers them), each undone from a dataset-wise scale the dictionary could not fold. Dictionaries off the residual
stream are refused with the reason; one CLT runs on the real SmolLM2."""

import json
import math
from pathlib import Path

import pytest
import torch
from test_dla import TOP_K, assert_matches, expected_logits
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm_saes_core.analysis.direct_logit import attributed_hooks
from lm_saes_core.backend import LanguageModelConfig
from lm_saes_core.models import CLTConfig, CrossCoder, CrossCoderConfig, CrossLayerTranscoder, PretrainedSAE
from lm_saes_core.runners.dla import DirectLogitAttributeSettings, direct_logit_attribute
from lm_saes_core.store import RecordStoreConfig, open_store

D = 64
CLT_IN = ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized", "blocks.2.ln2.hook_normalized"]
CLT_OUT = ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"]
HEADS = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_pre", "blocks.1.ln2.hook_normalized"]
"""In this order the deepest residual-stream head is the middle one (layer 2's input), not the last listed."""


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny Llama with a random final-norm gain (so the gain visibly enters), its weights and tokenizer."""
    torch.manual_seed(11)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.randn(D))
    path = tmp_path_factory.mktemp("dla_kinds_llama")
    model.save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.save_pretrained(path)
    return {"dir": path, "gain": model.model.norm.weight.detach(), "W_U": model.lm_head.weight.detach(),
            "tokenizer": tokenizer}  # fmt: skip


def run_dla(sae_dir: Path, model_dir: Path, tmp_path: Path, **fields) -> tuple[dict, dict]:
    store = RecordStoreConfig(sqlite_path=str(tmp_path / "records.sqlite"))
    settings = DirectLogitAttributeSettings(
        sae=PretrainedSAE(pretrained_name_or_path=str(sae_dir)),
        sae_name="kind",
        model=LanguageModelConfig(model_name=str(model_dir)),
        top_k=TOP_K,
        feature_batch_size=3,  # batches cut across a CLT's layers
        store=store,
        output_path=str(tmp_path / "dla.json"),
        **fields,
    )
    results = direct_logit_attribute(settings)
    with open_store(store) as opened:
        for index in (0, len(results) - 1):
            assert opened.get_feature("kind", "default", index).logits == results[index]
    return results, json.loads(Path(settings.output_path).read_text())


def clt(d_sae: int = 2, **fields) -> CrossLayerTranscoder:
    cfg = CLTConfig(**{"d_model": D, "d_sae": d_sae, "hook_points_in": CLT_IN, "hook_points_out": CLT_OUT,
                       "act_fn": "topk", "top_k": 1, "norm_activation": "inference"} | fields)  # fmt: skip
    torch.manual_seed(5)
    model = CrossLayerTranscoder.from_config(cfg)
    with torch.no_grad():
        for decoder in model.W_D:
            decoder.normal_()
    return model


def test_a_clt_feature_is_read_through_the_sum_of_its_decoders(llama, tmp_path):
    """Feature 0 of layer 0 writes e_3 to the outputs of layers 0 and 1 and nothing to layer 2: it promotes exactly
    what 2 e_3 promotes, the tokens of gain_3 * W_U[:, 3] at twice the value. Every other feature is the sum of its
    random decoders over t >= s, and feature (s, i) is number s * d_sae + i."""
    model = clt()
    e3 = torch.zeros(D)
    e3[3] = 1.0
    with torch.no_grad():
        model.W_D[0][0, 0] = e3
        model.W_D[1][0, 0] = e3
        model.W_D[2][0, 0] = 0.0
    sae_dir = model.save_pretrained(tmp_path / "clt")
    results, exported = run_dla(sae_dir, llama["dir"], tmp_path)

    directions = torch.stack([sum(model.W_D[t][s] for t in range(s, 3)) for s in range(3)]).flatten(0, 1).detach()
    torch.testing.assert_close(directions[0], 2 * e3)
    expected = expected_logits(directions, llama["gain"], llama["W_U"], centre=False)
    assert_matches(results, expected, llama["tokenizer"])
    unembedded = llama["gain"][3] * llama["W_U"][:, 3]  # what e_3 alone promotes
    assert [t.token_id for t in results[0].top_positive] == unembedded.argsort(descending=True)[:TOP_K].tolist()
    torch.testing.assert_close(
        torch.tensor([t.logit for t in results[0].top_positive]), 2 * unembedded.sort(descending=True).values[:TOP_K]
    )
    assert len(results) == 6  # 3 layers x 2 features, as the analysis numbers them
    assert exported["attributed_hooks"] == CLT_OUT and exported["summed"] is True
    assert exported["features"]["5"]["top_positive"][0]["token_id"] == results[5].top_positive[0].token_id


def test_a_clt_that_cannot_fold_has_each_layers_scale_undone_before_the_sum(llama, tmp_path):
    """Decoder-norm gating with outputs of different dataset-wise norms cannot fold: the saved decoders live in each
    output's normalised space (x c_out(t) = sqrt(d) / norm_t), so the raw direction is sum_t W_D[t][s] / c_out(t)."""
    norms = dict(zip(CLT_IN, (1.0, 2.0, 3.0), strict=True)) | dict(zip(CLT_OUT, (2.0, 5.0, 0.5), strict=True))
    model = clt(norm_activation="dataset-wise", dataset_average_activation_norm=norms)
    assert not model.can_fold
    sae_dir = model.save_pretrained(tmp_path / "clt")
    results, _ = run_dla(sae_dir, llama["dir"], tmp_path)
    c_out = [math.sqrt(D) / norms[hook] for hook in CLT_OUT]
    directions = torch.stack([sum(model.W_D[t][s] / c_out[t] for t in range(s, 3)) for s in range(3)]).flatten(0, 1)
    expected = expected_logits(directions.detach(), llama["gain"], llama["W_U"], centre=False)
    assert_matches(results, expected, llama["tokenizer"])


def crosscoder(**fields) -> CrossCoder:
    cfg = CrossCoderConfig(**{"d_model": D, "d_sae": 4, "heads": HEADS, "act_fn": "topk", "top_k": 1,
                              "norm_activation": "inference"} | fields)  # fmt: skip
    torch.manual_seed(6)
    model = CrossCoder.from_config(cfg)
    with torch.no_grad():
        model.W_D.normal_()
    return model


@pytest.mark.parametrize("head", [None, "blocks.0.hook_resid_post"])
def test_a_crosscoder_feature_is_read_through_one_residual_head(llama, tmp_path, head):
    """Default: the deepest head on the residual stream (layer 2's resid_pre, listed second); or the head asked for.
    A dataset-wise crosscoder folds exactly, head by head: its raw decoder rows are W_D[h] / c_h."""
    norms = dict(zip(HEADS, (2.0, 4.0, 8.0), strict=True))
    model = crosscoder(norm_activation="dataset-wise", dataset_average_activation_norm=norms)
    sae_dir = model.save_pretrained(tmp_path / "crosscoder", fold_activation_scale=False)
    results, exported = run_dla(sae_dir, llama["dir"], tmp_path, head=head)
    chosen = head or "blocks.2.hook_resid_pre"
    index = HEADS.index(chosen)
    raw = model.W_D[index].detach() / (math.sqrt(D) / norms[chosen])
    assert_matches(results, expected_logits(raw, llama["gain"], llama["W_U"], centre=False), llama["tokenizer"])
    assert len(results) == 4 and exported["attributed_hooks"] == [chosen] and exported["summed"] is False


@pytest.mark.parametrize(
    ("make", "head", "match"),
    [
        (lambda: crosscoder().cfg, "blocks.1.ln2.hook_normalized", "is not a residual-stream hook"),
        (lambda: crosscoder().cfg, "blocks.1.hook_resid_post", "is not one of the crosscoder's heads"),
        (
            lambda: crosscoder(heads=["blocks.0.ln2.hook_normalized", "blocks.1.mlp.hook_in"]).cfg,
            None,
            "none of the crosscoder's heads",
        ),
        (lambda: clt().cfg, "blocks.2.hook_mlp_out", "there is no head to choose"),
        (
            lambda: clt(hook_points_out=[CLT_OUT[0], "blocks.1.ln2.hook_out", CLT_OUT[2]]).cfg,
            None,
            r"writes to \['blocks.1.ln2.hook_out'\], which is not",
        ),
    ],
)
def test_dictionaries_off_the_residual_stream_are_refused_with_the_reason(make, head, match):
    with pytest.raises(ValueError, match=match):
        attributed_hooks(make(), head)


def test_a_refused_head_fails_before_the_model_or_the_store_opens(tmp_path):
    sae_dir = crosscoder().save_pretrained(tmp_path / "crosscoder")
    settings = DirectLogitAttributeSettings(
        sae=PretrainedSAE(pretrained_name_or_path=str(sae_dir)),
        sae_name="bad",
        model=LanguageModelConfig(model_name=str(tmp_path / "no-such-model")),
        store=RecordStoreConfig(sqlite_path=str(tmp_path / "records.sqlite")),
        head="blocks.1.ln2.hook_normalized",
    )
    with pytest.raises(ValueError, match="not a residual-stream hook"):
        direct_logit_attribute(settings)
    assert not (tmp_path / "records.sqlite").exists()


def test_a_clt_on_smollm2_promotes_what_its_summed_decoders_write(smollm2_dir, smollm2_config, tmp_path):
    """Layers 28-29's MLPs: a layer-28 feature writing half of " cat"'s (gain-divided) embedding to each of the two
    outputs promotes " cat" first, as the SAE test's full row does; the rest match the matrix product."""
    from safetensors.torch import load_file

    weights = load_file(str(smollm2_dir / "model.safetensors"))
    embedding, gain = weights["model.embed_tokens.weight"], weights["model.norm.weight"]  # tied unembedding
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    cat = tokenizer.encode(" cat", add_special_tokens=False)[0]
    cfg = CLTConfig(d_model=576, d_sae=3, hook_points_in=[f"blocks.{layer}.ln2.hook_normalized" for layer in (28, 29)],
                    hook_points_out=[f"blocks.{layer}.hook_mlp_out" for layer in (28, 29)], act_fn="topk", top_k=1,
                    norm_activation="inference")  # fmt: skip
    torch.manual_seed(7)
    model = CrossLayerTranscoder.from_config(cfg)
    with torch.no_grad():
        for decoder in model.W_D:
            decoder.normal_().mul_(0.02)
        model.W_D[0][0, 0] = model.W_D[1][0, 0] = embedding[cat] / gain / 2
    sae_dir = model.save_pretrained(tmp_path / "clt")
    store = RecordStoreConfig(sqlite_path=str(tmp_path / "records.sqlite"))
    settings = DirectLogitAttributeSettings(
        sae=PretrainedSAE(pretrained_name_or_path=str(sae_dir)), sae_name="clt", model=smollm2_config, top_k=TOP_K,
        store=store,
    )  # fmt: skip
    results = direct_logit_attribute(settings)
    directions = torch.stack([sum(model.W_D[t][s] for t in range(s, 2)) for s in range(2)]).flatten(0, 1).detach()
    assert_matches(results, expected_logits(directions, gain, embedding, centre=False), tokenizer)
    assert results[0].top_positive[0].token == " cat" and len(results) == 6
    with open_store(store) as opened:
        assert opened.get_feature("clt", "default", 5).logits == results[5]
