"""Resumable checkpoints: `checkpoints/step_{N}/` with the unfolded weights, `config.json` and `trainer_state.pt`;
and the final weights of a run.

A checkpoint directory is assembled under a temporary name and renamed into place, so a directory called
`step_N` is always complete; a crash or a full disk leaves at most a `.tmp-*` directory, which is never picked for
resuming (nor is a `step_N` whose files are missing or cut short, e.g. copied by hand). The final weights go to the
run's output directory, which holds other files too: they are staged the same way and moved in config-last, after
the earlier config.json is withdrawn, so the directory never holds a config.json beside weights it does not describe.
`trainer_state.pt` holds only tensors, numbers, strings and containers, so it is read with `weights_only=True`.

A feature- or head-parallel run writes sharded checkpoints (`save_sharded_checkpoint`): every process writes its part
of the tensors into `sharded/` (see `sharded_checkpoint`), beside the whole dictionary's `config.json` and the
trainer state; nothing is gathered, and they resume under any layout. The run's final weights are one ordinary file
set all the same.

A checkpoint also records the settings of the run that wrote it (`train_settings.json`), so a run that looks for a
checkpoint to continue (`resume_from: auto`) takes only one its own settings wrote. Periodic checkpoints (written on
a wall-clock cadence to bound what a killed run loses) carry a `periodic` marker and only the newest two are kept:
they are resume points, not snapshots of the run's history.
"""

import json
import logging
import os
import random
import re
import shutil
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lm_saes_core.io import atomic_path, is_temporary, temporary_path
from lm_saes_core.models.base import CONFIG_FILE, WEIGHTS_FILE, save_config
from lm_saes_core.training.sharded_checkpoint import (
    SHARDED_DIR,
    Split,
    is_sharded_checkpoint,
    sharded_problem,
    write_tensors,
)

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
RUN_SETTINGS_FILE = "train_settings.json"
PERIODIC_MARKER = "periodic"
PERIODIC_KEPT = 2
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


def save_checkpoint(
    root: str | Path,
    step: int,
    model,
    trainer_state: dict[str, Any],
    *,
    run_settings: dict[str, Any] | None = None,
    periodic: bool = False,
) -> Path:
    """Write `root/checkpoints/step_{step}/` (weights unfolded, so training can continue from them) atomically, with
    the settings of the run (`run_settings`) when given. A `periodic` checkpoint replaces all but the newest earlier
    periodic one."""
    final = Path(root) / "checkpoints" / f"step_{step}"
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_path(final)
    try:
        staging.mkdir()
        model.save_pretrained(staging, fold_activation_scale=False)
        _finish(staging, final, trainer_state, run_settings, periodic)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def save_sharded_checkpoint(
    root: str | Path,
    step: int,
    config,
    tensors: dict[str, torch.Tensor],
    split_of: Callable[[str], Split],
    mesh,
    trainer_state: dict[str, Any],
    *,
    run_settings: dict[str, Any] | None = None,
    periodic: bool = False,
) -> Path:
    """`save_checkpoint` for a feature- or head-parallel run, called by every process at once: each writes its part
    of `tensors` (this process's, split as `split_of` says) into `sharded/`; rank 0 adds the whole dictionary's
    `config`, the trainer state and the settings, and renames the directory into place when all parts are written."""
    final = Path(root) / "checkpoints" / f"step_{step}"
    main = dist.get_rank() == 0
    staging = [temporary_path(final)]
    if main:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging[0].mkdir()
    dist.broadcast_object_list(staging, src=0)  # rank 0's name, once the directory exists
    staging = staging[0]
    try:
        write_tensors(staging / SHARDED_DIR, tensors, split_of, mesh)  # returns once .metadata is written
        if main:
            problem = sharded_problem(staging)
            if problem is not None:  # e.g. other nodes wrote their parts to disks of their own
                raise RuntimeError(
                    f"checkpoint {final}: {problem} after every process wrote its part; the run's exp_result_path "
                    "must be one filesystem that every node shares"
                )
            save_config(config, staging)
            _finish(staging, final, trainer_state, run_settings, periodic)
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _finish(staging: Path, final: Path, trainer_state: dict, run_settings: dict | None, periodic: bool) -> None:
    """Add the trainer state and settings to a staged checkpoint and rename it into place."""
    if run_settings is not None:
        (staging / RUN_SETTINGS_FILE).write_text(json.dumps(run_settings, indent=2))
    if periodic:
        (staging / PERIODIC_MARKER).touch()
    with atomic_path(staging / STATE_FILE) as tmp:
        torch.save({"format_version": STATE_FORMAT_VERSION, **trainer_state}, tmp)
    _fsync_directory(staging)
    _replace_directory(staging, final)
    if periodic:
        _prune_periodic(final.parent, keep=PERIODIC_KEPT)


