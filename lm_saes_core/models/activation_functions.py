"""Activation functions of sparse dictionaries: the functions on dense (tokens, d_sae) pre-activations, and one
module per `act_fn` that a dictionary holds as `activation_function` (chosen once from its config).

All of them zero what they drop by multiplying with a 0/1 mask computed without gradient, so gradients reach only
the kept entries. The sparse (index, value) forms used by the fast TopK training path live in `kernels.py`.

Decoder-norm gating (`sparsity_include_decoder_norm`): a module is called with the per-feature decoder norms n and
returns act(h * n) / n, so it ranks or thresholds each feature by its contribution h_i ||W_D,i||; without gating it
is called with n = None and returns act(h).
"""

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from lm_saes_core.models import kernels
from lm_saes_core.models.kernels import KthLargest, batch_topk_threshold


def relu(x: Tensor) -> Tensor:
    return x.relu()


def _nonzero(norm: Tensor) -> Tensor:
    """Decoder norms to divide by: a feature whose decoder is zero has score 0, is never kept, and divides to 0."""
    return norm.clamp(min=torch.finfo(norm.dtype).tiny)


def _sum_over_tokens(values: Tensor, threshold: Tensor) -> Tensor:
    """(..., *feature_shape) summed over the leading dims down to the threshold's (feature) shape."""
    return values.reshape(-1, *threshold.shape).sum(0)


class JumpReLUFunction(torch.autograd.Function):
    """y = x * 1[x > theta], with a rectangular-kernel pseudo-derivative for theta (Rajamanoharan et al. 2024).

    d/dx is straight-through on the kept entries; d/dtheta = g * (-theta / window) inside the window
    |x - theta| < window / 2 (x > 0), summed over the leading (token) dims theta does not have: theta has the
    feature shape, (d_sae,) or e.g. (n_layers, d_sae).
    """

    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor, window: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, threshold)
        ctx.window = window
        return x * (x > threshold)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, threshold = ctx.saved_tensors
        grad_x = grad_threshold = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output * (x > threshold)
        if ctx.needs_input_grad[1]:
            in_window = ((x - threshold).abs() < ctx.window / 2) & (x > 0)
            grad_threshold = _sum_over_tokens(grad_output * in_window * (-threshold / ctx.window), threshold)
        return grad_x, grad_threshold, None


class GatedJumpReLUFunction(torch.autograd.Function):
    """f = (s * 1[s > theta]) / n with s = x * n (decoder-norm gating), computed without forming s in the forward.

    Same values and gradients as `jumprelu(x * n, theta) / n`: d/dx is straight-through on the kept entries, no
    gradient reaches n (through s and through the division the terms cancel exactly), and d/dtheta is the rectangle
    kernel on s divided by n. With n > 0, s > theta is x > theta / n, so the masks compare x with per-feature bounds.
    """

    @staticmethod
    def forward(ctx, x: Tensor, norm: Tensor, threshold: Tensor, window: float) -> Tensor:  # type: ignore[override]
        kept = x > threshold / norm
        ctx.save_for_backward(x, norm, threshold, kept)  # the mask (1 byte an entry) is not recomputed in backward
        ctx.window = window
        # `where`, not `x * kept`: multiplying by a bool tensor first copies it into a float tensor of x's size
        return torch.where(kept, x, 0.0)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:  # type: ignore[override]
        x, norm, threshold, kept = ctx.saved_tensors
        grad_x = grad_threshold = in_window_grad = None
        if ctx.needs_input_grad[2]:
            # |x n - theta| < w / 2 and x n > 0, as bounds on x per feature (x > max(low, 0): both lower bounds)
            low, high = ((threshold - ctx.window / 2) / norm).clamp(min=0), (threshold + ctx.window / 2) / norm
            in_window_grad = torch.where((x > low) & (x < high), grad_output, 0.0)
            weight = -threshold / (ctx.window * norm)  # the feature shape
            grad_threshold = _sum_over_tokens(in_window_grad, threshold) * weight
        if ctx.needs_input_grad[0]:
            if in_window_grad is not None and not torch.is_grad_enabled():  # reuse its memory: no fresh allocation
                grad_x = torch.where(kept, grad_output, grad_output.new_zeros(()), out=in_window_grad)
            else:
                grad_x = torch.where(kept, grad_output, 0.0)
        return grad_x, None, grad_threshold, None


