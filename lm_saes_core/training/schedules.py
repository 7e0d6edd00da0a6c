"""Pure functions of the step number: learning-rate multipliers, k annealing, coefficient warm-ups, checkpoint steps.

Step convention: steps are 0-based; the value for step `s` is the one used by the optimiser step that turns `s`
completed steps into `s + 1`. Warm-ups reach 1 at step `W - 1` (multiplier `(s + 1) / W`); decays reach
`lr_end_ratio` at `s = T` (one step after the last one), so the last step uses a value just above it. A zero-length
warm-up or cool-down simply does not exist (no division by zero).
"""

import math
from typing import Literal

from lm_saes_core.models.losses import KScheduleType

LRSchedulerName = Literal[
    "constant",
    "constantwithwarmup",
    "linearwarmupdecay",
    "cosineannealing",
    "cosineannealingwarmup",
    "exponentialwarmup",
]
CheckpointMode = Literal["log", "linear"]


def resolve_steps(value: int | float, total_steps: int) -> int:
    """An int is a step count; a float in [0, 1] is a fraction of the total number of steps."""
    if isinstance(value, float):
        return int(value * total_steps)
    return value


def lr_multiplier(
    name: LRSchedulerName, step: int, *, warmup: int, cooldown: int, total: int, end_ratio: float
) -> float:
    """Multiplier of the base learning rate at 0-based `step` (see the module docstring for the convention)."""
    if name == "constant":
        return 1.0
    if name == "cosineannealing":
        progress = min(step, total) / max(total, 1)
        return end_ratio + (1 - end_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if step < warmup:
        return (step + 1) / warmup
    if name == "constantwithwarmup":
        if cooldown == 0:
            return 1.0
        return min(1.0, end_ratio + (1 - end_ratio) * max(total - step, 0) / cooldown)
    progress = min(step - warmup, total - warmup) / max(total - warmup, 1)  # 0 after warm-up, 1 at s = T
    if name == "linearwarmupdecay":
        return end_ratio + (1 - end_ratio) * (1 - progress)
    if name == "cosineannealingwarmup":
        return end_ratio + (1 - end_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if name == "exponentialwarmup":
        return end_ratio**progress
    raise ValueError(f"unknown lr_scheduler_name {name!r}")


def annealed_k(
    step: int,
    *,
    initial_k: int,
    final_k: int,
    warmup: int,
    cold_boot: int,
    schedule: KScheduleType,
    exponential_factor: float,
) -> int:
    """TopK's k at `step`: hold `initial_k` for `cold_boot` steps, then anneal to `final_k` over `warmup` steps."""
    if step < cold_boot:
        return initial_k
    progress = 1.0 if warmup == 0 else min(1.0, (step - cold_boot) / warmup)
    if schedule == "linear":
        k = initial_k + (final_k - initial_k) * progress
    else:
        a = exponential_factor
        k = initial_k - (initial_k - final_k) * (1 - math.exp(-a * progress)) / (1 - math.exp(-a))
    return max(final_k, math.ceil(k - 1e-9))  # the epsilon keeps exact integers from rounding up on float noise


def warmup_factor(step: int, warmup: int) -> float:
    """Linear warm-up of a loss coefficient from 0 at step 0 to 1 at step `warmup`."""
    return 1.0 if warmup == 0 else min(1.0, step / warmup)


def checkpoint_steps(total: int, n_checkpoints: int, mode: CheckpointMode, every: int | None = None) -> list[int]:
    """Completed-step counts after which to write a checkpoint: `n_checkpoints` spaced snapshots (the end, which
    gets the final weights, excluded) plus every `every` steps. T=1000, n=5: log -> [4, 16, 63, 251],
    linear -> [200, 400, 600, 800]."""
    steps: set[int] = set()
    if n_checkpoints > 1:
        if mode == "linear":
            steps.update(range(0, total, max(1, total // n_checkpoints)))
        else:
            steps.update(round(total ** (i / n_checkpoints)) for i in range(1, n_checkpoints))
    if every:
        steps.update(range(every, total, every))
    return sorted(s for s in steps if 0 < s < total)
