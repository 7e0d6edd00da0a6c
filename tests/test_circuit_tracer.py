"""circuit-tracer CLT and transcoder-set export/import, checked against circuit-tracer's forward pass written out here
from spec/peer-formats.md (and circuit-tracer's loaders), on files read with plain safetensors/numpy: a transposed
encoder, a decoder slice for the wrong target layer, an unfolded scale or a threshold on the wrong scale changes the
outputs and fails these tests. Tiny random models (d_model 16, d_sae 32, 3 layers), CPU, seconds."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lm_saes_core.cli import app
from lm_saes_core.interop import InteropError, circuit_tracer
from lm_saes_core.interop.circuit_tracer import (
    export_clt_to_circuit_tracer,
    export_transcoders_to_circuit_tracer,
    import_circuit_tracer,
    import_clt_from_circuit_tracer,
    import_transcoders_from_circuit_tracer,
)
from lm_saes_core.models import CLTConfig, CrossLayerTranscoder, SAEConfig, SparseAutoEncoder, SparseDictionary

D, F, L, N = 16, 32, 3, 64
IN = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(L)]
OUT = [f"blocks.{layer}.hook_mlp_out" for layer in range(L)]
# Different norms per hook: scale factors differ per layer and between input and output.
NORMS = dict(zip(IN + OUT, [3.0, 5.0, 8.0, 2.0, 6.0, 11.0], strict=True))
F64, F32 = torch.float64, torch.float32


# ---------------------------------------------------------------- circuit-tracer's forward pass, from the format


def activation(pre: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """circuit-tracer: JumpReLU `pre * (pre > threshold)` when the file has thresholds, else ReLU."""
    return pre * (pre > threshold) if threshold is not None else pre.relu()


def clt_forward_from_files(directory: Path, x: torch.Tensor) -> torch.Tensor:
    """x (N, L, D) raw -> (N, L, D): pre_s = x_s W_enc_s^T + b_enc_s, f_s = act(pre_s),
    y_t = sum_{s <= t} f_s W_dec_s[:, t - s] + b_dec_t; decoder rows read with get_slice, as circuit-tracer does."""
    n_layers = len(list(directory.glob("W_enc_*.safetensors")))  # circuit-tracer counts the encoder files
    x = x.double()
    y = torch.zeros(x.shape[0], n_layers, x.shape[-1], dtype=F64)
    for s in range(n_layers):
        encoder = {name: t.double() for name, t in load_file(directory / f"W_enc_{s}.safetensors").items()}
        f = activation(x[:, s] @ encoder[f"W_enc_{s}"].T + encoder[f"b_enc_{s}"], encoder.get(f"threshold_{s}"))
        y[:, s] += encoder[f"b_dec_{s}"]
        active = f.abs().sum(0).nonzero().flatten()  # the features that fire somewhere
        if len(active) == 0:
            continue
        with safe_open(str(directory / f"W_dec_{s}.safetensors"), framework="pt") as handle:
            rows = handle.get_slice(f"W_dec_{s}")[active.tolist()].double()  # (active, L - s, D)
        for t in range(s, n_layers):
            y[:, t] += f[:, active] @ rows[:, t - s]
    return y


def transcoder_forward(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """circuit-tracer's SingleLayerTranscoder: act(x W_enc^T + b_enc) W_dec + b_dec (+ x W_skip^T)."""
    w = {name: t.double() for name, t in tensors.items()}
    x = x.double()
    f = activation(x @ w["W_enc"].T + w["b_enc"], w.get("activation_function.threshold"))
    y = f @ w["W_dec"] + w["b_dec"]
    return y + x @ w["W_skip"].T if "W_skip" in w else y


def transcoder_set_forward_from_files(directory: Path, x: torch.Tensor) -> torch.Tensor:
    layers = sorted(directory.glob("layer_*.safetensors"), key=lambda path: int(path.stem.split("_")[1]))
    return torch.stack([transcoder_forward(load_file(path), x[:, layer]) for layer, path in enumerate(layers)], dim=1)


# ---------------------------------------------------------------- our models with every parameter non-trivial


