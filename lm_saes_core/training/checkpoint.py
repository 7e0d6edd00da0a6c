"""Resumable checkpoints: `checkpoints/step_{N}/` with the unfolded weights, `config.json` and `trainer_state.pt`.

A checkpoint directory is assembled under a temporary name and renamed into place, so a directory called
`step_N` is always complete; a crash leaves at most a `.tmp-*` directory, which is never picked for resuming.
`trainer_state.pt` holds only tensors, numbers, strings and containers, so it is read with `weights_only=True`.
"""

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm_saes_core.io import atomic_path, is_temporary, temporary_path

STATE_FILE = "trainer_state.pt"
STATE_FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


def capture_rng_states() -> dict[str, Any]:
    bit_generator, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": bit_generator,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, model, trainer_state: dict[str, Any]) -> Path:
    """Write `root/checkpoints/step_{step}/` (weights unfolded, so training can continue from them) atomically."""
    final = Path(root) / "checkpoints" / f"step_{step}"
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_path(final)
    try:
        staging.mkdir()
        model.save_pretrained(staging, fold_activation_scale=False)
        with atomic_path(staging / STATE_FILE) as tmp:
            torch.save({"format_version": STATE_FORMAT_VERSION, **trainer_state}, tmp)
        _replace_directory(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _replace_directory(source: Path, target: Path) -> None:
    """Rename `source` to `target`; an existing `target` (from an earlier, longer attempt) is moved aside first."""
    previous = None
    if target.exists():
        previous = temporary_path(target)
        os.replace(target, previous)
    os.replace(source, target)
    _fsync_directory(target.parent)
    if previous is not None:
        shutil.rmtree(previous)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(
            f"{state_file} not found: {path} is not a training checkpoint (expected a checkpoints/step_N directory)"
        )
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(f"{state_file}: unsupported format_version {state.get('format_version')!r}")
    return state


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `root/checkpoints`, or None."""
    directory = Path(root) / "checkpoints"
    if not directory.is_dir():
        return None
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and not is_temporary(child) and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None
