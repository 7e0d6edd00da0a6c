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
applied to it in place. Once training has made the features sparse (a few percent active), they take a sparse path
(`codec_is_sparse`): only the encoder stays dense; the decode, the features' gradient (sampled at the active and
in-window entries only) and the weight gradients cost O(active pairs * D).
"""

import warnings
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


SPARSE_CODEC_MAX_DENSITY = 0.1
"""Fraction of active (token, feature) entries below which the ReLU/JumpReLU codecs take their sparse path. The
sparse path's cost grows with the active pairs, the dense one's does not: whole training steps on a 2-core AVX2 CPU
(N 4096, D 576, d_sae 4608, fp32), sparse / dense tokens/s: ReLU 1.36 at 5%, 1.35 at 10%, 0.99 at 15%, 0.83 at 20%;
gated JumpReLU (its threshold gradient costs more) 1.25, 0.97, 0.91, 0.61."""


def codec_is_sparse(active: Tensor, max_density: float | None = None) -> bool:
    """Whether a codec call takes the sparse path: on CPU, when the fraction of nonzeros of `active` (the features
    (N, d_sae) or their mask, counted on about 512 evenly spaced rows: a choice of speed, not of values) is below
    `max_density` (default `SPARSE_CODEC_MAX_DENSITY`). Elsewhere dense: the crossover was measured on CPU only."""
    if active.device.type != "cpu" or active.numel() == 0:
        return False
    sample = active[:: max(1, active.shape[0] // 512)]
    limit = SPARSE_CODEC_MAX_DENSITY if max_density is None else max_density
    return int(torch.count_nonzero(sample)) < limit * sample.numel()


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # "CSR support is in beta": the few ops used here are tested against dense ones
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _row_csr(pairs: Selection, values: Tensor, n_cols: int) -> Tensor:
    """The pairs (sorted by row) as an (N, n_cols) CSR matrix holding `values`."""
    crow = torch.cat([pairs.offsets, pairs.offsets.new_full((1,), pairs.rows.numel())])
    return _csr(crow, pairs.cols, values, (pairs.offsets.numel(), n_cols))


def _sampled_features_grad(pairs: Selection, W_D: Tensor, grad_f: Tensor | None, grad_y: Tensor | None) -> Tensor:
    """The features' whole gradient (as `_features_grad`) at the pairs only (M,): grad_y[r] . W_D[c] + grad_f[r, c]."""
    extra = grad_f[pairs.rows, pairs.cols] if grad_f is not None else None
    if grad_y is None:
        return extra if extra is not None else W_D.new_zeros(pairs.rows.shape)
    pattern = _row_csr(pairs, extra if extra is not None else W_D.new_zeros(pairs.rows.shape), W_D.shape[0])
    return torch.sparse.sampled_addmm(pattern, grad_y, W_D.t()).values()  # + grad_f: beta = 1 adds the pattern's values


def _masked_features_grad_sum(mask: Tensor, W_D: Tensor, grad_f: Tensor | None, grad_y: Tensor | None) -> Tensor:
    """Per feature, the features' whole gradient summed over the entries of `mask` (N, d_sae): sampled at them when
    they are few; else as W_D[c] . (grad_y summed over feature c's masked rows), one dense matmul, for a window wide
    enough to hold most positive pre-activations (thresholds small next to it) would make the sampling dense."""
    if codec_is_sparse(mask):
        rows, cols = mask.nonzero(as_tuple=True)
        pairs = Selection(rows, cols, row_offsets(rows, mask.shape[0]))
        return W_D.new_zeros(W_D.shape[0]).index_add_(0, cols, _sampled_features_grad(pairs, W_D, grad_f, grad_y))
    total = torch.where(mask, grad_f, 0.0).sum(0) if grad_f is not None else W_D.new_zeros(W_D.shape[0])
    if grad_y is not None:
        total += ((mask.to(W_D.dtype).t() @ grad_y) * W_D).sum(-1)
    return total


