"""Direct logit attribution: the runner's top tokens and values equal a plain matrix product of the model's own
weights (final-norm gain, centring for LayerNorm, unembedding; no biases), on tiny Llama/GPT-2 models through both
backends and on the real SmolLM2; results round-trip through the record store; bad dictionaries are named errors."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm_saes_core.backend import LanguageModelConfig, UnknownHookPointError
from lm_saes_core.models import PretrainedSAE, SAEConfig, SparseAutoEncoder
from lm_saes_core.runners.dla import DirectLogitAttributeSettings, direct_logit_attribute
from lm_saes_core.store import DictionaryRecord, RecordStoreConfig, open_store

TOP_K = 5


@pytest.fixture(scope="module")
def tiny_models(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama (RMSNorm) with a random final-norm gain, and a GPT-2 (LayerNorm with gain and bias, lm_head bias-free
    but with a nonzero ln_f bias), both on the SmolLM2 vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        llama.model.norm.weight.copy_(torch.randn(64))
    llama_dir = tmp_path_factory.mktemp("dla_llama")
    llama.save_pretrained(llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.save_pretrained(llama_dir)

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=128))
    with torch.no_grad():
        gpt2.transformer.ln_f.weight.copy_(torch.randn(64))
        gpt2.transformer.ln_f.bias.copy_(torch.randn(64))
    gpt2_dir = tmp_path_factory.mktemp("dla_gpt2")
    gpt2.save_pretrained(gpt2_dir)
    tokenizer.save_pretrained(gpt2_dir)
    return {"llama": llama_dir, "gpt2": gpt2_dir}


def save_dictionary(path: Path, W_D: torch.Tensor, hook_in: str, hook_out: str, norms: dict[str, float]) -> Path:
    """A dataset-wise dictionary saved unfolded, so the runner must fold it to get raw-space decoder rows."""
    d_sae, d_model = W_D.shape
    cfg = SAEConfig(
        hook_point_in=hook_in,
        hook_point_out=hook_out,
        d_model=d_model,
        d_sae=d_sae,
        norm_activation="dataset-wise",
        dataset_average_activation_norm=norms,
    )
    sae = SparseAutoEncoder.from_config(cfg)
    with torch.no_grad():
        sae.W_D.copy_(W_D)
    return sae.save_pretrained(path, fold_activation_scale=False)


def expected_logits(directions: torch.Tensor, norm_weight: torch.Tensor, W_vocab: torch.Tensor, centre: bool):
    """(F, V) by hand: optional centring, the final norm's gain, the unembedding (V, D) rows; nothing else."""
    if centre:
        directions = directions - directions.mean(-1, keepdim=True)
    return (directions * norm_weight) @ W_vocab.T


def assert_matches(results, expected: torch.Tensor, tokenizer) -> None:
    assert sorted(results) == list(range(expected.shape[0]))
    order = expected.argsort(dim=-1, descending=True, stable=True)
    for index, feature in results.items():
        top_ids, bottom_ids = order[index, :TOP_K].tolist(), order[index, -TOP_K:].flip(0).tolist()
        assert [t.token_id for t in feature.top_positive] == top_ids
        assert [t.token_id for t in feature.top_negative] == bottom_ids
        for tokens, ids in ((feature.top_positive, top_ids), (feature.top_negative, bottom_ids)):
            torch.testing.assert_close(
                torch.tensor([t.logit for t in tokens]), expected[index, ids], rtol=1e-5, atol=1e-5
            )
            assert [t.token for t in tokens] == [tokenizer.decode([i]) for i in ids]


