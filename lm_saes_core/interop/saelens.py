"""Read and write SAELens 6 SAE directories (`cfg.json` + `sae_weights.safetensors`) without importing sae_lens.

sae-lens pins transformer-lens<4, so it cannot live beside our TransformerLens 4; the files are simple enough to map
by hand. Every mapping is exact in arithmetic (biases folded in float64), so a converted SAE computes the same
reconstruction as the original on raw activations. SAELens computes, per token (spec/peer-formats.md):
`pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc`, an activation, then `f @ W_dec + b_dec` (+ x @ W_skip.T).
"""

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lm_saes_core.config import UserError, parse_dtype
from lm_saes_core.io import atomic_path, atomic_write_text, ensure_writable_dir, read_json_object
from lm_saes_core.models.sae import SAEConfig, SparseAutoEncoder

SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.54.12"
"""The SAELens release whose inference files we write; SAELens treats configs without a version >= 6 as legacy."""

SAE_ARCHITECTURES = ("standard", "topk", "jumprelu")
TRANSCODER_ARCHITECTURES = ("transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder")
# SAELens metadata keys that pre-6.0 configs kept at the top level.
_LEGACY_METADATA_KEYS = (
    "model_name",
    "hook_name",
    "hook_head_index",
    "model_class_name",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
)


class InteropError(UserError, ValueError):
    """A model or a peer file that cannot be converted exactly; the message names the field and what would work."""


def inference_copy(model: SparseAutoEncoder, target: str) -> SparseAutoEncoder:
    """A detached eval-mode copy whose weights map raw activations to raw reconstructions (dataset-wise scale folded).

    Peers have no per-hook scale factor, so the scale must live in the weights; the caller's model is left untouched.
    """
    cfg = model.cfg
    if cfg.norm_activation == "token-wise":
        raise InteropError(
            f"cannot export to {target}: norm_activation='token-wise' rescales every token by its own norm, which "
            f"{target} cannot represent; train with norm_activation='dataset-wise' or 'inference'"
        )
    if cfg.norm_activation == "dataset-wise":
        norms = cfg.dataset_average_activation_norm or {}
        missing = [hook for hook in cfg.hook_points if hook not in norms]
        if missing:
            raise InteropError(
                f"cannot export to {target}: norm_activation='dataset-wise' but dataset_average_activation_norm has "
                f"no entry for {missing}; set it (model.set_dataset_average_activation_norm) or fold the scale first"
            )
    copied = copy.deepcopy(model).eval()
    if copied.cfg.norm_activation == "dataset-wise":
        copied.fold_activation_scale()
    return copied


def gated_threshold(model: SparseAutoEncoder, threshold: torch.Tensor) -> torch.Tensor:
    """Per-latent threshold on the raw pre-activation h equivalent to ours (float64, shape (d_sae,)).

    With `sparsity_include_decoder_norm` we gate on h_i * n_i > theta_i, i.e. h_i > theta_i / n_i (n_i > 0); a zero
    decoder row never fires (theta / 0 = inf), as in our model.
    """
    threshold = threshold.detach().double().expand(model.cfg.d_sae)
    if not model.cfg.sparsity_include_decoder_norm:
        return threshold.clone()
    return threshold / model.decoder_norm().detach().double()


def decoder_bias(model: SparseAutoEncoder) -> torch.Tensor:
    if model.cfg.use_decoder_bias:
        return model.b_D.detach()
    return torch.zeros(model.cfg.d_output, dtype=model.W_D.dtype, device=model.W_D.device)


def _saelens_architecture(cfg: SAEConfig) -> str:
    if cfg.is_transcoder:
        if cfg.act_fn == "topk":
            raise InteropError(
                "cannot export to SAELens: it has no TopK transcoder architecture (its transcoders are relu or "
                f"jumprelu, optionally with a skip connection); got act_fn={cfg.act_fn!r} for a transcoder"
            )
        prefix = "" if cfg.act_fn == "relu" else "jumprelu_"  # batchtopk runs as a threshold at inference
        return prefix + ("skip_transcoder" if cfg.use_skip_connection else "transcoder")
    return {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}[cfg.act_fn]


