"""The SAE/transcoder model: exact values on fixed small weights, gradients, folding, persistence, errors, and the
sparse TopK kernels against the dense path. All CPU, tiny sizes."""

import functools
import json
import math

import pytest
import torch
from pydantic import ValidationError

from lm_saes_core.config import ConfigError
from lm_saes_core.models import (
    LossConfig,
    PretrainedSAE,
    SAEConfig,
    SparseAutoEncoder,
    kernels,
    load_sparse_dictionary,
)
from lm_saes_core.models import activation_functions as act

F64 = torch.float64
# The fixed weights of the reference test suite: D=2, F=4.
W_E = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
B_E = [3.0, 2.0, 3.0, 4.0]
W_D = [[1.0, 5.0], [2.0, 6.0], [3.0, 7.0], [4.0, 8.0]]
B_D = [1.0, 2.0]
# Decoder row norms sqrt(26), sqrt(40), sqrt(58), sqrt(80). Inputs and their pre-activations h = x W_E + b_E:
X = [[0.5, -0.25], [-1.0, 1.0]]
H = [[2.25, 1.5, 2.75, 4.0], [7.0, 6.0, 7.0, 8.0]]
NORMS = [math.sqrt(26), math.sqrt(40), math.sqrt(58), math.sqrt(80)]
# Gated scores h * n: token 0 ~ [11.47, 9.49, 20.94, 35.78], token 1 ~ [35.69, 37.95, 53.31, 71.55].


def fixed_sae(act_fn: str = "relu", **kwargs) -> SparseAutoEncoder:
    cfg = SAEConfig(
        d_model=2,
        d_sae=4,
        hook_point_in="x",
        hook_point_out="x",
        act_fn=act_fn,
        norm_activation="inference",
        dtype="float64",
        **kwargs,
    )
    model = SparseAutoEncoder.from_config(cfg)
    with torch.no_grad():
        model.W_E.copy_(torch.tensor(W_E))
        model.b_E.copy_(torch.tensor(B_E))
        model.W_D.copy_(torch.tensor(W_D))
        model.b_D.copy_(torch.tensor(B_D))
        if act_fn == "jumprelu":
            model.activation_function.log_jumprelu_threshold.copy_(tensor([10.0, 10.0, 30.0, 40.0]).log())
    return model


def tensor(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def loss(**fields):
    """The coefficients of a loss config at full strength (no warm-up), as `compute_loss` takes them."""
    return LossConfig(**fields).coefficients()


# ------------------------------------------------------------------ exact forward values


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize(
    ("act_fn", "kwargs", "features", "reconstruction"),
    [
        ("relu", {}, H, [[30.5, 73.5], [73.0, 186.0]]),
        # theta = [10, 10, 30, 40] on the gated scores: token 0 keeps feature 0 only, token 1 keeps all.
        ("jumprelu", {}, [[2.25, 0, 0, 0], H[1]], [[3.25, 13.25], [73.0, 186.0]]),
        # Top 2 gated scores per token: features 2, 3 in both tokens.
        ("topk", {"top_k": 2}, [[0, 0, 2.75, 4], [0, 0, 7, 8]], [[25.25, 53.25], [54.0, 115.0]]),
        # Top 3: gating ranks feature 1 (6 * sqrt40 = 37.9) above feature 0 (7 * sqrt26 = 35.7) in token 1 ...
        ("topk", {"top_k": 3}, [[2.25, 0, 2.75, 4], [0, 6, 7, 8]], [[27.5, 64.5], [66.0, 151.0]]),
        # ... without gating the plain pre-activations rank feature 0 (7) above feature 1 (6).
        (
            "topk",
            {"top_k": 3, "sparsity_include_decoder_norm": False},
            [[2.25, 0, 2.75, 4], [7, 0, 7, 8]],
            [[27.5, 64.5], [61.0, 150.0]],
        ),
        # The 2 * 2 largest gated scores of the batch: 71.55, 53.31, 37.95 (token 1) and 35.78 (token 0, feature 3).
        ("batchtopk", {"top_k": 2}, [[0, 0, 0, 4], [0, 6, 7, 8]], [[17.0, 34.0], [66.0, 151.0]]),
    ],
)
def test_forward_values_on_fixed_weights(act_fn, kwargs, features, reconstruction, sparse):
    model = fixed_sae(act_fn, **kwargs)
    model.sparse_kernels = sparse
    f, h = model.encode(tensor(X), return_hidden_pre=True)
    torch.testing.assert_close(h, tensor(H))
    torch.testing.assert_close(f, tensor(features))
    torch.testing.assert_close(model(tensor(X)), tensor(reconstruction))
    # 3-D input gives the same values per token.
    torch.testing.assert_close(model(tensor([X])), tensor([reconstruction]))


def test_batchtopk_training_sets_threshold_and_eval_uses_it():
    model = fixed_sae("batchtopk", top_k=2)
    model(tensor(X))
    # The first batch sets the threshold to its smallest kept score, 4 * sqrt(80).
    assert model.activation_function.topk_threshold.item() == pytest.approx(4 * math.sqrt(80))
    model(tensor(X))  # EMA of two equal batch thresholds stays put
    assert model.activation_function.topk_threshold.item() == pytest.approx(4 * math.sqrt(80))
    model.eval()
    with torch.no_grad():
        model.activation_function.topk_threshold.fill_(36.0)
    for sparse in (True, False):
        model.sparse_kernels = sparse
        # Eval mode compares every token with 36 on its own: token 0 keeps nothing, token 1 features 1..3.
        torch.testing.assert_close(model.encode(tensor(X)), tensor([[0, 0, 0, 0], [0, 6, 7, 8]]))
        torch.testing.assert_close(model(tensor(X)), tensor([[1.0, 2.0], [66.0, 151.0]]))


def test_batchtopk_threshold_is_an_ema():
    model = fixed_sae("batchtopk", top_k=2)
    with torch.no_grad():
        model.activation_function.topk_threshold.fill_(10.0)
    model(tensor(X))
    expected = 0.99 * 10.0 + 0.01 * 4 * math.sqrt(80)
    assert model.activation_function.topk_threshold.item() == pytest.approx(expected)


def test_scale_factors_worked_check():
    x = tensor([[1.0, 2.0], [3.0, 4.0]])
    model = fixed_sae("relu")
    model.cfg.norm_activation = "token-wise"
    c_in, c_out = model.scale_factors({"x": x})
    torch.testing.assert_close(c_in, tensor([[math.sqrt(2) / math.sqrt(5)], [math.sqrt(2) / 5]]))
    torch.testing.assert_close(c_out, c_in)
    cfg = SAEConfig(d_model=2, d_sae=4, hook_point_in="in", hook_point_out="out", norm_activation="dataset-wise")
    transcoder = SparseAutoEncoder.from_config(cfg)
    transcoder.set_dataset_average_activation_norm({"in": 3.0, "out": 2.0})
    c_in, c_out = transcoder.scale_factors({"in": x, "out": x})
    assert (c_in.item(), c_out.item()) == pytest.approx((math.sqrt(2) / 3, math.sqrt(2) / 2))
    assert transcoder.cfg.dataset_average_activation_norm == {"in": 3.0, "out": 2.0}


def test_decoder_norm_setters():
    model = fixed_sae("relu")
    model.set_decoder_to_fixed_norm(7.3, force_exact=True)
    torch.testing.assert_close(model.decoder_norm(), torch.full((4,), 7.3, dtype=F64))
    model = fixed_sae("relu")
    model.set_decoder_to_fixed_norm(7.3, force_exact=False)  # only rows longer than 7.3 (sqrt58, sqrt80) shrink
    torch.testing.assert_close(model.decoder_norm(), tensor([math.sqrt(26), math.sqrt(40), 7.3, 7.3]))
    model.init_encoder_with_decoder_transpose(0.5)
    torch.testing.assert_close(model.W_E, 0.5 * model.W_D.t())
    torch.testing.assert_close(model.encoder_norm(), 0.5 * model.decoder_norm())


# ------------------------------------------------------------------ JumpReLU gradient


def test_jumprelu_gradients_match_the_closed_form():
    # theta = 1, window 2, x = [0.5, 1.5, 2.5], upstream gradient 1 (one threshold per feature).
    x = tensor([[0.5, 1.5, 2.5]]).requires_grad_()
    log_threshold = torch.zeros(3, dtype=F64, requires_grad=True)
    y = act.jumprelu(x, log_threshold.exp(), window=2.0)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), tensor([[0.0, 1.5, 2.5]]))
    torch.testing.assert_close(x.grad, tensor([[0.0, 1.0, 1.0]]))
    # d/dlog(theta) = -theta^2 / window inside |x - theta| < 1, including x = 0.5 just below the threshold.
    torch.testing.assert_close(log_threshold.grad, tensor([-0.5, -0.5, 0.0]))


