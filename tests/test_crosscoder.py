"""The crosscoder: exact values on fixed weights, per-head gating, the sparse path against the dense one, exact
folding with different norms per head, persistence (also of the reference system's `hook_points` key), the analysis
view (a feature is its heads' largest), and training through the generic initializer and trainer on masked 2-D
batches with exact resume. CPU, tiny sizes."""

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from dictionary_helpers import randomised as randomised_dictionary
from safetensors.torch import load_file

from lm_saes_core.models import CrossCoder, CrossCoderConfig, LossConfig, SparseDictionary, load_sparse_dictionary
from lm_saes_core.training import Initializer, InitializerConfig, Trainer, TrainerConfig, find_latest_checkpoint

HEADS = ["blocks.2.hook_resid_post", "blocks.4.hook_resid_post", "blocks.6.hook_resid_post"]
F64 = torch.float64


def crosscoder_config(act_fn: str = "relu", heads: int = 3, **fields) -> CrossCoderConfig:
    defaults = {"d_model": 4, "d_sae": 8, "heads": HEADS[:heads], "act_fn": act_fn, "top_k": 2,
                "norm_activation": "inference"}  # fmt: skip
    return CrossCoderConfig(**(defaults | fields))


def randomised(cfg: CrossCoderConfig, seed: int = 0) -> CrossCoder:
    return randomised_dictionary(CrossCoder, cfg, seed)


