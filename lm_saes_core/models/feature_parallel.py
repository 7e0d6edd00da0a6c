"""Feature (model) parallelism: a dictionary's features split over the `model` ranks of a mesh.

Each model rank holds an ordinary dictionary of its kind with d_sae / mp features (local tensors, explicit
collectives: no DTensor). What crosses the shards is small and explicit:

- the decode: every rank decodes its features into a partial reconstruction, summed once over `model`
  (`reduce_partial`: all-reduce forward, identity backward, since every rank then computes the same loss from the
  same sum, the gradient of a partial is the gradient of the sum);
- the TopK selection: a token's k-th largest score over all shards (`row_kth`: each rank sends its k best per token);
  BatchTopK's threshold over every shard and data rank (`batch_kth`); both exact, not a tolerance search;
- counts that span features (Aux-K's number of dead latents, metrics over all features) and the gradient norm.

Why local shards rather than DTensor: the sparse TopK kernels (embedding_bag, sparse matmuls, index_add) have no
DTensor implementations, and a local shard of a kind is the kind itself, so every kernel, loss and test of the
one-process code holds on a shard unchanged. A kind opts in by naming the feature axis of each tensor
(`SparseDictionary.feature_axes`).

A shard's part of a feature axis is one slice unless the kind numbers its features in blocks that every shard must
share (a MOLT's ranks: each shard holds 1/size of every rank's transforms); then it is its slice of each block, in
block order (`SparseDictionary.feature_blocks`, `shard_part`, `join_parts`).
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lm_saes_core.models.collectives import gathered_parts, kth_largest_over, mean_over_parts, summed


class _ReducePartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:  # type: ignore[override]
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


@dataclass(frozen=True)
class FeatureShards:
    """This process's place on the `model` axis of a mesh: `rank` of `size` shards of every feature axis.

    `world` is the group of every process (data x model), which BatchTopK's threshold spans; `data_size` how many
    data ranks share each step."""

    rank: int
    size: int
    group: object
    world: object
    data_size: int = 1

    # ---------------------------------------------------------------- collectives of a step

    def reduce_partial(self, partial: Tensor) -> Tensor:
        """The sum over shards of each shard's partial reconstruction (gradient: the sum's, unchanged)."""
        return _ReducePartial.apply(partial, self.group)

    def sum(self, tensor: Tensor) -> Tensor:
        """A new tensor: `tensor` summed over the shards (no gradient)."""
        return summed(tensor, self.group)

    def gather(self, tensor: Tensor, dim: int, blocks: tuple[int, ...] | None = None) -> Tensor:
        """Every shard's `tensor` joined along `dim` (no gradient): a feature axis made whole (`join_parts`)."""
        return join_parts(gathered_parts(tensor, self.group), dim, blocks)

    def row_kth(self, candidates: Tensor, k: int) -> Tensor:
        """(N,): per row, the k-th largest of every shard's `candidates` (N, c) together; each shard sends its own
        k largest scores of a row (or all it has), which hold every entry of the row's global top k."""
        gathered = self.gather(candidates, dim=1)
        return gathered.topk(min(k, gathered.shape[1]), dim=1, sorted=False).values.min(1).values

    def batch_kth(self, values: Tensor, n: int) -> Tensor:
        """BatchTopK's search over the whole mesh: `values` are this shard's candidates of this data rank's rows, `n`
        is k x its rows; the threshold is the (n x data ranks)-th largest of every process's values (each sends
        that many of its largest, which hold every entry of the global top), clamped at 0."""
        return kth_largest_over(values, n * self.data_size, self.world)

    def mean_statistics(self, stats: dict[str, float]) -> dict[str, float]:
        """Statistics that are means over a shard's features (norms, thresholds) or the same on every shard, made
        the whole dictionary's: their mean over the (equal) shards."""
        return mean_over_parts(stats, self.sum, self.size)

    # ---------------------------------------------------------------- shards of whole tensors

    def local_slice(self, tensor: Tensor, dim: int, blocks: tuple[int, ...] | None = None) -> Tensor:
        """This shard's part of a whole tensor along `dim` (`shard_part`)."""
        return shard_part(tensor, dim, self.rank, self.size, blocks)


def shard_part(tensor: Tensor, dim: int, rank: int, size: int, blocks: tuple[int, ...] | None = None) -> Tensor:
    """Shard `rank` of `size`'s part of a whole tensor along `dim`: one slice (a view), or, with `blocks` (the widths
    of a shard's blocks; the whole's are `size` times wider), its slice of each of the whole's blocks, concatenated."""
    width = tensor.shape[dim]
    if blocks is None:
        if width % size:
            raise ValueError(f"a feature axis of {width} does not split into {size} equal shards")
        step = width // size
        return tensor.narrow(dim, rank * step, step)
    if width != sum(blocks) * size:
        raise ValueError(f"a feature axis of {width} is not {size} shards of blocks {list(blocks)}")
    parts, start = [], 0
    for block in blocks:
        parts.append(tensor.narrow(dim, start + rank * block, block))
        start += block * size
    return torch.cat(parts, dim)