def test_jumprelu_threshold_gradient_sums_over_tokens_and_weights_by_upstream():
    x = tensor([[[0.5, 1.5, 2.5], [1.2, -0.1, 0.9]]])  # (1, 2, 3): tokens on two leading dims
    threshold = torch.ones(3, dtype=F64, requires_grad=True)
    y = act.jumprelu(x, threshold, window=2.0)
    (y * tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])).sum().backward()
    # d/dtheta = g * (-1/2) in the window, x > 0: feature 0: tokens 0.5 (g=1) and 1.2 (g=4); feature 1: 1.5 (g=2)
    # (-0.1 is not positive); feature 2: 0.9 (g=6) (2.5 is outside the window).
    torch.testing.assert_close(threshold.grad, tensor([-2.5, -1.0, -3.0]))


def test_gated_jumprelu_equals_jumprelu_of_the_gated_scores_in_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(64, 16, dtype=F64)
    W_D = (torch.rand(16, 8, dtype=F64) + 0.2).requires_grad_()
    log_threshold = (torch.randn(16, dtype=F64) * 0.3).requires_grad_()
    upstream = torch.randn(64, 16, dtype=F64)
    results = []
    for fused in (True, False):
        h = x.clone().requires_grad_()
        norm, threshold = W_D.norm(dim=1), log_threshold.exp()
        if fused:
            f = act.gated_jumprelu(h, norm, threshold, window=0.5)
        else:
            f = act.jumprelu(h * norm, threshold, window=0.5) / norm
        W_D.grad = log_threshold.grad = None
        (f * upstream).sum().backward()
        results.append((f.detach(), h.grad, log_threshold.grad, W_D.grad))
    (f_fused, h_fused, t_fused, w_fused), (f_ref, h_ref, t_ref, w_ref) = results
    torch.testing.assert_close(f_fused, f_ref)
    torch.testing.assert_close(h_fused, h_ref)
    torch.testing.assert_close(t_fused, t_ref)
    assert t_ref.abs().sum() > 0  # some entries were inside the window
    assert w_fused is None and w_ref.abs().max() < 1e-12  # gating passes no gradient to the decoder in either form


# ------------------------------------------------------------------ BatchTopK inference threshold


def test_batchtopk_eval_threshold_reproduces_training_sparsity():
    torch.manual_seed(0)
    cfg = SAEConfig(
        d_model=16, d_sae=64, hook_point_in="x", hook_point_out="x", act_fn="batchtopk", top_k=4,
        norm_activation="inference",
    )  # fmt: skip
    model = SparseAutoEncoder.from_config(cfg)
    mixing = torch.randn(16, 16)

    def batch() -> torch.Tensor:
        return torch.randn(256, 16) @ mixing + 0.5

    with torch.no_grad():
        # The first batch sets the threshold; the EMA (momentum 0.99) then averages out the batch-to-batch noise.
        for _ in range(100):
            model(batch())
        train_l0 = torch.stack([(model.encode(batch()) > 0).sum(-1).float().mean() for _ in range(10)]).mean()
        model.eval()
        eval_l0 = torch.stack([(model.encode(batch()) > 0).sum(-1).float().mean() for _ in range(10)]).mean()
    assert train_l0.item() == pytest.approx(4.0, abs=1e-6)
    # Tolerance: 5% of k. The per-batch threshold fluctuates; the EMA averages it.
    assert eval_l0.item() == pytest.approx(train_l0.item(), rel=0.05)