def raw_inputs(seed: int = 1, dtype: torch.dtype = F64) -> torch.Tensor:
    """(N, L, D) raw activations of the input hooks, each hook at roughly its dataset norm."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, L, D, generator=generator) + torch.randn(L, D, generator=generator)
    return (x * torch.tensor([NORMS[hook] for hook in IN])[:, None] / math.sqrt(D)).to(dtype)


def batch_of(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {hook: x[:, layer] for layer, hook in enumerate(IN)}


def outputs(model: CrossLayerTranscoder, x: torch.Tensor) -> torch.Tensor:
    """Our raw-scale outputs (N, L, D) on raw inputs (N, L, D)."""
    reconstructed = model.reconstruct(batch_of(x))
    return torch.stack([reconstructed[hook] for hook in OUT], dim=1)


def set_outputs(models: list[SparseAutoEncoder], x: torch.Tensor) -> torch.Tensor:
    by_layer = {int(model.cfg.hook_point_in.split(".")[1]): model for model in models}
    return torch.stack([next(iter(by_layer[layer].reconstruct(x[:, layer]).values())) for layer in range(L)], dim=1)


def midpoint_quantile(values: torch.Tensor, level: float) -> torch.Tensor:
    """A value halfway between two neighbouring data points, so no score sits on the threshold (where h n > theta and
    h > theta / n may round differently)."""
    ordered = values.flatten().sort().values
    index = int(level * (len(ordered) - 1))
    return (ordered[index] + ordered[index + 1]) / 2


def randomise(model, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "activation_function" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.4)


def place_thresholds(model, scores: torch.Tensor) -> None:
    """JumpReLU: per feature at the 70% quantile of its scores; BatchTopK: per layer (or overall) at 60% of the
    positive scores. `scores` (N, *feature_shape) are what the model compares with its thresholds."""
    act = model.activation_function
    with torch.no_grad():
        if model.cfg.act_fn == "jumprelu":
            flat = scores.clamp_min(0).reshape(N, -1)
            theta = torch.stack([midpoint_quantile(flat[:, i], 0.7) for i in range(flat.shape[1])]).clamp_min(1e-3)
            act.log_jumprelu_threshold.copy_(theta.log().reshape(model.feature_shape))
        elif model.cfg.act_fn == "batchlayertopk":
            act.topk_threshold.fill_(float(midpoint_quantile(scores[scores > 0], 0.6)))
        elif model.cfg.act_fn == "batchtopk":
            per_group = scores.reshape(N, -1, F).transpose(0, 1)  # (groups, N, F)
            values = [midpoint_quantile(group[group > 0], 0.6) for group in per_group]
            act.topk_threshold.copy_(torch.stack(values).reshape(act.topk_threshold.shape))


def make_clt(
    act_fn: str = "jumprelu",
    *,
    gating: bool = True,
    norm_activation: str = "dataset-wise",
    dtype: torch.dtype = F64,
    hooks_in: list[str] = IN,
    hooks_out: list[str] = OUT,
    **fields,
) -> CrossLayerTranscoder:
    cfg = CLTConfig(
        hook_points_in=hooks_in,
        hook_points_out=hooks_out,
        d_model=D,
        d_sae=F,
        act_fn=act_fn,
        top_k=4,
        norm_activation=norm_activation,
        sparsity_include_decoder_norm=gating,
        dtype=dtype,
        **fields,
    )
    model = CrossLayerTranscoder.from_config(cfg)
    randomise(model, torch.Generator().manual_seed(0))
    if norm_activation == "dataset-wise":
        model.set_dataset_average_activation_norm({hook: NORMS.get(hook, 4.0) for hook in cfg.hook_points})
    c_in = torch.tensor([model.dataset_scale(hook) if norm_activation == "dataset-wise" else 1.0 for hook in hooks_in])
    x = raw_inputs(dtype=dtype) * c_in[:, None].to(dtype)
    with torch.no_grad():
        hidden = torch.einsum("nld,ldf->nlf", x, model.W_E) + model.b_E
        norm = model.gating_norm()
        place_thresholds(model, hidden * norm if norm is not None else hidden)
    return model.eval()


def make_transcoder(
    layer: int,
    act_fn: str = "jumprelu",
    *,
    skip: bool = False,
    gating: bool = True,
    norm_activation: str = "dataset-wise",
    dtype: torch.dtype = F64,
) -> SparseAutoEncoder:
    cfg = SAEConfig(
        hook_point_in=IN[layer],
        hook_point_out=OUT[layer],
        d_model=D,
        d_sae=F,
        act_fn=act_fn,
        top_k=4,
        use_skip_connection=skip,
        norm_activation=norm_activation,
        sparsity_include_decoder_norm=gating,
        dtype=dtype,
    )
    model = SparseAutoEncoder.from_config(cfg)
    randomise(model, torch.Generator().manual_seed(10 + layer))
    c_in = 1.0
    if norm_activation == "dataset-wise":
        model.set_dataset_average_activation_norm({hook: NORMS[hook] for hook in cfg.hook_points})
        c_in = model.dataset_scale(IN[layer])
    with torch.no_grad():
        hidden = (raw_inputs(dtype=dtype)[:, layer] * c_in) @ model.W_E + model.b_E
        norm = model.gating_norm()
        place_thresholds(model, hidden * norm if norm is not None else hidden)
    return model.eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = F64) -> None:
    tolerance = 1e-9 if dtype == F64 else 2e-5
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance, atol=tolerance)


def fraction_active(model: CrossLayerTranscoder, x: torch.Tensor) -> float:
    c_in, _ = model.scale_factors(batch_of(x))
    return float((model.encode(x * c_in) != 0).double().mean())


# ---------------------------------------------------------------- CLT


CLT_VARIANTS = {
    "relu": {"act_fn": "relu"},
    # Gated, outputs of different scales: our own fold_activation_scale refuses this one; the export is still exact.
    "jumprelu-gated": {"act_fn": "jumprelu"},
    "jumprelu-ungated": {"act_fn": "jumprelu", "gating": False},
    "batchtopk-gated": {"act_fn": "batchtopk"},
    "batchlayertopk-gated": {"act_fn": "batchlayertopk"},
    "jumprelu-inference-f32": {"act_fn": "jumprelu", "norm_activation": "inference", "dtype": torch.float32},
    "relu-no-decoder-bias": {"act_fn": "relu", "use_decoder_bias": False},
}


@pytest.mark.parametrize("variant", list(CLT_VARIANTS))
def test_clt_export_matches_the_format_forward_and_round_trips(tmp_path: Path, variant: str) -> None:
    model = make_clt(**CLT_VARIANTS[variant])
    dtype = model.cfg.dtype
    x = raw_inputs(dtype=dtype)
    expected = outputs(model, x)
    assert 0.05 < fraction_active(model, x) < 0.9  # the activation function decides something

    directory = export_clt_to_circuit_tracer(model, tmp_path / "clt", scan="demo/clt")
    names = {f"W_enc_{i}.safetensors" for i in range(L)} | {f"W_dec_{i}.safetensors" for i in range(L)}
    assert {path.name for path in directory.iterdir()} == names | {"config.yaml"}
    config = yaml.safe_load((directory / "config.yaml").read_text())
    assert config == {
        "model_kind": "cross_layer_transcoder",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "scan": "demo/clt",
    }
    thresholded = model.cfg.act_fn != "relu"
    for i in range(L):
        encoder = load_file(directory / f"W_enc_{i}.safetensors")
        shapes = {f"W_enc_{i}": (F, D), f"b_enc_{i}": (F,), f"b_dec_{i}": (D,)} | (
            {f"threshold_{i}": (F,)} if thresholded else {}
        )
        assert {name: tuple(t.shape) for name, t in encoder.items()} == shapes
        assert all(t.dtype == dtype for t in encoder.values())
        decoder = load_file(directory / f"W_dec_{i}.safetensors")
        assert {name: tuple(t.shape) for name, t in decoder.items()} == {f"W_dec_{i}": (F, L - i, D)}

    assert_close(clt_forward_from_files(directory, x), expected, dtype)

    imported = import_clt_from_circuit_tracer(directory)
    assert (imported.cfg.hook_points_in, imported.cfg.hook_points_out) == (IN, OUT)
    assert imported.cfg.norm_activation == "inference" and not imported.cfg.sparsity_include_decoder_norm
    assert imported.cfg.act_fn == ("jumprelu" if thresholded else "relu")
    assert imported.W_E.dtype == dtype
    assert_close(outputs(imported, x), expected, dtype)


def test_the_gated_clt_is_one_our_fold_refuses() -> None:
    """The jumprelu-gated variant above exercises an export that `fold_activation_scale` could not do."""
    assert not make_clt("jumprelu").can_fold
    assert make_clt("jumprelu", gating=False).can_fold


def test_clt_round_trip_gives_identical_parameters(tmp_path: Path) -> None:
    model = make_clt("jumprelu", gating=False, norm_activation="inference")
    imported = import_clt_from_circuit_tracer(export_clt_to_circuit_tracer(model, tmp_path / "clt"))
    state, back = model.state_dict(), imported.state_dict()
    assert set(state) == set(back)
    for name, value in state.items():
        if name == "activation_function.log_jumprelu_threshold":  # stored as exp(log theta), read back as its log
            torch.testing.assert_close(back[name], value, rtol=1e-12, atol=1e-12)
        else:
            assert torch.equal(back[name], value), name
    x = raw_inputs()
    torch.testing.assert_close(outputs(imported, x), outputs(model, x), rtol=1e-6, atol=1e-6)


def test_clt_export_equals_our_own_fold_where_there_is_one(tmp_path: Path) -> None:
    """Where `fold_activation_scale` is exact, the exported weights are the folded model's."""
    for kwargs in ({"act_fn": "relu"}, {"act_fn": "jumprelu", "gating": False}):
        model = make_clt(**kwargs)
        reference = copy.deepcopy(model)
        reference.fold_activation_scale()
        imported = import_clt_from_circuit_tracer(export_clt_to_circuit_tracer(model, tmp_path / kwargs["act_fn"]))
        folded = reference.state_dict()
        for name, value in imported.state_dict().items():
            torch.testing.assert_close(value, folded[name], rtol=1e-12, atol=1e-12, msg=name)
        assert not torch.allclose(folded["b_E"], model.b_E)  # the scale was not trivial


