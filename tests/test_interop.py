"""SAELens and sparsify import/export, checked against each peer's forward pass written out here from
spec/peer-formats.md, independently of the converters: a transposed tensor, a misplaced b_dec or a threshold on the
wrong scale changes the reconstruction and fails these tests."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lm_saes_core.interop import (
    InteropError,
    export_saelens,
    export_sparsify,
    import_saelens,
    import_sparsify,
    sparsify_hook_points,
    sparsify_hookpoint,
)
from lm_saes_core.models.sae import SAEConfig, SparseAutoEncoder

D_IN, D_OUT, D_SAE, N_TOKENS = 16, 12, 64, 96
HOOK = "blocks.3.hook_resid_post"
TC_IN, TC_OUT = "blocks.3.mlp.hook_in", "blocks.3.hook_mlp_out"
NORMS = {HOOK: 5.0, TC_IN: 7.0, TC_OUT: 3.0}


# ---------------------------------------------------------------- the peers' forward passes, from the spec


def saelens_forward(
    w: dict[str, torch.Tensor],
    x: torch.Tensor,
    *,
    architecture: str,
    apply_b_dec_to_input: bool,
    k: int | None = None,
    rescale_acts_by_decoder_norm: bool = False,
    finetuning_scaling_factor: bool = False,
) -> torch.Tensor:
    """SAELens: x' = x - b_dec * apply_b_dec_to_input; pre = x' W_enc + b_enc; activation; f W_dec + b_dec (+ skip)."""
    w = {name: t.double() for name, t in w.items()}
    x = x.double()
    sae_in = x - w["b_dec"] if apply_b_dec_to_input else x  # transcoders: b_dec has the output width
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    decoder_norm = w["W_dec"].norm(dim=-1)
    if architecture == "topk":
        if rescale_acts_by_decoder_norm:
            pre = pre * decoder_norm
        values, indices = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        if rescale_acts_by_decoder_norm:
            f = f / decoder_norm
    elif architecture.startswith("jumprelu"):
        threshold = w["threshold"] if "threshold" in w else w["log_threshold"].exp()
        f = pre.relu() * (pre > threshold.relu())
    else:
        f = pre.relu()
    if finetuning_scaling_factor:
        f = f * w["scaling_factor"]
    out = f @ w["W_dec"] + w["b_dec"]
    if "skip" in architecture:
        out = out + x @ w["W_skip"].T
    return out


def saelens_forward_from_dir(directory: Path, x: torch.Tensor) -> torch.Tensor:
    cfg = json.loads((directory / "cfg.json").read_text())
    return saelens_forward(
        load_file(directory / "sae_weights.safetensors"),
        x,
        architecture=cfg["architecture"],
        apply_b_dec_to_input=cfg["apply_b_dec_to_input"],
        k=cfg.get("k"),
        rescale_acts_by_decoder_norm=cfg.get("rescale_acts_by_decoder_norm", False),
    )


def sparsify_forward(w: dict[str, torch.Tensor], x: torch.Tensor, *, k: int, transcode: bool) -> torch.Tensor:
    """sparsify: relu((x - b_dec) encoder.weight^T + bias) (no - b_dec when transcoding), top-k,
    sum top_acts * W_dec[top_idx] + b_dec (+ x W_skip^T)."""
    w = {name: t.double() for name, t in w.items()}
    x = x.double()
    sae_in = x if transcode else x - w["b_dec"]
    pre = torch.relu(sae_in @ w["encoder.weight"].T + w["encoder.bias"])
    top_acts, top_indices = pre.topk(k, dim=-1, sorted=False)
    out = (top_acts.unsqueeze(-1) * w["W_dec"][top_indices]).sum(-2) + w["b_dec"]
    if "W_skip" in w:
        out = out + x @ w["W_skip"].T
    return out


def sparsify_forward_from_dir(directory: Path, x: torch.Tensor) -> torch.Tensor:
    cfg = json.loads((directory / "cfg.json").read_text())
    return sparsify_forward(load_file(directory / "sae.safetensors"), x, k=cfg["k"], transcode=cfg["transcode"])


# ---------------------------------------------------------------- models with every parameter non-trivial


def raw_inputs(d: int = D_IN, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    offset = torch.randn(d, generator=generator)
    return (torch.randn(N_TOKENS, d, generator=generator) * 2 + offset).to(dtype)


def make_model(
    act_fn: str,
    *,
    transcoder: bool = False,
    skip: bool = False,
    d_out: int = D_OUT,
    gating: bool = True,
    norm_activation: str = "dataset-wise",
    dtype: torch.dtype = torch.float64,
) -> SparseAutoEncoder:
    """Random weights, biases and decoder norms in [0.5, 2]; JumpReLU/BatchTopK thresholds set from data so that
    they cut about a third of the positive activations (a threshold on the wrong scale then shows)."""
    hook_in, hook_out = (TC_IN, TC_OUT) if transcoder else (HOOK, HOOK)
    cfg = SAEConfig(
        hook_point_in=hook_in,
        hook_point_out=hook_out,
        d_model=D_IN,
        d_sae=D_SAE,
        d_out=d_out if transcoder else None,
        use_skip_connection=skip,
        act_fn=act_fn,
        top_k=6,
        norm_activation=norm_activation,
        sparsity_include_decoder_norm=gating,
        dtype=dtype,
    )
    model = SparseAutoEncoder.from_config(cfg)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    with torch.no_grad():
        model.W_E.copy_(rand(D_IN, D_SAE, scale=0.3))
        model.b_E.copy_(rand(D_SAE, scale=0.3))
        row_norms = torch.rand(D_SAE, 1, generator=generator).to(dtype) * 1.5 + 0.5
        W_D = rand(D_SAE, cfg.d_output, scale=1.0)
        model.W_D.copy_(W_D / W_D.norm(dim=1, keepdim=True) * row_norms)
        model.b_D.copy_(rand(cfg.d_output, scale=1.0))
        if skip:
            model.W_skip.copy_(rand(cfg.d_output, D_IN, scale=0.2))
    if norm_activation == "dataset-wise":
        model.set_dataset_average_activation_norm({hook: NORMS[hook] for hook in cfg.hook_points})
    if act_fn in ("jumprelu", "batchtopk"):
        # Gated pre-activations of the (normalised) inputs the tests use, to place the thresholds among them.
        c_in = math.sqrt(D_IN) / NORMS[hook_in] if norm_activation == "dataset-wise" else 1.0
        hidden = (raw_inputs(dtype=dtype) * c_in) @ model.W_E.detach() + model.b_E.detach()
        gated = (hidden * model.decoder_norm().detach() if gating else hidden).clamp_min(0)
        with torch.no_grad():
            if act_fn == "jumprelu":
                thresholds = [midpoint_quantile(gated[:, i], 0.8) for i in range(D_SAE)]
                model.activation_function.log_jumprelu_threshold.copy_(torch.stack(thresholds).clamp_min(1e-3).log())
            else:
                model.activation_function.topk_threshold.fill_(float(midpoint_quantile(gated[gated > 0], 0.3)))
    return model.eval()


def midpoint_quantile(values: torch.Tensor, level: float) -> torch.Tensor:
    """A value halfway between two neighbouring data points, so no activation sits exactly on the threshold (where
    h * n > theta and h > theta / n may round differently)."""
    ordered = values.sort().values
    index = int(level * (len(ordered) - 1))
    return (ordered[index] + ordered[index + 1]) / 2


def folded(model: SparseAutoEncoder) -> SparseAutoEncoder:
    copied = copy.deepcopy(model)
    if copied.cfg.norm_activation == "dataset-wise":
        copied.fold_activation_scale()
    return copied


def reconstruction(model: SparseAutoEncoder, x: torch.Tensor) -> torch.Tensor:
    """The raw-scale reconstruction of the dictionary's one output hook."""
    (value,) = model.reconstruct(x).values()
    return value


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
    tolerance = 1e-9 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance, atol=tolerance)