class _ByFeature(NamedTuple):
    """The pairs sorted by feature (stably: by row within a feature): where each pair went, its row, and where each
    feature's pairs start."""

    order: Tensor
    rows: Tensor
    offsets: Tensor

    @staticmethod
    def of(pairs: Selection, d_sae: int) -> "_ByFeature":
        order = pairs.cols.argsort(stable=True)
        return _ByFeature(order, pairs.rows[order], row_offsets(pairs.cols, d_sae))

    def mm(self, values: Tensor, dense: Tensor) -> Tensor:
        """(d_sae, D): per feature, the sum over its pairs of value * dense[row]: a sparse f^T @ dense. An
        embedding_bag, which measured 2-4x faster than a CSR matmul on CPU."""
        return F.embedding_bag(self.rows, dense, self.offsets, mode="sum", per_sample_weights=values[self.order])


def _sparse_decode_active(hidden_pre: Tensor, active: Tensor, W_D: Tensor) -> tuple[Selection, Tensor, Tensor]:
    """The active entries (the nonzeros of `active`, f or its mask) as pairs, their values and f @ W_D over them."""
    rows, cols = active.nonzero(as_tuple=True)
    pairs = Selection(rows, cols, row_offsets(rows, hidden_pre.shape[0]))
    values = hidden_pre[rows, cols]  # f == h on the active entries
    return pairs, values, F.embedding_bag(cols, W_D, pairs.offsets, mode="sum", per_sample_weights=values)


def _sparse_codec_grads(ctx, x: Tensor, W_E: Tensor, W_D: Tensor, pairs: Selection, values: Tensor, grad_pre: Tensor,
                        grad_h: Tensor | None, grad_y: Tensor | None):  # fmt: skip
    """`_codec_grads` from the pre-activations' gradient at the active pairs (zero elsewhere, plus grad_h if any):
    sparse products over the pairs, dense ones only for a dense grad_h."""
    n_rows, d_sae = x.shape[0], W_E.shape[1]
    needs_x, needs_W_E, needs_b_E, needs_W_D = ctx.needs_input_grad[:4]
    needs_W_D = needs_W_D and grad_y is not None
    by_feature = _ByFeature.of(pairs, d_sae) if needs_W_D or (needs_W_E and grad_h is None) else None
    grad_x = grad_W_E = grad_b_E = None
    if grad_h is not None:  # rare (h's own loss): a dense gradient of the pre-activations, as in the dense path
        dense = grad_h.expand(n_rows, d_sae).clone(memory_format=torch.contiguous_format)
        dense.index_put_((pairs.rows, pairs.cols), grad_pre, accumulate=True)
        grad_x, grad_W_E, grad_b_E, _ = _codec_grads(ctx, x, W_E, W_D, None, dense, None)
    else:
        if needs_x:
            grad_x = F.embedding_bag(pairs.cols, W_E.t().contiguous(), pairs.offsets, mode="sum",
                                     per_sample_weights=grad_pre)  # fmt: skip
        if needs_W_E:
            grad_W_E = by_feature.mm(grad_pre, x).t().contiguous()
        if needs_b_E:
            grad_b_E = grad_pre.new_zeros(d_sae).index_add_(0, pairs.cols, grad_pre)
    grad_W_D = by_feature.mm(values, grad_y) if needs_W_D else None
    return grad_x, grad_W_E, grad_b_E, grad_W_D


def _features_grad(W_D: Tensor, f: Tensor, grad_f: Tensor | None, grad_y: Tensor | None) -> Tensor:
    """The features' whole gradient, grad_y @ W_D^T plus what reaches f from elsewhere (a sparsity penalty's
    gradient, often a broadcast row), in one fresh (N, d_sae) tensor that the caller may overwrite."""
    grad = grad_y @ W_D.t() if grad_y is not None else torch.zeros_like(f)
    return grad.add_(grad_f) if grad_f is not None else grad


