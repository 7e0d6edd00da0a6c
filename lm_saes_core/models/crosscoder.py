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
from lm_saes_core.models.base import Batch, SparseDictionary
from lm_saes_core.models.config import SparseDictionaryConfig

Sparse = list[tuple[kernels.Selection, Tensor]]
"""Per head: the selected (token, feature) pairs and their activations."""


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


class CrossCoder(SparseDictionary):
    config_class = CrossCoderConfig
    cfg: CrossCoderConfig

    def __init__(self, cfg: CrossCoderConfig):
        super().__init__(cfg)
        factory = {"device": torch.device(cfg.device), "dtype": cfg.dtype}
        H, D, F = cfg.n_heads, cfg.d_model, cfg.d_sae
        self.W_E = nn.Parameter(torch.empty(H, D, F, **factory))
        self.b_E = nn.Parameter(torch.empty(H, F, **factory))
        self.W_D = nn.Parameter(torch.empty(H, F, D, **factory))
        self.b_D = nn.Parameter(torch.empty(H, D, **factory)) if cfg.use_decoder_bias else None
        self.sparse_kernels: bool | None = None
        """True/False forces the sparse/dense path of the TopK family; None picks sparse when k <= d_sae / 8."""

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (self.cfg.n_heads, self.cfg.d_sae)

    @property
    def n_analysed_features(self) -> int:
        return self.cfg.d_sae  # a feature's activation is its heads' largest

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

    def norm_statistics(self) -> dict[str, float]:
        stats = {
            "metrics/encoder_norm": self.encoder_norm().mean().item(),
            "metrics/decoder_norm": self.decoder_norm().mean().item(),
        }
        if self.b_D is not None:
            stats["metrics/decoder_bias_norm"] = self.b_D.norm(dim=-1).mean().item()
        return stats

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
        norm = self.decoder_norm()
        self.W_D.mul_((value / (norm if force_exact else norm.clamp(min=value)))[..., None])

    @torch.no_grad()
    def init_encoder_with_decoder_transpose(self, factor: float = 1.0) -> None:
        self.W_E.copy_(factor * self.W_D.transpose(1, 2))

    @torch.no_grad()
    def init_decoder_bias(self, center: Tensor) -> None:
        """b_D[h] = the centre of head h's normalised activations (center (H, D))."""
        if self.b_D is None:
            raise ValueError("this dictionary has no decoder bias (use_decoder_bias=False)")
        self.b_D.copy_(center.to(self.b_D.dtype))

    @torch.no_grad()
    def init_encoder_bias_with_mean_hidden_pre(self, batch: Batch) -> None:
        """The encoder biases (split evenly over the heads) = minus the batch's mean shared pre-activation."""
        x = self.prepare(self.token_rows(batch)).input  # (N, H, D)
        mean = torch.einsum("nhd,hdf->nf", x, self.W_E).float().mean(0)
        self.b_E.copy_((-mean / self.cfg.n_heads).to(self.b_E.dtype).expand_as(self.b_E))

    # ---------------------------------------------------------------- encode / decode

    def _use_sparse_kernels(self, k: int) -> bool:
        if not self.uses_k:
            return False
        return self.sparse_kernels if self.sparse_kernels is not None else k * 8 <= self.cfg.d_sae

    def _shared_pre(self, x: Tensor) -> Tensor:
        """(N, F) = x (N, H, D) side by side times the stacked encoders, plus the summed biases."""
        n, H, D = x.shape
        return torch.addmm(self.b_E.sum(0), x.reshape(n, H * D), self.W_E.reshape(H * D, -1))

    def _select(
        self, x: Tensor, shared: Tensor, k: int, latent_mask: Tensor | None = None, update_state: bool = True
    ) -> Sparse:
        with torch.no_grad():
            scores = shared.detach()[:, None, :].expand(-1, self.cfg.n_heads, -1)
            norm = self.gating_norm()
            if norm is not None:
                scores = scores * norm
            if latent_mask is not None:
                scores = scores * latent_mask
            selected = self.activation_function.select(scores, k, update_state)
        n, H, D = x.shape
        inputs, encoders, bias = x.reshape(n, H * D), self.W_E.reshape(H * D, -1), self.b_E.sum(0)
        sparse = []
        for selection, keep in selected:
            values = kernels.gather_preacts(inputs, encoders, bias, shared, selection)
            sparse.append((selection, values * keep if keep is not None else values))
        return sparse

    def _features(self, x: Tensor) -> tuple[Tensor, Tensor, Sparse | None]:
        """(f (N, H, F), h (N, H, F): the shared pre-activation repeated, sparse form or None) of x (N, H, D)."""
        k, H = self.current_k, self.cfg.n_heads
        if self._use_sparse_kernels(k):
            with torch.no_grad():
                shared = self._shared_pre(x)
            sparse = self._select(x, shared, k)
            f = torch.stack([kernels.densify(s, v, x.shape[0], self.cfg.d_sae) for s, v in sparse], dim=1)
            return f, shared[:, None, :].expand(-1, H, -1), sparse
        hidden_pre = self._shared_pre(x)[:, None, :].expand(-1, H, -1)
        return self.activation_function(hidden_pre, self.gating_norm(), k), hidden_pre, None

    def encode(self, x: Tensor, return_hidden_pre: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Per-head feature activations (..., H, F) of normalised heads x (..., H, D)."""
        leading = x.shape[:-2]
        f, h, _ = self._features(x.to(self.cfg.dtype).reshape(-1, self.cfg.n_heads, self.cfg.d_model))
        f, h = f.reshape(*leading, *self.feature_shape), h.reshape(*leading, *self.feature_shape)
        return (f, h) if return_hidden_pre else f

    def _decode_dense(self, feature_acts: Tensor, bias: bool = True) -> Tensor:
        y = torch.einsum("...hf,hfd->...hd", feature_acts, self.W_D)
        return y + self.b_D if bias and self.b_D is not None else y

    def _decode_sparse(self, sparse: Sparse, bias: bool = True) -> Tensor:
        y = torch.stack([kernels.sparse_decode(s, v, self.W_D[h]) for h, (s, v) in enumerate(sparse)], dim=1)
        return y + self.b_D if bias and self.b_D is not None else y

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Heads (..., H, D): y_hat_h = f_h @ W_D[h] + b_D[h]."""
        return self._decode_dense(feature_acts)

    def encode_and_reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        leading = x.shape[:-2]
        x = x.to(self.cfg.dtype).reshape(-1, self.cfg.n_heads, self.cfg.d_model)
        f, h, sparse = self._features(x)
        y = self._decode_sparse(sparse) if sparse is not None else self._decode_dense(f)
        shape = self.feature_shape
        return f.reshape(*leading, *shape), h.reshape(*leading, *shape), y.reshape(*leading, *y.shape[1:])

    def encode_batch(self, batch: Batch) -> Tensor:
        """A feature's activation on each token: the largest of its heads' (..., F)."""
        return self.encode(self.prepare(batch).input).amax(dim=-2)

    def aux_loss(self, x: Tensor, hidden_pre: Tensor, residual: Tensor, dead_latents: Tensor, k_aux: int) -> Tensor:
        """Mean over tokens and heads of ||residual_h - f_dead_h @ W_D[h]||^2 over the top k_aux dead latents."""
        n_dead = int(dead_latents.sum())
        if n_dead == 0:
            return residual.new_zeros(())
        k = min(k_aux, n_dead, self.cfg.d_sae)
        dead = dead_latents.reshape(self.feature_shape).to(hidden_pre.dtype)
        if self._use_sparse_kernels(k):
            sparse = self._select(x, hidden_pre[:, 0], k, dead, update_state=False)
            residual_hat = self._decode_sparse(sparse, bias=False)
        else:
            f_dead = self.activation_function(hidden_pre * dead, self.gating_norm(), k, update_state=False)
            residual_hat = self._decode_dense(f_dead, bias=False)
        return (residual - residual_hat).pow(2).sum(-1).mean()

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