class StepFunction(torch.autograd.Function):
    """H(x - theta) = 1[x > theta], the JumpReLU L0 count, with the rectangular-kernel pseudo-derivative for theta:
    d/dtheta = g * (-1 / window) inside |x - theta| < window / 2 (x > 0); no gradient reaches x (the count is
    piecewise constant in x), as in Rajamanoharan et al. 2024."""

    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor, window: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, threshold)
        ctx.window = window
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[None, Tensor | None, None]:  # type: ignore[override]
        x, threshold = ctx.saved_tensors
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            in_window = ((x - threshold).abs() < ctx.window / 2) & (x > 0)
            grad_threshold = _sum_over_tokens(grad_output * in_window * (-1.0 / ctx.window), threshold)
        return None, grad_threshold, None


def step(x: Tensor, threshold: Tensor, window: float) -> Tensor:
    """The JumpReLU L0 penalty's per-entry count 1[x > theta], differentiable in theta."""
    return StepFunction.apply(x, threshold.to(x.dtype), window)


def jumprelu(x: Tensor, threshold: Tensor, window: float) -> Tensor:
    """JumpReLU with per-feature `threshold` (shape (d_sae,)); pass exp(log_threshold) to learn it in log space."""
    return JumpReLUFunction.apply(x, threshold.to(x.dtype), window)


def gated_jumprelu(x: Tensor, norm: Tensor, threshold: Tensor, window: float) -> Tensor:
    """`jumprelu(x * norm, threshold) / norm` (decoder-norm gating) in fewer passes over x; `norm` gets no gradient,
    as in that composition."""
    return GatedJumpReLUFunction.apply(x, norm.to(x.dtype), threshold.to(x.dtype), window)


def topk(x: Tensor, k: int) -> Tensor:
    """Keep the k largest positive entries of every row (last dim)."""
    with torch.no_grad():
        kept_values, kept_indices = x.topk(k, dim=-1, sorted=False)
        mask = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, kept_indices, kept_values > 0)
    return x * mask


def batchtopk_threshold(x: Tensor, k: int, kth: KthLargest | None = None) -> Tensor:
    """The smallest value kept when keeping the k * n_rows largest positive entries of x (n_rows, d_sae) overall
    (of every data-parallel rank's rows with a group's `kth`).

    0-d tensor; 0 when fewer than k * n_rows entries are positive (then every positive entry is kept).
    """
    with torch.no_grad():
        return batch_topk_threshold(x, k, kth)


def threshold_activation(x: Tensor, threshold: Tensor | float, inclusive: bool = False) -> Tensor:
    """Keep the positive entries above one scalar threshold (>= when `inclusive`)."""
    with torch.no_grad():
        mask = (x >= threshold) if inclusive else (x > threshold)
        mask &= x > 0
    return x * mask


# -------------------------------------------------------------------------------- modules, one per act_fn


class ActivationFunction(nn.Module):
    """f = act(h * n) / n (or act(h) without gating) for pre-activations h (..., *feature_shape).

    Class attributes say what the trainer and the losses may ask of it: `uses_k` (TopK family: `k` picks how many
    features stay), `needs_sparsity_penalty` (relu and jumprelu are only sparse under a penalty)."""

    name: ClassVar[str]
    uses_k: ClassVar[bool] = False
    needs_sparsity_penalty: ClassVar[bool] = False
    gated: ClassVar[bool] = True
    """Whether decoder-norm gating changes the result (ReLU: relu(h * n) / n == relu(h), so no norms are needed)."""
    spans_groups: ClassVar[bool] = False
    """It ranks features across their groups (the layers of a CLT): only for dictionaries whose features come in
    groups."""

    def __init__(self, feature_shape: tuple[int, ...], window: float, **factory):
        """`feature_shape` and `factory` (device, dtype) size learned state; `window` is JumpReLU's bandwidth."""
        super().__init__()

    def forward(self, hidden_pre: Tensor, norm: Tensor | None, k: int, update_state: bool = True) -> Tensor:
        raise NotImplementedError

    def threshold_parameters(self) -> list[nn.Parameter]:
        """Learned thresholds: their own optimiser group, left out of gradient clipping."""
        return []

    def statistics(self, k: int) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def fold_(self, scale: float | Tensor) -> None:
        """Thresholds compare scores that folding divides by `scale` (a number, or one per group of features (G,)):
        divide them too (no-op without thresholds)."""

    def init_parameters(self, **_: float) -> None:
        """Reset learned state (thresholds) to its initial value."""