# ---------------------------------------------------------------- SAELens export -> peer forward -> import


SAELENS_VARIANTS = {
    # name: (make_model kwargs, expected architecture)
    "relu": ({"act_fn": "relu"}, "standard"),
    "relu-inference-f32": ({"act_fn": "relu", "norm_activation": "inference", "dtype": torch.float32}, "standard"),
    "topk-gated": ({"act_fn": "topk"}, "topk"),
    "topk-ungated-f32": ({"act_fn": "topk", "gating": False, "dtype": torch.float32}, "topk"),
    "jumprelu-gated": ({"act_fn": "jumprelu"}, "jumprelu"),
    "jumprelu-ungated": ({"act_fn": "jumprelu", "gating": False}, "jumprelu"),
    "batchtopk-gated": ({"act_fn": "batchtopk"}, "jumprelu"),
    "batchtopk-ungated": ({"act_fn": "batchtopk", "gating": False}, "jumprelu"),
    "transcoder": ({"act_fn": "relu", "transcoder": True}, "transcoder"),
    "skip-transcoder": ({"act_fn": "relu", "transcoder": True, "skip": True}, "skip_transcoder"),
    "jumprelu-transcoder": ({"act_fn": "jumprelu", "transcoder": True}, "jumprelu_transcoder"),
    "jumprelu-skip-transcoder": (
        {"act_fn": "jumprelu", "transcoder": True, "skip": True},
        "jumprelu_skip_transcoder",
    ),
    "batchtopk-transcoder": ({"act_fn": "batchtopk", "transcoder": True}, "jumprelu_transcoder"),
}