def join_parts(parts: list[Tensor], dim: int, blocks: tuple[int, ...] | None = None) -> Tensor:
    """The whole tensor of every shard's part (in rank order) along `dim`: what `shard_part` split, put back."""
    if blocks is None:
        return torch.cat(parts, dim=dim)
    pieces = [part.split(list(blocks), dim) for part in parts]
    return torch.cat([piece[b] for b in range(len(blocks)) for piece in pieces], dim=dim)


def whole_feature_index(rank: int, size: int, width: int, blocks: tuple[int, ...] | None = None) -> Tensor:
    """(width,): the whole dictionary's index of each of shard `rank`'s `width` features (a shard's d_sae)."""
    return shard_part(torch.arange(width * size), 0, rank, size, blocks)


def analysed_feature_index(local) -> Tensor:
    """(n_analysed_features,): the whole dictionary's index of each feature a shard analyses, numbered as the
    whole's analysis numbers them (features of a kind's groups, e.g. a CLT's layers, one group after another)."""
    shards: FeatureShards = local.feature_shards
    width = local.cfg.d_sae
    own = whole_feature_index(shards.rank, shards.size, width, local.feature_blocks())
    groups = torch.arange(local.n_analysed_features // width)
    return (groups[:, None] * width * shards.size + own).reshape(-1)


FEATURE_PARALLEL_KINDS = ("sae", "crosscoder", "clt", "lorsa", "molt")
"""The kinds whose features split over shards: SAEs, transcoders, crosscoders, CLTs, Lorsa and MOLT."""


def feature_parallel_problem(cfg, model_parallel_size: int) -> str | None:
    """Why a dictionary of config `cfg` cannot be split into `model_parallel_size` feature shards, or None."""
    if model_parallel_size == 1:
        return None
    if cfg.sae_type not in FEATURE_PARALLEL_KINDS:
        return (f"feature parallelism is not available for sae_type {cfg.sae_type!r} yet (it is for "
                f"{', '.join(map(repr, FEATURE_PARALLEL_KINDS))})")  # fmt: skip
    for rank, count in getattr(cfg, "rank_counts", {}).items():  # a MOLT's shard holds a part of every rank
        if count % model_parallel_size:
            return f"sae.rank_counts[{rank}]={count} does not split into {model_parallel_size} equal shards"
    if cfg.d_sae % model_parallel_size:
        return f"sae.d_sae={cfg.d_sae} does not split into {model_parallel_size} equal feature shards"
    if getattr(cfg, "n_qk_heads", 0) % model_parallel_size:
        return f"sae.n_qk_heads={cfg.n_qk_heads} does not split into {model_parallel_size} equal shards of QK heads"
    return None


def require_feature_parallel(cfg, model_parallel_size: int) -> None:
    """`feature_parallel_problem` as the runners report it: a ConfigError naming the field (none when it splits)."""
    from lm_saes_core.config import ConfigError

    problem = feature_parallel_problem(cfg, model_parallel_size)
    if problem is not None:
        raise ConfigError(f"model_parallel_size: {problem}")


def shard_model(model, shards: FeatureShards):
    """This shard's dictionary (d_sae / size features) of the whole `model`, which every rank holds identically:
    the same kind, its tensors sliced along their feature axes (`model.feature_axes()`), the rest copied."""
    cfg, axes = model.cfg, model.feature_axes()

    def blocks(name: str) -> tuple[int, ...] | None:  # a shard's own blocks: 1/size of each of the whole's (MOLT)
        whole = model.feature_blocks(name)
        return None if whole is None else tuple(block // shards.size for block in whole)

    state = {
        name: (shards.local_slice(tensor, axes[name], blocks(name)) if name in axes else tensor).clone()
        for name, tensor in model.state_dict().items()
    }
    local = rebuilt(model, local_config(cfg, shards.size), state)
    attach_shards(local, shards, cfg)
    local.current_k = model.current_k  # checked against the whole's d_sae, which the shard knows once attached
    return local


def attach_shards(local, shards: FeatureShards, whole_cfg):
    """Make `local` (a dictionary of d_sae / size features holding this shard's weights) shard `shards.rank` of the
    dictionary of config `whole_cfg`."""
    local.feature_shards = shards
    local.whole_cfg = whole_cfg.model_copy(deep=True)
    if hasattr(local.activation_function, "row_kth"):  # TopK: a token's top k over every shard
        local.activation_function.row_kth = shards.row_kth
    return local


def read_shard(
    handle, name: str, axis: int | None, shards: FeatureShards, blocks: tuple[int, ...] | None = None
) -> Tensor:
    """Tensor `name` of an open safetensors file: this shard's part along `axis` (its slice, or its slice of each of
    `blocks` concatenated: read alone, not the whole tensor), or the whole tensor when it has no feature axis."""
    if axis is None:
        return handle.get_tensor(name)
    view = handle.get_slice(name)
    shape = view.get_shape()
    blocks = blocks if blocks is not None else (shape[axis] // shards.size,)
    parts, start = [], 0
    for width in blocks:
        begin = start + shards.rank * width
        parts.append(view[tuple(slice(begin, begin + width) if d == axis else slice(None) for d in range(len(shape)))])
        start += width * shards.size
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)


def gather_model(local):
    """The whole dictionary (on every rank) of a feature-sharded one: each feature axis gathered over the shards."""
    shards: FeatureShards = local.feature_shards
    axes = local.feature_axes()
    state = {
        name: shards.gather(tensor, axes[name], local.feature_blocks(name)) if name in axes else tensor.detach().clone()
        for name, tensor in local.state_dict().items()
    }
    whole = rebuilt(local, local.whole_cfg, state)
    whole.current_k = local.current_k
    return whole


def rebuilt(like, cfg, state: dict[str, Tensor], norms: dict[str, float] | None = None):
    """A dictionary of `like`'s kind with config `cfg` holding `state` (another part, or the whole, of `like`'s
    dictionary), with `like`'s dataset norms (or `norms`) and mode."""
    model = type(like)(cfg)
    model.load_state_dict(state)
    norms = norms if norms is not None else like.cfg.dataset_average_activation_norm
    if norms is not None:
        model.set_dataset_average_activation_norm(norms)
    model.train(like.training)
    return model


def local_config(cfg, size: int):
    """The config of one of `size` shards: d_sae / size features, nothing else changed."""
    if cfg.d_sae % size:
        raise ValueError(f"d_sae={cfg.d_sae} does not split into model_parallel_size={size} equal shards")
    update = {"d_sae": cfg.d_sae // size, "expansion_factor": None, **cfg.shard_fields(size)}
    return cfg.model_copy(deep=True, update=update)


# ---------------------------------------------------------------- optimiser and per-feature state


Axis = int | tuple[int, tuple[int, ...]]
"""A sharded tensor's feature axis: its dim, or (dim, the blocks of a shard's part of it) for a kind that has blocks
(`SparseDictionary.feature_blocks`)."""


def optimizer_axes(local, optimizer: torch.optim.Optimizer) -> list[Axis | None]:
    """The feature axis of each parameter in the optimiser's order (None: replicated)."""
    names = {id(p): name for name, p in local.named_parameters()}
    axes = local.feature_axes()

    def axis(name: str) -> Axis | None:
        blocks = local.feature_blocks(name) if name in axes else None
        return axes.get(name) if blocks is None else (axes[name], blocks)

    return [axis(names[id(p)]) for group in optimizer.param_groups for p in group["params"]]


def _map_optimizer_state(state: dict, axes: list[Axis | None], change) -> dict:
    """The optimiser state dict with `change(tensor, dim)` (or `change(tensor, dim, blocks)`) applied to every
    per-parameter tensor of a sharded parameter (Adam's moments; a scalar step count has no feature axis)."""
    mapped = {}
    for index, entries in state["state"].items():
        axis = axes[index]
        args = (axis,) if isinstance(axis, int) else axis
        mapped[index] = {
            key: change(value, *args) if axis is not None and isinstance(value, Tensor) and value.ndim > 0 else value
            for key, value in entries.items()
        }
    return {"state": mapped, "param_groups": state["param_groups"]}


def shard_optimizer_state(state: dict, axes: list[Axis | None], shards: FeatureShards) -> dict:
    """This shard's part of a whole optimiser state."""
    return _map_optimizer_state(state, axes, lambda value, *axis: shards.local_slice(value, *axis).clone())


def gather_features(
    values: Tensor, feature_shape: tuple[int, ...], shards: FeatureShards, blocks: tuple[int, ...] | None = None
) -> Tensor:
    """A per-feature vector (flattened over a shard's `feature_shape`; `blocks`: its `feature_blocks()`) made
    whole, still flattened."""
    return shards.gather(values.reshape(feature_shape), -1, blocks).reshape(-1)


def shard_features(
    values: Tensor, whole_shape: tuple[int, ...], shards: FeatureShards, blocks: tuple[int, ...] | None = None
) -> Tensor:
    """This shard's part of a whole per-feature vector (flattened over `whole_shape`; `blocks`: the shard's
    `feature_blocks()`)."""
    return shards.local_slice(values.reshape(whole_shape), -1, blocks).reshape(-1).clone()