def export_saelens(
    model: SparseAutoEncoder, path: str | Path, *, model_name: str | None = None, hook_name: str | None = None
) -> Path:
    """Write `model` as a SAELens 6 inference SAE directory; returns the directory.

    relu -> "standard"; topk -> "topk" (rescale_acts_by_decoder_norm = our decoder-norm gating); jumprelu and
    batchtopk (its learned inference threshold) -> "jumprelu" with the threshold on the raw pre-activation;
    transcoders -> "transcoder"/"jumprelu_transcoder" (+ "skip_" with W_skip). Always `apply_b_dec_to_input: false`
    and `normalize_activations: "none"` (a dataset-wise scale is folded into the weights first).
    """
    sae = inference_copy(model, "SAELens")
    cfg = sae.cfg
    architecture = _saelens_architecture(cfg)
    dtype = sae.W_E.dtype
    tensors = {
        "W_enc": sae.W_E.detach(),  # (d_in, d_sae): same orientation as ours
        "b_enc": sae.b_E.detach(),
        "W_dec": sae.W_D.detach(),  # (d_sae, d_out)
        "b_dec": decoder_bias(sae),
    }
    if cfg.act_fn == "jumprelu":
        tensors["threshold"] = gated_threshold(
            sae, sae.activation_function.log_jumprelu_threshold.detach().double().exp()
        ).to(dtype)
    elif cfg.act_fn == "batchtopk":
        tensors["threshold"] = gated_threshold(sae, sae.activation_function.topk_threshold.detach()).to(dtype)
    if cfg.use_skip_connection:
        tensors["W_skip"] = sae.W_skip.detach()  # (d_out, d_in): same orientation as ours

    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        "model_name": model_name,
        "hook_name": hook_name or cfg.hook_point_in,
        "hook_head_index": None,
    }
    if cfg.is_transcoder:
        metadata.update(hook_name_out=cfg.hook_point_out, hook_head_index_out=None)
    if cfg.act_fn == "batchtopk":
        metadata["training_architecture"] = "batchtopk"
    saelens_cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": cfg.d_model,
        "d_sae": cfg.d_sae,
        "dtype": str(dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    if cfg.is_transcoder:
        saelens_cfg["d_out"] = cfg.d_output
    if cfg.act_fn == "topk":
        saelens_cfg.update(k=sae.current_k, rescale_acts_by_decoder_norm=cfg.sparsity_include_decoder_norm)

    directory = ensure_writable_dir(path)
    with atomic_path(directory / SAELENS_WEIGHTS_FILE) as tmp:
        save_file({name: t.to("cpu").contiguous() for name, t in tensors.items()}, tmp)
    atomic_write_text(directory / SAELENS_CONFIG_FILE, json.dumps(saelens_cfg, indent=2))
    return directory


def _major_version(version: Any) -> int | None:
    match = re.match(r"\s*(\d+)", str(version)) if version else None
    return int(match.group(1)) if match else None


def upgrade_saelens_config(raw: dict[str, Any], source: str = SAELENS_CONFIG_FILE) -> dict[str, Any]:
    """The 6.x form of a SAELens config: pre-6.0 keys renamed, legacy top-level metadata moved into `metadata`.

    Applied like SAELens does, to every config without a version >= 6 (top level or metadata); on a 6.x config it is
    a no-op apart from filling defaults.
    """
    cfg = dict(raw)
    metadata = dict(cfg.pop("metadata", None) or {})
    version = cfg.get("sae_lens_version") or metadata.get("sae_lens_version")
    if (_major_version(version) or 0) < 6:
        for old, new in (
            ("hook_point", "hook_name"),
            ("hook_point_head_index", "hook_head_index"),
            ("activation_fn_str", "activation_fn"),
        ):
            if old in cfg:
                cfg.setdefault(new, cfg.pop(old))
        for key in _LEGACY_METADATA_KEYS:
            if key in cfg:
                metadata.setdefault(key, cfg.pop(key))
        cfg.setdefault("architecture", "standard")
        activation_fn = cfg.get("activation_fn") or "relu"
        if cfg["architecture"] in ("standard", "topk") and activation_fn == "topk":
            kwargs = cfg.get("activation_fn_kwargs") or {}
            if "k" not in cfg and "k" not in kwargs:
                raise InteropError(f"{source}: activation_fn 'topk' without activation_fn_kwargs.k")
            cfg["architecture"] = "topk"
            cfg.setdefault("k", kwargs.get("k"))
        elif cfg["architecture"] == "standard" and activation_fn != "relu":
            raise InteropError(
                f"{source}: legacy activation_fn {activation_fn!r} is not supported (only 'relu' and 'topk')"
            )
        if "reshape_activations" not in cfg:
            cfg["reshape_activations"] = "hook_z" if "hook_z" in str(metadata.get("hook_name") or "") else "none"
    if isinstance(cfg.get("normalize_activations"), bool):
        cfg["normalize_activations"] = "expected_average_only_in" if cfg["normalize_activations"] else "none"
    if cfg.get("normalize_activations") is None:
        cfg["normalize_activations"] = "none"
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("reshape_activations", "none")
    cfg["metadata"] = metadata
    return cfg


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected a {path.name} next to the weights)")
    return read_json_object(path, InteropError)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(path)
    except SafetensorError as exc:
        raise InteropError(f"cannot read {path}: {exc}") from exc


