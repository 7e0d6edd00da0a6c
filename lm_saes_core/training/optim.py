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


def rms_grad_norm(parameters: Iterable[torch.nn.Parameter], shards: "GradShards | None" = None) -> torch.Tensor:
    """||all gradients||_2 / sqrt(#non-zero gradient entries): a per-entry scale that does not grow with model size
    or with the number of features a sparse step leaves untouched. With `shards` (feature parallelism) the sums of
    the sharded parameters' gradients are taken over every shard, the replicated ones counted once."""
    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return torch.zeros(())
    if shards is None:
        grads = [p.grad for p in parameters]
        squares = torch.stack([g.float().square().sum() for g in grads]).sum()
        nonzero = torch.stack([torch.count_nonzero(g) for g in grads]).sum()
        return squares.sqrt() / nonzero.clamp(min=1).sqrt()
    sums = []  # per parameter: (sum of squares, non-zero entries), float64 (counts past 2^24 stay exact)
    for p in parameters:
        sums.append(torch.stack([p.grad.double().square().sum(), torch.count_nonzero(p.grad).double()]))
    sharded = torch.tensor([id(p) in shards.ids for p in parameters], device=sums[0].device)
    stacked = torch.stack(sums)  # (P, 2)
    totals = shards.sum(stacked[sharded].sum(0)) + stacked[~sharded].sum(0)
    return (totals[0].sqrt() / totals[1].clamp(min=1).sqrt()).float()


class GradShards:
    """What the gradient norm needs of feature parallelism: which parameters are sharded and the sum over shards."""

    def __init__(self, sharded_parameters: Iterable[torch.nn.Parameter], sum_over_shards):
        self.ids = {id(p) for p in sharded_parameters}
        self.sum = sum_over_shards


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