def test_select_batch_topk_matches_the_whole_batch_search_also_on_its_fallback():
    torch.manual_seed(1)
    scores = torch.randn(32, 64, dtype=F64)
    heavy = scores.clone()
    heavy[3] += 10.0  # row 3 holds more than 4k of the batch's top entries: the fast search must fall back
    for s in (scores, heavy):
        selection, threshold = kernels.select_batch_topk(s, k=2)
        reference_threshold = s.reshape(-1).topk(64).values.min()
        assert threshold.item() == reference_threshold.item()
        dense = kernels.densify(selection, s[selection.rows, selection.cols], *s.shape)
        torch.testing.assert_close(dense, s * (s >= reference_threshold))
        assert len(selection.rows) == 64 and torch.equal(selection.rows, selection.rows.sort().values)
        assert torch.equal(selection.offsets, kernels.row_offsets(selection.rows, 32))
    assert (selection.rows == 3).sum().item() > 8  # the heavy row holds more than 4k pairs: rows differ in length


# ------------------------------------------------------------------ loss terms by hand


def masked_batch() -> dict[str, torch.Tensor]:
    """One sequence of 3 tokens, the last one padding (garbage activations that the mask must exclude)."""
    return {"x": tensor([[X[0], X[1], [100.0, -100.0]]]), "mask": torch.tensor([[True, True, False]])}


def test_reconstruction_loss_is_a_masked_mean():
    model = fixed_sae("relu")
    out = model.compute_loss(masked_batch())
    # Token 0: (30.5 - 0.5)^2 + (73.5 + 0.25)^2; token 1: (73 + 1)^2 + (186 - 1)^2; mean over the 2 real tokens.
    assert out.l_rec.item() == (900 + 5439.0625 + 5476 + 34225) / 2
    assert out.loss.item() == out.l_rec.item()
    assert out.n_tokens == 2
    assert out.feature_acts.shape == (2, 4) and out.label.shape == (2, 2)
    assert out.l_sparsity is None and out.l_lp is None and out.l_aux is None
    # The same tokens as a 1-D batch (no mask) give the same loss.
    assert model.compute_loss({"x": tensor(X)}).l_rec.item() == out.l_rec.item()


def contributions() -> torch.Tensor:
    """f_i * ||W_D,i|| of the relu model on the two real tokens."""
    return tensor(H) * tensor(NORMS)


def tanh_quad(c: torch.Tensor) -> torch.Tensor:
    """One scalar per batch: p_i = mean over tokens of tanh(0.01 f_i n_i), then sum_i p_i (1 + p_i / 0.5)."""
    frequency = torch.tanh(0.01 * c).mean(0)
    return 0.5 * (frequency * (1 + frequency / 0.5)).sum()


@pytest.mark.parametrize(
    ("loss_type", "p", "expected"),
    [
        ("power", 1, lambda c: 0.5 * c.sum(-1).mean()),
        ("power", 2, lambda c: 0.5 * c.pow(2).sum(-1).sqrt().mean()),
        ("tanh", 1, lambda c: 0.5 * torch.tanh(0.01 * c).sum(-1).mean()),
        ("tanh-quad", 1, tanh_quad),
    ],
)
def test_sparsity_losses(loss_type, p, expected):
    model = fixed_sae("relu")
    out = model.compute_loss(
        masked_batch(),
        loss(sparsity_loss_type=loss_type, l1_coefficient=0.5, p=p, tanh_stretch_coefficient=0.01, frequency_scale=0.5),
    )
    by_hand = expected(contributions()).item()
    if loss_type == "power" and p == 1:
        by_hand_sum = (
            2.25 * NORMS[0] + 1.5 * NORMS[1] + 2.75 * NORMS[2] + 4 * NORMS[3]
            + 7 * NORMS[0] + 6 * NORMS[1] + 7 * NORMS[2] + 8 * NORMS[3]
        )  # fmt: skip
        assert by_hand == pytest.approx(0.5 * by_hand_sum / 2)
    assert out.l_sparsity.item() == pytest.approx(by_hand, rel=1e-12)
    assert out.loss.item() == pytest.approx(out.l_rec.item() + by_hand, rel=1e-12)
    out.loss.backward()  # tanh-quad must not crash (upstream defect B4)


def test_jumprelu_lp_loss():
    model = fixed_sae("jumprelu")
    out = model.compute_loss(masked_batch(), loss(lp_coefficient=0.1))
    # theta = [10, 10, 30, 40]: sum_i relu(theta_i - h_i) * n_i per token.
    token0 = 7.75 * NORMS[0] + 8.5 * NORMS[1] + 27.25 * NORMS[2] + 36 * NORMS[3]
    token1 = 3 * NORMS[0] + 4 * NORMS[1] + 23 * NORMS[2] + 32 * NORMS[3]
    assert out.l_lp.item() == pytest.approx(0.1 * (token0 + token1) / 2, rel=1e-12)
    # Reconstructions [3.25, 13.25] and [73, 186] against the inputs.
    assert out.l_rec.item() == (2.75**2 + 13.5**2 + 74**2 + 185**2) / 2
    assert out.loss.item() == pytest.approx(out.l_rec.item() + out.l_lp.item(), rel=1e-12)
    with pytest.raises(ValueError, match="jumprelu"):
        fixed_sae("relu").compute_loss(masked_batch(), loss(lp_coefficient=0.1))


