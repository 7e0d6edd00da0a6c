"""The mixture of linear transforms (MOLT, `sae_type: molt`): a transcoder whose features switch low-rank linear maps
of the input on and off, instead of adding fixed directions.

On normalised activations (see `SparseDictionary.prepare`), x the input (e.g. an MLP's) and y the output it
reconstructs:

    h     = x @ W_E + b_E                                   (N, F)
    f     = act(h * n) / n        n_i = ||U_i V_i||_F       (decoder-norm gating; act(h) without it)
    y_hat = sum_i f_i U_i (V_i x) + b_D

Transform i has rank r_i: U_i is (D, r_i), V_i (r_i, D). `rank_counts` says how many transforms each rank has; those
of one rank are one parameter each, `U_matrices[r]` (n_r, D, r) and `V_matrices[r]` (n_r, r, D), and features are
numbered by rank, ascending ({1: 3, 4: 2}: features 0-2 have rank 1, 3-4 rank 4), so d_sae = sum of the counts.

The norm never forms a D x D matrix: ||U V||_F^2 = tr(V^T U^T U V) = tr((U^T U)(V V^T)), two r x r Gram matrices
per transform (D r^2 work instead of D^2 r, and no count x D^2 memory).

Decoding touches the active transforms only (the TopK family's selected ones; for relu, and jumprelu when its
thresholds need no gradient, the non-zero activations when they are at most 1/8 of all): for each active (token t,
transform i) pair z = V_i x_t (`gather_project`, r numbers), and y_hat_t gains f_i U_i z, an embedding bag over the
columns of U_i. Forward and backward cost O(active pairs x r x D) instead of O(N x sum_i r_i x D); `sparse_kernels`
forces either path.

Aux-K is meaningful here and implemented (`SparseCoder.aux_loss`): the top `k_aux` dead transforms, ranked by their
gated pre-activations, are applied to x as they would be if alive, sum_{dead i} f_i U_i V_i x, and fitted to the
residual, so a dead transform is pulled towards what it would add.

A feature has no output direction (what it writes, U_i V_i x, turns with the input), so there is no direct logit
attribution: `output_directions` raises `NoOutputDirectionsError` (the base's, so the DLA runner refuses a MOLT from
its config, before loading anything).

Split by features over M model shards (`model_parallel_size`; every count of `rank_counts` divisible by M), a shard
holds n_r / M transforms of every rank r, so it is a MOLT of the same ranks; its features are a slice of each rank's
block of the whole's numbering (`feature_blocks`), and its partial sums of the decode are summed over the shards.

Folding the dataset-wise scales c_in, c_out: b_E /= c_in, b_D /= c_out, and U, V *= c_in / sqrt(c_out): a transform
carries c_in^2 / c_out, one c_in for the activations (which become f / c_in) and one for the x it is applied to. (The
reference system scales U, V by sqrt(c_in / c_out), which leaves the x factor out.)
"""

from collections.abc import Iterator
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from lm_saes_core.config import field_error
from lm_saes_core.models import kernels
from lm_saes_core.models.activation_functions import ACTIVATION_FUNCTIONS
from lm_saes_core.models.base import Batch
from lm_saes_core.models.config import SparseDictionaryConfig
from lm_saes_core.models.sparse_coder import Sparse, SparseCoder

PositiveInt = Annotated[int, Field(gt=0)]