@pytest.mark.parametrize("backend", ["huggingface", "transformer_lens"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dla_equals_the_matrix_product_of_the_model_weights(tiny_models, tmp_path, family, backend):
    model_dir = tiny_models[family]
    torch.manual_seed(2)
    W_D = torch.randn(6, 64)
    # A transcoder between two residual-stream hooks with different dataset norms: folding scales W_D by
    # c_in / c_out = (sqrt(64) / 2) / (sqrt(64) / 5) = 2.5.
    sae_dir = save_dictionary(
        tmp_path / "sae",
        W_D,
        "blocks.0.hook_resid_post",
        "blocks.1.hook_mlp_out",
        {"blocks.0.hook_resid_post": 2.0, "blocks.1.hook_mlp_out": 5.0},
    )
    store_cfg = RecordStoreConfig(sqlite_path=str(tmp_path / "records.sqlite"))
    settings = DirectLogitAttributeSettings(
        sae=PretrainedSAE(pretrained_name_or_path=str(sae_dir)),
        sae_name="tc",
        model=LanguageModelConfig(model_name=str(model_dir), backend=backend),
        top_k=TOP_K,
        feature_batch_size=4,  # two batches, the second one partial
        store=store_cfg,
        output_path=str(tmp_path / "out" / "dla.json"),
    )
    results = direct_logit_attribute(settings)

    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    if family == "llama":
        norm_weight, centre = hf.model.norm.weight, False
    else:
        norm_weight, centre = hf.transformer.ln_f.weight, True
    with torch.no_grad():
        expected = expected_logits(W_D * 2.5, norm_weight, hf.lm_head.weight, centre)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert_matches(results, expected, tokenizer)

    exported = json.loads(Path(settings.output_path).read_text())
    assert exported["features"]["3"]["top_positive"][0]["token_id"] == results[3].top_positive[0].token_id
    assert exported["features"]["3"]["top_negative"][0]["logit"] == results[3].top_negative[0].logit


def test_dla_on_smollm2_round_trips_through_the_store(smollm2_config, smollm2_dir, tmp_path):
    from safetensors.torch import load_file

    weights = load_file(str(smollm2_dir / "model.safetensors"))
    embedding, gain = weights["model.embed_tokens.weight"], weights["model.norm.weight"]  # tied unembedding
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    cat = tokenizer.encode(" cat", add_special_tokens=False)[0]
    torch.manual_seed(3)
    W_D = torch.randn(4, 576) * 0.05
    W_D[0] = embedding[cat] / gain  # reads back as the Gram row of " cat": the cat tokens first
    sae_dir = save_dictionary(
        tmp_path / "sae",
        W_D,
        "blocks.29.hook_resid_post",
        "blocks.29.hook_resid_post",
        {"blocks.29.hook_resid_post": 7},
    )  # an SAE: c_in = c_out, folding leaves W_D unchanged
    store_cfg = RecordStoreConfig(sqlite_path=str(tmp_path / "records.sqlite"))
    with open_store(store_cfg) as store:  # an existing record keeps its metrics
        store.add_dictionary(
            DictionaryRecord(name="sm", series="s1", path="elsewhere", cfg={}, metrics={"metrics/l0": 12.5})
        )
    settings = DirectLogitAttributeSettings(
        sae=PretrainedSAE(pretrained_name_or_path=str(sae_dir)),
        sae_name="sm",
        sae_series="s1",
        model=smollm2_config,
        top_k=TOP_K,
        store=store_cfg,
    )
    results = direct_logit_attribute(settings)

    expected = expected_logits(W_D, gain, embedding, centre=False)
    assert_matches(results, expected, tokenizer)
    assert results[0].top_positive[0].token == " cat"  # leading space kept
    assert "cats" in [t.token for t in results[0].top_positive]

    with open_store(store_cfg) as store:
        for index, logits in results.items():
            assert store.get_feature("sm", "s1", index).logits == logits
        assert store.get_dictionary("sm", "s1").metrics == {"metrics/l0": 12.5}
        assert store.get_model("smollm2-135m") is not None


def test_dla_upserts_the_dictionary_record(tiny_models, tmp_path):
    hook = "blocks.2.hook_resid_pre"
    cfg = SAEConfig(hook_point_in=hook, hook_point_out=hook, d_model=64, d_sae=3, norm_activation="inference")
    sae_dir = SparseAutoEncoder.from_config(cfg).save_pretrained(tmp_path / "sae")
    store_cfg = RecordStoreConfig(sqlite_path=str(tmp_path / "records.sqlite"))
    model_cfg = LanguageModelConfig(model_name=str(tiny_models["llama"]))
    direct_logit_attribute(
        DirectLogitAttributeSettings(
            sae=PretrainedSAE(pretrained_name_or_path=str(sae_dir)), sae_name="new", model=model_cfg, store=store_cfg
        )
    )
    with open_store(store_cfg) as store:
        record = store.get_dictionary("new", "default")
        assert record.path == str(sae_dir.resolve())
        assert record.cfg == json.loads((sae_dir / "config.json").read_text())
        assert record.model_name == model_cfg.model_name
        assert LanguageModelConfig.model_validate(store.get_model(model_cfg.model_name).cfg) == model_cfg
        assert store.get_feature("new", "default", 2).logits is not None


@pytest.mark.parametrize(
    ("hook_out", "d_model", "error", "match"),
    [
        ("blocks.1.mlp.hook_post", 64, ValueError, "not a residual-stream hook"),
        ("blocks.1.ln2.hook_normalized", 64, ValueError, "not a residual-stream hook"),
        ("blocks.9.hook_resid_post", 64, UnknownHookPointError, "no hook point 'blocks.9.hook_resid_post'"),
        ("blocks.1.hook_resid_post", 32, ValueError, "d_model 64"),
    ],
)
def test_dla_refuses_dictionaries_that_do_not_write_the_residual_stream(
    tiny_models, tmp_path, hook_out, d_model, error, match
):
    hook_in = "blocks.0.hook_resid_post" if hook_out != "blocks.1.hook_resid_post" else hook_out
    cfg = SAEConfig(
        hook_point_in=hook_in, hook_point_out=hook_out, d_model=d_model, d_sae=4, norm_activation="inference"
    )
    sae_dir = SparseAutoEncoder.from_config(cfg).save_pretrained(tmp_path / "sae")
    store_path = tmp_path / "records.sqlite"
    settings = DirectLogitAttributeSettings(
        sae=PretrainedSAE(pretrained_name_or_path=str(sae_dir)),
        sae_name="bad",
        model=LanguageModelConfig(model_name=str(tiny_models["llama"])),
        store=RecordStoreConfig(sqlite_path=str(store_path)),
    )
    with pytest.raises(error, match=match):
        direct_logit_attribute(settings)
    if "residual-stream" in match:
        assert not store_path.exists()  # refused before the store (and the model) was opened