def test_auxk_loss_relu_by_hand():
    model = fixed_sae("relu")
    dead = torch.tensor([True, False, False, True])
    out = model.compute_loss(masked_batch(), loss(auxk_coefficient=0.25), dead)
    # e = y - y_hat: [-30, -73.75] and [-74, -185]; the dead latents 0, 3 reconstruct 2.25 W_D0 + 4 W_D3 =
    # [18.25, 43.25] and 7 W_D0 + 8 W_D3 = [39, 99].
    token0 = (-30 - 18.25) ** 2 + (-73.75 - 43.25) ** 2
    token1 = (-74 - 39) ** 2 + (-185 - 99) ** 2
    assert out.l_aux.item() == 0.25 * (token0 + token1) / 2
    assert out.loss.item() == out.l_rec.item() + out.l_aux.item()
    none_dead = model.compute_loss(masked_batch(), loss(auxk_coefficient=0.25), torch.zeros(4, dtype=torch.bool))
    assert none_dead.l_aux.item() == 0.0
    with pytest.raises(ValueError, match="dead_latents"):
        model.compute_loss(masked_batch(), loss(auxk_coefficient=0.25))


@pytest.mark.parametrize("sparse", [True, False])
def test_auxk_loss_topk_keeps_top_dead_latents(sparse):
    model = fixed_sae("topk", top_k=2)
    model.sparse_kernels = sparse
    out = model.compute_loss(
        masked_batch(), loss(auxk_coefficient=1.0, k_aux=1), torch.tensor([True, False, False, True])
    )
    # Main: features 2, 3 -> y_hat [25.25, 53.25] and [54, 115]. Aux: the top-1 dead latent by gated score is
    # feature 3 in both tokens (35.78 > 11.47, 71.55 > 35.69): 4 W_D3 = [16, 32], 8 W_D3 = [32, 64].
    token0 = (0.5 - 25.25 - 16) ** 2 + (-0.25 - 53.25 - 32) ** 2
    token1 = (-1 - 54 - 32) ** 2 + (1 - 115 - 64) ** 2
    assert out.l_aux.item() == (token0 + token1) / 2
    # The auxiliary reconstruction of the residual trains the dead latents only, not the main reconstruction.
    out.l_aux.backward()
    assert model.W_D.grad[[1, 2]].abs().sum().item() == 0.0
    assert model.W_D.grad[3].abs().sum().item() > 0.0


# ------------------------------------------------------------------ sparse TopK path == dense path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gating", [True, False])
@pytest.mark.parametrize("act_fn", ["topk", "batchtopk"])
def test_sparse_kernels_equal_the_dense_path(act_fn, gating, dtype):
    torch.manual_seed(0)
    cfg = SAEConfig(
        d_model=24, d_sae=192, d_out=20, hook_point_in="in", hook_point_out="out", act_fn=act_fn, top_k=6,
        use_skip_connection=True, norm_activation="inference", sparsity_include_decoder_norm=gating, dtype=dtype,
    )  # fmt: skip
    model = SparseAutoEncoder.from_config(cfg)
    with torch.no_grad():
        model.b_E.normal_(0, 0.1)
        model.b_D.normal_()
        model.W_skip.normal_(0, 0.1)
    batch = {"in": torch.randn(2, 40, 24, dtype=dtype), "out": torch.randn(2, 40, 20, dtype=dtype)}
    batch["mask"] = torch.rand(2, 40) > 0.2
    dead = torch.rand(192) > 0.5
    results = {}
    for sparse in (True, False):
        model.sparse_kernels = sparse
        model.zero_grad()
        out = model.compute_loss(
            batch, loss(sparsity_loss_type="tanh", l1_coefficient=0.1, auxk_coefficient=0.5, k_aux=16), dead
        )
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results[sparse] = (out, grads)
    (sparse_out, sparse_grads), (dense_out, dense_grads) = results[True], results[False]
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for field in ("loss", "l_rec", "l_sparsity", "l_aux", "feature_acts", "reconstructed"):
        torch.testing.assert_close(getattr(sparse_out, field), getattr(dense_out, field), **tolerance)
    for name, grad in dense_grads.items():
        relative = ((sparse_grads[name] - grad).norm() / grad.norm()).item()
        assert relative < (1e-5 if dtype == torch.float32 else 1e-12), name


def plain_codec(x, W_E, b_E, W_D, *gating, window=0.5):
    """(h, f, f @ W_D) through autograd's own nodes: ReLU, or gated JumpReLU given (norms, thresholds)."""
    h = torch.addmm(b_E, x, W_E)
    f = act.gated_jumprelu(h, *gating, window) if gating else h.relu()
    return h, f, f @ W_D


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act_fn", ["relu", "jumprelu"])
def test_fused_codecs_give_the_values_and_gradients_of_plain_autograd(act_fn, dtype):
    """Every output has an upstream gradient (h's too), and every input takes one (x's too)."""
    torch.manual_seed(0)
    inputs = [torch.randn(50, 12, dtype=dtype), torch.randn(12, 40, dtype=dtype), torch.randn(40, dtype=dtype),
              torch.randn(40, 10, dtype=dtype)]  # fmt: skip
    if act_fn == "jumprelu":  # norms, and thresholds that keep some of the scores h * n and put others in the window
        inputs += [torch.rand(40, dtype=dtype) + 0.5, torch.rand(40, dtype=dtype)]
    upstream = [torch.randn(50, 40, dtype=dtype), torch.randn(50, 40, dtype=dtype), torch.randn(50, 10, dtype=dtype)]
    fused = kernels.relu_codec if act_fn == "relu" else lambda *a: kernels.gated_jumprelu_codec(*a, window=0.5)
    results = []
    for function in (plain_codec, fused):
        leaves = [tensor.clone().requires_grad_() for tensor in inputs]
        outputs = function(*leaves)
        torch.autograd.backward(outputs, upstream)
        grads = [leaf.grad for i, leaf in enumerate(leaves) if i != 4]  # the norms get no gradient (None)
        results.append([*outputs, *grads])
    if act_fn == "jumprelu":
        assert results[1][-1].abs().sum() > 0  # some scores lie in the thresholds' window
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, **tolerance)


