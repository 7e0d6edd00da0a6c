"""Read and write circuit-tracer's transcoder directories (a `config.yaml` beside safetensors files) without importing
circuit_tracer: a cross-layer transcoder (`model_kind: cross_layer_transcoder`) and per-layer transcoders
(`model_kind: transcoder_set`), as spec/peer-formats.md describes them.

circuit-tracer computes, on raw activations and with one row per feature in every matrix (no decoder-norm gating):

    pre_l = x_l @ W_enc_l.T + b_enc_l                     (N, F)
    f_l   = relu(pre_l), or pre_l * (pre_l > threshold_l) (JumpReLU)
    CLT:        y_t = sum_{s <= t} f_s @ W_dec_s[:, t - s] + b_dec_t      W_dec_s (F, n_layers - s, D)
    transcoder: y_l = f_l @ W_dec_l + b_dec_l (+ x_l @ W_skip_l.T)

Its hooks are TransformerLens names within a block: layer l reads `blocks.{l}.{feature_input_hook}` and writes
`blocks.{l}.{feature_output_hook}`, for every layer from 0 on.

Exporting computes, in float64, the weights that give our outputs on raw activations: with c_in(s) and c_out(t) the
dataset-wise scale factors (1 for an `inference` model), b_enc = b_E / c_in, W_dec = W_D c_in / c_out,
b_dec = b_D / c_out, and our gate `h n > theta` on normalised pre-activations h = c_in h_raw (n the decoder norm with
`sparsity_include_decoder_norm`, else 1) becomes circuit-tracer's per-feature `h_raw > theta / (c_in n)`. Because every
feature has its own threshold there, this is exact even where our own `fold_activation_scale` is not (a gated CLT
whose outputs have different scales). BatchTopK exports as the JumpReLU its inference threshold is; per-token TopK does
not exist in circuit-tracer's CLT, and its per-layer TopK keeps negative pre-activations, so neither is exported.
"""

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lm_saes_core.config import format_validation_error, parse_dtype
from lm_saes_core.interop.saelens import InteropError, build_model, check_shapes, read_safetensors
from lm_saes_core.io import temporary_path
from lm_saes_core.models.base import SparseDictionary
from lm_saes_core.models.clt import CLTConfig, CrossLayerTranscoder
from lm_saes_core.models.sae import SAEConfig, SparseAutoEncoder

CONFIG_FILE = "config.yaml"
CLT_KIND = "cross_layer_transcoder"
TRANSCODER_SET_KIND = "transcoder_set"
THRESHOLD = "activation_function.threshold"
"""The per-layer transcoder file's JumpReLU threshold (circuit-tracer nests it in its activation module)."""
_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")
_CLT_ENCODER_FILE = re.compile(r"^W_enc_(\d+)\.safetensors$")
_TOPK_REFUSAL = (
    "circuit-tracer's cross-layer transcoder runs ReLU or JumpReLU only, and its per-layer TopK keeps the k largest "
    "pre-activations even when they are negative, so none of its activations computes ours; convert the dictionary "
    "first with `lm-saes convert-topk-to-jumprelu` (batchtopk exports as it is: its inference threshold is a JumpReLU)"
)

HookPoints = str | Sequence[str] | None
"""Our hook names on import: a list with one per layer, a template with `{layer}` (e.g.
`blocks.{layer}.ln2.hook_normalized`), or None for `blocks.{l}.` + the config's hook name."""


# ---------------------------------------------------------------- export