def check_shapes(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: Path) -> None:
    """Every expected tensor present with its shape; nothing unknown (an unknown tensor is a feature we would drop)."""
    for name, shape in expected.items():
        if name not in tensors:
            raise InteropError(f"{source}: missing tensor {name!r} (has {sorted(tensors)})")
        if tuple(tensors[name].shape) != shape:
            raise InteropError(f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise InteropError(f"{source}: unexpected tensors {unknown} for this architecture; refusing to drop them")


def build_model(cfg: SAEConfig, weights: dict[str, torch.Tensor]) -> SparseAutoEncoder:
    """Allocate a model for `cfg` and fill every parameter from `weights` (named like ours), cast to cfg.dtype."""
    model = SparseAutoEncoder(cfg)
    params = dict(model.named_parameters())
    if set(params) != set(weights):
        raise InteropError(
            f"internal: converted tensors {sorted(weights)} do not match the model's parameters {sorted(params)}"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))
    return model.eval()


def read_saelens_config(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    hook_point_in: str | None = None,
    hook_point_out: str | None = None,
) -> SAEConfig:
    """Our config of a SAELens SAE directory, from its cfg.json alone: what `import_saelens` builds the model with."""
    return _saelens_config(Path(path), device, dtype, hook_point_in, hook_point_out)[0]


def _saelens_config(
    directory: Path, device: str, dtype: torch.dtype | str | None, hook_point_in: str | None, hook_point_out: str | None
) -> tuple[SAEConfig, dict[str, Any]]:
    """(our config, the upgraded SAELens cfg.json) of a SAELens SAE directory, refusing what has no exact mapping."""
    cfg_path = directory / SAELENS_CONFIG_FILE
    cfg = upgrade_saelens_config(read_json(cfg_path), str(cfg_path))
    metadata = cfg["metadata"]
    architecture = cfg["architecture"]
    if architecture not in SAE_ARCHITECTURES + TRANSCODER_ARCHITECTURES:
        hint = (
            " (a BatchTopK training save: save it with SAELens save_inference_model)"
            if architecture == "batchtopk"
            else ""
        )
        raise InteropError(
            f"{cfg_path}: architecture {architecture!r} is not supported{hint}; "
            f"supported: {', '.join(SAE_ARCHITECTURES + TRANSCODER_ARCHITECTURES)}"
        )
    if cfg["normalize_activations"] != "none":
        raise InteropError(
            f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} is not supported, only 'none'; fold "
            "the scaling into the weights first (SAELens: sae.fold_activation_norm_scaling_factor)"
        )
    if cfg["reshape_activations"] != "none":
        raise InteropError(
            f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r} (per-head hook_z SAEs) "
            "is not supported, only 'none'"
        )
    if metadata.get("hook_head_index") is not None:
        raise InteropError(
            f"{cfg_path}: metadata.hook_head_index={metadata['hook_head_index']!r} (a per-head SAE) is not supported"
        )
    is_transcoder = architecture in TRANSCODER_ARCHITECTURES
    if is_transcoder and cfg["apply_b_dec_to_input"]:
        raise InteropError(f"{cfg_path}: apply_b_dec_to_input must be false for architecture {architecture!r}")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    d_out = int(cfg.get("d_out") or d_in) if is_transcoder else d_in

    hook_in = hook_point_in or metadata.get("hook_name")
    if not hook_in:
        raise InteropError(f"{cfg_path}: no metadata.hook_name (or legacy hook_point); pass hook_point_in=...")
    hook_out = hook_in
    if is_transcoder:
        hook_out = hook_point_out or metadata.get("hook_name_out")
        if not hook_out or hook_out == hook_in:
            raise InteropError(
                f"{cfg_path}: a transcoder needs an output hook different from the input hook {hook_in!r}, got "
                f"metadata.hook_name_out={metadata.get('hook_name_out')!r}; pass hook_point_out=..."
            )
    act_fn = "topk" if architecture == "topk" else "jumprelu" if architecture.startswith("jumprelu") else "relu"
    model_cfg = SAEConfig(
        hook_point_in=hook_in,
        hook_point_out=hook_out,
        d_model=d_in,
        d_sae=d_sae,
        d_out=d_out if is_transcoder else None,
        use_skip_connection="skip" in architecture,
        act_fn=act_fn,
        norm_activation="inference",
        # Only TopK's ranking can depend on decoder norms in SAELens; everything else gates on the raw pre-activation.
        sparsity_include_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)) and act_fn == "topk",
        device=device,
        dtype=parse_dtype(dtype if dtype is not None else cfg.get("dtype") or "float32"),
        # SAELens's TopKSAEConfig defaults k to 100 when a config omits it.
        **({"top_k": int(cfg.get("k", 100))} if act_fn == "topk" else {}),
    )
    return model_cfg, cfg


