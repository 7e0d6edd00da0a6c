"""Activation functions of sparse dictionaries, on dense (tokens, d_sae) pre-activations.

All of them zero what they drop by multiplying with a 0/1 mask computed without gradient, so gradients reach only
the kept entries. The sparse (index, value) forms used by the fast TopK training path live in `kernels.py`.
"""

import torch
from torch import Tensor

from lm_saes_core.models.kernels import KthLargest, batch_topk_threshold


def relu(x: Tensor) -> Tensor:
    return x.relu()


class JumpReLUFunction(torch.autograd.Function):
    """y = x * 1[x > theta], with a rectangular-kernel pseudo-derivative for theta (Rajamanoharan et al. 2024).

    d/dx is straight-through on the kept entries; d/dtheta = g * (-theta / window) inside the window
    |x - theta| < window / 2 (x > 0), summed over every leading (token) dim, so theta has shape x.shape[-1:].
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
            grad_threshold = (grad_output * in_window * (-threshold / ctx.window)).reshape(-1, x.shape[-1]).sum(0)
        return grad_x, grad_threshold, None


class GatedJumpReLUFunction(torch.autograd.Function):
    """f = (s * 1[s > theta]) / n with s = x * n (decoder-norm gating), computed without forming s in the forward.

    Same values and gradients as `jumprelu(x * n, theta) / n`: d/dx is straight-through on the kept entries, no
    gradient reaches n (through s and through the division the terms cancel exactly), and d/dtheta is the rectangle
    kernel on s divided by n. With n > 0, s > theta is x > theta / n, so the masks compare x with per-feature bounds.
    """

    @staticmethod
    def forward(ctx, x: Tensor, norm: Tensor, threshold: Tensor, window: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, norm, threshold)
        ctx.window = window
        return x * (x > threshold / norm)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:  # type: ignore[override]
        x, norm, threshold = ctx.saved_tensors
        grad_x = grad_threshold = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output * (x > threshold / norm)
        if ctx.needs_input_grad[2]:
            # |x n - theta| < w / 2 and x n > 0, as bounds on x per feature
            low, high = (threshold - ctx.window / 2) / norm, (threshold + ctx.window / 2) / norm
            in_window = (x > low) & (x < high) & (x > 0)
            weight = -threshold / (ctx.window * norm)  # (d_sae,)
            grad_threshold = (grad_output * in_window).reshape(-1, x.shape[-1]).sum(0) * weight
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
            grad_threshold = (grad_output * in_window * (-1.0 / ctx.window)).reshape(-1, x.shape[-1]).sum(0)
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


def batchtopk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Training-mode BatchTopK over (n_rows, d_sae): keep the k * n_rows largest positive entries of the batch.

    Returns the activations and the threshold (smallest kept value) that the inference threshold averages.
    """
    threshold = batchtopk_threshold(x, k)
    return threshold_activation(x, threshold, inclusive=True), threshold