def export_clt_to_circuit_tracer(
    model: CrossLayerTranscoder, directory: str | Path, *, scan: str | None = None, overwrite: bool = False
) -> Path:
    """Write `model` as a circuit-tracer CLT directory: `W_enc_{i}.safetensors` (`W_enc_{i}` (F, D), `b_enc_{i}`,
    `b_dec_{i}`, `threshold_{i}` for JumpReLU/BatchTopK), `W_dec_{i}.safetensors` (`W_dec_{i}` (F, L - i, D)) and
    config.yaml. `scan` is circuit-tracer's feature-visualisation id. The directory appears complete or not at all;
    an existing non-empty one is replaced only with `overwrite`. Returns the directory."""
    if not isinstance(model, CrossLayerTranscoder):
        raise InteropError(
            f"export_clt_to_circuit_tracer takes a cross-layer transcoder (sae_type 'clt'), got sae_type "
            f"{model.cfg.sae_type!r}; per-layer transcoders go through export_transcoders_to_circuit_tracer"
        )
    cfg = model.cfg
    _check_exportable(model, f"CLT over {cfg.hook_points_in[0]!r}...")
    input_hook = _common_block_hook(cfg.hook_points_in, "hook_points_in")
    output_hook = _common_block_hook(cfg.hook_points_out, "hook_points_out")
    c_in, c_out = _scale_factors(model)
    thresholds = _raw_thresholds(model, c_in[:, None])  # (L, F) or None
    W_E, b_E = model.W_E.detach().double().cpu(), model.b_E.detach().double().cpu()
    W_D = [decoder.detach().double().cpu() for decoder in model.W_D]
    b_D = _decoder_biases(model)
    files: dict[str, dict[str, Tensor]] = {}
    L = cfg.n_layers
    for s in range(L):
        encoder = {f"W_enc_{s}": W_E[s].T, f"b_enc_{s}": b_E[s] / c_in[s], f"b_dec_{s}": b_D[s] / c_out[s]}
        if thresholds is not None:
            encoder[f"threshold_{s}"] = thresholds[s]
        files[f"W_enc_{s}.safetensors"] = encoder
        # Feature-major: row i holds everything feature i of layer s writes, to layers s..L-1 (read by get_slice).
        decoder = torch.stack([W_D[t][s] * (c_in[s] / c_out[t]) for t in range(s, L)], dim=1)  # (F, L - s, D)
        files[f"W_dec_{s}.safetensors"] = {f"W_dec_{s}": decoder}
    config = {
        "model_kind": CLT_KIND,
        "feature_input_hook": input_hook,
        "feature_output_hook": output_hook,
        "scan": scan,
    }
    return _write_directory(Path(directory), files, config, model.W_E.dtype, overwrite)


