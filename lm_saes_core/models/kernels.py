"""Sparse kernels for TopK-family training: touch only the selected (token, feature) pairs after encoding.

With k of d_sae features active per token, the dense decoder matmul and both encoder/decoder weight-gradient
matmuls cost O(N * d_sae * D) each; here they cost O(nnz * D). Only the encoder forward `x @ W_E` stays dense
(every pre-activation is needed to choose the features).

Selected features are a flat list of (row, feature) pairs sorted by row, with `offsets` giving where each row's
pairs start (the layout `embedding_bag` reads). Rows may hold different numbers of pairs: BatchTopK gives a few
high-norm tokens hundreds of features and most tokens a handful, and a flat list stays as sparse as the selection.
A pair may carry the value 0 (TopK keeps exactly k slots per row even when fewer scores are positive).

Dense ReLU and gated JumpReLU training have fused nodes here too (`relu_codec`, `gated_jumprelu_codec`): they do the
textbook arithmetic, but own the one (N, d_sae) gradient of the backward, so the penalty's gradient and the mask are
applied to it in place.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Selection(NamedTuple):
    """(row, feature) pairs sorted by row; `offsets[r]` is the index of row r's first pair."""

    rows: Tensor  # (M,)
    cols: Tensor  # (M,)
    offsets: Tensor  # (N,)


