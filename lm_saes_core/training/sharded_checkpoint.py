"""The tensors of a feature- or head-parallel run's checkpoint, written by every process at once (torch.distributed.
checkpoint, DCP) and read back under any layout.

Under model or head parallelism no process holds the whole dictionary, so nothing is gathered for a checkpoint: each
process writes its own part of every large tensor (the weights, Adam's moments, the dead-latent counters) into one
DCP directory (`sharded/`: a file per writing process, then `.metadata`, written last by rank 0). Each part is saved
as a DTensor on the run's (data, head, model) mesh: sharded over `head` on a crosscoder's axis 0 and over `model` on
its feature axis, replicated over `data` (written once). A later run reads it into its own layout: another mesh (each
process reads only its slices) or one process (whole tensors).

A kind whose shards hold a slice of each of several blocks of the feature axis (a MOLT's ranks: `feature_blocks`)
saves each block as a tensor of its own (`KEY/block{i}`), which every layout's shards slice evenly.

Keys: `model/NAME` (state-dict names), `optimizer/INDEX/NAME` (per-parameter state with a shape; the scalars stay in
trainer_state.pt), `dead/NAME` (per-feature counters, shaped as `feature_shape`).
"""

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from lm_saes_core.models.base import SHARDED_DIR

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def _dcp():
    """torch.distributed.checkpoint, imported when a sharded checkpoint is read or written: with DTensor it costs
    ~1.3 s of start-up, which every other process (a CLI call, each Pipes step) would pay for nothing."""
    import torch.distributed.checkpoint as dcp

    return dcp


_BLOCK = re.compile(r"^(.*)/block(\d+)$")


@dataclass(frozen=True)
class Split:
    """How a tensor splits over a mesh: the axis of its heads (a crosscoder's 0, when its heads are split) and its
    feature axis, each None when it has none; `blocks`: the widths of this part's blocks of the feature axis (None:
    one slice)."""

    head_axis: int | None = None
    feature_axis: int | None = None
    blocks: tuple[int, ...] | None = None


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether checkpoint `path` keeps its tensors in a DCP directory (written by a feature- or head-parallel run)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def sharded_problem(path: str | Path) -> str | None:
    """Why the DCP directory of checkpoint `path` is not whole (a part file missing or cut short), or None."""
    directory = Path(path) / SHARDED_DIR
    try:
        metadata = _dcp().FileSystemReader(directory).read_metadata()
    except Exception as error:  # a .metadata cut short or not DCP's: whatever unpickling it raised
        return f"{SHARDED_DIR}/.metadata is unreadable ({type(error).__name__})"
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = directory / name
        if not file.is_file():
            return f"{SHARDED_DIR}/{name} missing"
        if file.stat().st_size < end:
            return f"{SHARDED_DIR}/{name} is cut short ({file.stat().st_size} bytes, its parts need {end})"
    return None


def write_tensors(directory: Path, tensors: dict[str, Tensor], split_of: Callable[[str], Split], mesh) -> None:
    """Write this process's part of every tensor (a collective: every process of `mesh` calls it at once)."""
    flat = {}
    for key, tensor in tensors.items():
        split = split_of(key)
        for name, piece in _pieces(key, tensor, split):
            flat[name] = _distributed(piece.contiguous(), split, mesh)
    _dcp().save(flat, checkpoint_id=directory)


def read_tensors(
    directory: Path, split_of: Callable[[str], Split], mesh, device, prefix: str = ""
) -> dict[str, Tensor]:
    """This process's part of every tensor in `directory` whose key starts with `prefix` (its slices under `mesh`;
    the whole tensors without one), its blocks joined as a part holds them."""
    dcp = _dcp()
    metadata = dcp.FileSystemReader(directory).read_metadata().state_dict_metadata
    targets: dict[str, Tensor] = {}
    for name, entry in metadata.items():
        if not name.startswith(prefix):
            continue
        split = split_of(_key(name))
        local = torch.empty(_local_shape(entry.size, split, mesh), dtype=entry.properties.dtype, device=device)
        targets[name] = local if mesh is None else _distributed(local, split, mesh)
    with warnings.catch_warnings():  # one process reading whole tensors is what no_dist means; DCP warns anyway
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(targets, checkpoint_id=directory, no_dist=not dist.is_initialized())
    pieces: dict[str, list[tuple[int, Tensor]]] = {}
    for name, target in targets.items():
        match = _BLOCK.match(name)
        local = target if mesh is None else target.to_local()
        pieces.setdefault(_key(name), []).append((int(match.group(2)) if match else 0, local))
    return {key: _joined(parts, split_of(key)) for key, parts in pieces.items()}