def batch(cfg: CrossCoderConfig, rows: int = 16, scales: tuple[float, ...] | None = None, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    scales = scales or (1.0,) * cfg.n_heads
    return {hook: scale * torch.randn(rows, cfg.d_model, generator=generator, dtype=cfg.dtype)
            for hook, scale in zip(cfg.heads, scales, strict=True)}  # fmt: skip


# ------------------------------------------------------------------ exact values


def fixed_crosscoder(act_fn: str = "relu", **fields) -> CrossCoder:
    cfg = crosscoder_config(act_fn, heads=2, d_model=2, d_sae=3, dtype="float64", **fields)
    model = CrossCoder(cfg)
    with torch.no_grad():
        model.W_E.copy_(torch.tensor([[[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]], [[2.0, 0.0, 0.0], [0.0, -1.0, 1.0]]]))
        model.b_E.copy_(torch.tensor([[0.5, 0.0, 0.0], [0.0, 0.5, -1.0]]))
        model.W_D.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]]]))
        model.b_D.copy_(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    return model


def test_fixed_weights_by_hand():
    """x_0 = [1, 2], x_1 = [1, 1]: h = x_0 W_E[0] + x_1 W_E[1] + b_E[0] + b_E[1]
    = [1, 2, 1] + [2, -1, 1] + [0.5, 0.5, -1] = [3.5, 1.5, 1]; relu (no gating) keeps all; y_0 = f W_D[0] + b_D[0]
    = [3.5 + 1, 1.5 + 1] + [0, 1] = [4.5, 3.5]; y_1 = [7, 3] + [-1, 0] = [6, 3]."""
    model = fixed_crosscoder(sparsity_include_decoder_norm=False)
    x = {HEADS[0]: torch.tensor([[1.0, 2.0]], dtype=F64), HEADS[1]: torch.tensor([[1.0, 1.0]], dtype=F64)}
    f, h = model.encode(model.prepare(x).input, return_hidden_pre=True)
    assert h.tolist() == [[[3.5, 1.5, 1.0], [3.5, 1.5, 1.0]]]  # one shared pre-activation, repeated per head
    assert f.tolist() == [[[3.5, 1.5, 1.0], [3.5, 1.5, 1.0]]]
    reconstruction = model.reconstruct(x)
    assert reconstruction[HEADS[0]].tolist() == [[4.5, 3.5]] and reconstruction[HEADS[1]].tolist() == [[6.0, 3.0]]
    assert model.encode_batch(x).tolist() == [[3.5, 1.5, 1.0]] and model.n_analysed_features == 3


def test_topk_gates_each_head_by_its_own_decoder_norms():
    """h = [3.5, 1.5, 1]; head 0 norms [1, 1, sqrt2] -> scores [3.5, 1.5, 1.41]: top 2 = features 0, 1; head 1 norms
    [2, 0, 3] -> scores [7, 0, 3]: top 2 = features 0, 2."""
    model = fixed_crosscoder("topk", top_k=2)
    x = {HEADS[0]: torch.tensor([[1.0, 2.0]], dtype=F64), HEADS[1]: torch.tensor([[1.0, 1.0]], dtype=F64)}
    f = model.encode(model.prepare(x).input)
    assert f.tolist() == [[[3.5, 1.5, 0.0], [3.5, 0.0, 1.0]]]
    assert model.encode_batch(x).tolist() == [[3.5, 1.5, 1.0]]  # the heads' largest


def test_decoder_similarities_across_heads():
    model = fixed_crosscoder()
    products = model.decoder_inner_products()
    assert products.shape == (3, 2, 2)
    assert products[0].tolist() == [[1.0, 2.0], [2.0, 4.0]] and products[2].tolist() == [[2.0, 3.0], [3.0, 9.0]]
    similarities = model.decoder_similarities()
    torch.testing.assert_close(similarities[0], torch.ones(2, 2, dtype=F64))
    assert similarities[2, 0, 1].item() == pytest.approx(3 / (2**0.5 * 3))


def test_metrics_per_head_by_hand():
    """Head norms [1, 1, sqrt2] and [2, 0, 3]; features 0 (head 0) and 2 (head 1) fire: head 0's share is the mean of
    1/3 and sqrt2/(sqrt2 + 3). Head 0's reconstruction is exact, head 1's off by 1 in one of two tokens."""
    model = fixed_crosscoder()
    f = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=F64)
    label = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[-1.0, 0.0], [0.0, 0.0]]], dtype=F64)  # (N, H, D)
    reconstructed = label.clone()
    reconstructed[0, 1, 0] += 1.0
    stats = {key: value.item() for key, value in model.group_statistics(label, reconstructed, f).items()}
    head0, head1 = (f"crosscoder_metrics/{hook}" for hook in HEADS[:2])
    share0 = (1 / 3 + 2**0.5 / (2**0.5 + 3)) / 2
    assert stats[f"{head0}/decoder_norm_share"] == pytest.approx(share0)
    assert stats[f"{head1}/decoder_norm_share"] == pytest.approx(1 - share0)
    assert stats[f"{head0}/l0"] == 0.5 and stats[f"{head1}/l0"] == 0.5
    assert stats["crosscoder_metrics/l0_features"] == 1.0  # features 0 and 2 in token 0, none in token 1
    assert stats[f"{head0}/explained_variance"] == 1.0 and stats[f"{head0}/l_rec"] == 0.0
    # head 1: squared errors [1, 0] -> mean 0.5; labels [2, 0] around their mean 1 -> spread 1
    assert stats[f"{head1}/l_rec"] == 0.5 and stats[f"{head1}/explained_variance"] == 0.5


# ------------------------------------------------------------------ sparse path, folding, persistence


@pytest.mark.parametrize("act_fn", ["topk", "batchtopk"])
def test_sparse_path_equals_the_dense_path_in_values_and_gradients(act_fn):
    cfg = crosscoder_config(act_fn, d_sae=64, top_k=4, dtype="float64")
    dead = torch.rand(3 * 64, generator=torch.Generator().manual_seed(3)) > 0.5
    loss = LossConfig(sparsity_loss_type="tanh", l1_coefficient=0.1, auxk_coefficient=0.5, k_aux=8).coefficients()
    results = {}
    for sparse in (True, False):
        model = randomised(cfg)
        model.sparse_kernels = sparse
        out = model.compute_loss(batch(cfg), loss, dead)
        out.loss.backward()
        results[sparse] = (out, {name: p.grad.clone() for name, p in model.named_parameters()})
    (sparse_out, sparse_grads), (dense_out, dense_grads) = results[True], results[False]
    for field in ("loss", "l_rec", "l_sparsity", "l_aux", "feature_acts", "reconstructed"):
        torch.testing.assert_close(getattr(sparse_out, field), getattr(dense_out, field), rtol=1e-12, atol=1e-12)
    assert sparse_out.l_aux > 0
    for name, grad in dense_grads.items():
        torch.testing.assert_close(sparse_grads[name], grad, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "topk", "batchtopk"])