def export_transcoders_to_circuit_tracer(
    models: Sequence[SparseAutoEncoder],
    directory: str | Path,
    *,
    scan: str | None = None,
    hf_repo: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one transcoder per layer (`hook_point_in` `blocks.{l}.<a>` -> `hook_point_out` `blocks.{l}.<b>`, layers
    0..n-1 in any order) as a circuit-tracer transcoder set: `layer_{l}.safetensors` (`W_enc` (F, D), `W_dec` (F, D),
    `b_enc`, `b_dec`, `activation_function.threshold` for JumpReLU/BatchTopK, `W_skip` (D, D)) and config.yaml. With
    `hf_repo` ("org/name[/folder]", where the files will be uploaded) the config lists them as `transcoders: [hf://…]`;
    without, circuit-tracer finds `layer_*.safetensors` beside the config. Returns the directory."""
    if not models:
        raise InteropError("export_transcoders_to_circuit_tracer needs at least one transcoder")
    by_layer: dict[int, SparseAutoEncoder] = {}
    hook_names: set[tuple[str, str]] = set()
    for model in models:
        if not isinstance(model, SparseAutoEncoder) or not model.cfg.is_transcoder:
            hooks = f"{model.cfg.hooks_in} -> {model.cfg.hooks_out}"
            raise InteropError(
                f"a circuit-tracer transcoder set holds transcoders (sae_type 'sae' with hook_point_in != "
                f"hook_point_out), got sae_type {model.cfg.sae_type!r} on {hooks}; a CLT goes through "
                "export_clt_to_circuit_tracer"
            )
        cfg = model.cfg
        layer_in, name_in = _block_hook(cfg.hook_point_in, "hook_point_in")
        layer_out, name_out = _block_hook(cfg.hook_point_out, "hook_point_out")
        if layer_in != layer_out:
            raise InteropError(
                f"transcoder {cfg.hook_point_in!r} -> {cfg.hook_point_out!r} reads block {layer_in} and writes block "
                f"{layer_out}; circuit-tracer's layer-l transcoder reads and writes block l"
            )
        if layer_in in by_layer:
            raise InteropError(f"two transcoders for block {layer_in} (one is {cfg.hook_point_in!r})")
        by_layer[layer_in] = model
        hook_names.add((name_in, name_out))
    missing = sorted(set(range(max(by_layer) + 1)) - set(by_layer))
    if missing:
        raise InteropError(
            f"no transcoder for blocks {missing}: circuit-tracer needs one for every block from 0 to {max(by_layer)}"
        )
    if len(hook_names) > 1:
        raise InteropError(
            f"the transcoders use different hook names {sorted(hook_names)}; circuit-tracer reads one "
            "feature_input_hook and writes one feature_output_hook in every block"
        )
    layers = [by_layer[layer] for layer in range(len(by_layer))]
    widths = {model.cfg.d_sae for model in layers}
    if len(widths) > 1:
        raise InteropError(f"the transcoders have different d_sae {sorted(widths)}; circuit-tracer needs one width")
    if len({model.cfg.use_skip_connection for model in layers}) > 1:
        raise InteropError("some transcoders have a skip connection and some not; circuit-tracer needs all or none")

    files = {f"layer_{layer}.safetensors": _transcoder_tensors(model) for layer, model in enumerate(layers)}
    (input_hook, output_hook) = hook_names.pop()
    config: dict[str, Any] = {
        "model_kind": TRANSCODER_SET_KIND,
        "feature_input_hook": input_hook,
        "feature_output_hook": output_hook,
        "scan": scan,
    }
    if hf_repo is not None:
        if len(hf_repo.strip("/").split("/")) < 2:
            raise InteropError(f"hf_repo={hf_repo!r} must name a Hugging Face repository as 'org/name[/folder]'")
        config["transcoders"] = [f"hf://{hf_repo.strip('/')}/{name}" for name in files]
    dtypes = {model.W_E.dtype for model in layers}
    if len(dtypes) > 1:
        raise InteropError(f"the transcoders have different dtypes {sorted(map(str, dtypes))}; convert them to one")
    return _write_directory(Path(directory), files, config, dtypes.pop(), overwrite)


def export_circuit_tracer(
    models: Sequence[SparseDictionary], directory: str | Path, *, scan: str | None = None, hf_repo: str | None = None
) -> Path:
    """One CLT -> `export_clt_to_circuit_tracer`; transcoders -> `export_transcoders_to_circuit_tracer`."""
    if len(models) == 1 and isinstance(models[0], CrossLayerTranscoder):
        if hf_repo is not None:
            raise InteropError("hf_repo applies to transcoder sets (their config lists the files); a CLT has none")
        return export_clt_to_circuit_tracer(models[0], directory, scan=scan)
    return export_transcoders_to_circuit_tracer(models, directory, scan=scan, hf_repo=hf_repo)


def _check_exportable(model: SparseDictionary, what: str) -> None:
    cfg = model.cfg
    if cfg.act_fn not in ("relu", "jumprelu", "batchtopk", "batchlayertopk"):
        raise InteropError(f"cannot export {what} with act_fn={cfg.act_fn!r} to circuit-tracer: {_TOPK_REFUSAL}")
    if cfg.d_output != cfg.d_model:
        raise InteropError(
            f"cannot export {what} with d_out={cfg.d_output} != d_model={cfg.d_model} to circuit-tracer: its "
            "transcoders write back to the input width (b_dec has d_model entries)"
        )


def _scale_factors(model: SparseDictionary) -> tuple[Tensor, Tensor]:
    """(c_in per input hook, c_out per output hook), float64: what the model multiplies raw activations by."""
    cfg = model.cfg
    if cfg.norm_activation == "token-wise":
        raise InteropError(
            "cannot fold the activation scale into the circuit-tracer files: norm_activation='token-wise' rescales "
            "every token by its own norm, which no weight can express; train with 'dataset-wise' or 'inference'"
        )
    if cfg.norm_activation == "inference":
        return torch.ones(len(cfg.hooks_in), dtype=torch.float64), torch.ones(len(cfg.hooks_out), dtype=torch.float64)
    norms = cfg.dataset_average_activation_norm or {}
    missing = [hook for hook in cfg.hook_points if hook not in norms]
    if missing:
        raise InteropError(
            "cannot fold the activation scale into the circuit-tracer files: norm_activation='dataset-wise' but "
            f"dataset_average_activation_norm has no entry for {missing}; set it "
            "(model.set_dataset_average_activation_norm) or load a model that has it"
        )
    c_in = torch.tensor([model.dataset_scale(hook) for hook in cfg.hooks_in], dtype=torch.float64)
    return c_in, torch.tensor([model.dataset_scale(hook) for hook in cfg.hooks_out], dtype=torch.float64)


def _raw_thresholds(model: SparseDictionary, c_in: Tensor) -> Tensor | None:
    """Per-feature thresholds (*feature_shape, float64) on the raw pre-activations that keep exactly the features the
    model keeps (in eval mode); None for ReLU. `c_in` broadcasts against the features (per layer for a CLT)."""
    activation = model.activation_function
    shape = model.feature_shape
    if model.cfg.act_fn == "relu":
        return None
    if model.cfg.act_fn == "jumprelu":
        theta = activation.log_jumprelu_threshold.detach().double().cpu().exp()
    else:  # batchtopk / batchlayertopk at inference: one threshold per layer, or one for all
        theta = activation.topk_threshold.detach().double().cpu()
        theta = theta.reshape(theta.shape + (1,) * (len(shape) - theta.dim()))
    scale = c_in.expand(shape)
    norm = model.gating_norm()
    if norm is None:
        return (theta / scale).expand(shape).clone()
    norm = norm.detach().double().cpu()
    # A feature whose decoder is zero scores 0 and never fires in our model: an infinite threshold says the same.
    return torch.where(norm > 0, theta / (scale * norm), torch.inf)


def _decoder_biases(model: CrossLayerTranscoder) -> list[Tensor]:
    if model.b_D is None:
        return [torch.zeros(model.cfg.d_output, dtype=torch.float64) for _ in range(model.cfg.n_layers)]
    return [bias.detach().double().cpu() for bias in model.b_D]


def _transcoder_tensors(model: SparseAutoEncoder) -> dict[str, Tensor]:
    cfg = model.cfg
    _check_exportable(model, f"transcoder {cfg.hook_point_in!r} -> {cfg.hook_point_out!r}")
    c_in, c_out = (float(c) for c in _scale_factors(model))
    thresholds = _raw_thresholds(model, torch.tensor(c_in, dtype=torch.float64))
    b_D = model.b_D.detach().double().cpu() if model.b_D is not None else torch.zeros(cfg.d_output, dtype=torch.float64)
    tensors = {
        "W_enc": model.W_E.detach().double().cpu().T,  # (F, D): a row per feature
        "W_dec": model.W_D.detach().double().cpu() * (c_in / c_out),  # (F, D)
        "b_enc": model.b_E.detach().double().cpu() / c_in,
        "b_dec": b_D / c_out,
    }
    if thresholds is not None:
        tensors[THRESHOLD] = thresholds
    if model.W_skip is not None:
        tensors["W_skip"] = model.W_skip.detach().double().cpu() * (c_in / c_out)  # (D, D), applied as x @ W_skip.T
    return tensors


def _block_hook(hook: str, field: str) -> tuple[int, str]:
    match = _BLOCK_HOOK.match(hook)
    if match is None:
        raise InteropError(
            f"{field} {hook!r} is not a TransformerLens block hook 'blocks.<layer>.<name>': circuit-tracer names "
            "hooks by their name within a block and applies layer l's features to block l"
        )
    return int(match.group(1)), match.group(2)


def _common_block_hook(hooks: list[str], field: str) -> str:
    """The one in-block hook name of `hooks`, which must be blocks 0, 1, ... in order."""
    names = set()
    for position, hook in enumerate(hooks):
        layer, name = _block_hook(hook, field)
        if layer != position:
            raise InteropError(
                f"{field}[{position}] is {hook!r} (block {layer}), but circuit-tracer applies a CLT's layer "
                f"{position} to block {position}: the CLT must cover blocks 0..{len(hooks) - 1} in order"
            )
        names.add(name)
    if len(names) > 1:
        raise InteropError(
            f"{field} uses different hook names {sorted(names)}; circuit-tracer reads one name in every block"
        )
    return names.pop()


def _write_directory(
    target: Path, files: dict[str, dict[str, Tensor]], config: dict[str, Any], dtype: torch.dtype, overwrite: bool
) -> Path:
    """Write the files into a hidden sibling directory, then rename it to `target`: a failed export leaves nothing."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; choose a new directory or pass overwrite=True")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_path(target)
    staging.mkdir()
    try:
        for name, tensors in files.items():
            save_file({key: value.to(dtype).contiguous() for key, value in tensors.items()}, str(staging / name))
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _replace_directory(staging: Path, target: Path) -> None:
    if not target.exists() or not any(target.iterdir()):
        os.replace(staging, target)  # rename(2) replaces an empty directory
        return
    old = temporary_path(target)
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old)