def _prune_periodic(directory: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete periodic checkpoints (an incomplete one is no resume point)."""
    periodic = [path for _, path in _step_directories(directory) if (path / PERIODIC_MARKER).is_file()]
    complete = [path for path in periodic if checkpoint_problem(path) is None]
    for path in complete[keep:]:
        shutil.rmtree(path, ignore_errors=True)


def read_run_settings(path: str | Path) -> dict[str, Any] | None:
    """The settings of the run that wrote checkpoint `path`, or None when it recorded none (older checkpoints)."""
    file = Path(path) / RUN_SETTINGS_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def save_final_dictionary(model, output: str | Path, *, fold_activation_scale: bool) -> Path:
    """`model.save_pretrained(output)` for a directory that holds more than the dictionary (checkpoints, settings):
    the earlier config.json is removed first, the files are written into a staging directory and moved in with
    config.json last. A failure at any point (a full disk) leaves `output` without a config.json, so nothing there
    loads as a dictionary, rather than an earlier run's config beside this run's weights or half of a file set."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / CONFIG_FILE).unlink(missing_ok=True)
    staging = temporary_path(output / "dictionary")
    try:
        staging.mkdir()
        model.save_pretrained(staging, fold_activation_scale=fold_activation_scale)
        names = sorted(path.name for path in staging.iterdir() if path.name != CONFIG_FILE)
        for name in [*names, CONFIG_FILE]:
            os.replace(staging / name, output / name)
        _fsync_directory(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


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


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (its header's last data offset must end the file), or None."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{path.name} is cut short ({size} bytes)"
        (header_size,) = struct.unpack("<Q", prefix)
        if 8 + header_size > size:
            return f"{path.name} is cut short (its header alone needs {8 + header_size} bytes, the file has {size})"
        try:
            header = json.loads(handle.read(header_size))
            ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        except (UnicodeDecodeError, ValueError, AttributeError, KeyError, IndexError, TypeError):
            return f"{path.name} has an unreadable header"
    expected = 8 + header_size + max(ends, default=0)
    if expected != size:
        return f"{path.name} is cut short or padded ({size} bytes, its header describes {expected})"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete checkpoint (a file missing or cut short), or None for a complete one. Cheap: it
    reads the files' headers (a sharded one's `.metadata`) and sizes, not their contents."""
    path = Path(path)
    sharded = is_sharded_checkpoint(path)  # its .metadata is written once every part is
    weights = f"{SHARDED_DIR}/.metadata" if sharded else WEIGHTS_FILE
    missing = [name for name in (CONFIG_FILE, weights, STATE_FILE) if not (path / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    if not zipfile.is_zipfile(path / STATE_FILE):  # torch.save writes a zip; cut short, it has no central directory
        return f"{STATE_FILE} is cut short or not written by torch.save"
    return sharded_problem(path) if sharded else _safetensors_problem(path / WEIGHTS_FILE)


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(
            f"{state_file} not found: {path} is not a training checkpoint (expected a checkpoints/step_N directory)"
        )
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"{path} is not a complete training checkpoint: {problem}; resume from an earlier one")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(f"{state_file}: unsupported format_version {state.get('format_version')!r}")
    return state


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under `root/checkpoints`, or None. Incomplete `step_N`
    directories are passed over with a warning naming what they lack."""
    for _, candidate in _step_directories(Path(root) / "checkpoints"):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        if (candidate / STATE_FILE).exists():  # a directory without trainer state is no checkpoint attempt at all
            logger.warning("skipping the incomplete checkpoint %s: %s", candidate, problem)
    return None


def _step_directories(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step_N` directory under `directory`, newest first."""
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and not is_temporary(child) and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, reverse=True)