@pytest.mark.parametrize("gating", [True, False])
def test_folding_is_exact_with_different_norms_per_head(act_fn, gating):
    cfg = crosscoder_config(act_fn, d_sae=16, norm_activation="dataset-wise", sparsity_include_decoder_norm=gating)
    model = randomised(cfg)
    raw = batch(cfg, rows=64, scales=(1.0, 4.0, 0.25))
    model.set_dataset_average_activation_norm({hook: raw[hook].norm(dim=-1).mean().item() for hook in HEADS})
    model.eval()
    if act_fn in ("jumprelu", "batchtopk"):
        with torch.no_grad():  # thresholds at midpoints of the scores, so folding them matters
            f, h = model.encode(model.prepare(raw).input, return_hidden_pre=True)
            scores = (h * (model.decoder_norm() if gating else 1.0)).relu()
            medians = scores.quantile(0.5, dim=0, interpolation="midpoint")  # (H, F)
            if act_fn == "jumprelu":
                model.activation_function.log_jumprelu_threshold.copy_(medians.clamp(min=1e-3).log())
            else:
                model.activation_function.topk_threshold.copy_(medians.mean(-1))
    expected, features = model.reconstruct(raw), model.encode_batch(raw)
    model.fold_activation_scale()
    assert model.cfg.norm_activation == "inference"
    torch.testing.assert_close(model.reconstruct(raw), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.encode_batch(raw), features, rtol=1e-5, atol=1e-5)  # same scale as trained


@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "topk", "batchtopk"])
def test_save_load_gives_identical_outputs(tmp_path, act_fn):
    cfg = crosscoder_config(act_fn, d_sae=16, norm_activation="dataset-wise")
    model = randomised(cfg)
    raw = batch(cfg, rows=32, scales=(1.0, 2.0, 3.0))
    model.set_dataset_average_activation_norm({hook: 2.0 + i for i, hook in enumerate(HEADS)})
    model.train()
    model.encode(model.prepare(raw).input)  # BatchTopK's per-head inference thresholds from one batch
    model.eval()
    expected = model.reconstruct(raw)
    model.save_pretrained(tmp_path / "unfolded", fold_activation_scale=False)
    model.save_pretrained(tmp_path / "folded")
    assert load_file(tmp_path / "folded" / "sae_weights.safetensors")["W_D"].shape == (3, 16, 4)
    for directory in ("unfolded", "folded"):
        loaded = load_sparse_dictionary(tmp_path / directory)
        assert type(loaded) is CrossCoder
        torch.testing.assert_close(loaded.reconstruct(raw), expected, rtol=1e-5, atol=1e-5)
    # The reference system names the heads `hook_points`.
    config_file = tmp_path / "unfolded" / "config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**{k: v for k, v in saved.items() if k != "heads"}, "hook_points": HEADS}))
    assert load_sparse_dictionary(tmp_path / "unfolded").cfg.heads == HEADS


# ------------------------------------------------------------------ training through the generic trainer

D_MODEL, N_TRUE, ROWS, CONTEXT = 16, 32, 4, 32


