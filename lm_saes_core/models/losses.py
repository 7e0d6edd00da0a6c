"""What a dictionary is trained to minimise: the loss config (coefficients and their schedules), the sparsity
penalties chosen once from it, the coefficients of one step, and the loss output with its named terms.

The trainer reads `LossConfig`, schedules its coefficients (l1 warm-up, k annealing) and hands one step's
`LossCoefficients` to `SparseDictionary.compute_loss`; what each term means belongs to the dictionary's kind.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import Tensor

from lm_saes_core.config import BaseConfig, StepCount

if TYPE_CHECKING:
    from lm_saes_core.models.base import SparseDictionary

SparsityLossType = Literal["power", "tanh", "tanh-quad", "l0"]
KScheduleType = Literal["linear", "exponential"]


# ------------------------------------------------------------------------------------------ penalties


class SparsityPenalty:
    """A sparsity penalty of one batch (before the l1 coefficient): feature activations f (N, *feature_shape),
    their pre-activations and the dictionary (its decoder norms n and activation function)."""

    def __call__(self, f: Tensor, hidden_pre: Tensor, model: "SparseDictionary") -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class PowerPenalty(SparsityPenalty):
    """Mean over tokens of ||f * n||_p: each feature weighted by what it adds to the reconstruction."""

    p: int = 1

    def __call__(self, f: Tensor, hidden_pre: Tensor, model: "SparseDictionary") -> Tensor:
        norm = model.decoder_norm()
        if self.p == 1:
            # Every activation function gives f >= 0, so the mean L1 norm of f * n is (sum over tokens of f) . n / N:
            # one pass over f forward, and a backward that broadcasts one row instead of forming (N, *feature_shape).
            return (f.sum(0) * norm).sum() / f.shape[0]
        return (f * norm).flatten(1).norm(p=self.p, dim=-1).mean()


@dataclass(frozen=True)
class TanhPenalty(SparsityPenalty):
    """Mean over tokens of sum_i tanh(c f_i n_i): a soft count of the active features."""

    stretch: float = 4.0

    def __call__(self, f: Tensor, hidden_pre: Tensor, model: "SparseDictionary") -> Tensor:
        contribution = f * model.decoder_norm()
        return torch.tanh(self.stretch * contribution).flatten(1).sum(-1).mean()


@dataclass(frozen=True)
class TanhQuadPenalty(SparsityPenalty):
    """One penalty per batch on the soft firing frequency p_i = mean_tokens tanh(c f_i n_i): sum_i p_i (1 + p_i / s)."""

    stretch: float = 4.0
    frequency_scale: float = 0.01

    def __call__(self, f: Tensor, hidden_pre: Tensor, model: "SparseDictionary") -> Tensor:
        frequency = torch.tanh(self.stretch * f * model.decoder_norm()).mean(0)
        return (frequency * (1 + frequency / self.frequency_scale)).sum()


class L0Penalty(SparsityPenalty):
    """JumpReLU's own L0: the count of features over their thresholds, whose gradient reaches the thresholds only."""

    def __call__(self, f: Tensor, hidden_pre: Tensor, model: "SparseDictionary") -> Tensor:
        count = getattr(model.activation_function, "active_count", None)
        if count is None:
            raise ValueError(f"sparsity_loss_type 'l0' is for act_fn 'jumprelu', not {model.cfg.act_fn!r}")
        return count(hidden_pre, model.gating_norm()).flatten(1).sum(-1).mean()


# ------------------------------------------------------------------------------------------ config


class LossConfig(BaseConfig):
    """The loss terms and their schedules. Settings files may still give these keys directly under `trainer`
    (where they lived before); they are moved here."""

    l1_coefficient: float = Field(default=8e-5, ge=0)
    """Weight of the sparsity penalty (the name is historical: any `sparsity_loss_type`)."""
    l1_coefficient_warmup_steps: StepCount = 0.1
    """The sparsity weight rises linearly from 0 over these steps (int) or this fraction of the run (float)."""
    sparsity_loss_type: SparsityLossType | None = None
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
    """Tokens without any activation after which a latent counts as dead (for Aux-K)."""

    # TopK k annealing (None: k = top_k from the first step)
    initial_k: int | None = Field(default=None, gt=0)
    k_warmup_steps: StepCount = 0.1
    k_cold_booting_steps: StepCount = 0
    k_schedule_type: KScheduleType = "linear"
    k_exponential_factor: float = Field(default=3.0, gt=0)

    def penalty(self) -> SparsityPenalty | None:
        match self.sparsity_loss_type:
            case None:
                return None
            case "power":
                return PowerPenalty(self.p)
            case "tanh":
                return TanhPenalty(self.tanh_stretch_coefficient)
            case "tanh-quad":
                return TanhQuadPenalty(self.tanh_stretch_coefficient, self.frequency_scale)
            case "l0":
                return L0Penalty()

    def coefficients(self, k: int | None = None) -> "LossCoefficients":
        """The full coefficients (no warm-up), e.g. for evaluating a loss outside training."""
        return LossCoefficients(
            self.penalty(), self.l1_coefficient, self.lp_coefficient, self.auxk_coefficient, self.k_aux, k
        )


@dataclass(frozen=True)
class LossCoefficients:
    """One step's loss: the penalty and the scheduled weights. All zero / None: the reconstruction loss alone."""

    penalty: SparsityPenalty | None = None
    l1: float = 0.0
    lp: float = 0.0
    auxk: float = 0.0
    k_aux: int = 512
    k: int | None = None
    """The TopK family's k for this step (None: leave the dictionary's current k)."""

    def as_metrics(self) -> dict[str, float]:
        return {"l1_coefficient": self.l1, "lp_coefficient": self.lp, "auxk_coefficient": self.auxk}


# ------------------------------------------------------------------------------------------ output


@dataclass
class LossOutput:
    """Loss of one batch and its named terms (`mse_loss` always; `sparsity_loss`, `lp_loss`, `aux_loss` when used).
    Tensors are over the N selected (masked-in) tokens, in the normalised space; a kind with several output hooks
    stacks them on dim -2 of `label` and `reconstructed`."""

    loss: Tensor
    terms: dict[str, Tensor]
    feature_acts: Tensor  # (N, *feature_shape)
    hidden_pre: Tensor  # (N, *feature_shape); detached in the sparse TopK path
    reconstructed: Tensor  # (N, [n_outputs,] d_out)
    label: Tensor  # (N, [n_outputs,] d_out)
    n_tokens: int

    @property
    def l_rec(self) -> Tensor:
        return self.terms["mse_loss"]

    @property
    def l_sparsity(self) -> Tensor | None:
        return self.terms.get("sparsity_loss")

    @property
    def l_lp(self) -> Tensor | None:
        return self.terms.get("lp_loss")

    @property
    def l_aux(self) -> Tensor | None:
        return self.terms.get("aux_loss")