def test_gated_thresholds_are_divided_by_input_scale_and_decoder_norm(tmp_path: Path) -> None:
    """Our gate h n > theta on normalised h is circuit-tracer's h_raw > theta / (c_in n); writing theta itself (or
    leaving out either factor) changes the outputs on the test data."""
    model = make_clt("jumprelu")
    directory = export_clt_to_circuit_tracer(model, tmp_path / "clt")
    theta = model.activation_function.log_jumprelu_threshold.detach().exp()
    c_in = torch.tensor([model.dataset_scale(hook) for hook in IN], dtype=F64)
    written = torch.stack([load_file(directory / f"W_enc_{i}.safetensors")[f"threshold_{i}"] for i in range(L)])
    assert_close(written * c_in[:, None] * model.decoder_norm().detach(), theta)

    x = raw_inputs()
    expected = outputs(model, x)
    for wrong in (theta, theta / c_in[:, None], theta / model.decoder_norm().detach()):
        naive = tmp_path / f"naive-{len(list(tmp_path.iterdir()))}"
        naive.mkdir()
        for path in directory.iterdir():
            (naive / path.name).write_bytes(path.read_bytes())
        for i in range(L):
            tensors = load_file(naive / f"W_enc_{i}.safetensors")
            save_file(tensors | {f"threshold_{i}": wrong[i].contiguous()}, naive / f"W_enc_{i}.safetensors")
        assert (clt_forward_from_files(naive, x) - expected).abs().max() > 1e-2


