"""Sparse kernels for TopK-family training: touch only the selected (token, feature) pairs after encoding.

With k of d_sae features active per token, the dense decoder matmul and both encoder/decoder weight-gradient
matmuls cost O(N * d_sae * D) each; here they cost O(N * k * D). Only the encoder forward `x @ W_E` stays dense
(every pre-activation is needed to choose the top k). Features are held as `indices (N, K)` and `values (N, K)`;
a padded slot has value 0 (K may exceed a row's number of active features, e.g. for BatchTopK).
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def select_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per row the k largest scores: indices (N, k) and a mask of the positive ones (the others are padding)."""
    values, indices = scores.topk(k, dim=-1, sorted=False)
    return indices, values > 0


def select_above(scores: Tensor, threshold: Tensor | float, inclusive: bool = False) -> tuple[Tensor, Tensor]:
    """Per row the positive scores above one threshold, padded to the longest row: indices and keep mask (N, K)."""
    above = (scores >= threshold) if inclusive else (scores > threshold)
    above &= scores > 0
    width = max(int(above.sum(-1).max()), 1) if scores.shape[0] else 1
    values, indices = scores.topk(width, dim=-1, sorted=False)
    keep = (values >= threshold) if inclusive else (values > threshold)
    return indices, keep & (values > 0)


def kth_largest(values: Tensor, n: int) -> Tensor:
    """The n-th largest entry of `values` (any shape), clamped at 0 (a 0-d tensor; 0 for an empty batch)."""
    if n == 0 or values.numel() == 0:
        return values.new_zeros(())
    return values.reshape(-1).topk(min(n, values.numel()), sorted=False).values.min().clamp(min=0)


def select_batch_topk(scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """BatchTopK over scores (N, d_sae): the k * N largest positive entries of the whole batch.

    Returns indices and keep mask (N, K), K = the largest per-row count, and the threshold (smallest kept value).
    The batch's top entries are searched among each row's 4k largest. That is exact except for rows whose 4k
    candidates all clear the threshold ("saturated": they may hold more); those rows alone are searched in full,
    which can only raise the threshold, so every other row's candidates still contain all of its kept entries.
    """
    n_rows, d_sae = scores.shape
    if n_rows == 0:
        return (*select_above(scores, 0.0), scores.new_zeros(()))
    width = min(4 * k, d_sae)
    values, indices = scores.topk(width, dim=-1, sorted=False)
    threshold = kth_largest(values, k * n_rows)
    saturated = values.min(-1).values >= threshold if width < d_sae else values.new_zeros(n_rows, dtype=torch.bool)
    full_rows = saturated.nonzero().squeeze(-1)
    if full_rows.numel():
        full_scores = scores[full_rows]
        candidates = torch.cat([values[~saturated].reshape(-1), full_scores.reshape(-1)])
        threshold = kth_largest(candidates, k * n_rows)
    keep = (values >= threshold) & (values > 0)
    n_kept = max(int(keep.sum(-1).max()), 1)
    if full_rows.numel():
        n_kept = max(n_kept, int(((full_scores >= threshold) & (full_scores > 0)).sum(-1).max()))
    # Compact the rows to the longest one's count, so that padding costs little in the decoder.
    positions = values.masked_fill(~keep, -torch.inf).topk(min(n_kept, width), dim=-1, sorted=False).indices
    kept_indices, kept = indices.gather(-1, positions), keep.gather(-1, positions)
    if n_kept > width:
        kept_indices = F.pad(kept_indices, (0, n_kept - width))
        kept = F.pad(kept, (0, n_kept - width))
    if full_rows.numel():
        full_values, full_indices = full_scores.topk(n_kept, dim=-1, sorted=False)
        kept_indices[full_rows] = full_indices
        kept[full_rows] = (full_values >= threshold) & (full_values > 0)
    return kept_indices, kept, threshold


class GatherPreacts(torch.autograd.Function):
    """values = (x @ W_E + b_E)[row, indices[row]] from already computed pre-activations, with a sparse backward.

    The backward never forms the dense (N, d_sae) gradient: grad_W_E is a sparse (d_sae, N) @ (N, D) product,
    grad_b_E an index_add and grad_x an embedding_bag over the selected encoder columns.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_E: Tensor, b_E: Tensor, hidden_pre: Tensor, indices: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, W_E, indices)
        return hidden_pre.gather(-1, indices)

    @staticmethod
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, W_E, indices = ctx.saved_tensors
        n_rows, width = indices.shape
        d_sae = W_E.shape[1]
        grad_values = grad_values.to(W_E.dtype)
        grad_x = grad_W_E = grad_b_E = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_E.t().contiguous(), per_sample_weights=grad_values, mode="sum")
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            rows = torch.arange(n_rows, device=x.device).repeat_interleave(width)
            grad_by_feature = torch.sparse_coo_tensor(
                torch.stack([indices.reshape(-1), rows]),
                grad_values.reshape(-1),
                (d_sae, n_rows),
                check_invariants=False,
            )
            grad_W_E = torch.sparse.mm(grad_by_feature, x.to(W_E.dtype)).t().contiguous()
        if ctx.needs_input_grad[2]:
            grad_b_E = torch.zeros(d_sae, dtype=W_E.dtype, device=W_E.device)
            grad_b_E.index_add_(0, indices.reshape(-1), grad_values.reshape(-1))
        return grad_x, grad_W_E, grad_b_E, None, None


def gather_preacts(x: Tensor, W_E: Tensor, b_E: Tensor, hidden_pre: Tensor, indices: Tensor) -> Tensor:
    """Selected pre-activations (N, K) whose gradient flows to x, W_E and b_E through the sparse backward."""
    return GatherPreacts.apply(x, W_E, b_E, hidden_pre.detach(), indices)


def sparse_decode(indices: Tensor, values: Tensor, W_D: Tensor) -> Tensor:
    """sum_k values[:, k] * W_D[indices[:, k]] (no bias); autograd reaches values and W_D sparsely."""
    return F.embedding_bag(indices, W_D, per_sample_weights=values.to(W_D.dtype), mode="sum")


def densify(indices: Tensor, values: Tensor, d_sae: int) -> Tensor:
    """The (N, d_sae) feature activations of a sparse (indices, values) pair (differentiable in values)."""
    # In place into fresh zeros: the out-of-place scatter would copy the whole (N, d_sae) block once more.
    # Adding (not overwriting) makes padding slots, which may repeat a kept index with value 0, harmless.
    return values.new_zeros(values.shape[0], d_sae).scatter_add_(-1, indices, values)
