"""Evaluation: splicing into both backends, metrics on fixed weights with hand-computed values, the identity and zero
dictionaries spliced into the real SmolLM2, and `evaluate_sae` from a dataset and from a cache of the same tokens."""

import json
import math
from pathlib import Path

import pytest
import torch

from lm_saes_core.activation.config import ActivationFactoryConfig, ActivationFactoryTarget
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.backend.base import LanguageModel, LanguageModelConfig, Observer, UnreplaceableHookPointError
from lm_saes_core.data import DatasetConfig, load_dataset
from lm_saes_core.evaluation import EvalConfig, Evaluator, limit_mask
from lm_saes_core.models.sae import SAEConfig, SparseAutoEncoder
from lm_saes_core.runners.evaluate import EvaluateSAESettings, evaluate_sae
from lm_saes_core.runners.generate import GenerateActivationsSettings, generate_activations

HOOK = "blocks.3.hook_resid_post"
CONTEXT = 32
D_MODEL = 576
BACKENDS = ["smollm2_hf", "smollm2_tl"]
# logits of sdpa (HF backend) vs eager (TransformerLens bridge) attention in float32; observed max ~1e-4
CROSS_BACKEND = {"atol": 1e-3, "rtol": 1e-4}


def sae_with_weights(d_model: int, w_e: torch.Tensor, w_d: torch.Tensor, hook: str = HOOK) -> SparseAutoEncoder:
    """A relu SAE on raw activations (norm_activation inference) with the given weights and zero biases; no
    decoder-norm gating, so a zero decoder is allowed."""
    cfg = SAEConfig(
        d_model=d_model,
        d_sae=w_e.shape[1],
        hook_point_in=hook,
        hook_point_out=hook,
        norm_activation="inference",
        sparsity_include_decoder_norm=False,
    )
    model = SparseAutoEncoder.from_config(cfg)
    with torch.no_grad():
        model.W_E.copy_(w_e)
        model.W_D.copy_(w_d)
        model.b_E.zero_()
        model.b_D.zero_()
    return model


def identity_sae(d_model: int) -> SparseAutoEncoder:
    """Reconstructs every input exactly: features relu(x) and relu(-x), decoded as relu(x) - relu(-x) = x."""
    eye = torch.eye(d_model)
    return sae_with_weights(d_model, torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0))


# ---- splicing in the backends ----
@pytest.fixture(scope="module")
def batch(smollm2_hf) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = smollm2_hf.tokenizer(
        ["def add(a, b):\n    return a + b", "Sparse autoencoders"], return_tensors="pt", padding=True
    )
    return encoded["input_ids"], encoded["attention_mask"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_replacement_gives_the_clean_logits_and_zeros_change_them(request, backend, batch):
    model: LanguageModel = request.getfixturevalue(backend)
    tokens, attention = batch
    clean = model.logits_with_replacements(tokens, attention)
    assert clean.shape == (*tokens.shape, len(model.tokenizer))
    hooks = ["blocks.6.hook_resid_post", "blocks.2.hook_attn_out", "blocks.2.hook_mlp_out", "blocks.1.hook_resid_pre"]
    same = model.logits_with_replacements(tokens, attention, {hook: lambda a: a.clone() for hook in hooks})
    assert torch.equal(same, clean)
    zeroed = model.logits_with_replacements(tokens, attention, {"blocks.6.hook_resid_post": torch.zeros_like})
    assert (zeroed - clean).abs().max() > 1.0
    # the replacement applies only inside the call
    assert torch.equal(model.logits_with_replacements(tokens, attention), clean)
    with pytest.raises(UnreplaceableHookPointError, match="only the MLP branch"):
        model.logits_with_replacements(tokens, attention, {"blocks.6.hook_resid_mid": torch.zeros_like})
    # Reading such a hook is fine (a transcoder spliced in reads its input there): the observer sees the activation.
    seen = []
    observed = model.logits_with_replacements(tokens, attention, {"blocks.6.hook_resid_mid": Observer(seen.append)})
    assert torch.equal(observed, clean) and seen[0].shape == (*tokens.shape, 576)


def test_hf_clean_logits_equal_a_direct_transformers_forward(smollm2_hf, batch):
    tokens, attention = batch
    direct = smollm2_hf.model(input_ids=tokens, attention_mask=attention).logits
    assert torch.equal(smollm2_hf.logits_with_replacements(tokens, attention), direct.detach())


def test_both_backends_agree_on_clean_and_replaced_logits(smollm2_hf, smollm2_tl, batch):
    tokens, attention = batch
    valid = attention.bool()

    def halve(activation: torch.Tensor) -> torch.Tensor:
        return activation * 0.5

    for replacements in (None, {"blocks.6.hook_resid_post": halve}, {"blocks.2.hook_mlp_out": torch.zeros_like}):
        hf = smollm2_hf.logits_with_replacements(tokens, attention, replacements)
        tl = smollm2_tl.logits_with_replacements(tokens, attention, replacements)
        torch.testing.assert_close(hf[valid], tl[valid], **CROSS_BACKEND)
    clean = smollm2_hf.logits_with_replacements(tokens, attention)
    assert (clean[valid] - hf[valid]).abs().max() > 0.1  # the last replacement did change the output


def test_hf_backend_refuses_to_replace_a_computed_hook(smollm2_hf, batch):
    with pytest.raises(UnreplaceableHookPointError, match="ln2.hook_normalized"):
        smollm2_hf.logits_with_replacements(*batch, {"blocks.1.ln2.hook_normalized": torch.zeros_like})


# ---- metrics on fixed weights ----
# x = (x0, x1) -> features relu(x0), relu(x1), relu(-x0), relu(-x1 - 10) (never fires on these inputs);
# reconstruction (x0, relu(x1)): exact except where x1 < 0.
W_E = torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 0.0, -1.0]])
W_D = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 1.0]])
TOY_HOOK = "toy"
X = torch.tensor([[1.0, 2.0], [-3.0, 0.0], [0.5, -1.0], [2.0, 2.0]])