def test_clt_import_hook_names_can_be_overridden(tmp_path: Path) -> None:
    directory = export_clt_to_circuit_tracer(make_clt("relu"), tmp_path / "clt")
    template = import_clt_from_circuit_tracer(directory, hook_points_in="blocks.{layer}.hook_resid_mid")
    assert template.cfg.hook_points_in == [f"blocks.{layer}.hook_resid_mid" for layer in range(L)]
    assert template.cfg.hook_points_out == OUT
    listed = import_clt_from_circuit_tracer(directory, hook_points_out=["a", "b", "c"])
    assert listed.cfg.hook_points_out == ["a", "b", "c"]
    with pytest.raises(InteropError, match="has 2 hook points but .* holds 3 layers"):
        import_clt_from_circuit_tracer(directory, hook_points_in=["a", "b"])
    with pytest.raises(InteropError, match=r"must contain '\{layer\}'"):
        import_clt_from_circuit_tracer(directory, hook_points_in="blocks.0.hook_resid_mid")


# ---------------------------------------------------------------- transcoder sets


SET_VARIANTS = {
    "mixed-activations": [{"act_fn": "relu"}, {"act_fn": "jumprelu"}, {"act_fn": "batchtopk"}],
    "jumprelu-ungated-skip": [{"act_fn": "jumprelu", "gating": False, "skip": True}] * L,
    "relu-skip-inference-f32": [{"act_fn": "relu", "skip": True, "norm_activation": "inference", "dtype": F32}] * L,
}


