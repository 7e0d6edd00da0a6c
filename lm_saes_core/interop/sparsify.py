"""Read and write EleutherAI sparsify hookpoint directories (`cfg.json` + `sae.safetensors`) without importing it.

sparsify computes, per token (spec/peer-formats.md): `pre = relu((x - b_dec) @ encoder.weight.T + encoder.bias)`
(no `- b_dec` when `transcode`), keeps the top k, then `sum top_acts * W_dec[top_idx] + b_dec` (+ x @ W_skip.T).
`encoder.weight` is our W_E transposed, `W_dec` is our W_D as is (SAELens's own sparsify loader transposes it: a bug).
Only TopK is representable; the b_dec subtraction is folded into the encoder bias in float64 both ways.
"""

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lm_saes_core.config import parse_dtype
from lm_saes_core.interop.saelens import (
    InteropError,
    build_model,
    check_shapes,
    decoder_bias,
    inference_copy,
    read_json,
    read_safetensors,
)
from lm_saes_core.io import atomic_path, atomic_write_text, ensure_writable_dir
from lm_saes_core.models.sae import SAEConfig, SparseAutoEncoder

SPARSIFY_CONFIG_FILE = "cfg.json"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
# A hookpoint is a module path of the HF model: `layers.6`, `model.layers.6.mlp`, GPT-2's `h.6.mlp`.
_LAYER_HOOKPOINT = re.compile(r"^(?:.*\.)?(?:layers|h)\.(\d+)(\.mlp)?$")


def sparsify_hook_points(hookpoint: str, transcode: bool) -> tuple[str, str]:
    """Our (TransformerLens-style) input and output hook names for a sparsify hookpoint directory name.

    sparsify reads a module's output (an SAE) or its input and output (a transcoder): `layers.N` is the residual
    stream after block N, `layers.N.mlp` the MLP.
    """
    match = _LAYER_HOOKPOINT.match(hookpoint)
    if match is None:
        raise InteropError(
            f"unknown sparsify hookpoint {hookpoint!r} (known: layers.N, layers.N.mlp, h.N, h.N.mlp); "
            "pass hook_point_in=... (and hook_point_out=... for a transcoder)"
        )
    layer, is_mlp = match.group(1), match.group(2) is not None
    out = f"blocks.{layer}.hook_mlp_out" if is_mlp else f"blocks.{layer}.hook_resid_post"
    if not transcode:
        return out, out
    return (f"blocks.{layer}.mlp.hook_in" if is_mlp else f"blocks.{layer}.hook_resid_pre"), out


def sparsify_hookpoint(cfg: SAEConfig) -> str:
    """The sparsify directory name for our hook points (the inverse of `sparsify_hook_points`), e.g. `layers.6`."""
    match = re.fullmatch(r"blocks\.(\d+)\.(hook_resid_post|hook_mlp_out)", cfg.hook_point_out)
    name = match and f"layers.{match.group(1)}" + (".mlp" if match.group(2) == "hook_mlp_out" else "")
    if not name or sparsify_hook_points(name, cfg.is_transcoder) != (cfg.hook_point_in, cfg.hook_point_out):
        raise InteropError(
            f"no sparsify hookpoint name for hooks {cfg.hook_point_in!r} -> {cfg.hook_point_out!r} (known: SAEs on "
            "blocks.N.hook_resid_post / blocks.N.hook_mlp_out, transcoders blocks.N.hook_resid_pre -> "
            "blocks.N.hook_resid_post, blocks.N.mlp.hook_in -> blocks.N.hook_mlp_out); choose the directory name"
        )
    return name


