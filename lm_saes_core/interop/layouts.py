"""The on-disk layouts of a saved dictionary, told apart by their files, and each read as our model:
- ours (`lm-saes`): config.json + sae_weights.safetensors, any `sae_type` (what `save_pretrained` writes; a
  repository publishing several has one folder per dictionary). Releases written by much earlier versions of the
  library (the first Llama Scope's hyperparams.json + checkpoints/final.safetensors, or tensors named encoder.weight /
  decoder.weight) are not read;
- SAELens: cfg.json + sae_weights.safetensors (read by `import_saelens`);
- sparsify: cfg.json + sae.safetensors, one folder per hookpoint (read by `import_sparsify`).
"""

from pathlib import Path
from typing import Literal

import torch

from lm_saes_core.config import ConfigError
from lm_saes_core.interop.saelens import SAELENS_CONFIG_FILE, SAELENS_WEIGHTS_FILE, import_saelens, read_saelens_config
from lm_saes_core.interop.sparsify import (
    SPARSIFY_CONFIG_FILE,
    SPARSIFY_WEIGHTS_FILE,
    import_sparsify,
    read_sparsify_config,
)
from lm_saes_core.io import read_json_object
from lm_saes_core.models.base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    SparseDictionary,
    locate_pretrained,
    read_dictionary_config,
)
from lm_saes_core.models.config import SparseDictionaryConfig

Layout = Literal["lm-saes", "saelens", "sparsify"]
LAYOUT_FILES: dict[Layout, tuple[str, str]] = {
    "lm-saes": (CONFIG_FILE, WEIGHTS_FILE),
    "saelens": (SAELENS_CONFIG_FILE, SAELENS_WEIGHTS_FILE),
    "sparsify": (SPARSIFY_CONFIG_FILE, SPARSIFY_WEIGHTS_FILE),
}
ALL_LAYOUT_FILES = tuple(sorted({name for files in LAYOUT_FILES.values() for name in files}))
LLAMA_SCOPE_V1_CONFIG = "hyperparams.json"
"""The first Llama Scope release's config (beside checkpoints/final.safetensors), written by an earlier version."""


def detect_layout(path: Path) -> Layout:
    """Ours for a .safetensors file, a missing path or a directory with config.json (`locate_pretrained` then says
    what is missing); else the peer whose two files are both there; FileNotFoundError naming the layouts otherwise."""
    if not path.is_dir() or (path / CONFIG_FILE).exists():
        return "lm-saes"
    for layout in ("saelens", "sparsify"):
        if all((path / name).is_file() for name in LAYOUT_FILES[layout]):
            return layout
    raise FileNotFoundError(no_layout_message(path))


def missing_files(path: Path, layout: Layout) -> list[str]:
    """The files of `layout` that `path` (a directory) lacks."""
    return [name for name in LAYOUT_FILES[layout] if not (path / name).is_file()]


def no_layout_message(path: Path) -> str:
    layouts = ", ".join(f"{' + '.join(files)} ({layout})" for layout, files in LAYOUT_FILES.items())
    has = sorted(entry.name for entry in path.iterdir())
    message = f"{path} holds no saved sparse dictionary: expected {layouts}; it has {has}"
    if (path / LLAMA_SCOPE_V1_CONFIG).is_file():
        message += (
            f". {LLAMA_SCOPE_V1_CONFIG} + checkpoints/final.safetensors is the first Llama Scope release's layout, "
            "which is not read: use a release in this library's layout (config.json + sae_weights.safetensors)"
        )
    holders = sorted(
        entry.name
        for entry in path.iterdir()
        if entry.is_dir() and any(not missing_files(entry, layout) for layout in LAYOUT_FILES)
    )
    if holders:
        message += f". Its subfolders {holders[:8]}{' ...' if len(holders) > 8 else ''} hold dictionaries: name one"
    return message


def load_layout(
    path: Path,
    layout: Layout,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    fold_activation_scale: bool = False,
    strict_loading: bool = True,
) -> SparseDictionary:
    """The dictionary saved at `path` in `layout`, in eval mode. A peer's dictionary takes raw activations already
    (nothing to fold) and is checked strictly whatever `strict_loading` says (an unknown tensor is a dropped
    feature)."""
    if layout == "lm-saes":
        return SparseDictionary.from_pretrained(
            path, device=device, dtype=dtype, fold_activation_scale=fold_activation_scale, strict_loading=strict_loading
        )
    importer = import_saelens if layout == "saelens" else import_sparsify
    return importer(path, device=device or "cpu", dtype=dtype)


def read_layout_config(path: Path, layout: Layout) -> tuple[SparseDictionaryConfig, dict]:
    """(the validated config, the config as a record stores it) of the dictionary saved at `path` in `layout`,
    without its weights: our config.json as saved, or the config a peer's dictionary is imported with."""
    if layout == "lm-saes":
        config_file, _ = locate_pretrained(path)
        return read_dictionary_config(config_file), read_json_object(config_file, ConfigError)
    reader = read_saelens_config if layout == "saelens" else read_sparsify_config
    cfg = reader(path)
    return cfg, cfg.model_dump(mode="json", exclude={"device"})
