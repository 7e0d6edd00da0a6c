"""`TrainerConfig`: every knob of the training loop, validated when built so a bad value fails before any work."""

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lm_saes_core.config import BaseConfig, ConfigError, DType, StepCount
from lm_saes_core.models.losses import LossConfig
from lm_saes_core.training.schedules import CheckpointMode, LRSchedulerName, resolve_steps

# Fields that may differ between a checkpoint and the settings that resume it: they do not change the weights.
RUN_NEUTRAL_FIELDS = frozenset(
    {
        "log_frequency",
        "exp_result_path",
        "checkpoint_every_steps",
        "n_checkpoints",
        "check_point_save_mode",
        "checkpoint_every_minutes",
    }
)
LOSS_FIELDS = frozenset(LossConfig.model_fields)
"""Keys of the loss config that settings files may still give directly under `trainer` (where they used to be)."""


class TrainerConfig(BaseConfig):
    loss: LossConfig = Field(default_factory=LossConfig)
    """The loss terms and their schedules (sparsity penalty, l1 warm-up, lp, Aux-K, k annealing), which the trainer
    schedules and hands to the dictionary's `compute_loss`."""

    # Optimiser and learning rate
    lr: float = Field(default=4e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(default=0.0, ge=0)
    """Adam: an L2 term added to the gradient (torch semantics); AdamW: decoupled decay."""
    jumprelu_lr_factor: float = Field(default=1.0, gt=0)
    lr_scheduler_name: LRSchedulerName = "constantwithwarmup"
    lr_end_ratio: float = Field(default=1 / 32, ge=0)
    """Learning rate at the end of the run as a fraction of `lr`; every decaying schedule ends there."""
    lr_warm_up_steps: StepCount = 0.05
    """Linear warm-up of the learning rate: a fraction of the run (default 5%) or a number of steps."""
    lr_cool_down_steps: StepCount = 0.2
    """Length of the final linear decay of `constantwithwarmup` (the only schedule with a separate cool-down)."""
    clip_grad_norm: float = Field(default=0.0, ge=0)
    """Clip the RMS gradient (over non-zero entries, thresholds excluded) to this value; 0 disables clipping."""
    amp_dtype: DType | None = None
    """Autocast dtype for forward and loss; None runs in the dictionary's dtype."""

    # Length, logging and output
    total_training_tokens: int = Field(default=300_000_000, gt=0)
    log_frequency: int = Field(default=1000, gt=0)
    checkpoint_every_steps: int | None = Field(default=None, gt=0)
    n_checkpoints: int = Field(default=10, ge=0)
    check_point_save_mode: CheckpointMode = "log"
    checkpoint_every_minutes: float | None = Field(default=None, gt=0)
    """Also checkpoint whenever this much wall-clock time has passed since the last checkpoint (or the start), so a
    killed run loses at most about this much work whatever the hardware's speed. These periodic checkpoints are
    resume points: only the newest two are kept. The steps of `n_checkpoints` / `checkpoint_every_steps` are all
    kept. Pipeline items default to 10 minutes."""
    exp_result_path: str = "results"
    fold_activation_scale: bool = True
    """Fold the dataset-wise normalisation into the final saved weights (checkpoints are never folded)."""

    @model_validator(mode="before")
    @classmethod
    def _loss_keys_at_the_top(cls, data: Any) -> Any:
        """Accept the loss keys where they used to be (`trainer.l1_coefficient`, ...) by moving them into `loss`."""
        if not isinstance(data, dict) or not LOSS_FIELDS & data.keys():
            return data
        data = dict(data)
        nested = data.get("loss") or {}
        nested = nested.model_dump(exclude_unset=True) if isinstance(nested, LossConfig) else dict(nested)
        twice = sorted(LOSS_FIELDS & data.keys() & nested.keys())
        if twice:
            raise ValueError(f"{twice} given both directly and under `loss`; give each once, under `loss`")
        data["loss"] = nested | {key: data.pop(key) for key in LOSS_FIELDS & data.keys()}
        return data

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError(f"betas={value}: each must lie in [0, 1)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainerConfig":
        if self.lr_end_ratio > 1:
            raise ValueError(f"lr_end_ratio={self.lr_end_ratio} must be <= 1 (it is the final fraction of lr)")
        if self.lr_scheduler_name == "exponentialwarmup" and self.lr_end_ratio == 0:
            raise ValueError("lr_end_ratio must be > 0 for lr_scheduler_name='exponentialwarmup' (a geometric decay)")
        explicit = self.model_fields_set
        name = self.lr_scheduler_name
        if name in ("constant", "cosineannealing") and "lr_warm_up_steps" in explicit and self.lr_warm_up_steps:
            raise ValueError(
                f"lr_scheduler_name={name!r} has no warm-up but lr_warm_up_steps={self.lr_warm_up_steps}; use "
                "'constantwithwarmup' or 'cosineannealingwarmup'"
            )
        if name == "constant" and "lr_end_ratio" in explicit and self.lr_end_ratio != 1:
            raise ValueError("lr_scheduler_name='constant' never decays; lr_end_ratio would be ignored")
        if name != "constantwithwarmup" and "lr_cool_down_steps" in explicit and self.lr_cool_down_steps:
            raise ValueError(
                f"lr_cool_down_steps applies to 'constantwithwarmup' only; {name!r} decays over the whole run"
            )
        return self

    def changes_against(self, other: "TrainerConfig") -> dict[str, tuple[object, object]]:
        """Fields (other than run-neutral ones) whose values differ: {name: (other's value, this value)}, the loss
        fields as `loss.<name>`."""
        mine, theirs = _flat(self.model_dump(mode="json")), _flat(other.model_dump(mode="json"))
        return {k: (theirs[k], mine[k]) for k in mine if k not in RUN_NEUTRAL_FIELDS and mine[k] != theirs[k]}

    def check_schedule_lengths(self, total_steps: int, tokens_per_batch: int) -> None:
        """Refuse a warm-up, cool-down or k-annealing period given as a number of steps that does not fit a run of
        `total_steps`: the run would end before the learning rate, the sparsity weight or k reach the values asked
        for, and the dictionary would silently be another one. Fractions of the run (the defaults) always fit."""
        loss = self.loss
        periods: list[tuple[str, list[StepCount]]] = []
        if self.lr_scheduler_name not in ("constant", "cosineannealing"):
            periods.append(("lr_warm_up_steps", [self.lr_warm_up_steps]))
        if self.lr_scheduler_name == "constantwithwarmup":
            periods.append(("lr_cool_down_steps", [self.lr_cool_down_steps]))
        if loss.sparsity_loss_type is not None:
            periods.append(("loss.l1_coefficient_warmup_steps", [loss.l1_coefficient_warmup_steps]))
        if loss.initial_k is not None:
            periods.append(("loss.k_cold_booting_steps + loss.k_warmup_steps",
                            [loss.k_cold_booting_steps, loss.k_warmup_steps]))  # fmt: skip
        for name, values in periods:
            steps = sum(resolve_steps(value, total_steps) for value in values)
            if any(isinstance(value, int) for value in values) and steps > 0 and steps >= total_steps:
                raise ConfigError(
                    f"trainer.{name} is {steps} steps, but the run has only {total_steps} ({self.total_training_tokens}"
                    f" total_training_tokens in batches of {tokens_per_batch}): it would not end before the run does. "
                    "Give a fraction of the run instead (e.g. 0.05) or fewer steps."
                )


def _flat(dump: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dumps as dotted keys (`loss.l1_coefficient`), so a difference names the field."""
    flat: dict[str, Any] = {}
    for key, value in dump.items():
        if isinstance(value, dict) and key == "loss":
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