def export_sparsify(model: SparseAutoEncoder, path: str | Path) -> Path:
    """Write a TopK `model` as one sparsify hookpoint directory `path` (e.g. `run/layers.6`); returns it.

    Decoder-norm gating (TopK ranking h_i * ||W_D,i||) is folded into the weights: W_E and b_E scale by n, W_D rows
    by 1/n, so sparsify's plain top-k on unit-norm decoder rows picks the same latents (`normalize_decoder: true`).
    """
    cfg = model.cfg
    if cfg.act_fn != "topk":
        raise InteropError(
            f"cannot export act_fn={cfg.act_fn!r} to sparsify: it only runs per-token TopK (activation 'topk')"
        )
    if cfg.is_transcoder and cfg.d_output != cfg.d_model:
        raise InteropError(
            f"cannot export a transcoder with d_out={cfg.d_output} != d_model={cfg.d_model} to sparsify: its "
            "transcoders write back to the input width"
        )
    sae = inference_copy(model, "sparsify")
    W_E, b_E, W_D = sae.W_E.detach().double(), sae.b_E.detach().double(), sae.W_D.detach().double()
    b_D = decoder_bias(sae).double()
    if cfg.sparsity_include_decoder_norm:
        norms = sae.decoder_norm().detach().double()
        # A zero decoder row never wins our top-k (h * 0 = 0): zero its encoder too instead of dividing by zero.
        W_E, b_E, W_D = W_E * norms, b_E * norms, W_D / torch.where(norms > 0, norms, 1.0).unsqueeze(1)
    # sparsify encodes (x - b_dec) unless transcoding: (x - b_D) W_E + (b_E + b_D W_E) == x W_E + b_E.
    encoder_bias = b_E if cfg.is_transcoder else b_E + b_D @ W_E
    dtype = sae.W_E.dtype
    tensors = {
        "encoder.weight": W_E.T,  # (d_sae, d_in)
        "encoder.bias": encoder_bias,
        "W_dec": W_D,  # (d_sae, d_in): no transpose
        "b_dec": b_D,
    }
    if cfg.use_skip_connection:
        tensors["W_skip"] = sae.W_skip.detach()  # (d_in, d_in), applied as x @ W_skip.T like ours
    unit_decoder = bool(torch.allclose(W_D.norm(dim=1), torch.ones(cfg.d_sae, dtype=torch.float64), atol=1e-4))
    sparsify_cfg: dict[str, Any] = {
        "activation": "topk",
        "expansion_factor": max(1, cfg.d_sae // cfg.d_model),
        "normalize_decoder": unit_decoder,
        "num_latents": cfg.d_sae,
        "k": sae.current_k,
        "multi_topk": False,
        "skip_connection": cfg.use_skip_connection,
        "transcode": cfg.is_transcoder,
        "d_in": cfg.d_model,
    }
    directory = ensure_writable_dir(path)
    with atomic_path(directory / SPARSIFY_WEIGHTS_FILE) as tmp:
        save_file({name: t.to(device="cpu", dtype=dtype).contiguous() for name, t in tensors.items()}, tmp)
    atomic_write_text(directory / SPARSIFY_CONFIG_FILE, json.dumps(sparsify_cfg, indent=2))
    return directory


def _first_tensor_dtype(path: Path) -> torch.dtype:
    """The dtype sparsify loads a coder in: that of the file's first tensor."""
    with safe_open(path, framework="pt", device="cpu") as handle:
        return handle.get_tensor(next(iter(handle.keys()))).dtype


def read_sparsify_config(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    hook_point_in: str | None = None,
    hook_point_out: str | None = None,
) -> SAEConfig:
    """Our config of one sparsify hookpoint directory, from its cfg.json (and the weights' dtype): what
    `import_sparsify` builds the model with."""
    return _sparsify_config(Path(path), device, dtype, hook_point_in, hook_point_out)


def _sparsify_config(
    directory: Path, device: str, dtype: torch.dtype | str | None, hook_point_in: str | None, hook_point_out: str | None
) -> SAEConfig:
    cfg_path = directory / SPARSIFY_CONFIG_FILE
    cfg = read_json(cfg_path)
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise InteropError(f"{cfg_path}: activation={activation!r} is not supported, only 'topk'")
    if "d_in" not in cfg:
        raise InteropError(f"{cfg_path}: missing 'd_in'")
    d_in = int(cfg["d_in"])
    d_sae = int(cfg.get("num_latents") or 0) or d_in * int(cfg.get("expansion_factor", 32))
    transcode = bool(cfg.get("transcode", False))
    skip = bool(cfg.get("skip_connection", False))
    if skip and not transcode:
        raise InteropError(
            f"{cfg_path}: skip_connection without transcode is not supported (our skip connection belongs to "
            "transcoders)"
        )
    if hook_point_in is None:
        hook_point_in, default_out = sparsify_hook_points(directory.name, transcode)
        hook_point_out = hook_point_out or default_out
    elif hook_point_out is None:
        if transcode:
            raise InteropError(f"{cfg_path}: a transcoder (transcode: true) needs hook_point_out as well")
        hook_point_out = hook_point_in
    if dtype is None:
        weights_path = directory / SPARSIFY_WEIGHTS_FILE
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path} not found")
        dtype = _first_tensor_dtype(weights_path)
    return SAEConfig(
        hook_point_in=hook_point_in,
        hook_point_out=hook_point_out,
        d_model=d_in,
        d_sae=d_sae,
        d_out=d_in if transcode else None,
        use_skip_connection=skip,
        act_fn="topk",
        top_k=int(cfg.get("k", 32)),
        norm_activation="inference",
        sparsity_include_decoder_norm=False,
        device=device,
        dtype=parse_dtype(dtype),
    )


def import_sparsify(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    hook_point_in: str | None = None,
    hook_point_out: str | None = None,
) -> SparseAutoEncoder:
    """Load one sparsify hookpoint directory (e.g. `run/layers.6`) as a TopK model.

    The b_dec subtraction before encoding is folded into b_E; decoder-norm gating is off (sparsify ranks raw
    pre-activations). `dtype` defaults to that of the file's first tensor (bf16 on the Hub); hook names default to
    the directory name mapped by `sparsify_hook_points`. `multi_topk` only adds a training loss, so it is accepted.
    """
    directory = Path(path)
    model_cfg = _sparsify_config(directory, device, dtype, hook_point_in, hook_point_out)
    weights_path = directory / SPARSIFY_WEIGHTS_FILE
    d_in, d_sae = model_cfg.d_model, model_cfg.d_sae
    transcode = model_cfg.d_out is not None  # cfg.json's `transcode` (the hook names may say otherwise)

    tensors = read_safetensors(weights_path)
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if model_cfg.use_skip_connection:
        expected["W_skip"] = (d_in, d_in)
    check_shapes(tensors, expected, weights_path)

    t = {name: value.double() for name, value in tensors.items()}
    W_E = t["encoder.weight"].T
    b_E = t["encoder.bias"] if transcode else t["encoder.bias"] - t["b_dec"] @ W_E
    weights = {"W_E": W_E, "b_E": b_E, "W_D": t["W_dec"], "b_D": t["b_dec"]}
    if model_cfg.use_skip_connection:
        weights["W_skip"] = t["W_skip"]
    return build_model(model_cfg, weights)