def read_whole_weights(directory: Path, model) -> dict[str, Tensor]:
    """The whole dictionary's weights (state-dict names) from a sharded checkpoint's DCP directory, read in one
    process onto `model`'s device (`model`: a whole dictionary of the checkpoint's config)."""
    axes = model.feature_axes()
    tensors = read_tensors(directory, lambda key: Split(None, axes.get(key.removeprefix("model/"))), None,
                           model.device, prefix="model/")  # fmt: skip
    return {key.removeprefix("model/"): tensor for key, tensor in tensors.items()}


def state_tensors(model, optimizer_state: dict, dead_state: dict) -> tuple[dict[str, Tensor], dict]:
    """(the tensors a sharded checkpoint writes, keyed as above; the optimiser state without them, for
    trainer_state.pt)."""
    tensors = {f"model/{name}": tensor.detach() for name, tensor in model.state_dict().items()}
    small = {}
    for index, entries in optimizer_state["state"].items():
        small[index] = {}
        for name, value in entries.items():
            if isinstance(value, Tensor) and value.ndim > 0:
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                small[index][name] = value
    tensors |= {f"dead/{name}": value.reshape(model.feature_shape) for name, value in dead_state.items()}
    return tensors, {"state": small, "param_groups": optimizer_state["param_groups"]}


def loaded_states(tensors: dict[str, Tensor], small_optimizer_state: dict) -> tuple[dict, dict, dict]:
    """(model state, optimiser state, dead-latent state) of `read_tensors`' tensors and trainer_state.pt's rest."""
    model = {key.removeprefix("model/"): value for key, value in tensors.items() if key.startswith("model/")}
    optimizer = {index: dict(entries) for index, entries in small_optimizer_state["state"].items()}
    dead = {}
    for key, value in tensors.items():
        group, _, rest = key.partition("/")
        if group == "optimizer":
            index, _, name = rest.partition("/")
            optimizer.setdefault(int(index), {})[name] = value
        elif group == "dead":
            dead[rest] = value.reshape(-1)
    return model, {"state": optimizer, "param_groups": small_optimizer_state["param_groups"]}, dead


def dictionary_splits(model, optimizer, heads_split: bool) -> Callable[[str], Split]:
    """How each key of `state_tensors` splits, for `model` (this process's part of the dictionary) and its
    optimiser: the feature axes and blocks the kind names (`feature_axes`, `feature_blocks`), axis 0 for the heads
    when they are split (every tensor of a crosscoder has its heads there)."""
    from lm_saes_core.models.feature_parallel import optimizer_axes

    head = 0 if heads_split else None
    axes, by_index = model.feature_axes(), optimizer_axes(model, optimizer)

    def split_of(key: str) -> Split:
        group, _, rest = key.partition("/")
        if group == "model":
            axis = axes.get(rest)
            return Split(head, axis, model.feature_blocks(rest) if axis is not None else None)
        if group == "optimizer":
            axis = by_index[int(rest.partition("/")[0])]
            return Split(head, *axis) if isinstance(axis, tuple) else Split(head, axis)
        return Split(head, len(model.feature_shape) - 1, model.feature_blocks())  # dead-latent counters

    return split_of


def _pieces(key: str, tensor: Tensor, split: Split) -> list[tuple[str, Tensor]]:
    if split.blocks is None:
        return [(key, tensor)]
    blocks = tensor.split(list(split.blocks), split.feature_axis)
    return [(f"{key}/block{index}", block) for index, block in enumerate(blocks)]


def _joined(parts: list[tuple[int, Tensor]], split: Split) -> Tensor:
    if len(parts) == 1:
        return parts[0][1]
    return torch.cat([tensor for _, tensor in sorted(parts, key=lambda part: part[0])], dim=split.feature_axis)


def _key(name: str) -> str:
    match = _BLOCK.match(name)
    return match.group(1) if match else name


def _distributed(local: Tensor, split: Split, mesh) -> "DTensor":
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, mesh, _placements(split, mesh), run_check=False)


def _placements(split: Split, mesh) -> list:
    """Replicated over `data`; sharded over `head` and `model` on the axes the tensor has (a mesh axis of one rank
    holds the whole)."""
    from torch.distributed.tensor import Replicate, Shard

    head, model = mesh.size(1), mesh.size(2)
    return [
        Replicate(),
        Shard(split.head_axis) if split.head_axis is not None and head > 1 else Replicate(),
        Shard(split.feature_axis) if split.feature_axis is not None and model > 1 else Replicate(),
    ]


def _local_shape(shape, split: Split, mesh) -> list[int]:
    local = list(shape)
    if mesh is not None:
        for axis, ranks in ((split.head_axis, mesh.size(1)), (split.feature_axis, mesh.size(2))):
            if axis is not None:
                local[axis] //= ranks
    return local