class MOLTConfig(SparseDictionaryConfig):
    """A mixture of linear transforms reading `hook_point_in` and reconstructing `hook_point_out` (both d_model wide).
    Its width is the number of transforms: `d_sae` and `expansion_factor` may be left out and, when given, must agree
    with `rank_counts`."""

    sae_type: Literal["molt"] = "molt"
    hook_point_in: str
    hook_point_out: str
    rank_counts: dict[PositiveInt, PositiveInt] = Field(min_length=1)
    """rank -> number of transforms of that rank (each rank at most d_model), e.g. {1: 2048, 2: 1024, 4: 512}."""

    @field_validator("rank_counts")
    @classmethod
    def _ascending(cls, rank_counts: dict[int, int]) -> dict[int, int]:
        return dict(sorted(rank_counts.items()))  # the feature order: ranks ascending

    @model_validator(mode="after")
    def _width(self) -> "MOLTConfig":
        """Replaces the base's `_width` (same name), which asks for exactly one of d_sae and expansion_factor: here
        the width follows from rank_counts."""
        d_sae = sum(self.rank_counts.values())
        if self.d_sae is not None and self.d_sae != d_sae:
            raise field_error(
                "d_sae",
                f"d_sae={self.d_sae} disagrees with rank_counts, whose counts sum to {d_sae} (leave d_sae out: it "
                "follows from rank_counts)",
                self.d_sae,
            )
        if self.expansion_factor is not None and abs(self.expansion_factor - d_sae / self.d_model) >= 0.1:
            raise field_error(
                "expansion_factor",
                f"expansion_factor={self.expansion_factor} disagrees with rank_counts: d_sae / d_model = {d_sae} / "
                f"{self.d_model} = {d_sae / self.d_model:.4g} (leave expansion_factor out: the width follows from "
                "rank_counts)",
                self.expansion_factor,
            )
        too_high = [rank for rank in self.rank_counts if rank > self.d_model]
        if too_high:
            raise field_error(
                "rank_counts",
                f"ranks {too_high} exceed d_model={self.d_model}: a transform U_i V_i (D x r, r x D) has rank at most "
                "d_model",
                self.rank_counts,
            )
        activation = ACTIVATION_FUNCTIONS[self.act_fn]
        if activation.spans_groups:
            raise field_error(
                "act_fn",
                f"act_fn {self.act_fn!r} ranks features across layers (sae_type 'clt'); for a MOLT it is "
                f"{self.act_fn.replace('layer', '')!r}",
                self.act_fn,
            )
        if activation.uses_k and self.top_k > d_sae:
            raise field_error("top_k", f"top_k ({self.top_k}) cannot exceed d_sae ({d_sae})", self.top_k)
        object.__setattr__(self, "d_sae", d_sae)
        object.__setattr__(self, "expansion_factor", None)
        return self

    def shard_fields(self, size: int) -> dict:
        """A feature shard holds 1/size of every rank's transforms (so it is a MOLT of the same ranks)."""
        return {"rank_counts": {rank: count // size for rank, count in self.rank_counts.items()}}

    @property
    def hooks_in(self) -> list[str]:
        return [self.hook_point_in]

    @property
    def hooks_out(self) -> list[str]:
        return [self.hook_point_out]

    def hook_widths(self) -> list[tuple[str, int, str]]:
        return [(hook, self.d_model, "d_model") for hook in dict.fromkeys([self.hook_point_in, self.hook_point_out])]


class MixtureOfLinearTransforms(SparseCoder):
    config_class = MOLTConfig
    cfg: MOLTConfig
    splices_causally = True  # the input hook (an MLP's input) fires before the output hook

    def __init__(self, cfg: MOLTConfig):
        super().__init__(cfg)
        factory = {"device": torch.device(cfg.device), "dtype": cfg.dtype}
        D = cfg.d_model
        self.W_E = nn.Parameter(torch.empty(D, cfg.d_sae, **factory))
        self.b_E = nn.Parameter(torch.empty(cfg.d_sae, **factory))
        # State keys U_matrices.{r} and V_matrices.{r}, as the reference system names them.
        self.U_matrices = nn.ParameterDict(
            {str(r): nn.Parameter(torch.empty(n, D, r, **factory)) for r, n in cfg.rank_counts.items()}
        )
        self.V_matrices = nn.ParameterDict(
            {str(r): nn.Parameter(torch.empty(n, r, D, **factory)) for r, n in cfg.rank_counts.items()}
        )
        self.b_D = nn.Parameter(torch.empty(D, **factory)) if cfg.use_decoder_bias else None

    def rank_groups(self) -> Iterator[tuple[int, int, Tensor, Tensor]]:
        """(rank r, index of its first feature, U (n_r, D, r), V (n_r, r, D)) per rank, ascending."""
        start = 0
        for rank, count in self.cfg.rank_counts.items():
            yield rank, start, self.U_matrices[str(rank)], self.V_matrices[str(rank)]
            start += count

    # ---------------------------------------------------------------- feature parallelism

    def feature_axes(self) -> dict[str, int]:
        axes = {"W_E": 1, "b_E": 0}
        axes |= {f"{name}.{r}": 0 for name in ("U_matrices", "V_matrices") for r in self.cfg.rank_counts}
        if self.cfg.act_fn == "jumprelu":
            axes["activation_function.log_jumprelu_threshold"] = 0
        return axes

    def feature_blocks(self, name: str | None = None) -> tuple[int, ...] | None:
        """Features are numbered by rank, and a shard holds a part of every rank: of the tensors over all features
        (W_E, b_E, thresholds, per-feature vectors) its slice of each rank's block; one rank's U or V is one slice."""
        if name is not None and name.startswith(("U_matrices.", "V_matrices.")):
            return None
        return tuple(self.cfg.rank_counts.values())

    # ---------------------------------------------------------------- parameters and norms

    def init_parameters(
        self,
        encoder_uniform_bound: float | None = None,
        decoder_uniform_bound: float | None = None,
        **activation_init: float,
    ) -> None:
        """W_E ~ U(+-1/sqrt(d_model)) unless given; every transform random, U_i and V_i of equal norm, and
        ||U_i V_i||_F equal to the expected norm of a D-wide decoder row drawn from U(+-decoder_uniform_bound)
        (default 1/sqrt(d_sae), as an SAE's): bound * sqrt(D / 3). Biases 0."""
        D = self.cfg.d_model
        enc = encoder_uniform_bound if encoder_uniform_bound is not None else D**-0.5
        dec = decoder_uniform_bound if decoder_uniform_bound is not None else self.cfg.d_sae**-0.5
        with torch.no_grad():
            self.W_E.uniform_(-enc, enc)
            self.b_E.zero_()
            for _, _, U, V in self.rank_groups():
                U.normal_()
                V.normal_()
                U /= U.norm(dim=(1, 2), keepdim=True)
                V /= V.norm(dim=(1, 2), keepdim=True)
            self.set_decoder_to_fixed_norm(dec * (D / 3) ** 0.5, force_exact=True)
            if self.b_D is not None:
                self.b_D.zero_()
        self.activation_function.init_parameters(**activation_init)

    def decoder_norm(self) -> Tensor:
        """(d_sae,) ||U_i V_i||_F = sqrt(tr((U_i^T U_i)(V_i V_i^T))), from two r x r Gram matrices per transform."""
        norms = []
        for _, _, U, V in self.rank_groups():
            gram_u = U.transpose(1, 2) @ U  # (n, r, r)
            gram_v = V @ V.transpose(1, 2)  # (n, r, r)
            squared = (gram_u * gram_v).sum((1, 2))  # tr(A B) = sum(A * B) for symmetric B
            norms.append(squared.clamp(min=torch.finfo(squared.dtype).tiny).sqrt())
        return torch.cat(norms)

    def encoder_norm(self) -> Tensor:
        return self.W_E.norm(dim=0)

    @torch.no_grad()
    def set_decoder_to_fixed_norm(self, value: float, force_exact: bool) -> None:
        """Exact: every transform gets ||U_i V_i||_F = `value`; otherwise longer ones are shrunk to it. U_i and V_i
        share the scaling (sqrt each), so their balance stays as it is."""
        scale = self.fixed_norm_scale(value, force_exact).sqrt()
        for _, start, U, V in self.rank_groups():
            part = scale[start : start + U.shape[0], None, None]
            U.mul_(part)
            V.mul_(part)

    @torch.no_grad()
    def init_encoder_with_decoder_transpose(self, factor: float = 1.0) -> None:
        """W_E[:, i] = factor * ||U_i V_i||_F * b_i, b_i the input direction transform i amplifies most (its top right
        singular vector): as an SAE's tied initialisation, each feature reads what its transform acts on, with the
        norm of its transform (whatever its rank, so no rank starts favoured).

        With U_i = Q R, U_i V_i = Q (R V_i): b_i is the top right singular vector of the r x D matrix R V_i, i.e.
        (R V_i)^T a / ||.|| for a the top eigenvector of the r x r matrix R (V_i V_i^T) R^T."""
        norm = self.decoder_norm()
        for _, start, U, V in self.rank_groups():
            R = torch.linalg.qr(U).R  # (n, r, r)
            RV = R @ V  # (n, r, D)
            top = torch.linalg.eigh(RV @ RV.transpose(1, 2)).eigenvectors[:, :, -1]  # (n, r), eigenvalues ascending
            direction = (top[:, None, :] @ RV).squeeze(1)  # (n, D)
            direction = direction / direction.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(RV.dtype).tiny)
            part = slice(start, start + U.shape[0])
            self.W_E[:, part] = (factor * norm[part, None] * direction).t().to(self.W_E.dtype)

    @torch.no_grad()
    def init_encoder_bias_with_mean_hidden_pre(self, batch: Batch) -> None:
        """b_E = minus the mean of x @ W_E over the batch's tokens, so pre-activations start centred."""
        x = self.prepare(self.token_rows(batch)).input
        self.b_E.copy_(-(x @ self.W_E).float().mean(dim=0).to(self.b_E.dtype))

    # ---------------------------------------------------------------- per-rank metrics

    @torch.no_grad()
    def group_statistics(
        self,
        label: Tensor,
        reconstructed: Tensor,
        feature_acts: Tensor,
        token_errors: tuple[Tensor, Tensor] | None = None,
        active_counts: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per rank r over the step's tokens: `molt_metrics/l0_rank{r}` (active rank-r transforms per token),
        `molt_metrics/l0_rank{r}_ratio` (that / the count of rank-r transforms: the fraction of them active per
        token), and `molt_metrics/total_rank_sum` (the ranks of the active transforms summed per token, i.e.
        sum_r r * l0_rank{r}: the rank of the token's whole transform at most). `active_counts` (the metric
        window's per-feature counts of active tokens) saves a pass over the activations; the errors are not used."""
        flat = feature_acts.reshape(-1, self.cfg.d_sae)
        if active_counts is None:
            active_counts = (flat > 0).sum(0, dtype=torch.float32)
        frequency = active_counts / flat.shape[0]  # (F,) active share of tokens
        counts = self.cfg.rank_counts
        l0 = torch.stack([frequency[start : start + U.shape[0]].sum() for _, start, U, _ in self.rank_groups()])
        if self.feature_shards is not None:  # a shard's transforms are a part of each rank's
            l0, counts = self.feature_shards.sum(l0), self.whole_cfg.rank_counts
        stats, total = {}, frequency.new_zeros(())
        for (rank, count), value in zip(counts.items(), l0.unbind(), strict=True):
            stats[f"molt_metrics/l0_rank{rank}"] = value
            stats[f"molt_metrics/l0_rank{rank}_ratio"] = value / count
            total = total + rank * value
        stats["molt_metrics/total_rank_sum"] = total
        return stats

    # ---------------------------------------------------------------- encode / decode

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.cfg.d_model,)

    def _hidden_pre(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b_E, x, self.W_E)

    def _gather(self, x: Tensor, hidden_pre: Tensor, group: int, selection: kernels.Selection) -> Tensor:
        return kernels.gather_preacts(x, self.W_E, self.b_E, hidden_pre, selection)

    def decode(self, feature_acts: Tensor, x: Tensor | None = None) -> Tensor:
        """sum_i f_i U_i (V_i x) + b_D of normalised inputs x (..., D) and their feature activations (..., d_sae):
        unlike a decoder's, the output depends on x as well."""
        if x is None:
            raise ValueError(
                "a MOLT's reconstruction sum_i f_i U_i V_i x + b_D depends on the input x as well as on the feature "
                "activations: call decode(feature_acts, x), or forward(x)"
            )
        leading, rows = self._rows(x)
        y = self._decode_rows(rows, feature_acts.to(rows.dtype).reshape(rows.shape[0], self.cfg.d_sae), None)
        return y.reshape(*leading, self.cfg.d_model)

    def _decode_rows(self, x: Tensor, f: Tensor | None, sparse: Sparse | None, features_only: bool = False) -> Tensor:
        """sum_i f_i U_i (V_i x) (+ b_D unless `features_only`) of rows x (N, D), over the selected pairs when sparse
        (dense activations with few non-zeros are made sparse first)."""
        if sparse is None and self._decode_sparsely(f):
            rows, cols = f.nonzero(as_tuple=True)  # row-major: sorted by row
            sparse = [(kernels.Selection(rows, cols, kernels.row_offsets(rows, f.shape[0])), f[rows, cols])]
        y = self._apply_selected(x, *sparse[0]) if sparse is not None else self._apply_all(x, f)
        y = self.reduce_features(y)  # a shard's transforms add a part of the sum
        return y + self.b_D if self.b_D is not None and not features_only else y

    def _decode_sparsely(self, f: Tensor) -> bool:
        """Whether dense activations are decoded over their non-zeros. Not when learned thresholds (JumpReLU) need
        gradients: they learn from the decode's gradient at inactive features near them, which a decode over the
        active ones leaves out."""
        if self.sparse_kernels is False or (f.requires_grad and self.activation_function.threshold_parameters()):
            return False
        return self.sparse_kernels or int(torch.count_nonzero(f)) * 8 <= f.numel()

    def _apply_all(self, x: Tensor, f: Tensor) -> Tensor:
        """sum_i f_i U_i (V_i x) over every transform (the dense reference path)."""
        y = x.new_zeros(x.shape[0], self.cfg.d_model)
        for _, start, U, V in self.rank_groups():
            z = torch.einsum("nd,ird->nir", x, V)  # (N, n_r, r)
            y = y + torch.einsum("nir,idr->nd", f[:, start : start + U.shape[0], None] * z, U)
        return y

    def _apply_selected(self, x: Tensor, selection: kernels.Selection, values: Tensor) -> Tensor:
        """sum over the selected (token t, transform i) pairs of f U_i (V_i x_t): per rank, z = V_i x_t for each pair
        (r numbers), then an embedding bag over the columns of U_i weighted by f z."""
        n_rows, D = x.shape[0], self.cfg.d_model
        y = x.new_zeros(n_rows, D)
        for rank, start, U, V in self.rank_groups():
            mine = (selection.cols >= start) & (selection.cols < start + U.shape[0])
            rows, transforms = selection.rows[mine], selection.cols[mine] - start
            offsets = kernels.row_offsets(rows, n_rows)
            z = gather_project(x, V, rows, transforms, offsets)  # (M, r)
            columns = (transforms[:, None] * rank + torch.arange(rank, device=x.device)).reshape(-1)
            U_columns = U.transpose(1, 2).reshape(-1, D)  # row i r + j: column j of U_i
            weights = (values[mine, None].to(z.dtype) * z).reshape(-1)
            y = y + F.embedding_bag(columns, U_columns, offsets * rank, mode="sum", per_sample_weights=weights)
        return y

    # ---------------------------------------------------------------- folding

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """Raw input -> raw-scale reconstruction: b_E /= c_in, U and V *= c_in / sqrt(c_out) (U_i V_i *= c_in^2 /
        c_out), b_D /= c_out.

        Pre-activations scale by 1/c_in; with decoder-norm gating the scores h * ||U_i V_i|| scale by c_in / c_out, so
        thresholds divide by c_out / c_in there (by c_in without gating)."""
        self._check_foldable()
        c_in = self.dataset_scale(self.cfg.hook_point_in)
        c_out = self.dataset_scale(self.cfg.hook_point_out)
        self.b_E /= c_in
        for _, _, U, V in self.rank_groups():
            U *= c_in / c_out**0.5
            V *= c_in / c_out**0.5
        if self.b_D is not None:
            self.b_D /= c_out
        self.activation_function.fold_(c_out / c_in if self.cfg.sparsity_include_decoder_norm else c_in)
        self.cfg = self.cfg.model_copy(deep=True, update={"norm_activation": "inference"})


# -------------------------------------------------------------------------------- the sparse projection

_dot_rows = torch.ops.aten._embedding_bag_per_sample_weights_backward
"""(grad (B, D), weight (E, D), indices (M,), offsets, offset2bag (M,), mode, padding_idx) -> (M,): the dot product of
weight[indices[m]] with grad[offset2bag[m]]. Embedding bags' own gather-dot (what their per-sample weights' gradient
is), used for z = V_i x_t: it reads the selected rows of V in place, where gathering them first writes M x r x D
floats (20x slower on CPU at M r = 32k, D = 576)."""


class GatherProject(torch.autograd.Function):
    """z[m] = V[cols[m]] @ x[rows[m]] (M, r): each selected transform's projection of its token. The forward reads the
    rows of V in place (`_dot_rows`); the backward is sparse like `kernels.GatherPreacts`: grad x an embedding bag over
    the rows of V, grad V a sparse (n r, N) @ (N, D) product. Nothing of size M x r x D is formed."""

    @staticmethod
    def forward(ctx, x: Tensor, V: Tensor, rows: Tensor, cols: Tensor, offsets: Tensor) -> Tensor:  # type: ignore[override]
        n, r, D = V.shape
        table_rows = (cols[:, None] * r + torch.arange(r, device=cols.device)).reshape(-1)  # row j of V_i: i r + j
        bags = rows.repeat_interleave(r)
        ctx.save_for_backward(x, V, table_rows, bags, offsets)
        x_ = x.to(V.dtype).contiguous()
        return _dot_rows(x_, V.reshape(n * r, D), table_rows, offsets * r, bags, 0, -1).reshape(-1, r)

    @staticmethod
    def backward(ctx, grad_z: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, V, table_rows, bags, offsets = ctx.saved_tensors
        n, r, D = V.shape
        weights = grad_z.to(V.dtype).contiguous().reshape(-1)  # (M r,)
        grad_x = grad_V = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(
                table_rows, V.reshape(n * r, D), offsets * r, mode="sum", per_sample_weights=weights
            ).to(x.dtype)
        if ctx.needs_input_grad[1]:
            by_row = torch.sparse_coo_tensor(
                torch.stack([table_rows, bags]), weights, (n * r, x.shape[0]), check_invariants=False
            )
            grad_V = torch.sparse.mm(by_row, x.to(V.dtype)).reshape(n, r, D)
        return grad_x, grad_V, None, None, None


def gather_project(x: Tensor, V: Tensor, rows: Tensor, cols: Tensor, offsets: Tensor) -> Tensor:
    """V[cols[m]] @ x[rows[m]] (M, r) for row-sorted pairs (`offsets`: where each row's pairs start)."""
    return GatherProject.apply(x, V, rows, cols, offsets)