@pytest.mark.parametrize("variant", list(SET_VARIANTS))
def test_transcoder_set_export_matches_the_format_forward_and_round_trips(tmp_path: Path, variant: str) -> None:
    models = [make_transcoder(layer, **kwargs) for layer, kwargs in enumerate(SET_VARIANTS[variant])]
    dtype = models[0].cfg.dtype
    x = raw_inputs(dtype=dtype)
    expected = set_outputs(models, x)

    directory = export_transcoders_to_circuit_tracer(models[::-1], tmp_path / "set")  # any order: sorted by block
    assert {path.name for path in directory.iterdir()} == {f"layer_{i}.safetensors" for i in range(L)} | {"config.yaml"}
    config = yaml.safe_load((directory / "config.yaml").read_text())
    assert config == {
        "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "scan": None,
    }
    for layer, model in enumerate(models):
        tensors = load_file(directory / f"layer_{layer}.safetensors")
        shapes = {"W_enc": (F, D), "W_dec": (F, D), "b_enc": (F,), "b_dec": (D,)}
        if model.cfg.act_fn != "relu":
            shapes["activation_function.threshold"] = (F,)
        if model.cfg.use_skip_connection:
            shapes["W_skip"] = (D, D)
        assert {name: tuple(t.shape) for name, t in tensors.items()} == shapes

    assert_close(transcoder_set_forward_from_files(directory, x), expected, dtype)

    imported = import_transcoders_from_circuit_tracer(directory)
    assert [(m.cfg.hook_point_in, m.cfg.hook_point_out) for m in imported] == list(zip(IN, OUT, strict=True))
    assert [m.cfg.act_fn for m in imported] == ["relu" if m.cfg.act_fn == "relu" else "jumprelu" for m in models]
    assert all(m.cfg.use_skip_connection == models[0].cfg.use_skip_connection for m in imported)
    assert_close(set_outputs(imported, x), expected, dtype)
    if variant == "relu-skip-inference-f32":  # nothing to fold: the parameters come back bitwise
        for model, back in zip(models, imported, strict=True):
            for name, value in model.state_dict().items():
                assert torch.equal(back.state_dict()[name], value), name


def test_transcoder_export_equals_our_own_fold(tmp_path: Path) -> None:
    models = [make_transcoder(layer, "relu", skip=True) for layer in range(L)]
    imported = import_transcoders_from_circuit_tracer(export_transcoders_to_circuit_tracer(models, tmp_path / "set"))
    for model, back in zip(models, imported, strict=True):
        folded = copy.deepcopy(model)
        folded.fold_activation_scale()
        for name, value in folded.state_dict().items():
            torch.testing.assert_close(back.state_dict()[name], value, rtol=1e-12, atol=1e-12, msg=name)
        assert not torch.allclose(folded.W_D, model.W_D)