class ReLU(ActivationFunction):
    name = "relu"
    needs_sparsity_penalty = True
    gated = False

    def forward(self, hidden_pre: Tensor, norm: Tensor | None, k: int, update_state: bool = True) -> Tensor:
        return relu(hidden_pre)


class JumpReLU(ActivationFunction):
    """Learned per-feature thresholds theta = exp(log_jumprelu_threshold); the window is the kernel bandwidth of
    their pseudo-gradient."""

    name = "jumprelu"
    needs_sparsity_penalty = True

    def __init__(self, feature_shape: tuple[int, ...], window: float, **factory):
        super().__init__(feature_shape, window)
        self.window = window
        self.log_jumprelu_threshold = nn.Parameter(torch.empty(feature_shape, **factory))

    def threshold(self) -> Tensor:
        return self.log_jumprelu_threshold.exp()

    def forward(self, hidden_pre: Tensor, norm: Tensor | None, k: int, update_state: bool = True) -> Tensor:
        if norm is not None:
            return gated_jumprelu(hidden_pre, norm, self.threshold(), self.window)
        return jumprelu(hidden_pre, self.threshold(), self.window)

    def active_count(self, hidden_pre: Tensor, norm: Tensor | None) -> Tensor:
        """The per-entry count 1[s > theta] of the scores s (h * n, or h), differentiable in theta (the L0 penalty)."""
        scores = hidden_pre * norm if norm is not None else hidden_pre
        return step(scores, self.threshold(), self.window)

    def pre_activation_loss(self, hidden_pre: Tensor, decoder_norm: Tensor) -> Tensor:
        """Mean over tokens of sum_i relu(theta_i - h_i) ||W_D,i|| (the lp loss that lifts pre-activations)."""
        return ((self.threshold() - hidden_pre).relu() * decoder_norm).flatten(1).sum(-1).mean()

    def threshold_parameters(self) -> list[nn.Parameter]:
        return [self.log_jumprelu_threshold]

    def statistics(self, k: int) -> dict[str, float]:
        return {"metrics/mean_jumprelu_threshold": self.threshold().mean().item()}

    @torch.no_grad()
    def fold_(self, scale: float | Tensor) -> None:
        if isinstance(scale, Tensor):  # one per group: thresholds (G, F)
            self.log_jumprelu_threshold -= scale.log()[:, None]
        else:
            self.log_jumprelu_threshold -= math.log(scale)

    @torch.no_grad()
    def init_parameters(self, init_log_jumprelu_threshold_value: float = math.log(0.1), **_: float) -> None:
        self.log_jumprelu_threshold.fill_(init_log_jumprelu_threshold_value)


Selected = list[tuple[kernels.Selection, Tensor | None]]
"""The sparse form of a TopK-family activation: per group of features (one for an SAE; per layer for a CLT), the
(row, feature) selection over that group's (N, d_sae) block and a mask of its positive entries (or None: all are)."""


def _groups(scores: Tensor) -> Tensor:
    """Scores (N, *groups, F) as (N, G, F)."""
    return scores.reshape(scores.shape[0], math.prod(scores.shape[1:-1]), scores.shape[-1])


def _split(selection: kernels.Selection, keep: Tensor | None, n_groups: int, width: int) -> Selected:
    """A selection over (N, G * F) (groups side by side) as one selection per group."""
    groups, cols = selection.cols // width, selection.cols % width
    n_rows = selection.offsets.shape[0]
    parts = []
    for group in range(n_groups):
        mine = groups == group
        rows = selection.rows[mine]
        part = kernels.Selection(rows, cols[mine], kernels.row_offsets(rows, n_rows))
        parts.append((part, keep[mine] if keep is not None else None))
    return parts