# ---------------------------------------------------------------- import


def read_circuit_tracer_config(directory: str | Path) -> dict[str, Any]:
    """The config.yaml of a circuit-tracer directory, with a `model_kind` we read."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a circuit-tracer directory has a {CONFIG_FILE} beside its weights")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InteropError(f"cannot parse {path} as YAML: {exc}") from None
    if not isinstance(config, dict):
        raise InteropError(f"{path} must hold a mapping, got {type(config).__name__}")
    kind = config.get("model_kind")
    if kind not in (CLT_KIND, TRANSCODER_SET_KIND):
        raise InteropError(f"{path}: model_kind={kind!r} is not supported, only {CLT_KIND} and {TRANSCODER_SET_KIND}")
    return config


def import_circuit_tracer(
    directory: str | Path,
    *,
    hook_points_in: HookPoints = None,
    hook_points_out: HookPoints = None,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> CrossLayerTranscoder | list[SparseAutoEncoder]:
    """A circuit-tracer directory as the CLT or the list of per-layer transcoders its `model_kind` names."""
    load = (
        import_clt_from_circuit_tracer
        if read_circuit_tracer_config(directory)["model_kind"] == CLT_KIND
        else import_transcoders_from_circuit_tracer
    )
    return load(directory, hook_points_in=hook_points_in, hook_points_out=hook_points_out, device=device, dtype=dtype)


def import_clt_from_circuit_tracer(
    directory: str | Path,
    *,
    hook_points_in: HookPoints = None,
    hook_points_out: HookPoints = None,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> CrossLayerTranscoder:
    """Load a circuit-tracer CLT directory (config.yaml, `W_enc_{i}` / `W_dec_{i}` files) as our CLT, ReLU or
    JumpReLU, with `norm_activation: inference` and no decoder-norm gating (circuit-tracer has neither). Hook names
    default to `blocks.{l}.{feature_input_hook}` / `blocks.{l}.{feature_output_hook}`; `dtype` to the files'."""
    directory = Path(directory)
    config = _expect_kind(directory, CLT_KIND, "import_transcoders_from_circuit_tracer")
    n_layers = _numbered_files(directory, _CLT_ENCODER_FILE, "W_enc_{}.safetensors")
    first = directory / "W_enc_0.safetensors"
    with safe_open(str(first), framework="pt") as handle:
        if "W_enc_0" not in handle.keys():  # noqa: SIM118
            raise InteropError(f"{first}: missing tensor 'W_enc_0' (has {sorted(handle.keys())})")
        d_sae, d_model = handle.get_slice("W_enc_0").get_shape()
        has_threshold = "threshold_0" in handle.keys()  # noqa: SIM118
        file_dtype = handle.get_tensor("b_enc_0").dtype if "b_enc_0" in handle.keys() else torch.float32  # noqa: SIM118

    W_E, b_E, b_D, thresholds, decoders = [], [], [], [], []
    for s in range(n_layers):
        path = directory / f"W_enc_{s}.safetensors"
        tensors = read_safetensors(path)
        if f"W_skip_{s}" in tensors:
            raise InteropError(
                f"{path}: W_skip_{s} (a skip connection) is not supported: our cross-layer transcoder has none"
            )
        expected = {f"W_enc_{s}": (d_sae, d_model), f"b_enc_{s}": (d_sae,), f"b_dec_{s}": (d_model,)}
        if has_threshold:
            expected[f"threshold_{s}"] = (d_sae,)
        check_shapes(tensors, expected, path)
        W_E.append(tensors[f"W_enc_{s}"].double().T)
        b_E.append(tensors[f"b_enc_{s}"].double())
        b_D.append(tensors[f"b_dec_{s}"].double())
        if has_threshold:
            thresholds.append(_log_threshold(tensors[f"threshold_{s}"], path, f"threshold_{s}"))
        path = directory / f"W_dec_{s}.safetensors"
        tensors = read_safetensors(path)
        check_shapes(tensors, {f"W_dec_{s}": (d_sae, n_layers - s, d_model)}, path)
        decoders.append(tensors[f"W_dec_{s}"].double())

    state = {"W_E": torch.stack(W_E), "b_E": torch.stack(b_E)}
    for t in range(n_layers):
        state[f"W_D.{t}"] = torch.stack([decoders[s][:, t - s] for s in range(t + 1)])  # (t + 1, F, D)
        state[f"b_D.{t}"] = b_D[t]
    if has_threshold:
        state["activation_function.log_jumprelu_threshold"] = torch.stack(thresholds)
    config_path = directory / CONFIG_FILE
    cfg = _validated(
        CLTConfig,
        config_path,
        hook_points_in=_hook_points(hook_points_in, config, "feature_input_hook", n_layers, config_path),
        hook_points_out=_hook_points(hook_points_out, config, "feature_output_hook", n_layers, config_path),
        d_model=d_model,
        d_sae=d_sae,
        act_fn="jumprelu" if has_threshold else "relu",
        norm_activation="inference",
        sparsity_include_decoder_norm=False,
        device=device,
        dtype=parse_dtype(dtype) if dtype is not None else file_dtype,
    )
    model = CrossLayerTranscoder(cfg)
    model.load_state_dict({name: value.to(cfg.dtype) for name, value in state.items()})
    return model.eval()