def test_transcoder_set_listed_as_hf_uris_imports_from_the_local_copies(tmp_path: Path) -> None:
    models = [make_transcoder(layer) for layer in range(L)]
    directory = export_transcoders_to_circuit_tracer(models, tmp_path / "set", hf_repo="org/tcs/v1", scan="org/tcs")
    config = yaml.safe_load((directory / "config.yaml").read_text())
    assert config["transcoders"] == [f"hf://org/tcs/v1/layer_{i}.safetensors" for i in range(L)]
    assert config["scan"] == "org/tcs"
    x = raw_inputs()
    assert_close(set_outputs(import_transcoders_from_circuit_tracer(directory), x), set_outputs(models, x))
    (directory / "layer_2.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"transcoders\[2\] = 'hf://org/tcs/v1/layer_2.safetensors'"):
        import_transcoders_from_circuit_tracer(directory)


def test_gemma_scope_npz_transcoders_are_read(tmp_path: Path) -> None:
    """GemmaScope's .npz layout (W_enc (D, F), a bare `threshold`), listed in the config as circuit-tracer's gemma
    configs list them; written by hand from known weights."""
    generator = torch.Generator().manual_seed(5)
    rows = []
    for layer in range(L):
        weights = {
            "W_enc": torch.randn(D, F, generator=generator, dtype=F64),
            "W_dec": torch.randn(F, D, generator=generator, dtype=F64),
            "b_enc": torch.randn(F, generator=generator, dtype=F64),
            "b_dec": torch.randn(D, generator=generator, dtype=F64),
            "threshold": torch.rand(F, generator=generator, dtype=F64) * 2,
        }
        np.savez(tmp_path / f"params_{layer}.npz", **{name: t.numpy() for name, t in weights.items()})
        rows.append(weights)
    (tmp_path / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "model_kind": "transcoder_set",
                "feature_input_hook": "hook_resid_mid",
                "feature_output_hook": "hook_mlp_out",
                "transcoders": [f"hf://google/gemma-scope/layer_{i}/params_{i}.npz" for i in range(L)],
            }
        )
    )
    imported = import_transcoders_from_circuit_tracer(tmp_path)
    assert [m.cfg.hook_point_in for m in imported] == [f"blocks.{i}.hook_resid_mid" for i in range(L)]
    x = raw_inputs()
    for layer, model in enumerate(imported):
        w = rows[layer]
        pre = x[:, layer] @ w["W_enc"] + w["b_enc"]
        expected = (pre * (pre > w["threshold"])) @ w["W_dec"] + w["b_dec"]
        assert_close(next(iter(model.reconstruct(x[:, layer]).values())), expected)


