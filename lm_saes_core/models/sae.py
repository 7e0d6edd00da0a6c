"""The sparse autoencoder, or a transcoder when it reads one hook point and reconstructs another.

On normalised activations x (see `SparseDictionary.prepare`):

    h     = x @ W_E + b_E
    f     = act(h * n) / n          n_i = ||W_D,i||  (decoder-norm gating; act(h) without it)
    y_hat = f @ W_D + b_D [+ x @ W_skip.T]

TopK/BatchTopK use the sparse kernels of `kernels.py` (decode and weight gradients only over the k selected
features per token) unless `sparse_kernels` says otherwise.
"""

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from lm_saes_core.models import kernels
from lm_saes_core.models.activation_functions import ACTIVATION_FUNCTIONS
from lm_saes_core.models.base import Batch
from lm_saes_core.models.config import SparseDictionaryConfig
from lm_saes_core.models.sparse_coder import Sparse, SparseCoder


class SAEConfig(SparseDictionaryConfig):
    """A sparse autoencoder (`hook_point_in == hook_point_out`) or a transcoder (they differ)."""

    sae_type: Literal["sae"] = "sae"
    hook_point_in: str
    hook_point_out: str
    d_out: int | None = Field(default=None, gt=0)
    """Width of the output hook point when it differs from d_model (transcoders only)."""
    use_skip_connection: bool = False
    """Transcoders: add a learned linear map x @ W_skip to the reconstruction."""

    @model_validator(mode="after")
    def _transcoder_only(self) -> "SAEConfig":
        if not self.is_transcoder and (self.d_out not in (None, self.d_model) or self.use_skip_connection):
            raise ValueError("d_out and use_skip_connection apply to transcoders (hook_point_in != hook_point_out)")
        if ACTIVATION_FUNCTIONS[self.act_fn].spans_groups:
            raise ValueError(
                f"act_fn {self.act_fn!r} ranks features across layers (sae_type 'clt'); for an SAE it is "
                f"{self.act_fn.replace('layer', '')!r}"
            )
        return self

    @property
    def is_transcoder(self) -> bool:
        return self.hook_point_in != self.hook_point_out

    @property
    def d_output(self) -> int:
        return self.d_out or self.d_model

    @property
    def hooks_in(self) -> list[str]:
        return [self.hook_point_in]

    @property
    def hooks_out(self) -> list[str]:
        return [self.hook_point_out]

    def hook_widths(self) -> list[tuple[str, int, str]]:
        widths = [(self.hook_point_in, self.d_model, "d_model")]
        if self.is_transcoder:
            widths.append((self.hook_point_out, self.d_output, "d_out" if self.d_out else "d_model"))
        return widths