def crosscoder_batch(index: int) -> dict[str, torch.Tensor]:
    """2-D batches (4 contexts of 32 positions, some padding masked out): the heads read the same sparse codes through
    their own directions; a quarter of the codes exist in one head only (as features of one model only)."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(3, N_TRUE, D_MODEL, generator=g) / D_MODEL**0.5
    for head in range(3):
        directions[head, head * 8 // 3 : (head + 1) * 8 // 3] = 0  # codes missing from this head
    g = torch.Generator().manual_seed(900 + index)
    n = ROWS * CONTEXT
    active = torch.multinomial(torch.ones(n, N_TRUE), 3, generator=g)
    codes = torch.zeros(n, N_TRUE).scatter_(1, active, torch.rand(n, 3, generator=g) + 0.5)
    values = {hook: (5 * codes @ directions[h]).reshape(ROWS, CONTEXT, D_MODEL) for h, hook in enumerate(HEADS)}
    mask = torch.ones(ROWS, CONTEXT, dtype=torch.bool)
    mask[:, 0] = False
    mask[index % ROWS, 24:] = False
    for value in values.values():
        value[~mask] = 1e3  # garbage where the mask is off: it must not be trained on
    return values | {"mask": mask, "tokens": torch.zeros(ROWS, CONTEXT, dtype=torch.long)}


def crosscoder_stream() -> Iterator[dict[str, torch.Tensor]]:
    for index in itertools.count():
        yield crosscoder_batch(index)


def train_config(path: Path, steps: int, **fields) -> TrainerConfig:
    defaults = dict(total_training_tokens=steps * (ROWS * CONTEXT - ROWS - 8), lr=5e-3, log_frequency=10,
                    n_checkpoints=0, exp_result_path=str(path))  # fmt: skip
    return TrainerConfig(**(defaults | fields))


def initialized(act_fn: str = "topk"):
    torch.manual_seed(0)
    cfg = CrossCoderConfig(d_model=D_MODEL, d_sae=64, heads=HEADS, act_fn=act_fn, top_k=4)
    return Initializer(InitializerConfig()).initialize(cfg, crosscoder_stream())


def test_the_generic_trainer_learns_it_per_head_from_masked_batches(tmp_path):
    model, stream = initialized()
    result = Trainer(train_config(tmp_path, 150)).fit(model, stream)
    metrics = result.last_metrics
    for hook in HEADS:
        assert metrics[f"crosscoder_metrics/{hook}/explained_variance"] > 0.8, metrics
        assert metrics[f"crosscoder_metrics/{hook}/l0"] == pytest.approx(4.0)  # topk: k per head
    assert 4.0 <= metrics["crosscoder_metrics/l0_features"] <= 12.0 and metrics["metrics/l0"] == pytest.approx(12.0)
    shares = [metrics[f"crosscoder_metrics/{hook}/decoder_norm_share"] for hook in HEADS]
    assert sum(shares) == pytest.approx(1.0) and min(shares) > 0.2  # mostly shared codes: about a third each
    assert result.n_tokens == 150 * (ROWS * CONTEXT - ROWS - 8)  # the masked positions are not counted
    # The 8 codes missing from one head each are learnt by features with almost no decoder in that head (measured: 8
    # features with a head's share under 0.1; per-head EV 0.98, 0.97, 0.97).
    loaded = load_sparse_dictionary(tmp_path)
    share = loaded.decoder_norm() / loaded.decoder_norm().sum(0)  # (H, F): each head's share of a feature
    assert (share.min(0).values < 0.1).sum() >= 6


def test_checkpoint_and_resume_reproduce_the_uninterrupted_run_bitwise(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    model, stream = initialized("batchtopk")
    Trainer(train_config(whole, 12, checkpoint_every_steps=6)).fit(model, stream)
    model, stream = initialized("batchtopk")
    Trainer(train_config(part, 12, checkpoint_every_steps=6)).fit(model, itertools.islice(stream, 8))
    checkpoint = find_latest_checkpoint(part)
    fresh = SparseDictionary.from_config(model.cfg)
    Trainer(train_config(part, 12, checkpoint_every_steps=6)).fit(fresh, crosscoder_stream(), resume_from=checkpoint)
    expected, actual = load_file(whole / "sae_weights.safetensors"), load_file(part / "sae_weights.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