def import_transcoders_from_circuit_tracer(
    directory: str | Path,
    *,
    hook_points_in: HookPoints = None,
    hook_points_out: HookPoints = None,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
) -> list[SparseAutoEncoder]:
    """Load a circuit-tracer transcoder set as one transcoder per layer (index = block). The files are those the
    config lists as `transcoders` (hf:// entries looked up by their path in the repository, then by file name, in
    `directory`; other paths relative to it), else `layer_{l}.safetensors`; `.npz` files in the GemmaScope layout
    (W_enc (D, F), `threshold`) are read too. JumpReLU where a file has a threshold (unless the config says
    `activation: relu`), else ReLU; `activation: topk` is refused (see the module docstring)."""
    directory = Path(directory)
    config = _expect_kind(directory, TRANSCODER_SET_KIND, "import_clt_from_circuit_tracer")
    config_path = directory / CONFIG_FILE
    activation = config.get("activation")
    if activation == "topk":
        raise InteropError(
            f"{config_path}: activation 'topk' is not supported: circuit-tracer's TopK keeps the k largest "
            "pre-activations even when negative, where ours keeps only positive ones, so the import would not compute "
            "the same outputs"
        )
    paths = _transcoder_files(directory, config)
    ins = _hook_points(hook_points_in, config, "feature_input_hook", len(paths), config_path)
    outs = _hook_points(hook_points_out, config, "feature_output_hook", len(paths), config_path)
    models = []
    for layer, path in enumerate(paths):
        tensors = _read_transcoder_file(path)
        if "k" in tensors:
            raise InteropError(f"{path}: a tensor 'k' marks a TopK transcoder, which is not supported (see activation)")
        for name in ("b_enc", "b_dec"):
            if name not in tensors:
                raise InteropError(f"{path}: missing tensor {name!r} (has {sorted(tensors)})")
        d_sae, d_model = tensors["b_enc"].shape[0], tensors["b_dec"].shape[0]
        jumprelu = THRESHOLD in tensors and activation != "relu"
        if activation == "relu":
            tensors.pop(THRESHOLD, None)  # circuit-tracer ignores the thresholds then
        skip = "W_skip" in tensors
        expected = {"W_enc": (d_sae, d_model), "W_dec": (d_sae, d_model), "b_enc": (d_sae,), "b_dec": (d_model,)}
        if jumprelu:
            expected[THRESHOLD] = (d_sae,)
        if skip:
            expected["W_skip"] = (d_model, d_model)
        check_shapes(tensors, expected, path)
        weights = {
            "W_E": tensors["W_enc"].double().T,
            "b_E": tensors["b_enc"].double(),
            "W_D": tensors["W_dec"].double(),
            "b_D": tensors["b_dec"].double(),
        }
        if jumprelu:
            weights["activation_function.log_jumprelu_threshold"] = _log_threshold(tensors[THRESHOLD], path, THRESHOLD)
        if skip:
            weights["W_skip"] = tensors["W_skip"].double()
        cfg = _validated(
            SAEConfig,
            config_path,
            hook_point_in=ins[layer],
            hook_point_out=outs[layer],
            d_model=d_model,
            d_sae=d_sae,
            use_skip_connection=skip,
            act_fn="jumprelu" if jumprelu else "relu",
            norm_activation="inference",
            sparsity_include_decoder_norm=False,
            device=device,
            dtype=parse_dtype(dtype) if dtype is not None else tensors["b_enc"].dtype,
        )
        models.append(build_model(cfg, weights))
    return models