class TopK(ActivationFunction):
    """The k largest scores of every token (of every token and group, e.g. layer, when features come in groups)."""

    name = "topk"
    uses_k = True
    row_kth: kernels.RowKth | None = None
    """Set on one shard of a feature-parallel dictionary: a row's k-th largest score over every shard."""

    def forward(self, hidden_pre: Tensor, norm: Tensor | None, k: int, update_state: bool = True) -> Tensor:
        if self.row_kth is not None:
            scores = hidden_pre * norm if norm is not None else hidden_pre
            with torch.no_grad():
                rows = scores.detach().reshape(-1, scores.shape[-1])
                candidates = rows.topk(min(k, rows.shape[-1]), dim=-1, sorted=False).values
                kth = self.row_kth(candidates, k).reshape(*scores.shape[:-1], 1)
            acts = threshold_activation(scores, kth, inclusive=True)
            return acts / _nonzero(norm) if norm is not None else acts
        if norm is None:
            return topk(hidden_pre, k)
        return topk(hidden_pre * norm, k) / _nonzero(norm)

    def select(self, scores: Tensor, k: int, update_state: bool = True) -> Selected:
        """The sparse form over scores (N, *groups, d_sae)."""
        grouped = _groups(scores)
        if self.row_kth is not None:
            return [
                (kernels.select_topk_of_shards(grouped[:, g], k, self.row_kth), None) for g in range(grouped.shape[1])
            ]
        return [kernels.select_topk(grouped[:, group], k) for group in range(grouped.shape[1])]

    def statistics(self, k: int) -> dict[str, float]:
        return {"sparsity/k": float(k)}


class LayerTopK(TopK):
    """The k largest scores of every token over all its groups (layers) of features together."""

    name = "layertopk"
    spans_groups = True

    def forward(self, hidden_pre: Tensor, norm: Tensor | None, k: int, update_state: bool = True) -> Tensor:
        scores = hidden_pre * norm if norm is not None else hidden_pre
        flat = scores.flatten(1)
        if self.row_kth is not None:
            with torch.no_grad():
                candidates = flat.detach().topk(min(k, flat.shape[1]), dim=-1, sorted=False).values
                kth = self.row_kth(candidates, k)[:, None]
            acts = threshold_activation(flat, kth, inclusive=True).reshape(scores.shape)
        else:
            acts = topk(flat, k).reshape(scores.shape)
        return acts / _nonzero(norm) if norm is not None else acts

    def select(self, scores: Tensor, k: int, update_state: bool = True) -> Selected:
        grouped = _groups(scores)
        if self.row_kth is not None:
            selection = kernels.select_topk_of_shards(grouped.flatten(1), k, self.row_kth)
            return _split(selection, None, grouped.shape[1], grouped.shape[2])
        return _split(*kernels.select_topk(grouped.flatten(1), k), grouped.shape[1], grouped.shape[2])