def _codec_grads(ctx, x: Tensor, W_E: Tensor, W_D: Tensor, f: Tensor | None, grad_pre: Tensor, grad_y: Tensor | None):
    """The gradients of x, W_E, b_E and W_D from that of the pre-activations, as autograd forms them."""
    grad_x = grad_pre @ W_E.t() if ctx.needs_input_grad[0] else None
    grad_W_E = x.t() @ grad_pre if ctx.needs_input_grad[1] else None
    grad_b_E = grad_pre.sum(0) if ctx.needs_input_grad[2] else None
    grad_W_D = f.t() @ grad_y if ctx.needs_input_grad[3] and grad_y is not None and f is not None else None
    return grad_x, grad_W_E, grad_b_E, grad_W_D


class ReLUCodec(torch.autograd.Function):
    """(h, f, f @ W_D) with h = x @ W_E + b_E and f = relu(h), as one node of the graph.

    Dense path: the backward forms the features' gradient once (`_features_grad`) and applies the ReLU mask to it in
    place: autograd through the separate ops would allocate (N, d_sae) tensors for the sum and the mask too, each
    costing page faults on CPU. The arithmetic is that of autograd: the same values, summed in the same order.
    Sparse path (`codec_is_sparse`; `sparse` forces either): decode and backward over the active entries only, as
    the gradient of the pre-activations is zero elsewhere; the same values up to rounding.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_E: Tensor, b_E: Tensor, W_D: Tensor, sparse: bool | None) -> tuple[Tensor, ...]:  # type: ignore[override]
        hidden_pre = torch.addmm(b_E, x, W_E)
        f = hidden_pre.relu()
        ctx.set_materialize_grads(False)  # an unused output (h, usually) gets None, not an (N, d_sae) of zeros
        ctx.sparse = codec_is_sparse(f) if sparse is None else sparse
        if ctx.sparse:
            pairs, values, y = _sparse_decode_active(hidden_pre, f, W_D)
            ctx.save_for_backward(x, W_E, W_D, *pairs, values)
            return hidden_pre, f, y
        ctx.save_for_backward(x, W_E, W_D, f)
        return hidden_pre, f, f @ W_D

    @staticmethod
    def backward(ctx, grad_h: Tensor | None, grad_f: Tensor | None, grad_y: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.sparse:
            x, W_E, W_D, rows, cols, offsets, values = ctx.saved_tensors
            pairs = Selection(rows, cols, offsets)
            grad_pre = _sampled_features_grad(pairs, W_D, grad_f, grad_y)  # every pair is active: no mask
            return *_sparse_codec_grads(ctx, x, W_E, W_D, pairs, values, grad_pre, grad_h, grad_y), None
        x, W_E, W_D, f = ctx.saved_tensors
        grad = _features_grad(W_D, f, grad_f, grad_y)
        grad = torch.ops.aten.threshold_backward.grad_input(grad, f, 0, grad_input=grad)  # ReLU's mask, in place
        if grad_h is not None:
            grad.add_(grad_h)
        return *_codec_grads(ctx, x, W_E, W_D, f, grad, grad_y), None


def relu_codec(
    x: Tensor, W_E: Tensor, b_E: Tensor, W_D: Tensor, sparse: bool | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(h, relu(h), relu(h) @ W_D) for h = x @ W_E + b_E, differentiable in every input (see `ReLUCodec`)."""
    return ReLUCodec.apply(x, W_E, b_E, W_D, sparse)