def sparse_codec_case(act_fn, dtype, window):
    """Inputs of a codec where about 3% of the entries are active and token 0 has none; for JumpReLU, some scores lie
    inside the thresholds' window but below them: a few in a narrow window, over 10% in a wide one."""
    torch.manual_seed(0)
    x, W_E = torch.randn(60, 12, dtype=dtype), torch.randn(12, 80, dtype=dtype)
    x[0] = 0.0  # h = b_E < 0 on token 0: no active feature
    W_D, b_E = torch.randn(80, 10, dtype=dtype), torch.full((80,), -6.5, dtype=dtype)
    if act_fn == "relu":
        return [x, W_E, b_E, W_D]
    norm, cut = torch.rand(80, dtype=dtype) + 0.5, 1.8 if window < 1 else 4.7  # kept: h > theta / n = cut
    return [x, W_E, b_E + cut, W_D, norm, cut * norm]


@pytest.mark.parametrize("with_grad_h", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("act_fn", "window"), [("relu", None), ("jumprelu", 0.5), ("jumprelu", 16.0)])
def test_sparse_codec_path_gives_the_values_and_gradients_of_plain_autograd(act_fn, window, dtype, with_grad_h):
    """At low density the codecs take their sparse path (chosen by density, not forced) and equal plain autograd on
    every output and input gradient, with an L1 penalty's broadcast gradient on f and, or not, a gradient on h."""
    inputs = sparse_codec_case(act_fn, dtype, window)
    fused = kernels.relu_codec if act_fn == "relu" else functools.partial(kernels.gated_jumprelu_codec, window=window)
    plain = functools.partial(plain_codec, window=window)
    upstream_y, upstream_h = torch.randn(60, 10, dtype=dtype), torch.randn(60, 80, dtype=dtype)
    results = []
    for function in (plain, fused):
        leaves = [tensor.clone().requires_grad_(i != 4) for i, tensor in enumerate(inputs)]  # no gradient to norms
        h, f, y = function(*leaves)
        loss = (y * upstream_y).sum() + 0.1 * (f * leaves[3].norm(dim=1)).sum()  # reconstruction, L1
        if with_grad_h:
            loss = loss + (h * upstream_h).sum()
        loss.backward()
        results.append([h, f, y, *[leaf.grad for i, leaf in enumerate(leaves) if i != 4]])
    assert f.grad_fn.sparse  # the fused node took its sparse path
    active = results[0][1] != 0
    assert 0.01 < active.double().mean() < 0.06 and not active[0].any()
    if act_fn == "jumprelu":
        h, (norm, threshold) = results[0][0], inputs[4:]
        below = (h * norm > threshold - window / 2) & (h > 0) & ~active  # inactive, inside the window
        assert 0 < below.double().mean() < 0.1 if window < 1 else below.double().mean() > 0.1  # sampled or not
        assert results[0][-1][below.any(0)].abs().min() > 0
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, **tolerance)


def test_codec_path_switches_on_density():
    """Sparse at 2% active entries, dense at 50% (and for no rows), for a mask or the features themselves."""
    torch.manual_seed(0)
    scores = torch.rand(4096, 512)
    for density, sparse in ((0.02, True), (0.5, False)):
        assert kernels.codec_is_sparse(scores < density) is sparse
        assert kernels.codec_is_sparse(torch.where(scores < density, scores, 0.0)) is sparse
    assert not kernels.codec_is_sparse(torch.zeros(0, 512))
    x, W_E, W_D = torch.randn(256, 16), torch.randn(16, 512), torch.randn(512, 16)
    for shift, sparse in ((-8.0, True), (0.0, False)):  # about 2% and 50% active
        _, f, _ = kernels.relu_codec(x, W_E.requires_grad_(), torch.full((512,), shift), W_D)
        assert f.grad_fn.sparse is sparse


@pytest.mark.parametrize(
    ("act_fn", "penalty"),
    [("relu", {"sparsity_loss_type": "power"}), ("jumprelu", {"sparsity_loss_type": "power", "lp_coefficient": 0.1}),
     ("jumprelu", {"sparsity_loss_type": "l0"})],
)  # fmt: skip
def test_sparse_codec_training_step_equals_the_dense_one(act_fn, penalty):
    """A whole low-density step of a transcoder with a skip map: forced sparse codec path == forced dense path."""
    model, batch = _transcoder_case(act_fn, bias_mean=-1.0 if act_fn == "relu" else 0.0)  # 3-5% of features active
    results = []
    for sparse in (True, False):
        model.sparse_kernels = sparse
        results.append(_step(model, batch, penalty))
    assert 0.005 < (results[1][0].feature_acts != 0).double().mean() < 0.1
    _assert_same_step(*results)


def _transcoder_case(act_fn: str, bias_mean: float) -> tuple[SparseAutoEncoder, dict[str, torch.Tensor]]:
    """A float64 transcoder with a skip map (JumpReLU threshold 0.3, b_E ~ N(bias_mean, 0.1)) and a masked batch."""
    torch.manual_seed(0)
    cfg = SAEConfig(d_model=24, d_sae=96, d_out=20, hook_point_in="in", hook_point_out="out", act_fn=act_fn,
                    use_skip_connection=True, norm_activation="token-wise", dtype="float64")  # fmt: skip
    model = SparseAutoEncoder.from_config(cfg)
    model.activation_function.init_parameters(init_log_jumprelu_threshold_value=math.log(0.3))
    with torch.no_grad():
        model.b_E.normal_(bias_mean, 0.1)
    batch = {"in": torch.randn(2, 40, 24, dtype=F64), "out": torch.randn(2, 40, 20, dtype=F64)}
    batch["mask"] = torch.rand(2, 40) > 0.2
    return model, batch


def _step(model: SparseAutoEncoder, batch: dict[str, torch.Tensor], penalty: dict) -> tuple:
    """The loss output of one step and every parameter's gradient."""
    model.zero_grad()
    out = model.compute_loss(batch, loss(l1_coefficient=0.1, **penalty))
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


