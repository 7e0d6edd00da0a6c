"""The crosscoder: one dictionary over H heads, each head a hook point (of one model, or the same hook point in
several models), read and reconstructed together.

On normalised activations x_h of each head (see `SparseDictionary.prepare`; heads stacked on dim -2):

    h       = sum_h (x_h @ W_E[h] + b_E[h])                  (N, F): one pre-activation per feature, shared
    f_h     = act(h * n_h) / n_h      n_h = ||W_D[h]|| rows  (N, H, F): per head, gated by that head's decoder norm
    y_hat_h = f_h @ W_D[h] + b_D[h]

so every head gets its copy of the same feature, differing only by its decoder norm (as in the reference system).
A feature's activation is the largest of its heads' (`encode_batch`, analysis), and its decoder norms per head say
which heads it lives in. The TopK family decodes sparsely: the shared pre-activation is one product of the heads'
inputs side by side with their encoders stacked, so the selected entries get sparse gradients as an SAE's do.
"""

from typing import Literal

import torch
from pydantic import AliasChoices, Field, model_validator
from torch import Tensor, nn

from lm_saes_core.models import kernels
from lm_saes_core.models.activation_functions import ACTIVATION_FUNCTIONS
from lm_saes_core.models.base import Batch
from lm_saes_core.models.config import SparseDictionaryConfig
from lm_saes_core.models.head_parallel import HeadShards
from lm_saes_core.models.losses import LossCoefficients, LossOutput, PowerPenalty
from lm_saes_core.models.sparse_coder import Sparse, SparseCoder


class CrossCoderConfig(SparseDictionaryConfig):
    """A crosscoder over `heads` (hook points, all of width d_model): each is read and reconstructed. Settings may
    name them `hook_points`, as the reference system's files do."""

    sae_type: Literal["crosscoder"] = "crosscoder"
    heads: list[str] = Field(min_length=1, validation_alias=AliasChoices("heads", "hook_points"))

    @model_validator(mode="after")
    def _heads(self) -> "CrossCoderConfig":
        if len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads names a hook point twice: {self.heads}")
        if ACTIVATION_FUNCTIONS[self.act_fn].spans_groups:
            raise ValueError(
                f"act_fn {self.act_fn!r} ranks features across the layers of a CLT, not a crosscoder's heads"
            )
        return self

    @property
    def n_heads(self) -> int:
        return len(self.heads)

    @property
    def hooks_in(self) -> list[str]:
        return self.heads

    @property
    def hooks_out(self) -> list[str]:
        return self.heads

    def hook_widths(self) -> list[tuple[str, int, str]]:
        return [(hook, self.d_model, "d_model") for hook in self.heads]


MEAN_OVER_HEADS = ("mse_loss", "aux_loss")
"""Loss terms that are means over the heads (the others sum over them): a head rank's part is its heads' sum."""