class GatedJumpReLUCodec(torch.autograd.Function):
    """(h, f, f @ W_D) with h = x @ W_E + b_E and f = `gated_jumprelu(h, n, theta)`, as one node of the graph.

    As `ReLUCodec`, the backward forms the features' gradient once and masks it in place; the thresholds get the
    gradient `GatedJumpReLUFunction` gives them (no gradient reaches the norms n). On the sparse path that gradient
    is sampled at the in-window entries, the inactive ones just below a threshold included.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W_E: Tensor, b_E: Tensor, W_D: Tensor, norm: Tensor, threshold: Tensor, window: float,
                sparse: bool | None):  # type: ignore[override]  # fmt: skip
        hidden_pre = torch.addmm(b_E, x, W_E)
        kept = hidden_pre > threshold / norm
        f = torch.where(kept, hidden_pre, 0.0)
        ctx.window = window
        ctx.set_materialize_grads(False)
        ctx.sparse = codec_is_sparse(kept) if sparse is None else sparse
        if ctx.sparse:
            pairs, values, y = _sparse_decode_active(hidden_pre, kept, W_D)
            window_state = (hidden_pre, kept) if ctx.needs_input_grad[5] else (None, None)  # for the window only
            ctx.save_for_backward(x, W_E, W_D, norm, threshold, *window_state, *pairs, values)
            return hidden_pre, f, y
        ctx.save_for_backward(x, W_E, W_D, norm, threshold, hidden_pre, f, kept)
        return hidden_pre, f, f @ W_D

    @staticmethod
    def backward(ctx, grad_h: Tensor | None, grad_f: Tensor | None, grad_y: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.sparse:
            return GatedJumpReLUCodec._sparse_backward(ctx, grad_h, grad_f, grad_y)
        x, W_E, W_D, norm, threshold, hidden_pre, f, kept = ctx.saved_tensors
        grad = _features_grad(W_D, f, grad_f, grad_y)
        grad_threshold = None
        if ctx.needs_input_grad[5]:  # the rectangle kernel on h * n, as bounds on h per feature
            low, high = _window_bounds(ctx, norm, threshold)
            in_window = torch.where((hidden_pre > low) & (hidden_pre < high), grad, 0.0).sum(0)
            grad_threshold = in_window * (-threshold / (ctx.window * norm))
        grad = torch.where(kept, grad, grad.new_zeros(()), out=grad)  # the mask, in place
        if grad_h is not None:
            grad.add_(grad_h)
        return *_codec_grads(ctx, x, W_E, W_D, f, grad, grad_y), None, grad_threshold, None, None

    @staticmethod
    def _sparse_backward(ctx, grad_h: Tensor | None, grad_f: Tensor | None, grad_y: Tensor | None):
        x, W_E, W_D, norm, threshold, hidden_pre, kept, rows, cols, offsets, values = ctx.saved_tensors
        pairs = Selection(rows, cols, offsets)
        grad_pre = _sampled_features_grad(pairs, W_D, grad_f, grad_y)
        grad_threshold = None
        if ctx.needs_input_grad[5]:  # the window's kept entries are pairs; its others (below threshold) found here
            low, high = _window_bounds(ctx, norm, threshold)
            kept_in_window = (values > low[cols]) & (values < high[cols])
            in_window = torch.zeros_like(threshold).index_add_(0, cols, torch.where(kept_in_window, grad_pre, 0.0))
            below = ((hidden_pre > low) & (hidden_pre < high)).masked_fill_(kept, False)
            in_window += _masked_features_grad_sum(below, W_D, grad_f, grad_y)
            grad_threshold = in_window * (-threshold / (ctx.window * norm))
        grads = _sparse_codec_grads(ctx, x, W_E, W_D, pairs, values, grad_pre, grad_h, grad_y)
        return *grads, None, grad_threshold, None, None


def _window_bounds(ctx, norm: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
    """|h n - theta| < window / 2 and h n > 0 as bounds on h per feature: low < h < high."""
    return ((threshold - ctx.window / 2) / norm).clamp(min=0), (threshold + ctx.window / 2) / norm


def gated_jumprelu_codec(
    x: Tensor,
    W_E: Tensor,
    b_E: Tensor,
    W_D: Tensor,
    norm: Tensor,
    threshold: Tensor,
    window: float,
    sparse: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(h, f, f @ W_D) for h = x @ W_E + b_E and f = jumprelu(h * norm, threshold) / norm (see `GatedJumpReLUCodec`)."""
    return GatedJumpReLUCodec.apply(x, W_E, b_E, W_D, norm.to(x.dtype), threshold.to(x.dtype), window, sparse)