def _expect_kind(directory: Path, kind: str, other: str) -> dict[str, Any]:
    config = read_circuit_tracer_config(directory)
    if config["model_kind"] != kind:
        raise InteropError(
            f"{directory / CONFIG_FILE}: model_kind is {config['model_kind']!r}, not {kind!r}; use {other}"
        )
    return config


def _numbered_files(directory: Path, pattern: re.Pattern, template: str) -> int:
    """How many files `template.format(0..n-1)` the directory holds; a gap is an error naming the missing file."""
    indices = {int(match.group(1)) for path in directory.iterdir() if (match := pattern.match(path.name))}
    if not indices:
        raise FileNotFoundError(f"{directory} has no {template.format('*')} files")
    missing = sorted(set(range(max(indices) + 1)) - indices)
    if missing:
        raise FileNotFoundError(f"{directory / template.format(missing[0])} is missing (layers are numbered from 0)")
    return len(indices)


def _transcoder_files(directory: Path, config: dict[str, Any]) -> list[Path]:
    entries = config.get("transcoders")
    if entries is None:
        count = _numbered_files(directory, _LAYER_FILE, "layer_{}.safetensors")
        return [directory / f"layer_{layer}.safetensors" for layer in range(count)]
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, str) for entry in entries):
        raise InteropError(f"{directory / CONFIG_FILE}: transcoders must be a non-empty list of paths, got {entries!r}")
    return [_local_file(directory, entry, layer) for layer, entry in enumerate(entries)]