@pytest.mark.parametrize("variant", list(SAELENS_VARIANTS))
def test_saelens_export_matches_peer_forward_and_round_trips(tmp_path: Path, variant: str) -> None:
    kwargs, architecture = SAELENS_VARIANTS[variant]
    model = make_model(**kwargs)
    dtype = model.cfg.dtype
    x = raw_inputs(dtype=dtype)
    expected = reconstruction(model, x)

    directory = export_saelens(model, tmp_path / "sae", model_name="smollm2-135m")
    cfg = json.loads((directory / "cfg.json").read_text())
    assert cfg["architecture"] == architecture
    assert (cfg["apply_b_dec_to_input"], cfg["normalize_activations"]) == (False, "none")
    assert cfg["metadata"]["hook_name"] == model.cfg.hook_point_in
    assert cfg["metadata"]["model_name"] == "smollm2-135m"
    assert cfg["dtype"] == str(dtype).removeprefix("torch.")
    if model.cfg.is_transcoder:
        assert (cfg["d_out"], cfg["metadata"]["hook_name_out"]) == (model.cfg.d_output, TC_OUT)
    if model.cfg.act_fn == "topk":
        assert (cfg["k"], cfg["rescale_acts_by_decoder_norm"]) == (6, model.cfg.sparsity_include_decoder_norm)
    if model.cfg.act_fn == "batchtopk":
        assert cfg["metadata"]["training_architecture"] == "batchtopk"

    peer = saelens_forward_from_dir(directory, x)
    assert_close(peer, expected, dtype)
    # The data exercises the activation: some latents fire, most do not.
    assert 0 < (model.encode(x * folded_scale(model)) > 0).float().mean() < 0.75

    imported = import_saelens(directory)
    assert imported.cfg.norm_activation == "inference"
    assert (imported.cfg.hook_point_in, imported.cfg.hook_point_out) == (
        model.cfg.hook_point_in,
        model.cfg.hook_point_out,
    )
    assert imported.W_E.dtype == dtype
    assert_close(reconstruction(imported, x), expected, dtype)
    reference = folded(model)
    for name in ("W_E", "b_E", "W_D", "b_D") + (("W_skip",) if model.cfg.use_skip_connection else ()):
        assert torch.equal(getattr(imported, name), getattr(reference, name)), name


def folded_scale(model: SparseAutoEncoder) -> float:
    return math.sqrt(D_IN) / NORMS[model.cfg.hook_point_in] if model.cfg.norm_activation == "dataset-wise" else 1.0


def test_saelens_jumprelu_threshold_is_divided_by_decoder_norm(tmp_path: Path) -> None:
    """Our gate h * n > theta is SAELens's h > theta / n; the saved threshold must say so, not theta itself."""
    model = make_model("jumprelu", norm_activation="inference")
    threshold = load_file(export_saelens(model, tmp_path / "sae") / "sae_weights.safetensors")["threshold"]
    theta = model.activation_function.log_jumprelu_threshold.detach().exp()
    assert_close(threshold * model.decoder_norm().detach(), theta)
    x = raw_inputs()
    weights = load_file(tmp_path / "sae" / "sae_weights.safetensors")
    naive = saelens_forward({**weights, "threshold": theta}, x, architecture="jumprelu", apply_b_dec_to_input=False)
    assert (naive - reconstruction(model, x)).abs().max() > 1e-2  # the test data would catch the naive mapping


