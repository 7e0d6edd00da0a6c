"""`TrainerConfig`: every knob of the training loop, validated when built so a bad value fails before any work."""

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lm_saes_core.config import BaseConfig, DType
from lm_saes_core.training.schedules import CheckpointMode, KScheduleType, LRSchedulerName

StepCount = int | float
"""An int is a number of steps; a float in [0, 1] is a fraction of the total number of training steps."""

STEP_FIELDS = (
    "l1_coefficient_warmup_steps",
    "k_warmup_steps",
    "k_cold_booting_steps",
    "lr_warm_up_steps",
    "lr_cool_down_steps",
)

# Fields that may differ between a checkpoint and the settings that resume it: they do not change the weights.
RUN_NEUTRAL_FIELDS = frozenset(
    {"log_frequency", "exp_result_path", "checkpoint_every_steps", "n_checkpoints", "check_point_save_mode"}
)


class TrainerConfig(BaseConfig):
    # Loss terms
    l1_coefficient: float = Field(default=8e-5, ge=0)
    l1_coefficient_warmup_steps: StepCount = 0.1
    sparsity_loss_type: Literal["power", "tanh", "tanh-quad", "l0"] | None = None
    """None: no sparsity penalty (TopK style). relu and jumprelu dictionaries need one; "l0" (JumpReLU only) is
    the count of active features with the threshold's kernel gradient."""
    tanh_stretch_coefficient: float = Field(default=4.0, gt=0)
    frequency_scale: float = Field(default=0.01, gt=0)
    p: int = Field(default=1, ge=1)
    lp_coefficient: float = Field(default=0.0, ge=0)
    """JumpReLU pre-activation loss (suggested 3e-6); 0 disables it."""
    auxk_coefficient: float = Field(default=0.0, ge=0)
    """Aux-K loss on dead latents (suggested 1/32); 0 disables it."""
    k_aux: int = Field(default=512, gt=0)
    dead_threshold: int = Field(default=10_000_000, gt=0)
    """Tokens without any activation after which a latent counts as dead."""

    # TopK k annealing (None: k = top_k from the first step)
    initial_k: int | None = Field(default=None, gt=0)
    k_warmup_steps: StepCount = 0.1
    k_cold_booting_steps: StepCount = 0
    k_schedule_type: KScheduleType = "linear"
    k_exponential_factor: float = Field(default=3.0, gt=0)

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
    lr_warm_up_steps: StepCount = 5000
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
    exp_result_path: str = "results"
    fold_activation_scale: bool = True
    """Fold the dataset-wise normalisation into the final saved weights (checkpoints are never folded)."""

    @field_validator(*STEP_FIELDS)
    @classmethod
    def _step_count(cls, value: StepCount, info) -> StepCount:
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise ValueError(
                f"{info.field_name}={value}: a float is a fraction of the total steps and must lie in [0, 1]; "
                "give an int for an absolute number of steps"
            )
        if isinstance(value, int) and value < 0:
            raise ValueError(f"{info.field_name}={value} must not be negative")
        return value

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
        """Fields (other than run-neutral ones) whose values differ: {name: (other's value, this value)}."""
        mine, theirs = self.model_dump(mode="json"), other.model_dump(mode="json")
        return {k: (theirs[k], mine[k]) for k in mine if k not in RUN_NEUTRAL_FIELDS and mine[k] != theirs[k]}