def _assert_same_step(one: tuple, other: tuple) -> None:
    """Two steps give the same outputs and the same (nonzero) gradients, to float64 rounding."""
    (one_out, one_grads), (other_out, other_grads) = one, other
    for field in ("loss", "l_rec", "l_sparsity", "feature_acts", "hidden_pre", "reconstructed"):
        torch.testing.assert_close(getattr(one_out, field), getattr(other_out, field), rtol=1e-12, atol=1e-12)
    for name, grad in other_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(one_grads[name], grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("act_fn", "penalty"),
    [("relu", {"sparsity_loss_type": "power"}), ("relu", {"sparsity_loss_type": "tanh"}),
     ("jumprelu", {"sparsity_loss_type": "power", "lp_coefficient": 0.1}), ("jumprelu", {"sparsity_loss_type": "l0"})],
)  # fmt: skip
def test_fused_training_step_equals_the_plain_path(monkeypatch, act_fn, penalty):
    model, batch = _transcoder_case(act_fn, bias_mean=0.0)
    fused = _step(model, batch, penalty)
    monkeypatch.setattr(SparseAutoEncoder, "_fused_codec", lambda self, rows: None)
    _assert_same_step(fused, _step(model, batch, penalty))


def test_aux_k_on_the_dense_path_after_a_sparse_step_trains_the_encoder_too():
    """A small k takes the sparse path, a large k_aux the dense one, whose pre-activations the sparse path left
    without gradient: Aux-K must still reach W_E and b_E, as when both take the dense path."""
    torch.manual_seed(0)
    cfg = SAEConfig(d_model=24, d_sae=192, hook_point_in="x", hook_point_out="x", act_fn="topk", top_k=6,
                    norm_activation="inference", dtype="float64")  # fmt: skip
    model = SparseAutoEncoder.from_config(cfg)
    batch, dead = {"x": torch.randn(40, 24, dtype=F64)}, torch.rand(192) > 0.5
    grads = {}
    for sparse in (None, False):  # None: sparse for k = 6, dense for k_aux = 64 (over d_sae / 8)
        model.sparse_kernels = sparse
        model.zero_grad()
        model.compute_loss(batch, loss(auxk_coefficient=0.5, k_aux=64), dead).loss.backward()
        grads[sparse] = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert grads[False]["W_E"][:, dead].abs().sum() > 0  # dead latents' encoders learn from Aux-K
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[None][name], grad, rtol=1e-12, atol=1e-12)