def test_export_leaves_the_model_untouched(tmp_path: Path) -> None:
    model = make_model("topk")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    export_saelens(model, tmp_path / "saelens")
    export_sparsify(model, tmp_path / "sparsify")
    assert model.cfg.norm_activation == "dataset-wise"
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


# ---------------------------------------------------------------- sparsify export -> peer forward -> import


SPARSIFY_VARIANTS = {
    "topk-gated": {"act_fn": "topk"},
    "topk-ungated": {"act_fn": "topk", "gating": False},
    "topk-ungated-f32": {"act_fn": "topk", "gating": False, "dtype": torch.float32, "norm_activation": "inference"},
    "topk-skip-transcoder": {"act_fn": "topk", "transcoder": True, "skip": True, "d_out": D_IN},
}


@pytest.mark.parametrize("variant", list(SPARSIFY_VARIANTS))
def test_sparsify_export_matches_peer_forward_and_round_trips(tmp_path: Path, variant: str) -> None:
    model = make_model(**SPARSIFY_VARIANTS[variant])
    dtype = model.cfg.dtype
    x = raw_inputs(dtype=dtype)
    expected = reconstruction(model, x)

    directory = export_sparsify(model, tmp_path / sparsify_hookpoint(model.cfg))
    cfg = json.loads((directory / "cfg.json").read_text())
    assert (cfg["activation"], cfg["k"], cfg["num_latents"], cfg["d_in"]) == ("topk", 6, D_SAE, D_IN)
    assert cfg["transcode"] == cfg["skip_connection"] == model.cfg.is_transcoder
    tensors = load_file(directory / "sae.safetensors")
    assert tensors["encoder.weight"].shape == tensors["W_dec"].shape == (D_SAE, D_IN)
    # Gating is folded into unit-norm decoder rows; without it the decoder is written as is.
    assert cfg["normalize_decoder"] == model.cfg.sparsity_include_decoder_norm
    if not model.cfg.sparsity_include_decoder_norm:
        assert torch.equal(tensors["W_dec"], model.W_D.detach())

    assert_close(sparsify_forward_from_dir(directory, x), expected, dtype)

    imported = import_sparsify(directory)
    assert (imported.cfg.hook_point_in, imported.cfg.hook_point_out) == (
        model.cfg.hook_point_in,
        model.cfg.hook_point_out,
    )
    assert imported.cfg.top_k == 6 and imported.W_E.dtype == dtype
    assert_close(reconstruction(imported, x), expected, dtype)
    if not model.cfg.sparsity_include_decoder_norm:
        reference = folded(model)
        for name in ("W_E", "b_E", "W_D", "b_D"):
            assert_close(getattr(imported, name).detach(), getattr(reference, name).detach(), dtype)


def test_sparsify_hook_point_names() -> None:
    assert sparsify_hook_points("layers.6", transcode=False) == ("blocks.6.hook_resid_post",) * 2
    assert sparsify_hook_points("model.layers.6.mlp", transcode=True) == (
        "blocks.6.mlp.hook_in",
        "blocks.6.hook_mlp_out",
    )
    assert sparsify_hook_points("h.2.mlp", transcode=False) == ("blocks.2.hook_mlp_out",) * 2
    with pytest.raises(InteropError, match="embed_tokens"):
        sparsify_hook_points("embed_tokens", transcode=False)


# ---------------------------------------------------------------- hand-written peer files


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=generator) * 0.5 for name, shape in shapes.items()}


def write_saelens(directory: Path, cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, directory / "sae_weights.safetensors")
    return directory


SAELENS_BASE = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "normalize_activations": "none"}
SAE_SHAPES = {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}