def toy_sae() -> SparseAutoEncoder:
    model = sae_with_weights(2, W_E, W_D, hook=TOY_HOOK)
    with torch.no_grad():
        model.b_E.copy_(torch.tensor([0.0, 0.0, 0.0, -10.0]))
    return model


def toy_stream_1d(rows: torch.Tensor, batch_size: int = 2):
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        yield {TOY_HOOK: chunk, "tokens": torch.zeros(len(chunk), dtype=torch.long)}


def expected_toy_metrics(x: torch.Tensor) -> dict[str, float]:
    """By hand from the weights above: feature activations and the reconstruction error per token."""
    acts = torch.stack([x[:, 0].relu(), x[:, 1].relu(), (-x[:, 0]).relu(), torch.zeros(len(x))], 1)
    error = torch.stack([torch.zeros(len(x)), x[:, 1] - x[:, 1].relu()], 1)
    sq = error.pow(2).sum(1)
    deviation = (x - x.mean(0)).pow(2).sum()
    return {
        "metrics/l0": (acts > 0).sum().item() / len(x),
        "metrics/l1": acts.sum().item() / len(x),
        "metrics/mean_feature_act": acts.sum().item() / (acts > 0).sum().item(),
        "losses/mse_loss": sq.mean().item(),
        "metrics/explained_variance": 1 - sq.sum().item() / deviation.item(),
        "metrics/l2_norm_error": sq.sqrt().mean().item(),
        "metrics/l2_norm_error_ratio": sq.sqrt().sum().item() / x.norm(dim=1).sum().item(),
    }