class SparseAutoEncoder(SparseCoder):
    config_class = SAEConfig
    cfg: SAEConfig
    legacy_tensor_names = {
        "log_jumprelu_threshold": "activation_function.log_jumprelu_threshold",
        "topk_threshold": "activation_function.topk_threshold",
    }
    splices_causally = True  # a transcoder's input hook fires before its output hook

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        factory = {"device": torch.device(cfg.device), "dtype": cfg.dtype}
        d_in, d_sae, d_out = cfg.d_model, cfg.d_sae, cfg.d_output
        self.W_E = nn.Parameter(torch.empty(d_in, d_sae, **factory))
        self.b_E = nn.Parameter(torch.empty(d_sae, **factory))
        self.W_D = nn.Parameter(torch.empty(d_sae, d_out, **factory))
        self.b_D = nn.Parameter(torch.empty(d_out, **factory)) if cfg.use_decoder_bias else None
        self.W_skip = nn.Parameter(torch.empty(d_out, d_in, **factory)) if cfg.use_skip_connection else None

    # ---------------------------------------------------------------- parameters and norms

    def init_parameters(
        self,
        encoder_uniform_bound: float | None = None,
        decoder_uniform_bound: float | None = None,
        **activation_init: float,
    ) -> None:
        """W_E ~ U(+-1/sqrt(d_in)), W_D ~ U(+-1/sqrt(d_sae)) unless given (nn.Linear's fan-in bounds); biases and
        the skip map start at 0; the activation function's thresholds at their initial value."""
        enc = encoder_uniform_bound if encoder_uniform_bound is not None else self.cfg.d_model**-0.5
        dec = decoder_uniform_bound if decoder_uniform_bound is not None else self.cfg.d_sae**-0.5
        with torch.no_grad():
            self.W_E.uniform_(-enc, enc)
            self.W_D.uniform_(-dec, dec)
            self.b_E.zero_()
            if self.b_D is not None:
                self.b_D.zero_()
            if self.W_skip is not None:
                self.W_skip.zero_()
        self.activation_function.init_parameters(**activation_init)

    def decoder_norm(self) -> Tensor:
        return self.W_D.norm(dim=1)

    def encoder_norm(self) -> Tensor:
        return self.W_E.norm(dim=0)

    @torch.no_grad()
    def set_decoder_to_fixed_norm(self, value: float, force_exact: bool) -> None:
        """Exact: every decoder row gets norm `value`; otherwise rows longer than `value` are shrunk to it."""
        self.W_D.mul_(self.fixed_norm_scale(value, force_exact)[:, None])

    @torch.no_grad()
    def init_encoder_with_decoder_transpose(self, factor: float = 1.0) -> None:
        if self.cfg.d_output != self.cfg.d_model:
            raise ValueError(
                f"init_encoder_with_decoder_transpose needs d_out == d_model, got {self.cfg.d_output} and "
                f"{self.cfg.d_model}"
            )
        self.W_E.copy_(factor * self.W_D.t())

    @torch.no_grad()
    def init_encoder_bias_with_mean_hidden_pre(self, batch: Batch) -> None:
        """b_E = minus the mean of x @ W_E over the batch's tokens, so pre-activations start centred (the activation
        function is not run: its running state, e.g. BatchTopK's threshold, stays as it is)."""
        x = self.prepare(self.token_rows(batch)).input
        self.b_E.copy_(-(x @ self.W_E).float().mean(dim=0).to(self.b_E.dtype))

    def feature_axes(self) -> dict[str, int]:
        axes = {"W_E": 1, "b_E": 0, "W_D": 0}
        if self.cfg.act_fn == "jumprelu":
            axes["activation_function.log_jumprelu_threshold"] = 0
        return axes

    def output_directions(self) -> Tensor:
        return self.W_D.detach()

    # ---------------------------------------------------------------- encode / decode

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.cfg.d_model,)

    def _hidden_pre(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b_E, x, self.W_E)

    def _gather(self, x: Tensor, hidden_pre: Tensor, group: int, selection: kernels.Selection) -> Tensor:
        return kernels.gather_preacts(x, self.W_E, self.b_E, hidden_pre, selection)

    def decode(self, feature_acts: Tensor) -> Tensor:
        """f @ W_D + b_D, without the skip term (which needs x; `forward` adds it)."""
        y = self.reduce_features(feature_acts @ self.W_D)
        return y + self.b_D if self.b_D is not None else y

    def _decode_rows(self, x: Tensor, f: Tensor | None, sparse: Sparse | None, features_only: bool = False) -> Tensor:
        y = kernels.sparse_decode(*sparse[0], self.W_D) if sparse is not None else f @ self.W_D
        y = self.reduce_features(y)
        return y if features_only else self._add_bias_and_skip(x, y)

    def _add_bias_and_skip(self, x: Tensor, y: Tensor) -> Tensor:
        if self.b_D is not None:
            y = y + self.b_D
        if self.W_skip is not None:
            y = y + x @ self.W_skip.t()
        return y

    def encode_and_reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ReLU and gated JumpReLU take one fused node of `kernels` (outside autocast): the numbers of the plain
        path, with fewer (N, d_sae) temporaries in the backward."""
        leading, rows = self._rows(x)
        fused = self._fused_codec(rows)
        if fused is None:
            return super().encode_and_reconstruct(x)
        h, f, y = fused
        y = self._add_bias_and_skip(rows, self.reduce_features(y))
        features = (*leading, *self.feature_shape)
        return f.reshape(features), h.reshape(features), y.reshape(*leading, *y.shape[1:])

    def _fused_codec(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """(h, f, f @ W_D) of input rows by a fused node, or None where there is none. The node takes its sparse
        path when few features are active (`kernels.codec_is_sparse`); `sparse_kernels` True/False forces it."""
        if torch.is_autocast_enabled(rows.device.type):
            return None
        sparse = self.sparse_kernels
        if self.cfg.act_fn == "relu":
            return kernels.relu_codec(rows, self.W_E, self.b_E, self.W_D, sparse)
        norm = self.gating_norm()
        if self.cfg.act_fn == "jumprelu" and norm is not None:
            activation = self.activation_function
            threshold, window = activation.threshold(), activation.window
            return kernels.gated_jumprelu_codec(rows, self.W_E, self.b_E, self.W_D, norm, threshold, window, sparse)
        return None

    # ---------------------------------------------------------------- folding

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """Raw input -> raw-scale reconstruction: b_E /= c_in, W_D (and W_skip) *= c_in / c_out, b_D /= c_out.

        Pre-activations scale by 1/c_in; with decoder-norm gating the thresholds compare h * ||W_D,i||, which
        scales by 1/c_out (the rows are multiplied by c_in / c_out), so thresholds divide by c_out there.
        """
        self._check_foldable()
        c_in = self.dataset_scale(self.cfg.hook_point_in)
        c_out = self.dataset_scale(self.cfg.hook_point_out)
        self.b_E /= c_in
        self.W_D *= c_in / c_out
        if self.b_D is not None:
            self.b_D /= c_out
        if self.W_skip is not None:
            self.W_skip *= c_in / c_out
        self.activation_function.fold_(c_out if self.cfg.sparsity_include_decoder_norm else c_in)
        self.cfg = self.cfg.model_copy(deep=True, update={"norm_activation": "inference"})