def test_saelens_standard_with_apply_b_dec_to_input(tmp_path: Path) -> None:
    weights = random_weights(SAE_SHAPES)
    cfg = {
        **SAELENS_BASE,
        "architecture": "standard",
        "apply_b_dec_to_input": True,
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": HOOK, "model_name": "gpt2"},
    }
    model = import_saelens(write_saelens(tmp_path / "sae", cfg, weights), dtype=torch.float64)
    x = raw_inputs()
    expected = saelens_forward(weights, x, architecture="standard", apply_b_dec_to_input=True)
    assert_close(reconstruction(model, x), expected)
    without_fold = saelens_forward(weights, x, architecture="standard", apply_b_dec_to_input=False)
    assert (without_fold - expected).abs().max() > 1e-2
    assert (model.cfg.act_fn, model.cfg.hook_point_in, model.W_E.dtype) == ("relu", HOOK, torch.float64)
    # The default dtype is the config's.
    assert import_saelens(tmp_path / "sae").W_E.dtype == torch.float32


def test_saelens_topk_rescaled_by_decoder_norm(tmp_path: Path) -> None:
    weights = random_weights(SAE_SHAPES)
    weights["W_dec"] *= torch.linspace(0.2, 3.0, D_SAE).unsqueeze(1)
    cfg = {
        **SAELENS_BASE,
        "architecture": "topk",
        "k": 5,
        "rescale_acts_by_decoder_norm": True,
        "apply_b_dec_to_input": True,
        "metadata": {"sae_lens_version": "6.5.0", "hook_name": HOOK},
    }
    model = import_saelens(write_saelens(tmp_path / "sae", cfg, weights), dtype=torch.float64)
    x = raw_inputs()
    kwargs = {"architecture": "topk", "apply_b_dec_to_input": True, "k": 5}
    expected = saelens_forward(weights, x, **kwargs, rescale_acts_by_decoder_norm=True)
    assert_close(reconstruction(model, x), expected)
    assert (saelens_forward(weights, x, **kwargs) - expected).abs().max() > 1e-2
    assert (model.cfg.top_k, model.cfg.sparsity_include_decoder_norm) == (5, True)


def test_saelens_pre_6_topk_config_is_upgraded(tmp_path: Path) -> None:
    """A SAELens 3.x/5.x config: hook_point, activation_fn_str + activation_fn_kwargs.k, boolean
    normalize_activations, metadata at the top level, and an all-ones legacy scaling_factor."""
    weights = random_weights(SAE_SHAPES) | {"scaling_factor": torch.ones(D_SAE)}
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "torch.float32",
        "device": "cuda",
        "model_name": "gpt2-small",
        "hook_point": HOOK,
        "hook_point_layer": 3,
        "hook_point_head_index": None,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 7},
        "apply_b_dec_to_input": True,
        "normalize_activations": False,
        "finetuning_scaling_factor": False,
        "context_size": 128,
        "prepend_bos": True,
        "sae_lens_training_version": "3.13.0",
    }
    model = import_saelens(write_saelens(tmp_path / "sae", cfg, weights), dtype=torch.float64)
    assert (model.cfg.act_fn, model.cfg.top_k, model.cfg.hook_point_in) == ("topk", 7, HOOK)
    assert model.cfg.sparsity_include_decoder_norm is False
    x = raw_inputs()
    weights.pop("scaling_factor")
    assert_close(
        reconstruction(model, x), saelens_forward(weights, x, architecture="topk", apply_b_dec_to_input=True, k=7)
    )


def test_saelens_pre_6_finetuning_scaling_factor_is_folded(tmp_path: Path) -> None:
    weights = random_weights(SAE_SHAPES) | {"scaling_factor": torch.linspace(0.5, 2.0, D_SAE)}
    cfg = {**SAELENS_BASE, "hook_point": HOOK, "activation_fn_str": "relu", "finetuning_scaling_factor": True}
    model = import_saelens(write_saelens(tmp_path / "sae", cfg, weights), dtype=torch.float64)
    x = raw_inputs()
    expected = saelens_forward(
        weights, x, architecture="standard", apply_b_dec_to_input=True, finetuning_scaling_factor=True
    )
    assert_close(reconstruction(model, x), expected)