def test_hand_computed_metrics_on_a_toy_stream():
    result = Evaluator(EvalConfig(total_eval_tokens=100)).run(toy_sae(), toy_stream_1d(X))
    metrics = result.metrics
    # the numbers themselves, so the helper above cannot hide a shared mistake
    assert metrics["metrics/l0"] == 1.5  # active features per token: 2, 1, 1, 2
    assert metrics["metrics/l1"] == pytest.approx(2.625)  # (3 + 3 + 0.5 + 4) / 4
    assert metrics["metrics/mean_feature_act"] == pytest.approx(1.75)  # 10.5 / 6
    assert metrics["losses/mse_loss"] == pytest.approx(0.25)  # only token 3 misses, by (0, -1)
    assert metrics["metrics/explained_variance"] == pytest.approx(1 - 1 / 20.9375)  # sum |y - mean|^2 = 20.9375
    for key, value in expected_toy_metrics(X).items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key
    assert metrics["metrics/dead_fraction"] == 0.25  # feature 3 never fires
    assert metrics["metrics/dense_fraction"] == 0.75  # frequencies 3/4, 2/4, 1/4, 0
    assert metrics["sparsity/above_1e-1"] == 3 and metrics["sparsity/below_1e-5"] == 1
    assert metrics["details/n_tokens"] == 4
    torch.testing.assert_close(result.feature_frequency, torch.tensor([0.75, 0.5, 0.25, 0.0]))
    histogram = result.frequency_histogram
    assert histogram.n_dead == 1 and histogram.counts.sum() == 3
    for frequency in (0.75, 0.5, 0.25):
        bin_index = int(torch.searchsorted(histogram.bin_edges, torch.tensor(math.log10(frequency)).double())) - 1
        assert histogram.counts[bin_index] >= 1


def test_dense_threshold_and_token_budget():
    metrics = Evaluator(EvalConfig(total_eval_tokens=3, dense_threshold=0.5)).evaluate(toy_sae(), toy_stream_1d(X))
    assert metrics["details/n_tokens"] == 3  # the second batch is cut after one row
    assert metrics["metrics/l0"] == pytest.approx(4 / 3)
    assert metrics["metrics/dense_fraction"] == 0.25  # frequencies 2/3, 1/3, 1/3, 0: only feature 0 is above 0.5
    for key, value in expected_toy_metrics(X[:3]).items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key


def test_2d_batches_use_only_masked_positions_and_match_1d():
    """The same four tokens in 2-D rows behind a BOS column of huge values and a padding position."""
    rows = torch.full((2, 4, 2), 1e3)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    rows[0, 1:4], mask[0, 1:4] = X[:3], True
    rows[1, 1], mask[1, 1] = X[3], True
    batch = {TOY_HOOK: rows, "tokens": torch.zeros(2, 4, dtype=torch.long), "mask": mask}
    metrics_2d = Evaluator(EvalConfig(total_eval_tokens=100)).evaluate(toy_sae(), [batch])
    metrics_1d = Evaluator(EvalConfig(total_eval_tokens=100)).evaluate(toy_sae(), toy_stream_1d(X))
    for key, value in metrics_1d.items():
        if key != "metrics/explained_variance_legacy":  # per-batch mean differs with the batching
            assert metrics_2d[key] == pytest.approx(value, rel=1e-6), key


def test_limit_mask_keeps_the_first_positions_row_major():
    mask = torch.tensor([[False, True, True], [False, True, False]])
    assert limit_mask(mask, 2).tolist() == [[False, True, True], [False, False, False]]
    assert torch.equal(limit_mask(mask, 10), mask)