def row_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """Start of each row's pairs in a row-sorted pair list (empty rows start where the next one does)."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cumsum(counts, 0) - counts


def select_topk(scores: Tensor, k: int) -> tuple[Selection, Tensor]:
    """Per row the k largest scores: the selection (k pairs per row) and a mask of the positive ones (M,)."""
    n_rows = scores.shape[0]
    values, indices = scores.topk(k, dim=-1, sorted=False)
    rows = torch.arange(n_rows, device=scores.device).repeat_interleave(k)
    offsets = torch.arange(0, n_rows * k, k, device=scores.device)
    return Selection(rows, indices.reshape(-1), offsets), (values > 0).reshape(-1)


RowKth = Callable[[Tensor, int], Tensor]
"""(candidates (N, c), k) -> (N,): per row the k-th largest over every feature shard's candidates (each shard's own
k largest), for the TopK of a feature-parallel dictionary (`FeatureShards.row_kth`)."""


def select_topk_of_shards(scores: Tensor, k: int, row_kth: RowKth) -> Selection:
    """TopK over one shard's scores (N, F / shards): the positive entries among the k largest of their row over all
    shards (each row may keep fewer or more than k here; the shards together keep the row's top k)."""
    values, indices = scores.topk(min(k, scores.shape[1]), dim=-1, sorted=False)
    kth = row_kth(values, k)
    rows, slots = ((values >= kth[:, None]) & (values > 0)).nonzero(as_tuple=True)
    return Selection(rows, indices[rows, slots], row_offsets(rows, scores.shape[0]))


def select_above(scores: Tensor, threshold: Tensor | float, inclusive: bool = False) -> Selection:
    """Every positive score above one threshold."""
    above = (scores >= threshold) if inclusive else (scores > threshold)
    rows, cols = (above & (scores > 0)).nonzero(as_tuple=True)
    return Selection(rows, cols, row_offsets(rows, scores.shape[0]))


def kth_largest(values: Tensor, n: int) -> Tensor:
    """The n-th largest entry of `values` (any shape), clamped at 0 (a 0-d tensor; 0 for an empty batch)."""
    if n == 0 or values.numel() == 0:
        return values.new_zeros(())
    return values.reshape(-1).topk(min(n, values.numel()), sorted=False).values.min().clamp(min=0)


KthLargest = Callable[[Tensor, int], Tensor]
"""(values, n) -> the n-th largest entry clamped at 0: `kth_largest` within this process; a data-parallel group's
version (`DataParallel.kth_largest`) takes n per rank and searches every rank's values, so BatchTopK keeps the top
of the whole distributed batch."""


def _batch_topk_search(scores: Tensor, k: int, kth: KthLargest | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The BatchTopK threshold of scores (N, d_sae), and the candidates it was searched among: each row's 4k largest
    (values, indices) and the rows that were searched in full (`saturated`).

    The batch's top entries are searched among each row's 4k largest. That is exact except for rows whose 4k
    candidates all clear the threshold ("saturated": they may hold more); those rows alone are searched in full,
    which can only raise the threshold, so every other row's candidates still contain all of its kept entries.
    With a group's `kth`, every rank takes the second search (a collective all must join), saturated rows or not.
    """
    n_rows, d_sae = scores.shape
    search = kth or kth_largest
    width = min(4 * k, d_sae)
    values, indices = scores.topk(width, dim=-1, sorted=False)
    threshold = search(values, k * n_rows)
    saturated = values.min(-1).values >= threshold if width < d_sae else values.new_zeros(n_rows, dtype=torch.bool)
    if kth is not None or saturated.any():
        candidates = torch.cat([values[~saturated].reshape(-1), scores[saturated].reshape(-1)])
        threshold = search(candidates, k * n_rows)
    return threshold, values, indices, saturated


def batch_topk_threshold(scores: Tensor, k: int, kth: KthLargest | None = None) -> Tensor:
    """The smallest value BatchTopK keeps: the (k * N)-th largest positive entry of scores (N, d_sae), else 0."""
    if scores.shape[0] == 0 and kth is None:
        return scores.new_zeros(())
    return _batch_topk_search(scores, k, kth)[0]


def select_batch_topk(scores: Tensor, k: int, kth: KthLargest | None = None) -> tuple[Selection, Tensor]:
    """BatchTopK over scores (N, d_sae): the k * N largest positive entries of the whole batch, and the threshold
    (the smallest kept value); see `_batch_topk_search` for how the search stays exact."""
    n_rows = scores.shape[0]
    if n_rows == 0 and kth is None:
        return select_above(scores, 0.0), scores.new_zeros(())
    threshold, values, indices, saturated = _batch_topk_search(scores, k, kth)
    keep = (values >= threshold) & (values > 0) & ~saturated[:, None]
    rows, slots = keep.nonzero(as_tuple=True)
    cols = indices[rows, slots]
    full_rows = saturated.nonzero().squeeze(-1)
    if full_rows.numel():
        full_scores = scores[full_rows]
        full_row, full_col = ((full_scores >= threshold) & (full_scores > 0)).nonzero(as_tuple=True)
        rows, cols = torch.cat([rows, full_rows[full_row]]), torch.cat([cols, full_col])
        order = rows.argsort(stable=True)
        rows, cols = rows[order], cols[order]
    return Selection(rows, cols, row_offsets(rows, n_rows)), threshold


class GatherPreacts(torch.autograd.Function):
    """values = (x @ W_E + b_E)[rows, cols] from already computed pre-activations, with a sparse backward.

    The backward never forms the dense (N, d_sae) gradient: grad_W_E is a sparse (d_sae, N) @ (N, D) product,
    grad_b_E an index_add and grad_x an embedding_bag over the selected encoder columns.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_E: Tensor, b_E: Tensor, hidden_pre: Tensor, selection: Selection) -> Tensor:  # type: ignore[override]
        rows, cols, offsets = selection
        ctx.save_for_backward(x, W_E, rows, cols, offsets)
        return hidden_pre[rows, cols]

    @staticmethod
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, W_E, rows, cols, offsets = ctx.saved_tensors
        n_rows, d_sae = x.shape[0], W_E.shape[1]
        grad_values = grad_values.to(W_E.dtype)
        grad_x = grad_W_E = grad_b_E = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(cols, W_E.t().contiguous(), offsets, mode="sum", per_sample_weights=grad_values)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_by_feature = torch.sparse_coo_tensor(
                torch.stack([cols, rows]), grad_values, (d_sae, n_rows), check_invariants=False
            )
            grad_W_E = torch.sparse.mm(grad_by_feature, x.to(W_E.dtype)).t().contiguous()
        if ctx.needs_input_grad[2]:
            grad_b_E = torch.zeros(d_sae, dtype=W_E.dtype, device=W_E.device).index_add_(0, cols, grad_values)
        return grad_x, grad_W_E, grad_b_E, None, None


def gather_preacts(x: Tensor, W_E: Tensor, b_E: Tensor, hidden_pre: Tensor, selection: Selection) -> Tensor:
    """Selected pre-activations (M,) whose gradient flows to x, W_E and b_E through the sparse backward."""
    return GatherPreacts.apply(x, W_E, b_E, hidden_pre.detach(), selection)


def sparse_decode(selection: Selection, values: Tensor, W_D: Tensor) -> Tensor:
    """Per row r: sum over its pairs of values * W_D[col] (no bias); autograd reaches values and W_D sparsely."""
    return F.embedding_bag(selection.cols, W_D, selection.offsets, mode="sum", per_sample_weights=values.to(W_D.dtype))


def densify(selection: Selection, values: Tensor, n_rows: int, d_sae: int) -> Tensor:
    """The (N, d_sae) feature activations of a selection with its values (differentiable in values)."""
    # Accumulating into fresh zeros: a repeated pair (possible only with value 0) stays harmless.
    return values.new_zeros(n_rows, d_sae).index_put_((selection.rows, selection.cols), values, accumulate=True)


def _features_grad(W_D: Tensor, f: Tensor, grad_f: Tensor | None, grad_y: Tensor | None) -> Tensor:
    """The features' whole gradient, grad_y @ W_D^T plus what reaches f from elsewhere (a sparsity penalty's
    gradient, often a broadcast row), in one fresh (N, d_sae) tensor that the caller may overwrite."""
    grad = grad_y @ W_D.t() if grad_y is not None else torch.zeros_like(f)
    return grad.add_(grad_f) if grad_f is not None else grad


def _codec_grads(ctx, x: Tensor, W_E: Tensor, W_D: Tensor, f: Tensor, grad_pre: Tensor, grad_y: Tensor | None):
    """The gradients of x, W_E, b_E and W_D from that of the pre-activations, as autograd forms them."""
    grad_x = grad_pre @ W_E.t() if ctx.needs_input_grad[0] else None
    grad_W_E = x.t() @ grad_pre if ctx.needs_input_grad[1] else None
    grad_b_E = grad_pre.sum(0) if ctx.needs_input_grad[2] else None
    grad_W_D = f.t() @ grad_y if ctx.needs_input_grad[3] and grad_y is not None else None
    return grad_x, grad_W_E, grad_b_E, grad_W_D


class ReLUCodec(torch.autograd.Function):
    """(h, f, f @ W_D) with h = x @ W_E + b_E and f = relu(h), as one node of the graph.

    The backward forms the features' gradient once (`_features_grad`) and applies the ReLU mask to it in place:
    autograd through the separate ops would allocate (N, d_sae) tensors for the sum and the mask too, each costing
    page faults on CPU. The arithmetic is that of autograd: the same values, summed in the same order.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_E: Tensor, b_E: Tensor, W_D: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        hidden_pre = torch.addmm(b_E, x, W_E)
        f = hidden_pre.relu()
        ctx.save_for_backward(x, W_E, W_D, f)
        ctx.set_materialize_grads(False)  # an unused output (h, usually) gets None, not an (N, d_sae) of zeros
        return hidden_pre, f, f @ W_D

    @staticmethod
    def backward(ctx, grad_h: Tensor | None, grad_f: Tensor | None, grad_y: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, W_E, W_D, f = ctx.saved_tensors
        grad = _features_grad(W_D, f, grad_f, grad_y)
        grad = torch.ops.aten.threshold_backward.grad_input(grad, f, 0, grad_input=grad)  # ReLU's mask, in place
        if grad_h is not None:
            grad.add_(grad_h)
        return _codec_grads(ctx, x, W_E, W_D, f, grad, grad_y)


def relu_codec(x: Tensor, W_E: Tensor, b_E: Tensor, W_D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(h, relu(h), relu(h) @ W_D) for h = x @ W_E + b_E, differentiable in every input (see `ReLUCodec`)."""
    return ReLUCodec.apply(x, W_E, b_E, W_D)


class GatedJumpReLUCodec(torch.autograd.Function):
    """(h, f, f @ W_D) with h = x @ W_E + b_E and f = `gated_jumprelu(h, n, theta)`, as one node of the graph.

    As `ReLUCodec`, the backward forms the features' gradient once and masks it in place; the thresholds get the
    gradient `GatedJumpReLUFunction` gives them (no gradient reaches the norms n).
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_E: Tensor, b_E: Tensor, W_D: Tensor, norm: Tensor, threshold: Tensor, window: float):  # type: ignore[override]
        hidden_pre = torch.addmm(b_E, x, W_E)
        kept = hidden_pre > threshold / norm
        f = torch.where(kept, hidden_pre, 0.0)
        ctx.save_for_backward(x, W_E, W_D, norm, threshold, hidden_pre, f, kept)
        ctx.window = window
        ctx.set_materialize_grads(False)
        return hidden_pre, f, f @ W_D

    @staticmethod
    def backward(ctx, grad_h: Tensor | None, grad_f: Tensor | None, grad_y: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, W_E, W_D, norm, threshold, hidden_pre, f, kept = ctx.saved_tensors
        grad = _features_grad(W_D, f, grad_f, grad_y)
        grad_threshold = None
        if ctx.needs_input_grad[5]:  # the rectangle kernel on h * n, as bounds on h per feature
            low, high = ((threshold - ctx.window / 2) / norm).clamp(min=0), (threshold + ctx.window / 2) / norm
            in_window = torch.where((hidden_pre > low) & (hidden_pre < high), grad, 0.0).sum(0)
            grad_threshold = in_window * (-threshold / (ctx.window * norm))
        grad = torch.where(kept, grad, grad.new_zeros(()), out=grad)  # the mask, in place
        if grad_h is not None:
            grad.add_(grad_h)
        return *_codec_grads(ctx, x, W_E, W_D, f, grad, grad_y), None, grad_threshold, None


def gated_jumprelu_codec(
    x: Tensor, W_E: Tensor, b_E: Tensor, W_D: Tensor, norm: Tensor, threshold: Tensor, window: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(h, f, f @ W_D) for h = x @ W_E + b_E and f = jumprelu(h * norm, threshold) / norm (see `GatedJumpReLUCodec`)."""
    return GatedJumpReLUCodec.apply(x, W_E, b_E, W_D, norm.to(x.dtype), threshold.to(x.dtype), window)