def test_saelens_jumprelu_training_save_with_log_threshold(tmp_path: Path) -> None:
    weights = random_weights(SAE_SHAPES) | {"log_threshold": torch.full((D_SAE,), math.log(0.4))}
    weights["log_threshold"][:4] = -30.0  # effectively ReLU
    cfg = {
        **SAELENS_BASE,
        "architecture": "jumprelu",
        "apply_b_dec_to_input": False,
        "jumprelu_bandwidth": 0.05,
        "l0_coefficient": 1.0,
        "decoder_init_norm": 0.1,
        "metadata": {"sae_lens_version": "6.1.0", "hook_name": HOOK},
    }
    model = import_saelens(write_saelens(tmp_path / "sae", cfg, weights), dtype=torch.float64)
    assert (model.cfg.act_fn, model.cfg.sparsity_include_decoder_norm) == ("jumprelu", False)
    assert_close(model.activation_function.log_jumprelu_threshold.detach(), weights["log_threshold"])
    x = raw_inputs()
    expected = saelens_forward(weights, x, architecture="jumprelu", apply_b_dec_to_input=False)
    assert_close(reconstruction(model, x), expected)
    relu_only = saelens_forward(weights, x, architecture="standard", apply_b_dec_to_input=False)
    assert (relu_only - expected).abs().max() > 1e-2


def test_saelens_jumprelu_skip_transcoder(tmp_path: Path) -> None:
    shapes = {
        "W_enc": (D_IN, D_SAE),
        "b_enc": (D_SAE,),
        "W_dec": (D_SAE, D_OUT),
        "b_dec": (D_OUT,),
        "threshold": (D_SAE,),
        "W_skip": (D_OUT, D_IN),
    }
    weights = random_weights(shapes)
    weights["threshold"] = weights["threshold"].abs()
    cfg = {
        **SAELENS_BASE,
        "architecture": "jumprelu_skip_transcoder",
        "d_out": D_OUT,
        "apply_b_dec_to_input": False,
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": TC_IN, "hook_name_out": TC_OUT},
    }
    model = import_saelens(write_saelens(tmp_path / "sae", cfg, weights), dtype=torch.float64)
    assert (model.cfg.is_transcoder, model.cfg.use_skip_connection, model.cfg.d_output) == (True, True, D_OUT)
    x = raw_inputs()
    expected = saelens_forward(weights, x, architecture="jumprelu_skip_transcoder", apply_b_dec_to_input=False)
    assert_close(reconstruction(model, x), expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architecture": "gated"}, "architecture 'gated' is not supported"),
        ({"architecture": "batchtopk"}, "save_inference_model"),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations='expected_average_only_in'"),
        ({"reshape_activations": "hook_z"}, "reshape_activations='hook_z'"),
        ({"architecture": "transcoder", "d_out": D_IN}, "apply_b_dec_to_input must be false"),
        ({"metadata": {"sae_lens_version": "6.0.0"}}, "no metadata.hook_name"),
    ],
)
def test_saelens_unsupported_configs_are_named(tmp_path: Path, change: dict, message: str) -> None:
    cfg = {
        **SAELENS_BASE,
        "architecture": "standard",
        "apply_b_dec_to_input": True,
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": HOOK},
    } | change
    directory = write_saelens(tmp_path / "sae", cfg, random_weights(SAE_SHAPES))
    with pytest.raises(InteropError, match=message):
        import_saelens(directory)


def test_saelens_tensor_errors_name_file_and_tensor(tmp_path: Path) -> None:
    cfg = {**SAELENS_BASE, "architecture": "standard", "metadata": {"sae_lens_version": "6.54.12", "hook_name": HOOK}}
    transposed = random_weights(SAE_SHAPES) | {"W_dec": torch.zeros(D_IN, D_SAE)}
    with pytest.raises(InteropError, match=r"sae_weights.safetensors: tensor 'W_dec' has shape \(16, 64\)"):
        import_saelens(write_saelens(tmp_path / "a", cfg, transposed))
    missing = {name: t for name, t in random_weights(SAE_SHAPES).items() if name != "b_enc"}
    with pytest.raises(InteropError, match="missing tensor 'b_enc'"):
        import_saelens(write_saelens(tmp_path / "b", cfg, missing))
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        import_saelens(tmp_path / "nowhere")


def write_sparsify(directory: Path, cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True)
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, directory / "sae.safetensors")
    return directory


SPARSIFY_BASE = {
    "activation": "topk",
    "expansion_factor": 4,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": 5,
    "multi_topk": False,
    "skip_connection": False,
    "transcode": False,
    "d_in": D_IN,
}
SPARSIFY_SHAPES = {"encoder.weight": (D_SAE, D_IN), "encoder.bias": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}