def import_saelens(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    hook_point_in: str | None = None,
    hook_point_out: str | None = None,
) -> SparseAutoEncoder:
    """Load a SAELens SAE directory (6.x or pre-6.0 config, inference or training save) as our model.

    Accepted: standard, topk, jumprelu (`threshold` or training `log_threshold`), transcoder, skip_transcoder,
    jumprelu_transcoder, jumprelu_skip_transcoder, with `normalize_activations: "none"`. `apply_b_dec_to_input: true`
    is folded into the encoder bias: (x - b_dec) W_enc + b_enc = x W_enc + (b_enc - b_dec W_enc). `dtype` defaults to
    the config's. Hook names come from the metadata unless given.
    """
    directory = Path(path)
    model_cfg, cfg = _saelens_config(directory, device, dtype, hook_point_in, hook_point_out)
    cfg_path, weights_path = directory / SAELENS_CONFIG_FILE, directory / SAELENS_WEIGHTS_FILE
    is_jumprelu, has_skip = model_cfg.act_fn == "jumprelu", model_cfg.use_skip_connection
    d_in, d_sae, d_out = model_cfg.d_model, model_cfg.d_sae, model_cfg.d_output

    tensors = read_safetensors(weights_path)
    if is_jumprelu and "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").double().exp()
    scaling = tensors.pop("scaling_factor", None)
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,)}
    if is_jumprelu:
        expected["threshold"] = (d_sae,)
    if has_skip:
        expected["W_skip"] = (d_out, d_in)
    check_shapes(tensors, expected, weights_path)

    t = {name: value.double() for name, value in tensors.items()}
    if scaling is not None and not torch.all(scaling == 1):
        if not cfg.get("finetuning_scaling_factor"):
            raise InteropError(
                f"{weights_path}: has a scaling_factor that is not all ones but {cfg_path} has no "
                "finetuning_scaling_factor: true; cannot tell whether to apply it"
            )
        t["W_dec"] = t["W_dec"] * scaling.double().reshape(d_sae, 1)  # f * s @ W_dec == f @ (s * W_dec)
    b_E = t["b_enc"] - t["b_dec"] @ t["W_enc"] if cfg["apply_b_dec_to_input"] else t["b_enc"]
    weights = {"W_E": t["W_enc"], "b_E": b_E, "W_D": t["W_dec"], "b_D": t["b_dec"]}
    if is_jumprelu:
        # SAELens gates on pre > relu(threshold): a threshold <= 0 is plain ReLU, i.e. log(0) = -inf here.
        weights["activation_function.log_jumprelu_threshold"] = t["threshold"].clamp_min(0).log()
    if has_skip:
        weights["W_skip"] = t["W_skip"]
    return build_model(model_cfg, weights)