def test_import_dispatches_on_model_kind(tmp_path: Path) -> None:
    clt = import_circuit_tracer(export_clt_to_circuit_tracer(make_clt("relu"), tmp_path / "clt"))
    assert isinstance(clt, CrossLayerTranscoder)
    models = [make_transcoder(layer, "relu") for layer in range(L)]
    transcoders = import_circuit_tracer(export_transcoders_to_circuit_tracer(models, tmp_path / "set"))
    assert [type(m) for m in transcoders] == [SparseAutoEncoder] * L
    with pytest.raises(InteropError, match="not 'cross_layer_transcoder'; use import_transcoders_from_circuit_tracer"):
        import_clt_from_circuit_tracer(tmp_path / "set")


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: make_clt("topk"), "act_fn='topk'.*lm-saes convert-topk-to-jumprelu"),
        (lambda: make_clt("layertopk"), "act_fn='layertopk'.*lm-saes convert-topk-to-jumprelu"),
        (lambda: make_clt("relu", norm_activation="token-wise"), "norm_activation='token-wise'"),
        (lambda: make_clt("relu", hooks_in=[f"blocks.{i}.ln2.hook_normalized" for i in (3, 4, 5)]), "blocks 0..2"),
        (lambda: make_clt("relu", hooks_in=[IN[0], IN[1], "blocks.2.hook_resid_mid"]), "different hook names"),
        (lambda: make_clt("relu", hooks_in=["resid_0", "resid_1", "resid_2"]), "not a TransformerLens block hook"),
        (lambda: make_clt("relu", d_out=8), "d_out=8 != d_model=16"),
    ],
)
def test_unexportable_clts_are_refused(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(InteropError, match=message):
        export_clt_to_circuit_tracer(make(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_wise_model_without_norms_is_refused(tmp_path: Path) -> None:
    model = make_clt("relu", norm_activation="inference")
    model.cfg.norm_activation = "dataset-wise"
    with pytest.raises(InteropError, match="cannot fold the activation scale.*dataset_average_activation_norm"):
        export_clt_to_circuit_tracer(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: [make_transcoder(i, "topk") for i in range(L)], "lm-saes convert-topk-to-jumprelu"),
        (lambda: [make_transcoder(0), make_transcoder(2)], r"no transcoder for blocks \[1\]"),
        (lambda: [make_transcoder(0, skip=True), make_transcoder(1)], "skip connection and some not"),
        (lambda: [make_clt("relu")], "a CLT goes through export_clt_to_circuit_tracer"),
    ],
)
def test_unexportable_transcoder_sets_are_refused(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(InteropError, match=message):
        export_transcoders_to_circuit_tracer(make(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_plain_sae_is_not_a_transcoder(tmp_path: Path) -> None:
    sae = SparseAutoEncoder.from_config(SAEConfig(hook_point_in=IN[0], hook_point_out=IN[0], d_model=D, d_sae=F))
    with pytest.raises(InteropError, match="hook_point_in != hook_point_out"):
        export_transcoders_to_circuit_tracer([sae], tmp_path / "out")


def write_clt(tmp_path: Path) -> Path:
    return export_clt_to_circuit_tracer(make_clt("jumprelu", gating=False), tmp_path / "clt")


def edit_tensors(path: Path, **changes: torch.Tensor | None) -> None:
    tensors = load_file(path)
    for name, value in changes.items():
        if value is None:
            tensors.pop(name)
        else:
            tensors[name] = value
    save_file(tensors, path)


def test_bad_clt_files_are_named(tmp_path: Path) -> None:
    directory = write_clt(tmp_path)
    encoder_1 = directory / "W_enc_1.safetensors"
    original = encoder_1.read_bytes()

    edit_tensors(encoder_1, threshold_1=-torch.ones(F, dtype=F64))
    with pytest.raises(InteropError, match=r"W_enc_1.safetensors: threshold_1 has 32 negative entries"):
        import_clt_from_circuit_tracer(directory)
    encoder_1.write_bytes(original)

    edit_tensors(encoder_1, W_skip_1=torch.zeros(D, D, dtype=F64))
    with pytest.raises(InteropError, match="W_skip_1 .* not supported"):
        import_clt_from_circuit_tracer(directory)
    encoder_1.write_bytes(original)

    edit_tensors(encoder_1, threshold_1=None)
    with pytest.raises(InteropError, match="W_enc_1.safetensors: missing tensor 'threshold_1'"):
        import_clt_from_circuit_tracer(directory)
    encoder_1.write_bytes(original)

    edit_tensors(directory / "W_dec_1.safetensors", W_dec_1=torch.zeros(F, L, D, dtype=F64))
    with pytest.raises(InteropError, match=r"W_dec_1.safetensors: tensor 'W_dec_1' has shape \(32, 3, 16\)"):
        import_clt_from_circuit_tracer(directory)

    encoder_1.unlink()
    with pytest.raises(FileNotFoundError, match="W_enc_1.safetensors is missing"):
        import_clt_from_circuit_tracer(directory)

    (directory / "config.yaml").write_text("model_kind: sae\n")
    with pytest.raises(InteropError, match="model_kind='sae' is not supported"):
        import_clt_from_circuit_tracer(directory)
    (directory / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="config.yaml not found"):
        import_clt_from_circuit_tracer(directory)


def test_unsupported_transcoder_sets_are_named(tmp_path: Path) -> None:
    directory = export_transcoders_to_circuit_tracer([make_transcoder(i) for i in range(L)], tmp_path / "set")
    config = yaml.safe_load((directory / "config.yaml").read_text())
    (directory / "config.yaml").write_text(yaml.safe_dump(config | {"activation": "topk", "k": 4}))
    with pytest.raises(InteropError, match="activation 'topk' is not supported"):
        import_transcoders_from_circuit_tracer(directory)

    # `activation: relu` makes circuit-tracer ignore the thresholds: so do we.
    (directory / "config.yaml").write_text(yaml.safe_dump(config | {"activation": "relu"}))
    assert {m.cfg.act_fn for m in import_transcoders_from_circuit_tracer(directory)} == {"relu"}

    without_input_hook = {key: value for key, value in config.items() if key != "feature_input_hook"}
    (directory / "config.yaml").write_text(yaml.safe_dump(without_input_hook))
    with pytest.raises(InteropError, match="no feature_input_hook .* pass hook_points_in"):
        import_transcoders_from_circuit_tracer(directory)

    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    edit_tensors(directory / "layer_1.safetensors", k=torch.tensor(4))
    with pytest.raises(InteropError, match="layer_1.safetensors: a tensor 'k' marks a TopK transcoder"):
        import_transcoders_from_circuit_tracer(directory)


# ---------------------------------------------------------------- the directory appears whole or not at all


def test_a_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_save_file = circuit_tracer.save_file

    def failing_save_file(tensors, path):
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full")
        real_save_file(tensors, path)

    monkeypatch.setattr(circuit_tracer, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        export_clt_to_circuit_tracer(make_clt("relu"), tmp_path / "clt")
    assert len(calls) == 4
    assert list(tmp_path.iterdir()) == []  # neither the directory nor its staging copy


def test_an_existing_directory_is_replaced_only_when_asked(tmp_path: Path) -> None:
    target = tmp_path / "clt"
    target.mkdir()
    export_clt_to_circuit_tracer(make_clt("relu"), target)  # an empty directory is fine
    (target / "W_enc_7.safetensors").write_bytes(b"stale")  # would change circuit-tracer's layer count
    with pytest.raises(FileExistsError, match="is not empty; choose a new directory or pass overwrite=True"):
        export_clt_to_circuit_tracer(make_clt("relu"), target)
    assert (target / "W_enc_7.safetensors").exists()
    export_clt_to_circuit_tracer(make_clt("jumprelu"), target, overwrite=True)
    assert not (target / "W_enc_7.safetensors").exists()
    assert import_clt_from_circuit_tracer(target).cfg.act_fn == "jumprelu"
    assert [path.name for path in tmp_path.iterdir()] == ["clt"]


# ---------------------------------------------------------------- CLI


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


def test_cli_exports_and_imports_a_clt(tmp_path: Path) -> None:
    model = make_clt("jumprelu")  # saved with its norms (our fold cannot take it), folded by the export
    model.save_pretrained(tmp_path / "saved")
    assert SparseDictionary.from_pretrained(tmp_path / "saved").cfg.norm_activation == "dataset-wise"
    result = invoke("export-circuit-tracer", str(tmp_path / "saved"), str(tmp_path / "ct"), "--scan", "demo")
    assert result.exit_code == 0, result.output
    assert f"circuit-tracer: {tmp_path / 'ct'} (3 layers)" in result.stdout
    x = raw_inputs()
    assert_close(clt_forward_from_files(tmp_path / "ct", x), outputs(model, x))

    template = "blocks.{layer}.ln2.hook_normalized"
    result = invoke("import-circuit-tracer", str(tmp_path / "ct"), str(tmp_path / "back"), "--hook-in", template)
    assert result.exit_code == 0, result.output
    back = SparseDictionary.from_pretrained(tmp_path / "back")
    assert back.cfg.hook_points_in == IN
    assert_close(outputs(back, x), outputs(model, x))


def test_cli_exports_and_imports_a_transcoder_set(tmp_path: Path) -> None:
    models = [make_transcoder(layer) for layer in range(L)]
    for layer, model in enumerate(models):
        model.save_pretrained(tmp_path / f"tc{layer}")
    sources = [str(tmp_path / f"tc{layer}") for layer in (2, 0, 1)]
    result = invoke("export-circuit-tracer", *sources, str(tmp_path / "ct"), "--hf-repo", "org/tcs")
    assert result.exit_code == 0, result.output
    x = raw_inputs()
    assert_close(transcoder_set_forward_from_files(tmp_path / "ct", x), set_outputs(models, x))

    result = invoke("import-circuit-tracer", str(tmp_path / "ct"), str(tmp_path / "back"))
    assert result.exit_code == 0, result.output
    assert result.stdout.count("dictionary: ") == L
    back = [SparseDictionary.from_pretrained(tmp_path / "back" / f"layer_{layer}") for layer in range(L)]
    assert_close(set_outputs(back, x), set_outputs(models, x))


@pytest.mark.parametrize(
    ("setup", "command", "message"),
    [
        (lambda p: make_clt("topk").save_pretrained(p / "in"), "export-circuit-tracer", "convert-topk-to-jumprelu"),
        (lambda p: (p / "in").mkdir(), "export-circuit-tracer", "is missing"),
        (lambda p: (p / "in").mkdir(), "import-circuit-tracer", "config.yaml not found"),
    ],
)
def test_cli_errors_are_one_clean_line(tmp_path: Path, setup, command: str, message: str) -> None:
    setup(tmp_path)
    result = invoke(command, str(tmp_path / "in"), str(tmp_path / "out"))
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