def test_sparse_encoder_gradient_reaches_input_too():
    torch.manual_seed(0)
    cfg = SAEConfig(d_model=8, d_sae=32, hook_point_in="x", hook_point_out="x", act_fn="topk", top_k=3, dtype="float64")
    model = SparseAutoEncoder.from_config(cfg)
    grads = []
    for sparse in (True, False):
        model.sparse_kernels = sparse
        x = torch.randn(5, 8, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_()
        model(x).pow(2).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


# ------------------------------------------------------------------ folding


def randomised(cfg: SAEConfig, norms: dict[str, float]) -> SparseAutoEncoder:
    torch.manual_seed(0)
    model = SparseAutoEncoder.from_config(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("log_jumprelu_threshold"):
                param.normal_(0, 0.3)
    model.set_dataset_average_activation_norm(norms)
    return model


def raw_batch(cfg: SAEConfig, norms: dict[str, float]) -> dict[str, torch.Tensor]:
    """Activations at the raw scale of the dataset norms."""
    generator = torch.Generator().manual_seed(1)
    batch = {}
    for hook, width in ((cfg.hook_point_in, cfg.d_model), (cfg.hook_point_out, cfg.d_output)):
        batch[hook] = torch.randn(64, width, generator=generator) * norms[hook] / math.sqrt(width)
    return batch


def set_thresholds_to_median(model: SparseAutoEncoder, batch: dict[str, torch.Tensor]) -> None:
    """Thresholds at the median score, halfway between two scores so that no score sits on a threshold."""
    with torch.no_grad():
        x, _, _, _ = model.prepare(batch)
        norm = model.decoder_norm() if model.cfg.sparsity_include_decoder_norm else 1.0
        scores = ((x @ model.W_E + model.b_E) * norm).relu()
        if model.cfg.act_fn == "jumprelu":
            median = scores.quantile(0.5, dim=0, interpolation="midpoint")
            model.activation_function.log_jumprelu_threshold.copy_(median.clamp(min=1e-3).log())
        if model.cfg.act_fn == "batchtopk":
            model.activation_function.topk_threshold.fill_(scores.quantile(0.5, interpolation="midpoint").item())


FOLD_CASES = [
    pytest.param(act_fn, transcoder, gating, id=f"{act_fn}-{'transcoder' if transcoder else 'sae'}-gating{gating}")
    for act_fn in ("relu", "jumprelu", "topk", "batchtopk")
    for transcoder in (False, True)
    for gating in (True, False)
]


def fold_config(act_fn: str, transcoder: bool, gating: bool) -> tuple[SAEConfig, dict[str, float]]:
    hook_out = "out" if transcoder else "in"
    cfg = SAEConfig(
        d_model=6, d_sae=24, d_out=4 if transcoder else None, hook_point_in="in", hook_point_out=hook_out,
        use_skip_connection=transcoder, act_fn=act_fn, top_k=5, sparsity_include_decoder_norm=gating,
    )  # fmt: skip
    return cfg, ({"in": 3.0, "out": 0.5} if transcoder else {"in": 3.0})


@pytest.mark.parametrize(("act_fn", "transcoder", "gating"), FOLD_CASES)
def test_folding_keeps_raw_reconstructions(act_fn, transcoder, gating):
    cfg, norms = fold_config(act_fn, transcoder, gating)
    model = randomised(cfg, norms)
    batch = raw_batch(cfg, norms)
    set_thresholds_to_median(model, batch)
    model.eval()
    folded = SparseAutoEncoder(cfg)
    folded.load_state_dict(model.state_dict())
    folded.cfg = model.cfg.model_copy(deep=True)
    folded.fold_activation_scale()
    folded.eval()
    assert folded.cfg.norm_activation == "inference"
    assert folded.cfg.dataset_average_activation_norm == norms
    with torch.no_grad():
        expected = model.reconstruct(batch)
        torch.testing.assert_close(folded.reconstruct(batch), expected, rtol=1e-5, atol=1e-5)
        # The folded model's features carry the raw scale: training-mode features / c_in.
        c_in, _ = model.scale_factors(batch)
        x, _, _, _ = model.prepare(batch)
        f = model.encode(x)
        assert (f > 0).float().mean() > 0.05  # the comparison is not vacuous
        torch.testing.assert_close(folded.encode(batch["in"]), f / c_in, rtol=1e-5, atol=1e-5)


def test_folding_needs_dataset_norms():
    cfg, _ = fold_config("relu", False, True)
    model = SparseAutoEncoder.from_config(cfg)
    with pytest.raises(ValueError, match="set_dataset_average_activation_norm"):
        model.fold_activation_scale()
    with pytest.raises(KeyError, match="out"):
        randomised(fold_config("relu", True, True)[0], {"in": 3.0})


# ------------------------------------------------------------------ persistence

SAVE_CASES = {
    "relu": {},
    "jumprelu": {"act_fn": "jumprelu"},
    "topk": {"act_fn": "topk"},
    "batchtopk": {"act_fn": "batchtopk"},
    "skip-transcoder": {"hook_point_out": "out", "d_out": 4, "use_skip_connection": True, "act_fn": "topk"},
    "no-decoder-bias": {"use_decoder_bias": False},
    "token-wise": {"norm_activation": "token-wise", "act_fn": "jumprelu"},
    "token-wise-transcoder": {"norm_activation": "token-wise", "hook_point_out": "out", "d_out": 4},
}


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
@pytest.mark.parametrize("case", list(SAVE_CASES))
def test_save_load_gives_identical_outputs(tmp_path, case, fold):
    options = {"d_model": 6, "d_sae": 24, "hook_point_in": "in", "hook_point_out": "in", "top_k": 5} | SAVE_CASES[case]
    cfg = SAEConfig(**options)
    norms = {"in": 3.0, "out": 0.5} if cfg.is_transcoder else {"in": 3.0}
    model = randomised(cfg, norms)
    batch = raw_batch(cfg, norms)
    set_thresholds_to_median(model, batch)
    model.eval()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    model.save_pretrained(tmp_path / "sae", fold_activation_scale=fold)
    # Saving (folded or not) leaves the model in memory as it was.
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    assert model.cfg.norm_activation == cfg.norm_activation

    saved = json.loads((tmp_path / "sae" / "config.json").read_text())
    dataset_wise = cfg.norm_activation == "dataset-wise"
    assert saved["norm_activation"] == ("inference" if fold and dataset_wise else cfg.norm_activation)
    assert saved["dataset_average_activation_norm"] == norms
    with torch.no_grad():
        expected = model.reconstruct(batch)
        for loaded in (
            SparseAutoEncoder.from_pretrained(tmp_path / "sae"),
            load_sparse_dictionary(tmp_path / "sae", fold_activation_scale=True),
            PretrainedSAE(pretrained_name_or_path=str(tmp_path / "sae")).load(),
        ):
            loaded.eval()
            torch.testing.assert_close(loaded.reconstruct(batch), expected, rtol=1e-5, atol=1e-5)
            assert loaded.cfg.dataset_average_activation_norm == norms


def test_load_with_dtype_and_weights_file_path(tmp_path):
    cfg = SAEConfig(d_model=6, d_sae=24, hook_point_in="in", hook_point_out="in", act_fn="batchtopk", top_k=3)
    model = randomised(cfg, {"in": 3.0})
    with torch.no_grad():
        model.activation_function.topk_threshold.fill_(0.7)
    model.save_pretrained(tmp_path, fold_activation_scale=False)
    loaded = load_sparse_dictionary(tmp_path / "sae_weights.safetensors", dtype="float64")
    assert loaded.W_E.dtype == torch.float64 and loaded.activation_function.topk_threshold.item() == pytest.approx(0.7)
    assert loaded.cfg.norm_activation == "dataset-wise" and loaded.current_k == 3
    assert not list(tmp_path.glob(".tmp-*"))


def test_config_that_does_not_match_the_weights_is_a_named_error(tmp_path):
    model = SparseAutoEncoder.from_config(
        SAEConfig(d_model=6, d_sae=24, hook_point_in="in", hook_point_out="in", norm_activation="inference")
    )
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(saved | {"d_sae": 48}))
    with pytest.raises(ValueError, match=r"config\.json.*'W_E' has shape \[6, 24\].*\[6, 48\]"):
        SparseAutoEncoder.from_pretrained(tmp_path)
    config_file.write_text(json.dumps(saved | {"act_fn": "jumprelu"}))
    with pytest.raises(
        ValueError, match=r"config\.json.*missing tensors \['activation_function.log_jumprelu_threshold'\]"
    ):
        SparseAutoEncoder.from_pretrained(tmp_path)
    lenient = SparseAutoEncoder.from_pretrained(tmp_path, strict_loading=False)
    torch.testing.assert_close(lenient.W_E, model.W_E)
    config_file.write_text(json.dumps(saved | {"d_model": 0}))
    with pytest.raises(ConfigError, match=r"config\.json[\s\S]*d_model"):
        SparseAutoEncoder.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SparseAutoEncoder.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        SparseAutoEncoder.from_pretrained(tmp_path)


def test_unknown_sae_type_is_a_named_error(tmp_path):
    SparseAutoEncoder.from_config(SAEConfig(d_model=2, d_sae=4, hook_point_in="a", hook_point_out="a")).save_pretrained(
        tmp_path
    )
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"sae_type": "hypercoder"}))
    with pytest.raises(
        ConfigError, match=r"config\.json: unknown sae_type 'hypercoder'; known dictionary types: \[.*'sae'"
    ):
        load_sparse_dictionary(tmp_path)


# ------------------------------------------------------------------ config and argument errors


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"act_fn": "topk", "top_k": 9}, r"top_k \(9\) cannot exceed d_sae \(8\)"),
        ({"d_model": 0}, "d_model"),
        ({"d_sae": -1}, "d_sae"),
        ({"d_sae": None, "expansion_factor": 0.1}, r"d_sae = int\(d_model \* expansion_factor\)"),
        ({"d_sae": None, "expansion_factor": -2.0}, "expansion_factor"),
        ({"top_k": 0}, "top_k"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"use_skip_connection": True}, "transcoders"),
    ],
)
def test_bad_configs_are_named_errors(fields, message):
    with pytest.raises(ValidationError, match=message):
        SAEConfig(**({"d_model": 4, "d_sae": 8, "hook_point_in": "a", "hook_point_out": "a"} | fields))