def _local_file(directory: Path, entry: str, layer: int) -> Path:
    if entry.startswith("hf://"):
        in_repo = "/".join(entry.removeprefix("hf://").split("?", 1)[0].split("/")[2:])  # drop org/name
        candidates = [directory / in_repo, directory / Path(in_repo).name] if in_repo else []
    else:
        path = Path(entry)
        candidates = [path] if path.is_absolute() else [directory / path, directory / path.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{directory / CONFIG_FILE}: transcoders[{layer}] = {entry!r} is not in {directory} (looked for "
        f"{[str(c) for c in candidates]}); download it next to {CONFIG_FILE}"
    )


def _read_transcoder_file(path: Path) -> dict[str, Tensor]:
    if path.suffix != ".npz":
        return read_safetensors(path)
    try:
        with np.load(path) as arrays:
            tensors = {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
    except (OSError, ValueError) as exc:
        raise InteropError(f"cannot read {path} as .npz: {exc}") from exc
    # GemmaScope's layout (what circuit-tracer's gemma-scope loader maps): W_enc (D, F) and a bare `threshold`.
    if "W_enc" in tensors:
        tensors["W_enc"] = tensors["W_enc"].T
    if "threshold" in tensors:
        tensors[THRESHOLD] = tensors.pop("threshold")
    return tensors


def _log_threshold(threshold: Tensor, path: Path, name: str) -> Tensor:
    """Our log-threshold of circuit-tracer's `pre * (pre > threshold)`; 0 is ReLU (log 0 = -inf)."""
    negative = threshold < 0
    if negative.any():
        raise InteropError(
            f"{path}: {name} has {int(negative.sum())} negative entries (e.g. {float(threshold[negative][0]):.4g}); "
            "circuit-tracer then keeps negative pre-activations, which our JumpReLU (threshold > 0) cannot express"
        )
    return threshold.double().log()


def _hook_points(override: HookPoints, config: dict[str, Any], key: str, n_layers: int, source: Path) -> list[str]:
    field = "hook_points_in" if key == "feature_input_hook" else "hook_points_out"
    if override is None:
        name = config.get(key)
        if not isinstance(name, str) or not name:
            raise InteropError(f"{source}: no {key} (the hook name within a block); pass {field}=...")
        return [f"blocks.{layer}.{name}" for layer in range(n_layers)]
    if isinstance(override, str):
        if "{layer}" not in override:
            raise InteropError(f"{field}={override!r} must contain '{{layer}}' or be a list of {n_layers} hook points")
        return [override.replace("{layer}", str(layer)) for layer in range(n_layers)]
    hooks = list(override)
    if len(hooks) != n_layers:
        raise InteropError(f"{field} has {len(hooks)} hook points but {source.parent} holds {n_layers} layers")
    return hooks


def _validated(config_class, source: Path, **fields: Any):
    try:
        return config_class(**fields)
    except ValidationError as exc:
        raise InteropError(format_validation_error(exc, str(source))) from None
