"""The collectives that data, feature and head parallelism share, each over a given process group (no gradient)."""

import torch
import torch.distributed as dist
from torch import Tensor

from lm_saes_core.models import kernels


def summed(tensor: Tensor, group) -> Tensor:
    """A new tensor: `tensor` summed over the group's processes."""
    total = tensor.detach().clone()
    dist.all_reduce(total, group=group)
    return total


def any_process(flags: Tensor, group) -> Tensor:
    """Element-wise OR of a boolean tensor over the group's processes."""
    combined = flags.to(torch.uint8)
    dist.all_reduce(combined, op=dist.ReduceOp.MAX, group=group)
    return combined.bool()


def gathered_parts(tensor: Tensor, group) -> list[Tensor]:
    """Every process's `tensor` (all of one shape), in rank order within the group."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    return parts


def mean_over_parts(stats: dict[str, float], sum_over_parts, parts: int) -> dict[str, float]:
    """Statistics that are means over one part's features (norms, thresholds) or the same on every part, made the
    whole dictionary's: their mean over the `parts` equal parts (`sum_over_parts`: a tensor summed over them)."""
    if not stats:
        return stats
    means = sum_over_parts(torch.tensor(list(stats.values()), dtype=torch.float64)) / parts
    return dict(zip(stats, means.tolist(), strict=True))


def kth_largest_over(values: Tensor, k: int, group) -> Tensor:
    """The k-th largest of every process's `values` together, clamped at 0 (BatchTopK's threshold over the group):
    each process sends its k largest (padded with -inf), which hold every entry of the global top k."""
    flat = values.reshape(-1)
    top = flat.topk(min(k, flat.numel()), sorted=False).values
    padded = torch.full((k,), float("-inf"), dtype=flat.dtype, device=flat.device)
    padded[: top.numel()] = top
    return kernels.kth_largest(torch.cat(gathered_parts(padded, group)), k)