def test_bad_arguments_are_named_errors():
    model = fixed_sae("topk", top_k=2)
    with pytest.raises(ValueError, match=r"current_k must lie in \[1, d_sae=4\], got 5"):
        model.current_k = 5
    with pytest.raises(KeyError, match="'x'"):
        model.compute_loss({"y": tensor(X)})
    with pytest.raises(ValueError, match="no tokens"):
        model.compute_loss({"x": tensor([X]), "mask": torch.tensor([[False, False]])})
    with pytest.raises(ValueError, match="sparsity_loss_type"):
        model.compute_loss({"x": tensor(X)}, loss(sparsity_loss_type="l0"))
    dataset_wise = SparseAutoEncoder.from_config(SAEConfig(d_model=2, d_sae=4, hook_point_in="x", hook_point_out="x"))
    with pytest.raises(ValueError, match="dataset_average_activation_norm has no value for 'x'"):
        dataset_wise.reconstruct(tensor(X).float())
    with pytest.raises(ValueError, match="finite and positive"):
        dataset_wise.set_dataset_average_activation_norm({"x": 0.0})
    token_wise_transcoder = SparseAutoEncoder.from_config(
        SAEConfig(d_model=2, d_sae=4, hook_point_in="x", hook_point_out="y", norm_activation="token-wise")
    )
    with pytest.raises(KeyError, match="token-wise scaling needs the activations of 'y'"):
        token_wise_transcoder.reconstruct(tensor(X).float())


# ------------------------------------------------------------------ optimiser groups and statistics


def test_parameter_groups_and_statistics():
    model = fixed_sae("jumprelu")
    groups = model.parameter_groups(lr=1e-3, jumprelu_lr_factor=0.1)
    assert [g["name"] for g in groups] == ["others", "jumprelu"]
    assert groups[1]["lr"] == pytest.approx(1e-4) and groups[1]["params"] == [
        model.activation_function.log_jumprelu_threshold
    ]
    assert len(groups[0]["params"]) == 4
    stats = model.log_statistics()
    assert stats["metrics/decoder_norm"] == pytest.approx(sum(NORMS) / 4)
    assert stats["metrics/decoder_bias_norm"] == pytest.approx(math.sqrt(5))
    assert stats["metrics/mean_jumprelu_threshold"] == pytest.approx(22.5)
    assert fixed_sae("topk", top_k=3).log_statistics()["sparsity/k"] == 3.0
    assert [g["name"] for g in fixed_sae("relu").parameter_groups(lr=1.0)] == ["others"]


def test_fresh_model_is_initialised():
    cfg = SAEConfig(d_model=16, expansion_factor=4, hook_point_in="x", hook_point_out="x", act_fn="jumprelu")
    model = SparseAutoEncoder.from_config(cfg)
    assert model.cfg.d_sae == 64
    assert model.W_E.abs().max() <= 16**-0.5 and model.W_D.abs().max() <= 64**-0.5
    assert model.b_E.abs().sum() == 0 and model.b_D.abs().sum() == 0
    torch.testing.assert_close(model.activation_function.log_jumprelu_threshold, torch.full((64,), math.log(0.1)))


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("act_fn", ["relu", "jumprelu", "topk", "batchtopk"])
def test_empty_input_gives_empty_output_and_keeps_the_threshold(act_fn, sparse):
    model = fixed_sae(act_fn, top_k=2)
    model.sparse_kernels = sparse
    if act_fn == "batchtopk":
        with torch.no_grad():
            model.activation_function.topk_threshold.fill_(5.0)
    assert model(torch.zeros(0, 2, dtype=F64)).shape == (0, 2)
    assert model.encode(torch.zeros(3, 0, 2, dtype=F64)).shape == (3, 0, 4)
    if act_fn == "batchtopk":
        assert model.activation_function.topk_threshold.item() == 5.0


def test_jumprelu_l0_penalty_counts_active_features_and_moves_only_the_threshold():
    """Closed form: theta = 1, window = 2, one token with scores [0.5, 1.5, 2.5] on three features (no gating).
    Count = 2 (1.5 and 2.5 pass); d count / d theta_i = -1/2 inside |x - 1| < 1 (features 0 and 1), 0 outside,
    and d/dlog(theta_i) = theta_i * that = [-0.5, -0.5, 0]."""
    cfg = SAEConfig(
        d_model=3, d_sae=3, hook_point_in="x", hook_point_out="x", act_fn="jumprelu",
        norm_activation="inference", sparsity_include_decoder_norm=False, jumprelu_threshold_window=2.0,
    )  # fmt: skip
    model = SparseAutoEncoder(cfg)
    with torch.no_grad():
        model.W_E.copy_(torch.eye(3))
        model.b_E.zero_()
        model.W_D.copy_(torch.eye(3))
        model.b_D.zero_()
        model.activation_function.log_jumprelu_threshold.zero_()  # theta = 1
    out = model.compute_loss({"x": torch.tensor([[0.5, 1.5, 2.5]])}, loss(sparsity_loss_type="l0", l1_coefficient=1.0))
    assert out.l_sparsity.item() == pytest.approx(2.0)
    out.l_sparsity.backward()
    assert model.activation_function.log_jumprelu_threshold.grad.tolist() == pytest.approx([-0.5, -0.5, 0.0])
    assert model.W_E.grad is None or torch.count_nonzero(model.W_E.grad) == 0  # the count gives x no gradient
    with pytest.raises(ValueError, match="'l0' is for act_fn 'jumprelu'"):
        SparseAutoEncoder.from_config(cfg.model_copy(update={"act_fn": "relu"})).compute_loss(
            {"x": torch.ones(1, 3)}, loss(sparsity_loss_type="l0")
        )
