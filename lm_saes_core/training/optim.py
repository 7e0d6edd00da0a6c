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


def rms_grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """||all gradients||_2 / sqrt(#non-zero gradient entries): a per-entry scale that does not grow with model size
    or with the number of features a sparse step leaves untouched."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    squares = torch.stack([g.float().square().sum() for g in grads]).sum()
    nonzero = torch.stack([torch.count_nonzero(g) for g in grads]).sum()
    return squares.sqrt() / nonzero.clamp(min=1).sqrt()


def clip_rms_grad_norm_(parameters: list[torch.nn.Parameter], max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale gradients so their RMS norm is at most `max_norm` (0 = no clipping); returns (before, after)."""
    norm = rms_grad_norm(parameters)
    if max_norm <= 0:
        return norm, norm
    scale = torch.where(norm > max_norm, max_norm / (norm + 1e-6), torch.ones_like(norm))
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.dtype))
    return norm, norm * scale