def test_sparsify_hand_written_sae(tmp_path: Path) -> None:
    weights = random_weights(SPARSIFY_SHAPES)
    directory = write_sparsify(tmp_path / "run" / "layers.3", SPARSIFY_BASE, weights)
    model = import_sparsify(directory, dtype=torch.float64)
    assert (model.cfg.d_sae, model.cfg.top_k, model.cfg.hook_point_in) == (D_SAE, 5, HOOK)
    x = raw_inputs()
    expected = sparsify_forward(weights, x, k=5, transcode=False)
    assert_close(reconstruction(model, x), expected)
    # The b_dec subtraction matters for these weights (so the fold is really tested).
    assert (sparsify_forward(weights, x, k=5, transcode=True) - expected).abs().max() > 1e-2


def test_sparsify_bf16_weights_load_in_their_dtype(tmp_path: Path) -> None:
    weights = {name: t.to(torch.bfloat16) for name, t in random_weights(SPARSIFY_SHAPES).items()}
    directory = write_sparsify(tmp_path / "layers.3", SPARSIFY_BASE, weights)
    model = import_sparsify(directory)
    assert model.W_E.dtype == torch.bfloat16
    assert torch.equal(model.W_E.detach(), weights["encoder.weight"].T)
    assert torch.equal(model.W_D.detach(), weights["W_dec"])
    upcast = import_sparsify(directory, dtype="float64")
    x = raw_inputs()
    assert_close(reconstruction(upcast, x), sparsify_forward(weights, x, k=5, transcode=False))


def test_sparsify_hand_written_skip_transcoder(tmp_path: Path) -> None:
    weights = random_weights(SPARSIFY_SHAPES | {"W_skip": (D_IN, D_IN)})
    cfg = SPARSIFY_BASE | {"transcode": True, "skip_connection": True, "num_latents": D_SAE, "multi_topk": True}
    model = import_sparsify(write_sparsify(tmp_path / "layers.2.mlp", cfg, weights), dtype=torch.float64)
    assert (model.cfg.hook_point_in, model.cfg.hook_point_out) == ("blocks.2.mlp.hook_in", "blocks.2.hook_mlp_out")
    x = raw_inputs()
    assert_close(reconstruction(model, x), sparsify_forward(weights, x, k=5, transcode=True))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activation": "groupmax"}, "activation='groupmax'"),
        ({"skip_connection": True}, "skip_connection without transcode"),
        ({"num_latents": 32}, r"'encoder.weight' has shape \(64, 16\), expected \(32, 16\)"),
    ],
)
def test_sparsify_unsupported_files_are_named(tmp_path: Path, change: dict, message: str) -> None:
    directory = write_sparsify(tmp_path / "layers.3", SPARSIFY_BASE | change, random_weights(SPARSIFY_SHAPES))
    with pytest.raises(InteropError, match=message):
        import_sparsify(directory)


# ---------------------------------------------------------------- models the peers cannot represent


@pytest.mark.parametrize(
    ("kwargs", "exporter", "message"),
    [
        ({"act_fn": "relu", "norm_activation": "token-wise"}, export_saelens, "token-wise"),
        ({"act_fn": "topk", "norm_activation": "token-wise"}, export_sparsify, "token-wise"),
        ({"act_fn": "topk", "transcoder": True}, export_saelens, "no TopK transcoder"),
        ({"act_fn": "relu"}, export_sparsify, "act_fn='relu'"),
        ({"act_fn": "jumprelu"}, export_sparsify, "act_fn='jumprelu'"),
        ({"act_fn": "topk", "transcoder": True}, export_sparsify, "d_out=12 != d_model=16"),
    ],
)
def test_unrepresentable_models_raise(tmp_path: Path, kwargs: dict, exporter, message: str) -> None:
    with pytest.raises(InteropError, match=message):
        exporter(make_model(**kwargs), tmp_path / "out")
    assert not (tmp_path / "out" / "cfg.json").exists()


def test_dataset_wise_model_without_norms_raises(tmp_path: Path) -> None:
    model = make_model("relu", norm_activation="inference")
    model.cfg.norm_activation = "dataset-wise"
    with pytest.raises(InteropError, match="dataset_average_activation_norm"):
        export_saelens(model, tmp_path / "out")
