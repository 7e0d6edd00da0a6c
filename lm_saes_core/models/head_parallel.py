"""Head parallelism: a crosscoder's heads split over the `head` ranks of a mesh, each rank streaming only its hooks.

Each head rank holds an ordinary crosscoder over its heads (every tensor of a crosscoder has the heads on axis 0:
W_E, b_E, W_D, b_D and JumpReLU's thresholds). What crosses the head ranks:

- the shared pre-activation h = sum over heads of x_h @ W_E[h] + b_E[h]: each rank adds its heads' part and the parts
  are summed (`sum_partial`). Unlike a feature shard's decode, the ranks then compute different losses (each its
  heads' reconstructions), so the step's loss is the sum of the ranks' losses and the backward sums the ranks'
  gradients of h too (all-reduce forward and backward);
- the loss terms that are means over heads (reconstruction, Aux-K) count each rank's heads out of all of them, and
  every term is logged as the whole's;
- what spans heads in the metrics: pooled explained variance, l0, a feature active in any head, the decoder norm
  shares, the dead-latent count and the gradient norm.

Composes with feature parallelism (a (data, head, model) mesh): a rank then holds its heads' part of its features.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lm_saes_core.models.collectives import any_process, gathered_parts, summed
from lm_saes_core.models.feature_parallel import rebuilt


class _SumPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial: Tensor, group) -> Tensor:  # type: ignore[override]
        ctx.group = group
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


@dataclass(frozen=True)
class HeadShards:
    """This process's place on the `head` axis: `rank` of `size` equal groups of a crosscoder's heads."""

    rank: int
    size: int
    group: object

    def sum_partial(self, partial: Tensor) -> Tensor:
        """The sum over head ranks of each rank's part; its gradient is the sum of the ranks' gradients."""
        return _SumPartial.apply(partial, self.group)

    def sum(self, tensor: Tensor) -> Tensor:
        """A new tensor: `tensor` summed over the head ranks (no gradient)."""
        return summed(tensor, self.group)

    def any(self, flags: Tensor) -> Tensor:
        """Element-wise OR of a boolean tensor over the head ranks."""
        return any_process(flags, self.group)

    def gather(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """Every head rank's `tensor` concatenated along `dim` (no gradient): the heads made whole."""
        return torch.cat(gathered_parts(tensor, self.group), dim=dim)

    def gather_objects(self, value) -> list:
        """Every head rank's picklable `value`, in rank order."""
        values = [None] * self.size
        dist.all_gather_object(values, value, group=self.group)
        return values

    def local_heads(self, heads: list[str]) -> list[str]:
        """This rank's heads of the whole list (equal contiguous groups)."""
        if len(heads) % self.size:
            raise ValueError(f"{len(heads)} heads do not split into {self.size} equal groups")
        step = len(heads) // self.size
        return heads[self.rank * step : (self.rank + 1) * step]

    def local_slice(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """This rank's heads (axis `dim`, 0 for every crosscoder tensor) of a whole tensor."""
        step = tensor.shape[dim] // self.size
        return tensor.narrow(dim, self.rank * step, step)


def head_parallel_problem(cfg, head_parallel_size: int) -> str | None:
    """Why a dictionary of config `cfg` cannot be split into `head_parallel_size` groups of heads, or None."""
    if head_parallel_size == 1:
        return None
    if cfg.sae_type != "crosscoder":
        return f"head parallelism splits a crosscoder's heads; sae_type {cfg.sae_type!r} has none"
    if cfg.n_heads % head_parallel_size:
        return f"the crosscoder's {cfg.n_heads} heads do not split into {head_parallel_size} equal groups"
    return None


def require_head_parallel(cfg, head_parallel_size: int) -> None:
    """`head_parallel_problem` as the runners report it: a ConfigError naming the field (none when it splits)."""
    from lm_saes_core.config import ConfigError

    problem = head_parallel_problem(cfg, head_parallel_size)
    if problem is not None:
        raise ConfigError(f"head_parallel_size: {problem}")


def shard_heads(model, heads: HeadShards):
    """This head rank's crosscoder (its heads) of the whole `model`, which every rank holds identically."""
    cfg = model.cfg.model_copy(deep=True, update={"heads": heads.local_heads(model.cfg.heads)})
    local = rebuilt(model, cfg, {name: heads.local_slice(t).clone() for name, t in model.state_dict().items()})
    local.current_k = model.current_k
    local.head_shards = heads
    return local


def whole_heads_config(cfg, heads: HeadShards, whole_heads: list[str]):
    """The config over `whole_heads` of a head rank's crosscoder config `cfg` (a collective: each rank knows its
    heads' dataset norms)."""
    norms = None
    if cfg.dataset_average_activation_norm is not None:
        norms = {}
        for part in heads.gather_objects(cfg.dataset_average_activation_norm):
            norms |= part
    return cfg.model_copy(deep=True, update={"heads": whole_heads, "dataset_average_activation_norm": norms})


def gather_heads(local, heads: HeadShards, whole_heads: list[str]):
    """The crosscoder over `whole_heads` (on every head rank) of this rank's crosscoder `local` over its heads: each
    tensor gathered on axis 0."""
    cfg = whole_heads_config(local.cfg, heads, whole_heads)
    state = {name: heads.gather(tensor) for name, tensor in local.state_dict().items()}
    whole = rebuilt(local, cfg, state, cfg.dataset_average_activation_norm)
    whole.current_k = local.current_k
    return whole