# ---- downstream on the real SmolLM2 ----
def real_stream(model: LanguageModel, n_rows: int = 4, hook_points: tuple[str, ...] = (HOOK,)):
    factory = ActivationFactory(
        ActivationFactoryConfig(
            sources=[{"type": "dataset", "name": "docs"}],
            target=ActivationFactoryTarget.ACTIVATIONS_2D,
            hook_points=list(hook_points),
            batch_size=2,
            context_size=CONTEXT,
            model_batch_size=2,
        )
    )
    dataset = load_dataset(DatasetConfig(dataset_name_or_path="python-docs", split="train[:20]"))
    batches = factory.process(model=model, datasets={"docs": dataset})
    return [next(batches) for _ in range(n_rows // 2)]


@pytest.fixture(scope="module")
def hf_batches(smollm2_hf):
    return real_stream(smollm2_hf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_dictionary_recovers_all_of_the_loss(request, backend, hf_batches):
    model: LanguageModel = request.getfixturevalue(backend)
    metrics = Evaluator(EvalConfig(total_eval_tokens=10_000)).evaluate(identity_sae(D_MODEL), hf_batches, model)
    assert metrics["metrics/explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["losses/mse_loss"] == 0.0
    assert metrics["metrics/ce_loss_spliced"] == metrics["metrics/ce_loss_clean"]
    assert metrics["metrics/ce_loss_recovered"] == 1.0
    assert metrics["metrics/kl_div_spliced"] == 0.0
    # zeroing layer 3's residual stream destroys the prediction (measured: clean 4.60, zero-ablated 13.86)
    assert metrics["metrics/ce_loss_clean"] < 6.0
    assert metrics["metrics/ce_loss_zero_ablation"] > metrics["metrics/ce_loss_clean"] + 2.0
    assert metrics["metrics/kl_div_zero_ablation"] > 1.0
    n_predicted = sum(int(batch["mask"][:, 1:].sum()) for batch in hf_batches)
    assert metrics["details/n_predicted_positions"] == n_predicted


def test_zero_dictionary_is_zero_ablation(smollm2_hf, hf_batches):
    zero = sae_with_weights(D_MODEL, torch.randn(D_MODEL, 64), torch.zeros(64, D_MODEL))
    metrics = Evaluator(EvalConfig(total_eval_tokens=10_000)).evaluate(zero, hf_batches, smollm2_hf)
    assert metrics["metrics/ce_loss_spliced"] == metrics["metrics/ce_loss_zero_ablation"]
    assert metrics["metrics/kl_div_spliced"] == metrics["metrics/kl_div_zero_ablation"]
    assert metrics["metrics/ce_loss_recovered"] == 0.0
    assert metrics["metrics/explained_variance"] < 0.05


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_transcoder_reading_resid_mid_is_spliced_at_mlp_out(request, backend):
    """The transcoder's input hook is only read during splicing, so even hook_resid_mid (which cannot be replaced)
    works; a zero transcoder is exactly the zero ablation of its output hook."""
    model: LanguageModel = request.getfixturevalue(backend)
    hook_in, hook_out = "blocks.3.hook_resid_mid", "blocks.3.hook_mlp_out"
    batches = real_stream(model, hook_points=(hook_in, hook_out))
    cfg = SAEConfig(
        d_model=D_MODEL, d_sae=64, hook_point_in=hook_in, hook_point_out=hook_out, norm_activation="inference",
        sparsity_include_decoder_norm=False,
    )  # fmt: skip
    zero = SparseAutoEncoder.from_config(cfg)
    with torch.no_grad():
        zero.W_D.zero_()
        zero.b_D.zero_()
    metrics = Evaluator(EvalConfig(total_eval_tokens=10_000)).evaluate(zero, batches, model)
    assert metrics["metrics/ce_loss_spliced"] == metrics["metrics/ce_loss_zero_ablation"]
    assert metrics["metrics/ce_loss_recovered"] == 0.0
    assert metrics["metrics/ce_loss_zero_ablation"] > metrics["metrics/ce_loss_clean"]


def test_downstream_budget_and_mask_alignment(smollm2_hf, hf_batches):
    """Next-token CE by hand for the first 20 document tokens: positions whose next token is one of them."""
    cfg = EvalConfig(total_eval_tokens=10_000, downstream_tokens=20)
    metrics = Evaluator(cfg).evaluate(identity_sae(D_MODEL), hf_batches, smollm2_hf)
    batch = hf_batches[0]
    positions = limit_mask(batch["mask"], 20)
    logits = smollm2_hf.logits_with_replacements(batch["tokens"], batch["attention_mask"])
    log_probs = logits[:, :-1].log_softmax(-1).gather(-1, batch["tokens"][:, 1:, None]).squeeze(-1)
    expected = -log_probs[positions[:, 1:]].mean().item()
    assert metrics["details/n_predicted_positions"] == int(positions[:, 1:].sum())
    assert metrics["metrics/ce_loss_clean"] == pytest.approx(expected, rel=1e-6)
    assert metrics["details/n_tokens"] == sum(int(b["mask"].sum()) for b in hf_batches)  # budget is downstream only


# ---- evaluate_sae ----
EVAL_TOKENS = 150  # fewer than the cache's document tokens, and not a whole number of rows


@pytest.fixture(scope="module")
def saved_sae(tmp_path_factory) -> Path:
    """A TopK SAE at layer 3 with a dataset-wise scale (c_in = sqrt(576) / 40 = 0.6), saved unfolded."""
    torch.manual_seed(0)
    cfg = SAEConfig(
        d_model=D_MODEL,
        d_sae=256,
        hook_point_in=HOOK,
        hook_point_out=HOOK,
        act_fn="topk",
        top_k=16,
        norm_activation="dataset-wise",
    )
    model = SparseAutoEncoder.from_config(cfg)
    model.set_dataset_average_activation_norm({HOOK: 40.0})
    path = tmp_path_factory.mktemp("sae")
    model.save_pretrained(path, fold_activation_scale=False)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    result = generate_activations(
        GenerateActivationsSettings(
            model=LanguageModelConfig(model_name="smollm2-135m"),
            dataset=DatasetConfig(dataset_name_or_path="python-docs", split="train[:20]"),
            hook_points=[HOOK],
            output_dir=str(tmp_path_factory.mktemp("cache") / "activations"),
            context_size=CONTEXT,
            model_batch_size=2,
            batch_size=2,
            total_tokens=8 * CONTEXT,
            num_workers=1,
        )
    )
    return result.output_dir


def eval_settings(sae_path: Path, source: dict, **overrides) -> EvaluateSAESettings:
    base = dict(
        sae={"pretrained_name_or_path": str(sae_path)},
        sae_name="layer3-topk",
        activation_factory=dict(
            sources=[source],
            target="activations-2d",
            hook_points=[HOOK],
            batch_size=2,
            context_size=CONTEXT,
            model_batch_size=2,
        ),
        model=LanguageModelConfig(model_name="smollm2-135m"),
        datasets={"docs": DatasetConfig(dataset_name_or_path="python-docs", split="train[:20]")},
        eval=EvalConfig(total_eval_tokens=EVAL_TOKENS),
    )
    return EvaluateSAESettings.model_validate({**base, **overrides})


@pytest.mark.slow
def test_evaluate_sae_from_a_dataset_and_from_its_cache_agree(saved_sae, cache_dir, tmp_path):
    output = tmp_path / "out" / "metrics.json"
    from_dataset = evaluate_sae(eval_settings(saved_sae, {"type": "dataset", "name": "docs"}, output_path=str(output)))
    cached_source = {"type": "activations", "name": "cache", "path": str(cache_dir), "num_workers": 0}
    from_cache = evaluate_sae(eval_settings(saved_sae, cached_source, datasets=None))
    assert from_dataset.metrics.keys() == from_cache.metrics.keys()
    assert from_dataset.metrics["details/n_tokens"] == EVAL_TOKENS
    assert "metrics/ce_loss_recovered" in from_cache.metrics  # downstream works from cached tokens
    for key, value in from_dataset.metrics.items():
        # same tokens, same backend: activations agree to float rounding
        assert from_cache.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    record = json.loads(output.read_text())
    assert record["sae_name"] == "layer3-topk" and record["metrics"] == from_dataset.metrics
    assert sum(record["frequency_histogram"]["counts"]) + record["frequency_histogram"]["n_dead"] == 256
    assert sorted(p.name for p in output.parent.iterdir()) == ["metrics.density.svg", "metrics.json"]  # no temp file


@pytest.mark.slow
def test_evaluate_sae_honours_fold_activation_scale(saved_sae, cache_dir):
    """Folding changes the feature scale by c_in but none of the reconstruction metrics (no model: no downstream)."""
    source = {"type": "activations", "name": "cache", "path": str(cache_dir), "num_workers": 0}
    runs = {
        fold: evaluate_sae(
            eval_settings(
                saved_sae,
                source,
                model=None,
                datasets=None,
                sae={"pretrained_name_or_path": str(saved_sae), "fold_activation_scale": fold},
            )
        ).metrics
        for fold in (False, True)
    }
    assert "metrics/ce_loss_clean" not in runs[True]
    for key in ("metrics/explained_variance", "metrics/l2_norm_error", "metrics/l0", "metrics/dead_fraction"):
        assert runs[True][key] == pytest.approx(runs[False][key], rel=1e-4), key
    assert runs[True]["metrics/l1"] == pytest.approx(runs[False]["metrics/l1"] / 0.6, rel=1e-4)


def test_downstream_with_1d_activations_is_refused_before_any_work(saved_sae):
    settings = eval_settings(saved_sae, {"type": "dataset", "name": "docs"})
    settings.activation_factory.target = ActivationFactoryTarget.ACTIVATIONS_1D
    with pytest.raises(ValueError, match="activations-2d, or set eval.compute_downstream=false"):
        evaluate_sae(settings)