class BatchTopK(ActivationFunction):
    """Training: the k x N largest scores of the batch of N tokens (of every data-parallel rank's tokens with a
    group's `kth`), per group (layer) of features when they come in groups. Inference: every score above
    `topk_threshold` (one per group), an EMA of the training thresholds, so a token's features do not depend on the
    other tokens."""

    name = "batchtopk"
    uses_k = True
    threshold_momentum = 0.99
    """EMA momentum of the inference threshold: averages ~100 batches, settles within a few hundred steps."""

    def __init__(self, feature_shape: tuple[int, ...], window: float, **factory):
        super().__init__(feature_shape, window)
        # 0 means "not estimated yet": the first training batch sets it directly.
        self.register_buffer("topk_threshold", torch.zeros(self._threshold_shape(feature_shape), **factory))
        self.kth: KthLargest | None = None
        """How training finds the threshold: None within this batch; a data-parallel trainer sets its group's
        search, so the threshold is that of the whole distributed batch and the replicas stay identical."""

    @staticmethod
    def _threshold_shape(feature_shape: tuple[int, ...]) -> tuple[int, ...]:
        return feature_shape[:-1]  # one per group: () for an SAE

    def _update_threshold(self, batch_threshold: Tensor) -> None:
        old, m = self.topk_threshold, self.threshold_momentum
        batch_threshold = batch_threshold.reshape(old.shape)
        self.topk_threshold.copy_(torch.where(old > 0, m * old + (1 - m) * batch_threshold, batch_threshold))

    def _thresholds(self, grouped: Tensor, k: int, update_state: bool) -> tuple[Tensor, bool]:
        """(G,) thresholds of scores (N, G, F) and whether they are inclusive."""
        if not self.training:
            return self.topk_threshold.reshape(-1), False
        detached = grouped.detach()
        thresholds = torch.stack([batchtopk_threshold(detached[:, g], k, self.kth) for g in range(grouped.shape[1])])
        if update_state and grouped.shape[0] > 0:
            self._update_threshold(thresholds)
        return thresholds, True

    def forward(self, hidden_pre: Tensor, norm: Tensor | None, k: int, update_state: bool = True) -> Tensor:
        scores = hidden_pre * norm if norm is not None else hidden_pre
        grouped = _groups(scores)
        thresholds, inclusive = self._thresholds(grouped, k, update_state)
        acts = threshold_activation(grouped, thresholds[:, None], inclusive).reshape(scores.shape)
        return acts / _nonzero(norm) if norm is not None else acts

    def select(self, scores: Tensor, k: int, update_state: bool = True) -> Selected:
        grouped = _groups(scores)
        if not self.training:
            thresholds = self.topk_threshold.reshape(-1)
            return [(kernels.select_above(grouped[:, g], thresholds[g]), None) for g in range(grouped.shape[1])]
        selected, thresholds = [], []
        for group in range(grouped.shape[1]):
            selection, threshold = kernels.select_batch_topk(grouped[:, group], k, self.kth)
            selected.append((selection, None))
            thresholds.append(threshold)
        if update_state and scores.shape[0] > 0:
            self._update_threshold(torch.stack(thresholds))
        return selected

    def statistics(self, k: int) -> dict[str, float]:
        return {"sparsity/k": float(k)}

    @torch.no_grad()
    def fold_(self, scale: float | Tensor) -> None:
        self.topk_threshold /= scale  # one threshold per group, as `scale` has

    @torch.no_grad()
    def init_parameters(self, **_: float) -> None:
        self.topk_threshold.zero_()


class BatchLayerTopK(BatchTopK):
    """BatchTopK over all groups (layers) of features together: the k x N largest scores of the whole batch, one
    inference threshold."""

    name = "batchlayertopk"
    spans_groups = True

    @staticmethod
    def _threshold_shape(feature_shape: tuple[int, ...]) -> tuple[int, ...]:
        return ()

    def forward(self, hidden_pre: Tensor, norm: Tensor | None, k: int, update_state: bool = True) -> Tensor:
        scores = hidden_pre * norm if norm is not None else hidden_pre
        flat = scores.flatten(1)[:, None]  # one group of every feature
        thresholds, inclusive = self._thresholds(flat, k, update_state)
        acts = threshold_activation(flat, thresholds[:, None], inclusive).reshape(scores.shape)
        return acts / _nonzero(norm) if norm is not None else acts

    def select(self, scores: Tensor, k: int, update_state: bool = True) -> Selected:
        grouped = _groups(scores)
        ((selection, _),) = super().select(grouped.flatten(1), k, update_state)
        return _split(selection, None, grouped.shape[1], grouped.shape[2])


ACTIVATION_FUNCTIONS: dict[str, type[ActivationFunction]] = {
    cls.name: cls for cls in (ReLU, JumpReLU, TopK, BatchTopK, LayerTopK, BatchLayerTopK)
}
"""act_fn -> module; a config's `act_fn` must be one of these names."""


def build_activation_function(
    act_fn: str, feature_shape: tuple[int, ...], window: float, device: torch.device | str, dtype: torch.dtype
) -> ActivationFunction:
    """The module a dictionary's config names, with learned state of `feature_shape` (JumpReLU thresholds)."""
    if act_fn not in ACTIVATION_FUNCTIONS:
        raise ValueError(f"unknown act_fn {act_fn!r}; choose one of {sorted(ACTIVATION_FUNCTIONS)}")
    return ACTIVATION_FUNCTIONS[act_fn](feature_shape, window, device=torch.device(device), dtype=dtype)