class CrossCoder(SparseCoder):
    config_class = CrossCoderConfig
    cfg: CrossCoderConfig

    stacks_one_hook = True
    head_shards: HeadShards | None = None
    """Set on one head rank of a head-parallel crosscoder (`head_parallel.shard_heads`): `cfg.heads` are its heads."""

    def __init__(self, cfg: CrossCoderConfig):
        super().__init__(cfg)
        factory = {"device": torch.device(cfg.device), "dtype": cfg.dtype}
        H, D, F = cfg.n_heads, cfg.d_model, cfg.d_sae
        self.W_E = nn.Parameter(torch.empty(H, D, F, **factory))
        self.b_E = nn.Parameter(torch.empty(H, F, **factory))
        self.W_D = nn.Parameter(torch.empty(H, F, D, **factory))
        self.b_D = nn.Parameter(torch.empty(H, D, **factory)) if cfg.use_decoder_bias else None

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (self.cfg.n_heads, self.cfg.d_sae)

    @property
    def n_analysed_features(self) -> int:
        return self.cfg.d_sae  # a feature's activation is its heads' largest

    @property
    def metric_groups(self) -> list[str]:
        return list(self.cfg.heads) if self.head_shards is not None else super().metric_groups

    def _use_sparse_kernels(self, k: int) -> bool:
        # The sparse path's encoder gradient reads the selections of every head; a head rank sees its own only.
        return self.head_shards is None and super()._use_sparse_kernels(k)

    def whole_count(self, flags: Tensor) -> int:
        count = super().whole_count(flags)
        if self.head_shards is None:
            return count
        return int(self.head_shards.sum(torch.tensor(count)))

    def compute_loss(
        self, batch: Batch, coefficients: LossCoefficients | None = None, dead_latents: Tensor | None = None
    ) -> LossOutput:
        """On a head rank: its heads' part of every term (a mean over heads counts them out of all the heads), whose
        sum over the ranks is the whole loss; each term's value is logged as the whole's."""
        heads = self.head_shards
        penalty = getattr(coefficients, "penalty", None)
        if heads is not None and isinstance(penalty, PowerPenalty) and penalty.p != 1:
            # ||f * n||_p over every head does not split into the heads' parts
            raise ValueError(f"head parallelism needs p=1 for sparsity_loss_type 'power', not p={penalty.p}")
        out = super().compute_loss(batch, coefficients, dead_latents)
        if heads is None:
            return out
        names = list(out.terms)
        parts = [out.terms[n] / heads.size if n in MEAN_OVER_HEADS else out.terms[n] for n in names]
        wholes = heads.sum(torch.stack([part.detach() for part in parts])).unbind()
        out.terms = {n: p + (w - p).detach() for n, p, w in zip(names, parts, wholes, strict=True)}
        out.loss = sum(out.terms.values())
        return out

    # ---------------------------------------------------------------- parameters and norms

    def init_parameters(
        self,
        encoder_uniform_bound: float | None = None,
        decoder_uniform_bound: float | None = None,
        **activation_init: float,
    ) -> None:
        """One (D, F) encoder and one (F, D) decoder, W_E ~ U(+-1/sqrt(d_model)), W_D ~ U(+-1/sqrt(d_sae)) unless
        given, repeated across the heads (every feature starts shared); biases 0."""
        cfg = self.cfg
        enc = encoder_uniform_bound if encoder_uniform_bound is not None else cfg.d_model**-0.5
        dec = decoder_uniform_bound if decoder_uniform_bound is not None else cfg.d_sae**-0.5
        with torch.no_grad():
            self.W_E.copy_(torch.empty_like(self.W_E[0]).uniform_(-enc, enc).expand_as(self.W_E))
            self.W_D.copy_(torch.empty_like(self.W_D[0]).uniform_(-dec, dec).expand_as(self.W_D))
            self.b_E.zero_()
            if self.b_D is not None:
                self.b_D.zero_()
        self.activation_function.init_parameters(**activation_init)

    def decoder_norm(self) -> Tensor:
        return self.W_D.norm(dim=-1)  # (H, F)

    def encoder_norm(self) -> Tensor:
        return self.W_E.norm(dim=1)  # (H, F)

    # ---------------------------------------------------------------- metrics per head

    def group_metric_key(self, group: int, metric: str) -> str:
        return f"crosscoder_metrics/{self.cfg.heads[group]}/{metric}"

    @torch.no_grad()
    def group_statistics(
        self,
        label: Tensor,
        reconstructed: Tensor,
        feature_acts: Tensor,
        token_errors: tuple[Tensor, Tensor] | None = None,
        active_counts: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per head: explained variance, l_rec, l0 and `decoder_norm_share`, head h's share n_h / sum_h' n_h' of
        the decoder norm of the features that fire (any head active), averaged over firings: 1/H each when the
        active features are shared evenly, near 1 for a head whose exclusive features do the work. Also
        `crosscoder_metrics/l0_features`, the distinct features active per token (`metrics/l0` counts every head's
        copy of a feature: up to H times as many)."""
        stats = super().group_statistics(label, reconstructed, feature_acts, token_errors, active_counts)
        active = (feature_acts.reshape(-1, *self.feature_shape) > 0).any(1)  # (N, F)
        norms = self.decoder_norm().float()  # (H, F)
        total = norms.sum(0)
        if self.head_shards is not None:  # over every head rank's heads
            active, total = self.head_shards.any(active), self.head_shards.sum(total)
        firing = active.sum(0).float()  # (F,)
        share = norms / total.clamp(min=1e-12)
        sums = torch.cat([share @ firing, firing.sum()[None]])  # (H + 1,): sums over features
        if self.feature_shards is not None:
            sums = self.feature_shards.sum(sums)
        stats["crosscoder_metrics/l0_features"] = sums[-1] / active.shape[0]
        per_head = sums[:-1] / sums[-1].clamp(min=1)
        for h in range(self.cfg.n_heads):
            stats[self.group_metric_key(h, "decoder_norm_share")] = per_head[h]
        return stats

    def feature_axes(self) -> dict[str, int]:
        axes = {"W_E": 2, "b_E": 1, "W_D": 1}
        if self.cfg.act_fn == "jumprelu":
            axes["activation_function.log_jumprelu_threshold"] = 1
        return axes

    def decoder_inner_products(self) -> Tensor:
        """(F, H, H): <W_D[i, f], W_D[j, f]> for every feature and pair of heads."""
        return torch.einsum("ifd,jfd->fij", self.W_D, self.W_D)

    def decoder_similarities(self) -> Tensor:
        """(F, H, H): the cosines of each feature's decoders across heads (diagonal 1)."""
        norm = self.decoder_norm().t()  # (F, H)
        return self.decoder_inner_products() / (norm[:, :, None] * norm[:, None, :]).clamp(min=1e-12)

    @torch.no_grad()
    def set_decoder_to_fixed_norm(self, value: float, force_exact: bool) -> None:
        """Exact: every head's decoder row of every feature gets norm `value`; otherwise longer ones shrink to it."""
        self.W_D.mul_(self.fixed_norm_scale(value, force_exact)[..., None])

    @torch.no_grad()
    def init_encoder_with_decoder_transpose(self, factor: float = 1.0) -> None:
        self.W_E.copy_(factor * self.W_D.transpose(1, 2))

    @torch.no_grad()
    def init_encoder_bias_with_mean_hidden_pre(self, batch: Batch) -> None:
        """The encoder biases (split evenly over the heads) = minus the batch's mean shared pre-activation."""
        x = self.prepare(self.token_rows(batch)).input  # (N, H, D)
        mean = torch.einsum("nhd,hdf->nf", x, self.W_E).float().mean(0)
        self.b_E.copy_((-mean / self.cfg.n_heads).to(self.b_E.dtype).expand_as(self.b_E))

    # ---------------------------------------------------------------- encode / decode

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.cfg.n_heads, self.cfg.d_model)

    def _hidden_pre(self, x: Tensor) -> Tensor:
        """The shared pre-activation (N, F), repeated for every head (N, H, F): the heads' inputs side by side times
        the stacked encoders, plus the summed biases."""
        n, H, D = x.shape
        shared = torch.addmm(self.b_E.sum(0), x.reshape(n, H * D), self.W_E.reshape(H * D, -1))
        if self.head_shards is not None:  # this rank's heads' part of the sum over every head
            shared = self.head_shards.sum_partial(shared)
        return shared[:, None, :].expand(-1, H, -1)

    def _gather(self, x: Tensor, hidden_pre: Tensor, group: int, selection: kernels.Selection) -> Tensor:
        n, H, D = x.shape  # every head's selection reads the one shared pre-activation
        return kernels.gather_preacts(
            x.reshape(n, H * D), self.W_E.reshape(H * D, -1), self.b_E.sum(0), hidden_pre[:, group], selection
        )

    def _decode_rows(self, x: Tensor, f: Tensor | None, sparse: Sparse | None, features_only: bool = False) -> Tensor:
        if sparse is not None:
            y = torch.stack([kernels.sparse_decode(s, v, self.W_D[h]) for h, (s, v) in enumerate(sparse)], dim=1)
        else:
            y = torch.einsum("...hf,hfd->...hd", f, self.W_D)
        y = self.reduce_features(y)
        return y + self.b_D if not features_only and self.b_D is not None else y

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Heads (..., H, D): y_hat_h = f_h @ W_D[h] + b_D[h]."""
        return self._decode_rows(None, feature_acts, None)

    def encode_batch(self, batch: Batch) -> Tensor:
        """A feature's activation on each token: the largest of its heads' (..., F)."""
        return self.encode(self.prepare(batch).input).amax(dim=-2)

    # ---------------------------------------------------------------- folding

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """Raw heads -> raw-scale reconstructions, exactly: W_E[h] *= c_h keeps the shared pre-activation, and
        W_D[h], b_D[h] /= c_h give raw outputs; with gating each head's scores (and thresholds) scale by 1 / c_h,
        which keeps every head's ranking."""
        self._check_foldable()
        scales = torch.tensor([self.dataset_scale(hook) for hook in self.cfg.heads], dtype=self.W_E.dtype)
        self.W_E *= scales[:, None, None].to(self.W_E.device)
        self.W_D /= scales[:, None, None].to(self.W_D.device)
        if self.b_D is not None:
            self.b_D /= scales[:, None].to(self.b_D.device)
        if self.gating_norm() is not None:
            self.activation_function.fold_(scales.to(self.W_E.device))
        self.cfg = self.cfg.model_copy(deep=True, update={"norm_activation": "inference"})
