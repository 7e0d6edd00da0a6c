"""The cross-layer transcoder (CLT): L encoders read the inputs of L layers, and the features of layer s write to
the output of every layer t >= s.

On normalised activations (see `SparseDictionary.prepare`), x_s the input of layer s and y_t the output of layer t:

    h_s     = x_s @ W_E[s] + b_E[s]                                          (N, F) per layer
    f       = act(h * n) / n,    n[s, i] = sqrt(sum_{t >= s} ||W_D[t][s, i]||^2)    (decoder-norm gating)
    y_hat_t = sum_{s <= t} f_s @ W_D[t][s] + b_D[t]

`act_fn`: relu; jumprelu (thresholds (L, F)); topk (k per token and layer); batchtopk (k x N per layer);
layertopk (k per token over every layer); batchlayertopk (k x N over the batch and every layer). As in the reference
system, k is not multiplied by L for the last two. The TopK family decodes sparsely: each source layer's selected
(token, feature) pairs go through the L - s decoders that read them (`kernels.sparse_decode`), so no dense
(N, L, F) x (F, D) product is formed, and the encoder weights get sparse gradients as an SAE's do.
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


class CLTConfig(SparseDictionaryConfig):
    """A cross-layer transcoder: `hook_points_in[l]` is read by layer l's encoder, `hook_points_out[t]` is the output
    the features of layers <= t reconstruct together; `d_sae` features per layer."""

    sae_type: Literal["clt"] = "clt"
    hook_points_in: list[str] = Field(min_length=1)
    hook_points_out: list[str] = Field(min_length=1)
    d_out: int | None = Field(default=None, gt=0)
    """Width of the output hook points when it differs from d_model."""
    init_cross_layer_decoder_all_zero: bool = False
    """Start the decoders from a layer to later layers at zero (each layer's own decoder stays random)."""

    @model_validator(mode="after")
    def _layers(self) -> "CLTConfig":
        if len(self.hook_points_in) != len(self.hook_points_out):
            raise ValueError(
                f"hook_points_in has {len(self.hook_points_in)} hook points and hook_points_out "
                f"{len(self.hook_points_out)}: a CLT reads and writes one of each per layer"
            )
        for field in ("hook_points_in", "hook_points_out"):
            hooks = getattr(self, field)
            if len(set(hooks)) != len(hooks):
                raise ValueError(f"{field} names a hook point twice: {hooks}")
        if ACTIVATION_FUNCTIONS[self.act_fn].spans_groups and self.top_k > self.n_layers * self.d_sae:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed n_layers x d_sae ({self.n_layers * self.d_sae})")
        return self

    @property
    def n_layers(self) -> int:
        return len(self.hook_points_in)

    @property
    def d_output(self) -> int:
        return self.d_out or self.d_model

    @property
    def hooks_in(self) -> list[str]:
        return self.hook_points_in

    @property
    def hooks_out(self) -> list[str]:
        return self.hook_points_out

    def hook_widths(self) -> list[tuple[str, int, str]]:
        widths = {hook: (self.d_model, "d_model") for hook in self.hook_points_in}
        out_field = "d_out" if self.d_out else "d_model"
        widths.update({hook: (self.d_output, out_field) for hook in self.hook_points_out})
        return [(hook, width, field) for hook, (width, field) in widths.items()]


class CrossLayerTranscoder(SparseCoder):
    config_class = CLTConfig
    cfg: CLTConfig
    splices_causally = True  # layer t's output reads the inputs of layers s <= t, which the forward pass reaches first

    def __init__(self, cfg: CLTConfig):
        super().__init__(cfg)
        factory = {"device": torch.device(cfg.device), "dtype": cfg.dtype}
        L, D, F, D_out = cfg.n_layers, cfg.d_model, cfg.d_sae, cfg.d_output
        self.W_E = nn.Parameter(torch.empty(L, D, F, **factory))
        self.b_E = nn.Parameter(torch.empty(L, F, **factory))
        # W_D[t][s]: from the features of layer s to the output of layer t (s <= t); state keys W_D.0 ... W_D.{L-1}.
        self.W_D = nn.ParameterList(nn.Parameter(torch.empty(t + 1, F, D_out, **factory)) for t in range(L))
        self.b_D = None
        if cfg.use_decoder_bias:
            self.b_D = nn.ParameterList(nn.Parameter(torch.empty(D_out, **factory)) for _ in range(L))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (self.cfg.n_layers, self.cfg.d_sae)

    # ---------------------------------------------------------------- parameters and norms

    def init_parameters(
        self,
        encoder_uniform_bound: float | None = None,
        decoder_uniform_bound: float | None = None,
        **activation_init: float,
    ) -> None:
        """W_E ~ U(+-1/sqrt(d_model)), W_D ~ U(+-1/sqrt(n_layers d_sae)) unless given (fan-in bounds: an output sums
        up to L layers' features); biases 0; cross-layer decoders 0 when the config asks."""
        cfg = self.cfg
        enc = encoder_uniform_bound if encoder_uniform_bound is not None else cfg.d_model**-0.5
        dec = decoder_uniform_bound if decoder_uniform_bound is not None else (cfg.n_layers * cfg.d_sae) ** -0.5
        with torch.no_grad():
            self.W_E.uniform_(-enc, enc)
            self.b_E.zero_()
            for t, decoder in enumerate(self.W_D):
                decoder.uniform_(-dec, dec)
                if cfg.init_cross_layer_decoder_all_zero:
                    decoder[:t].zero_()
            for bias in self.b_D or ():
                bias.zero_()
        self.activation_function.init_parameters(**activation_init)

    def decoder_norm(self) -> Tensor:
        """(L, F): the norm of everything a feature of layer s writes, over the decoders to layers t >= s."""
        squares = []
        for s in range(self.cfg.n_layers):
            squares.append(sum(self.W_D[t][s].pow(2).sum(-1) for t in range(s, self.cfg.n_layers)))
        return torch.stack(squares).sqrt()

    def encoder_norm(self) -> Tensor:
        return self.W_E.norm(dim=1)  # (L, F)

    def feature_axes(self) -> dict[str, int]:
        axes = {"W_E": 2, "b_E": 1, **{f"W_D.{t}": 1 for t in range(self.cfg.n_layers)}}
        if self.cfg.act_fn == "jumprelu":
            axes["activation_function.log_jumprelu_threshold"] = 1
        return axes

    def group_metric_key(self, group: int, metric: str) -> str:
        """Layer l of the CLT (0-based, in `hook_points_out` order): `metrics/explained_variance_L{l}`,
        `metrics/l0_layer{l}` (its own features' L0) and `metrics/l_rec_L{l}`, the reference system's names."""
        return f"metrics/l0_layer{group}" if metric == "l0" else f"metrics/{metric}_L{group}"

    @torch.no_grad()
    def set_decoder_to_fixed_norm(self, value: float, force_exact: bool) -> None:
        """Exact: every feature's decoders together get norm `value`; otherwise longer ones are shrunk to it."""
        scale = self.fixed_norm_scale(value, force_exact)  # (L, F)
        for t, decoder in enumerate(self.W_D):
            decoder.mul_(scale[: t + 1, :, None])

    @torch.no_grad()
    def init_encoder_with_decoder_transpose(self, factor: float = 1.0) -> None:
        """W_E[s] = factor * W_D[s][s]^T: each layer reads along the directions its own features write to its own
        output (as a transcoder is initialised; needs d_out == d_model)."""
        if self.cfg.d_output != self.cfg.d_model:
            raise ValueError(
                f"init_encoder_with_decoder_transpose needs d_out == d_model, got {self.cfg.d_output} and "
                f"{self.cfg.d_model}"
            )
        for s in range(self.cfg.n_layers):
            self.W_E[s].copy_(factor * self.W_D[s][s].t())

    @torch.no_grad()
    def init_decoder_bias(self, center: Tensor) -> None:
        """b_D[t] = the centre of layer t's normalised output (center (L, D_out))."""
        if self.b_D is None:
            raise ValueError("this dictionary has no decoder bias (use_decoder_bias=False)")
        for t, bias in enumerate(self.b_D):
            bias.copy_(center[t].to(bias.dtype))

    @torch.no_grad()
    def init_encoder_bias_with_mean_hidden_pre(self, batch: Batch) -> None:
        """b_E[s] = minus the mean of x_s @ W_E[s] over the batch's tokens (pre-activations start centred)."""
        x = self.prepare(self.token_rows(batch)).input  # (N, L, D)
        self.b_E.copy_(-torch.einsum("nld,ldf->nlf", x, self.W_E).float().mean(0).to(self.b_E.dtype))

    # ---------------------------------------------------------------- encode / decode

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.cfg.n_layers, self.cfg.d_model)

    def _hidden_pre(self, x: Tensor) -> Tensor:
        return torch.einsum("nld,ldf->nlf", x, self.W_E) + self.b_E

    def _gather(self, x: Tensor, hidden_pre: Tensor, group: int, selection: kernels.Selection) -> Tensor:
        s = group  # the source layer
        return kernels.gather_preacts(x[:, s], self.W_E[s], self.b_E[s], hidden_pre[:, s], selection)

    def _decode_rows(self, x: Tensor, f: Tensor | None, sparse: Sparse | None, features_only: bool = False) -> Tensor:
        """y_hat_t = sum_{s <= t} f_s @ W_D[t][s] (+ b_D[t]), from each source layer's selected pairs when sparse."""
        outputs = []
        for t, decoder in enumerate(self.W_D):
            if sparse is not None:
                y = sum(kernels.sparse_decode(selection, values, decoder[s]) for s, (selection, values) in
                        enumerate(sparse[: t + 1]))  # fmt: skip
            else:
                y = torch.einsum("...sf,sfd->...d", f[..., : t + 1, :], decoder)
            outputs.append(y)
        y = self.reduce_features(torch.stack(outputs, dim=-2))  # one sum over feature shards for every layer
        return y + torch.stack(list(self.b_D)) if not features_only and self.b_D is not None else y

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Outputs (..., L, D_out): y_hat_t = sum_{s <= t} f_s @ W_D[t][s] + b_D[t]."""
        return self._decode_rows(None, feature_acts, None)

    # ---------------------------------------------------------------- folding

    def _folding_scales(self) -> tuple[Tensor, Tensor]:
        self._check_foldable()
        c_in = torch.tensor([self.dataset_scale(hook) for hook in self.cfg.hook_points_in], dtype=torch.float64)
        c_out = torch.tensor([self.dataset_scale(hook) for hook in self.cfg.hook_points_out], dtype=torch.float64)
        return c_in, c_out

    @property
    def can_fold(self) -> bool:
        """Folding is exact when the scores the activation function ranks keep their order: with gating, n grows by
        c_in(s) / c_out(t) per decoder, so every output must share one scale; without it, per-layer TopK and
        thresholds fold, but ranking across layers (layertopk) needs one input scale."""
        norms = self.cfg.dataset_average_activation_norm
        if not norms or not all(hook in norms for hook in self.cfg.hook_points):
            return False
        c_in, c_out = self._folding_scales()
        if self.gating_norm() is not None:
            return bool((c_out == c_out[0]).all())
        return not self.activation_function.spans_groups or bool((c_in == c_in[0]).all())

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """Raw inputs -> raw-scale outputs: b_E[s] /= c_in(s), W_D[t][s] *= c_in(s) / c_out(t), b_D[t] /= c_out(t);
        thresholds compare h * n (gating: divided by the one output scale) or h (divided by c_in(s))."""
        if not self.can_fold:
            raise ValueError(
                "this CLT's activation scale cannot be folded exactly (decoder-norm gating with outputs of different "
                "dataset-wise norms, or a ranking across layers with inputs of different norms); use it as it is: "
                "it normalises its inputs itself"
            )
        c_in, c_out = self._folding_scales()
        dtype = self.W_E.dtype
        self.b_E /= c_in[:, None].to(dtype)
        for t, decoder in enumerate(self.W_D):
            decoder *= (c_in[: t + 1] / c_out[t])[:, None, None].to(dtype)
            if self.b_D is not None:
                self.b_D[t] /= float(c_out[t])
        if self.gating_norm() is not None:  # scores h * n: every layer's divided by the one output scale
            self.activation_function.fold_(float(c_out[0]))
        elif self.activation_function.spans_groups:  # one ranking across layers: one input scale
            self.activation_function.fold_(float(c_in[0]))
        else:  # scores h, per layer
            self.activation_function.fold_(c_in.to(dtype))
        self.cfg = self.cfg.model_copy(deep=True, update={"norm_activation": "inference"})
