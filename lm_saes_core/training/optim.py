"""Optimiser, learning-rate scheduler and the RMS gradient norm used for clipping and reporting."""

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from lm_saes_core.training.config import TrainerConfig
from lm_saes_core.training.schedules import lr_multiplier, resolve_steps


def build_optimizer(cfg: TrainerConfig, parameter_groups: list[dict]) -> torch.optim.Optimizer:
    optimizer_class = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(parameter_groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainerConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    warmup = resolve_steps(cfg.lr_warm_up_steps, total_steps)
    cooldown = resolve_steps(cfg.lr_cool_down_steps, total_steps)

    def multiplier(step: int) -> float:
        return lr_multiplier(
            cfg.lr_scheduler_name,
            step,
            warmup=warmup,
            cooldown=cooldown,
            total=total_steps,
            end_ratio=cfg.lr_end_ratio,
        )

    return LambdaLR(optimizer, multiplier)


def square_sum(tensor: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """The sum of squares of `tensor`'s entries in one read and without a temporary of its size (`square().sum()`
    makes one: on CPU its fresh pages cost more than the arithmetic): the norms of blocks of `block` entries, squared
    and summed. As accurate as `square().sum()`; one long `vector_norm` over the whole tensor is not (it accumulates
    millions of entries in one float32 run)."""
    flat = tensor.reshape(-1)
    whole = flat.numel() // block * block
    norms = torch.linalg.vector_norm(flat[:whole].view(-1, block), dim=1)
    return norms.square().sum() + flat[whole:].square().sum()


def rms_grad_norm(parameters: Iterable[torch.nn.Parameter], shards: "GradShards | None" = None) -> torch.Tensor:
    """||all gradients||_2 / sqrt(#non-zero gradient entries): a per-entry scale that does not grow with model size
    or with the number of features a sparse step leaves untouched. With `shards` (feature parallelism) the sums of
    the sharded parameters' gradients are taken over every shard, the replicated ones counted once."""
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return torch.zeros(())
    squares = torch.stack([square_sum(p.grad.float()) for p in parameters])
    nonzero = torch.stack([torch.count_nonzero(p.grad) for p in parameters])
    if shards is None:
        return squares.sum().sqrt() / nonzero.sum().clamp(min=1).sqrt()
    # per parameter: (sum of squares, non-zero entries), float64 (counts past 2^24 stay exact)
    stacked = torch.stack([squares.double(), nonzero.double()], dim=1)  # (P, 2)
    sharded = torch.tensor([id(p) in shards.ids for p in parameters], device=stacked.device)
    totals = stacked[~sharded].sum(0)
    if shards.sum is not None:
        totals = totals + shards.sum(stacked[sharded].sum(0))
    if shards.sum_over_heads is not None:  # every parameter is split by heads
        totals = shards.sum_over_heads(totals)
    return (totals[0].sqrt() / totals[1].clamp(min=1).sqrt()).float()


class GradShards:
    """What the gradient norm needs of feature and head parallelism: which parameters are split by features, the sum
    over feature shards, and the sum over head ranks (a head-parallel crosscoder's parameters all split by heads)."""

    def __init__(self, sharded_parameters: Iterable[torch.nn.Parameter], sum_over_shards, sum_over_heads=None):
        self.ids = {id(p) for p in sharded_parameters}
        self.sum = sum_over_shards
        self.sum_over_heads = sum_over_heads


def clip_rms_grad_norm_(
    parameters: list[torch.nn.Parameter], max_norm: float, shards: GradShards | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale gradients so their RMS norm is at most `max_norm` (0 = no clipping); returns (before, after)."""
    norm = rms_grad_norm(parameters, shards)
    if max_norm <= 0:
        return norm, norm
    scale = torch.where(norm > max_norm, max_norm / (norm + 1e-6), torch.ones_like(norm))
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return norm, norm * scale
