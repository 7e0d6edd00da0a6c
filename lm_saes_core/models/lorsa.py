"""Low-rank sparse attention (Lorsa): a sparse dictionary of rank-1 attention heads that reconstructs an attention
layer's output from its input, reading whole contexts (`granularity = "contexts"`).

On normalised activations x (B, S, D) (see `SparseDictionary.prepare`), with H = n_qk_heads QK heads of width E and
n_ov = d_sae rank-1 OV heads, OV head i reading the pattern of QK head g(i) = i // (d_sae / H):

    q_g = rope(norm(x W_Q[g] + b_Q[g]))        k_g = rope(norm(x W_K[g] + b_K[g]))        (B, S, E) per QK head
    A_g = softmax(q_g k_g^T / attn_scale + causal mask)                                 (B, S, S)
    v_i = x . W_V[i] + b_V[i]                                                           (B, S)    per OV head
    h_i[t] = sum_{tau <= t} A_g(i)[t, tau] v_i[tau]                                     (B, S, d_sae)
    f = act(h * n) / n          n_i = ||W_O[i]||  (decoder-norm gating; act(h) without it; per position)
    y_hat = f @ W_O + b_D

`norm` is the optional per-head RMSNorm of q and k (`use_post_qk_ln`), `rope` rotates the first `rotary_dim` channels
(adjacent pairs as GPT-J, or the halves as GPT-NeoX/Llama). The OV heads of one QK head are the value channels of one
attention head, so the fast path is a single `scaled_dot_product_attention` with values of width d_sae / H; the
explicit path forms the patterns (and the z-patterns A_g(i)[t, tau] v_i[tau] that analysis shows). The TopK family
decodes sparsely (`kernels.sparse_decode`: only the k selected heads per position reach W_O).
"""

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from lm_saes_core.models import kernels
from lm_saes_core.models.activation_functions import ACTIVATION_FUNCTIONS
from lm_saes_core.models.base import Batch, Replacement, SparseDictionary, _patch
from lm_saes_core.models.config import SparseDictionaryConfig

if TYPE_CHECKING:
    from lm_saes_core.backend.attention import HostAttention


class LorsaConfig(SparseDictionaryConfig):
    """A Lorsa reading `hook_point_in` (an attention layer's input, e.g. `blocks.L.ln1.hook_normalized`) and
    reconstructing `hook_point_out` (e.g. `blocks.L.hook_attn_out`) with `d_sae` rank-1 OV heads grouped onto
    `n_qk_heads` QK heads."""

    sae_type: Literal["lorsa"] = "lorsa"
    hook_point_in: str
    hook_point_out: str
    n_qk_heads: int = Field(gt=0)
    d_qk_head: int = Field(gt=0)
    n_ctx: int = Field(gt=0)
    """Longest context the rotary tables cover."""
    positional_embedding_type: Literal["rotary", "none"] = "rotary"
    rotary_dim: int | None = Field(default=None, gt=0)
    """Channels of each q/k head that rotate (the first ones); None: all d_qk_head."""
    rotary_base: float = Field(default=10000.0, gt=0)
    rotary_adjacent_pairs: bool = True
    """True: channels (2j, 2j+1) rotate together (GPT-J); False: (j, j + rotary_dim / 2) (GPT-NeoX, Llama)."""
    use_NTK_by_parts_rope: bool = False
    """Llama-3.1 frequency rescaling (NTK-by-parts) with the four fields below."""
    NTK_by_parts_factor: float = Field(default=1.0, gt=0)
    NTK_by_parts_low_freq_factor: float = Field(default=1.0, gt=0)
    NTK_by_parts_high_freq_factor: float = Field(default=1.0, gt=0)
    old_context_len: int = Field(default=2048, gt=0)
    attn_scale: float | None = Field(default=None, gt=0)
    """Scores are q.k / attn_scale; None: sqrt(d_qk_head)."""
    use_post_qk_ln: bool = False
    """Normalise each q and k head (QK-norm, as Qwen3), with `normalization_type` "RMS"."""
    normalization_type: Literal["LN", "RMS"] | None = None
    eps: float = Field(default=1e-6, gt=0)
    qk_lr_factor: float = Field(default=1.0, ge=0)
    """The QK circuit (W_Q, W_K, b_Q, b_K, QK-norm weights) learns at qk_lr_factor * lr (0: frozen, e.g. kept as the
    host's heads it was initialised from)."""

    @model_validator(mode="after")
    def _heads(self) -> "LorsaConfig":
        if self.hook_point_in == self.hook_point_out:
            raise ValueError(
                f"hook_point_in and hook_point_out are both {self.hook_point_in!r}: a Lorsa reads an attention layer's "
                "input and reconstructs its output (e.g. blocks.L.ln1.hook_normalized -> blocks.L.hook_attn_out)"
            )
        if self.d_sae % self.n_qk_heads:
            raise ValueError(
                f"d_sae (= n_ov_heads) {self.d_sae} is not divisible by n_qk_heads {self.n_qk_heads}: every QK head "
                "must carry the same number of OV heads"
            )
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.d_qk_head)
        if self.rotary_dim > self.d_qk_head or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and at most d_qk_head ({self.d_qk_head})")
        if self.use_NTK_by_parts_rope and self.NTK_by_parts_high_freq_factor <= self.NTK_by_parts_low_freq_factor:
            raise ValueError(
                f"NTK_by_parts_high_freq_factor ({self.NTK_by_parts_high_freq_factor}) must exceed "
                f"NTK_by_parts_low_freq_factor ({self.NTK_by_parts_low_freq_factor})"
            )
        if self.normalization_type == "LN":
            raise ValueError("normalization_type 'LN' (a LayerNorm of q and k) is not implemented; use 'RMS'")
        if self.use_post_qk_ln and self.normalization_type != "RMS":
            raise ValueError(f"use_post_qk_ln needs normalization_type 'RMS', got {self.normalization_type!r}")
        if ACTIVATION_FUNCTIONS[self.act_fn].spans_groups:
            raise ValueError(f"act_fn {self.act_fn!r} ranks the features of several layers (sae_type 'clt')")
        if self.attn_scale is None:
            object.__setattr__(self, "attn_scale", math.sqrt(self.d_qk_head))
        return self

    def shard_fields(self, size: int) -> dict:
        """A feature shard's config holds 1/size of the QK heads too (each with its OV heads)."""
        return {"n_qk_heads": self.n_qk_heads // size}

    @property
    def n_ov_heads(self) -> int:
        return self.d_sae

    @property
    def ov_group_size(self) -> int:
        """OV heads per QK head."""
        return self.d_sae // self.n_qk_heads

    @property
    def hooks_in(self) -> list[str]:
        return [self.hook_point_in]

    @property
    def hooks_out(self) -> list[str]:
        return [self.hook_point_out]

    def hook_widths(self) -> list[tuple[str, int, str]]:
        return [(self.hook_point_in, self.d_model, "d_model"), (self.hook_point_out, self.d_model, "d_model")]


# ---------------------------------------------------------------------------------------------- rotary embedding


def rotary_inverse_frequencies(cfg: LorsaConfig) -> Tensor:
    """(rotary_dim / 2,) float64 angular frequencies base^(-2j / rotary_dim), NTK-by-parts smoothed when asked."""
    rotary_dim = cfg.rotary_dim
    inv_freq = 1.0 / cfg.rotary_base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    if not cfg.use_NTK_by_parts_rope:
        return inv_freq
    factor, low, high = cfg.NTK_by_parts_factor, cfg.NTK_by_parts_low_freq_factor, cfg.NTK_by_parts_high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > cfg.old_context_len / low, inv_freq / factor, inv_freq)
    smooth = (cfg.old_context_len / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= cfg.old_context_len / high) & (wavelength <= cfg.old_context_len / low)
    return torch.where(medium, smoothed, scaled)


def rotary_tables(cfg: LorsaConfig) -> tuple[Tensor, Tensor]:
    """(sin, cos) of shape (n_ctx, rotary_dim): angle position * frequency of the pair each channel belongs to."""
    angles = torch.arange(cfg.n_ctx, dtype=torch.float64)[:, None] * rotary_inverse_frequencies(cfg)[None, :]
    if cfg.rotary_adjacent_pairs:
        angles = angles.repeat_interleave(2, dim=-1)  # channels 2j, 2j+1 share frequency j
    else:
        angles = torch.cat([angles, angles], dim=-1)  # channels j, j + rotary_dim / 2 share frequency j
    return angles.sin(), angles.cos()


def rotate_pairs(x: Tensor, adjacent: bool) -> Tensor:
    """Each pair (a, b) -> (-b, a): the quarter turn that, times sin, completes the rotation."""
    if adjacent:
        return torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class HeadRMSNorm(nn.Module):
    """Per-head RMSNorm of q or k (B, H, S, E): x / sqrt(mean(x^2) + eps) * w[h], in at least float32."""

    def __init__(self, n_heads: int, d_head: int, eps: float, **factory):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(n_heads, d_head, **factory))

    def forward(self, x: Tensor) -> Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.w[:, None, :]).to(x.dtype)


# ---------------------------------------------------------------------------------------------- the model


class LowRankSparseAttention(SparseDictionary):
    config_class = LorsaConfig
    cfg: LorsaConfig
    granularity = "contexts"
    sparse_kernels: bool | None = None
    """True/False forces the sparse/dense decode of the TopK family; None picks sparse when k <= d_sae / 8."""

    def __init__(self, cfg: LorsaConfig):
        super().__init__(cfg)
        factory = {"device": torch.device(cfg.device), "dtype": cfg.dtype}
        H, E, D, F_ = cfg.n_qk_heads, cfg.d_qk_head, cfg.d_model, cfg.d_sae
        self.W_Q = nn.Parameter(torch.empty(H, D, E, **factory))
        self.W_K = nn.Parameter(torch.empty(H, D, E, **factory))
        self.b_Q = nn.Parameter(torch.empty(H, E, **factory))
        self.b_K = nn.Parameter(torch.empty(H, E, **factory))
        self.W_V = nn.Parameter(torch.empty(F_, D, **factory))
        self.b_V = nn.Parameter(torch.empty(F_, **factory))
        self.W_O = nn.Parameter(torch.empty(F_, D, **factory))
        self.b_D = nn.Parameter(torch.empty(D, **factory)) if cfg.use_decoder_bias else None
        self.ln_q = self.ln_k = None
        if cfg.use_post_qk_ln:
            self.ln_q = HeadRMSNorm(H, E, cfg.eps, **factory)
            self.ln_k = HeadRMSNorm(H, E, cfg.eps, **factory)
        if cfg.positional_embedding_type == "rotary":
            sin, cos = rotary_tables(cfg)
            # Derived from the config, so not saved: a checkpoint holds learned tensors only.
            self.register_buffer("rotary_sin", sin.to(**factory), persistent=False)
            self.register_buffer("rotary_cos", cos.to(**factory), persistent=False)

    # ---------------------------------------------------------------- parameters and norms

    def init_parameters(self, **kwargs: float) -> None:
        """Xavier-uniform W_Q, W_K per head (D -> E); W_V ~ N(0, 1/d_sae), W_O ~ N(0, 1/d_model) (std 1/sqrt of
        those, as the reference system); biases 0; QK-norm weights 1. The initializer's uniform bounds do not apply
        (they size an SAE's encoder and decoder)."""
        cfg = self.cfg
        bound = math.sqrt(6 / (cfg.d_model + cfg.d_qk_head))
        if self.W_Q.is_meta:  # a shape-only model (settings checks): nothing to fill
            return
        with torch.no_grad():
            self.W_Q.uniform_(-bound, bound)
            self.W_K.uniform_(-bound, bound)
            self.W_V.normal_(0, cfg.d_sae**-0.5)
            self.W_O.normal_(0, cfg.d_model**-0.5)
            for bias in (self.b_Q, self.b_K, self.b_V, self.b_D):
                if bias is not None:
                    bias.zero_()
            for norm in (self.ln_q, self.ln_k):
                if norm is not None:
                    norm.w.fill_(1.0)
        self.activation_function.init_parameters(
            **{k: v for k, v in kwargs.items() if k == "init_log_jumprelu_threshold_value"}
        )

    def qk_parameters(self) -> list[nn.Parameter]:
        """The parameters of the attention patterns (W_Q, W_K, b_Q, b_K and the QK-norm weights)."""
        norms = [norm.w for norm in (self.ln_q, self.ln_k) if norm is not None]
        return [self.W_Q, self.W_K, self.b_Q, self.b_K, *norms]

    def parameter_groups(self, lr: float, jumprelu_lr_factor: float = 1.0) -> list[dict]:
        """The base's groups, the QK circuit split off into a group "qk" at `qk_lr_factor` * lr."""
        groups = super().parameter_groups(lr, jumprelu_lr_factor)
        if self.cfg.qk_lr_factor == 1.0:
            return groups
        qk = {id(p) for p in self.qk_parameters()}
        others = groups[0]
        groups[0] = {**others, "params": [p for p in others["params"] if id(p) not in qk]}
        return [*groups, {"name": "qk", "params": self.qk_parameters(), "lr": lr * self.cfg.qk_lr_factor}]

    def feature_axes(self) -> dict[str, int]:
        """QK heads and their OV heads split together (a shard holds whole QK heads with their groups)."""
        names = ["W_Q", "W_K", "b_Q", "b_K", "W_V", "b_V", "W_O"]
        names += [f"{norm}.w" for norm in ("ln_q", "ln_k") if getattr(self, norm) is not None]
        if self.cfg.act_fn == "jumprelu":
            names.append("activation_function.log_jumprelu_threshold")
        return dict.fromkeys(names, 0)

    def decoder_norm(self) -> Tensor:
        return self.W_O.norm(dim=1)

    def encoder_norm(self) -> Tensor:
        return self.W_V.norm(dim=1)

    @torch.no_grad()
    def set_decoder_to_fixed_norm(self, value: float, force_exact: bool) -> None:
        """Exact: every W_O row gets norm `value`; otherwise rows longer than `value` are shrunk to it."""
        self.W_O.mul_(self.fixed_norm_scale(value, force_exact)[:, None])

    @torch.no_grad()
    def init_encoder_bias_with_mean_hidden_pre(self, batch: Batch) -> None:
        """b_V -= the mean pre-activation over the batch's valid positions (the patterns sum to 1, so h shifts by
        exactly the change of b_V)."""
        rows = self.token_rows(batch)
        h = self.attend(self.prepare(rows).input)[0]
        self.b_V.sub_(h[rows["mask"].to(torch.bool)].float().mean(0).to(self.b_V.dtype))

    def output_directions(self) -> Tensor:
        return self.W_O.detach()

    # ---------------------------------------------------------------- initialisation from the host attention

    def _scale(self, hook: str) -> float:
        """The scale that normalises `hook` (dataset-wise or inference; token-wise has no fixed one to fold)."""
        mode = self.cfg.norm_activation
        if mode == "inference":
            return 1.0
        if mode == "dataset-wise":
            return self.dataset_scale(hook)
        raise ValueError(
            f"initialising from the host attention needs norm_activation 'dataset-wise' or 'inference', not {mode!r} "
            "(a per-token scale cannot be folded into W_Q, W_K)"
        )

    def check_matches_host(self, host: "HostAttention") -> None:
        """The QK circuit of this config must be the host's (heads, width, RoPE, scale, QK-norm), or copying the host's
        Q/K means nothing: raise naming every field that differs."""
        cfg, expected = self.cfg, host.lorsa_fields()
        differing = []
        if cfg.n_qk_heads % host.n_heads:
            differing.append(f"n_qk_heads {cfg.n_qk_heads} is not a multiple of the host's {host.n_heads} heads")
        exact = ("d_qk_head", "positional_embedding_type", "rotary_dim", "rotary_adjacent_pairs", "use_post_qk_ln")
        for field in exact:
            if field in expected and getattr(cfg, field) != expected[field]:
                differing.append(f"{field} is {getattr(cfg, field)!r}, the host's is {expected[field]!r}")
        for field in ("attn_scale", "eps"):
            if field in expected and not math.isclose(getattr(cfg, field), expected[field], rel_tol=1e-6):
                differing.append(f"{field} is {getattr(cfg, field)}, the host's is {expected[field]}")
        rotary = host.inv_freq is not None and cfg.positional_embedding_type == "rotary"
        if rotary and cfg.rotary_dim == expected["rotary_dim"]:
            if not torch.allclose(rotary_inverse_frequencies(cfg), host.inv_freq, rtol=1e-5, atol=0):
                host_rope = ", ".join(f"{k}={v}" for k, v in host.rope.items() if k != "rotary_dim")
                differing.append(f"the rotary frequencies differ from the host's ({host_rope})")
        if differing:
            raise ValueError(f"this Lorsa cannot take layer {host.layer}'s attention: " + "; ".join(differing))

    @torch.no_grad()
    def init_qk_from_host(self, host: "HostAttention") -> None:
        """W_Q, W_K (b_Q, b_K, QK-norm weights) from the host's heads, each repeated over n_qk_heads / host heads
        consecutive QK heads, the weights divided by the input scale (the Lorsa reads normalised activations)."""
        self.check_matches_host(host)
        repeat = self.cfg.n_qk_heads // host.n_heads
        c_in = self._scale(self.cfg.hook_point_in)
        for weight, bias, host_weight, host_bias in (
            (self.W_Q, self.b_Q, host.W_Q, host.b_Q),
            (self.W_K, self.b_K, host.W_K, host.b_K),
        ):
            weight.copy_(host_weight.repeat_interleave(repeat, 0) / c_in)
            bias.copy_(host_bias.repeat_interleave(repeat, 0) if host_bias is not None else torch.zeros_like(bias))
        if self.ln_q is not None:
            self.ln_q.w.copy_(host.q_norm.expand_as(self.ln_q.w))
            self.ln_k.w.copy_(host.k_norm.expand_as(self.ln_k.w))

    def _ov_groups(self, host: "HostAttention") -> int:
        if self.cfg.d_sae % host.n_heads:
            raise ValueError(
                f"d_sae {self.cfg.d_sae} is not divisible by the host's {host.n_heads} heads: every host head must get "
                "the same number of OV heads"
            )
        return self.cfg.d_sae // host.n_heads

    @torch.no_grad()
    def init_ov_with_active_subspace(self, batch: Batch, host: "HostAttention") -> None:
        """Per host head h and its n = d_sae / host heads OV heads: the principal d_head directions U of the values
        h reads, mapped back to the input (x W_V^h W_V^h^T over the batch's valid positions, centred); W_V rows =
        their first d_head random coordinates in that basis, W_O = W_V W_V^h W_O^h (what head h would write for
        them); rows normalised to 1."""
        n, d = self._ov_groups(host), host.d_head
        rows = self.token_rows(batch)
        x = self.prepare(rows).input[rows["mask"].to(torch.bool)].double()  # (N, D) valid positions
        for head in range(host.n_heads):
            ov = slice(head * n, (head + 1) * n)
            read_back = x @ host.W_V[head] @ host.W_V[head].T
            centred = (read_back - read_back.mean(0)).T  # (D, N)
            directions = torch.linalg.svd(centred, full_matrices=False).U[:, :d]  # (D, <= d): fewer rows, fewer
            W_V = self.W_V[ov, : directions.shape[1]].double() @ directions.T
            self.W_V[ov] = W_V.to(self.W_V.dtype)
            self.W_O[ov] = (W_V @ host.W_V[head] @ host.W_O[head]).to(self.W_O.dtype)
        self.W_V.div_(self.W_V.norm(dim=1, keepdim=True))
        self.W_O.div_(self.W_O.norm(dim=1, keepdim=True))

    @torch.no_grad()
    def init_ov_from_host_svd(self, host: "HostAttention") -> None:
        """OV heads from the host heads' OV circuits W_V^h W_O^h = sum_j s_j u_j v_j^T: the n = d_sae / host heads
        OV heads of head h are its n largest singular terms (W_V = s_j u_j / c_in, W_O = c_out v_j; the value bias
        projected on v_j, the output bias into b_D). With n = d_head and the host's Q/K this is the host attention
        exactly (pre-activations decoded without the activation function)."""
        n = self._ov_groups(host)
        if n > host.d_head:
            raise ValueError(f"{n} OV heads per host head exceed the rank of its OV circuit (d_head {host.d_head})")
        c_in, c_out = self._scale(self.cfg.hook_point_in), self._scale(self.cfg.hook_point_out)
        for head in range(host.n_heads):
            ov = slice(head * n, (head + 1) * n)
            U, S, Vh = _low_rank_svd(host.W_V[head], host.W_O[head])
            self.W_V[ov] = ((U[:, :n] * S[:n]).T / c_in).to(self.W_V.dtype)
            self.W_O[ov] = (Vh[:n] * c_out).to(self.W_O.dtype)
            value_bias = host.b_V[head] @ host.W_O[head] @ Vh[:n].T if host.b_V is not None else 0.0
            self.b_V[ov] = torch.as_tensor(value_bias, dtype=self.b_V.dtype)
        if self.b_D is not None:
            self.b_D.copy_(host.b_O * c_out if host.b_O is not None else torch.zeros_like(self.b_D))

    # ---------------------------------------------------------------- attention

    def token_rows(self, batch: Batch) -> dict[str, Tensor]:
        """Whole contexts and their mask (every position valid when the batch has none)."""
        rows = super().token_rows(batch)
        if "mask" not in rows:
            x = rows[self.cfg.hook_point_in]
            rows["mask"] = torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
        return rows

    def _check_contexts(self, x: Tensor) -> None:
        if x.ndim != 3:
            raise ValueError(
                f"Lorsa reads whole contexts (batch, positions, d_model), got a tensor of shape {tuple(x.shape)}; "
                "use an activations-2d stream"
            )
        if x.shape[1] > self.cfg.n_ctx:
            raise ValueError(f"contexts of {x.shape[1]} positions exceed n_ctx={self.cfg.n_ctx} of this Lorsa")

    def _rope(self, x: Tensor) -> Tensor:
        """Rotate the first rotary_dim channels of q or k (B, H, S, E) by their positions' angles."""
        if self.cfg.positional_embedding_type != "rotary":
            return x
        S, r = x.shape[-2], self.cfg.rotary_dim
        sin, cos = self.rotary_sin[:S].to(x.dtype), self.rotary_cos[:S].to(x.dtype)
        rotating = x[..., :r]
        rotated = rotating * cos + rotate_pairs(rotating, self.cfg.rotary_adjacent_pairs) * sin
        return rotated if r == x.shape[-1] else torch.cat([rotated, x[..., r:]], dim=-1)

    def queries_keys_values(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (B, H, S, E) after QK-norm and RoPE, and v (B, H, S, d_sae / H): OV head g * group + j is value
        channel j of QK head g."""
        self._check_contexts(x)
        x = x.to(self.cfg.dtype)
        B, S, D = x.shape
        H, E = self.cfg.n_qk_heads, self.cfg.d_qk_head
        W_QK = torch.cat([self.W_Q, self.W_K]).transpose(0, 1).reshape(D, 2 * H * E)  # one product for q and k
        qk = (x @ W_QK).view(B, S, 2 * H, E).transpose(1, 2) + torch.cat([self.b_Q, self.b_K])[:, None]
        q, k = qk[:, :H], qk[:, H:]
        v = F.linear(x, self.W_V, self.b_V).view(B, S, H, self.cfg.ov_group_size).transpose(1, 2)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return self._rope(q), self._rope(k), v

    def attention_pattern(self, q: Tensor, k: Tensor) -> Tensor:
        """(B, H, S, S) causal softmax(q k^T / attn_scale): row t is where position t reads from."""
        scores = q @ k.transpose(-1, -2) / self.cfg.attn_scale
        S = scores.shape[-1]
        causal = torch.ones(S, S, dtype=torch.bool, device=scores.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)

    def attend(self, x: Tensor, return_pattern: bool = False) -> tuple[Tensor, Tensor | None]:
        """Pre-activations h (B, S, d_sae) of normalised contexts x (B, S, D), and the patterns (B, H, S, S) when
        asked (the explicit path; otherwise one fused scaled-dot-product attention, values of width d_sae / H)."""
        q, k, v = self.queries_keys_values(x)
        if return_pattern:
            pattern = self.attention_pattern(q, k)
            z = pattern @ v
        else:
            pattern = None
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / self.cfg.attn_scale)
        B, H, S, G = z.shape
        return z.transpose(1, 2).reshape(B, S, H * G), pattern

    def z_patterns(self, x: Tensor, heads: Tensor | list[int] | None = None) -> Tensor:
        """(B, n_heads, S, S): how much each source position tau adds to OV head i's pre-activation at t,
        A_g(i)[t, tau] * v_i[tau], for `heads` (default all); summing over tau gives h_i[t]."""
        q, k, v = self.queries_keys_values(x)
        pattern = self.attention_pattern(q, k)  # (B, H, S, S)
        heads = torch.arange(self.cfg.d_sae) if heads is None else torch.as_tensor(heads)
        heads = heads.to(pattern.device)
        group = self.cfg.ov_group_size
        values = v.transpose(1, 2).flatten(2)[:, :, heads]  # (B, S, n) value of head i at each source position
        return pattern[:, heads // group] * values.transpose(1, 2)[:, :, None, :]

    # ---------------------------------------------------------------- encode / decode

    def _activate(self, h: Tensor, update_state: bool = True) -> Tensor:
        """act(h * n) / n per position (features ranked across the d_sae heads of each position)."""
        flat = h.reshape(-1, self.cfg.d_sae)
        return self.activation_function(flat, self.gating_norm(), self.current_k, update_state).reshape(h.shape)

    def encode(self, x: Tensor, return_hidden_pre: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        h, _ = self.attend(x)
        f = self._activate(h)
        return (f, h) if return_hidden_pre else f

    def encode_with_patterns(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(f, h, patterns (B, H, S, S)) through the explicit path."""
        h, pattern = self.attend(x, return_pattern=True)
        return self._activate(h), h, pattern

    def decode(self, feature_acts: Tensor) -> Tensor:
        y = self.reduce_features(feature_acts.to(self.W_O.dtype) @ self.W_O)
        return y + self.b_D if self.b_D is not None else y

    def _use_sparse_decode(self) -> bool:
        if not self.uses_k:
            return False
        return self.sparse_kernels if self.sparse_kernels is not None else self.current_k * 8 <= self.cfg.d_sae

    def encode_and_reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The training forward pass; the TopK family decodes only the selected heads of each position."""
        h, _ = self.attend(x)
        f, y = self._activate_and_decode(h.reshape(-1, self.cfg.d_sae))
        return f.reshape(h.shape), h, y.reshape(*h.shape[:-1], -1)

    def encode_and_reconstruct_valid(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attend over the whole contexts, then activate and decode only the `valid` positions (B, S): a batch-wise
        activation's budget is k per valid token (BatchTopK ranking BOS and padding too handed their share to the
        real tokens: k 32 became 33.2 on held-out tokens)."""
        h = self.attend(x)[0][valid]
        f, y = self._activate_and_decode(h)
        return f, h, y

    def _activate_and_decode(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """(f, reconstruction) of pre-activation rows (N, d_sae), one row per position."""
        if not self._use_sparse_decode():
            f = self._activate(flat)
            return f, self.decode(f)
        with torch.no_grad():
            norm = self.gating_norm()
            scores = flat.detach() * norm if norm is not None else flat.detach()
            ((selection, keep),) = self.activation_function.select(scores, self.current_k)
        # act(h * n) / n == h on kept entries; TopK selects k per row in row order, so a gather reads them
        k = self.current_k
        exactly_k = self.activation_function.name == "topk" and self.feature_shards is None  # a shard keeps any number
        if exactly_k and selection.cols.numel() == flat.shape[0] * k:
            values = flat.gather(1, selection.cols.view(-1, k)).reshape(-1)
        else:
            values = flat[selection.rows, selection.cols]
        if keep is not None:
            values = values * keep
        y = self.reduce_features(kernels.sparse_decode(selection, values, self.W_O))
        if self.b_D is not None:
            y = y + self.b_D
        return kernels.densify(selection, values, flat.shape[0], self.cfg.d_sae), y

    def aux_loss(self, x: Tensor, hidden_pre: Tensor, residual: Tensor, dead_latents: Tensor, k_aux: int) -> Tensor:
        """Aux-K: how well the top k_aux dead heads (by the model's own activation) reconstruct the residual."""
        n_dead = self.whole_count(dead_latents)
        if n_dead == 0:
            return residual.new_zeros(())
        k = min(k_aux, n_dead, self.whole_d_sae)
        h = hidden_pre.reshape(-1, self.cfg.d_sae)
        f_dead = self.activation_function(h * dead_latents.to(h.dtype), self.gating_norm(), k, update_state=False)
        residual_hat = self.reduce_features(f_dead @ self.W_O)
        return (residual.reshape(h.shape[0], -1) - residual_hat).pow(2).sum(-1).mean()

    # ---------------------------------------------------------------- splicing whole contexts

    def splice(self, positions: Tensor, batch: Batch) -> dict[str, Replacement]:
        """Reconstruct every context whole from the clean activations of `batch` (B, S, width) (attention reads
        all earlier positions, BOS included), then patch the reconstruction in at `positions`."""
        inputs = {hook: batch[hook].to(self.device, self.cfg.dtype) for hook in self.cfg.hook_points if hook in batch}
        reconstruction = self.reconstruct(inputs)[self.cfg.hook_point_out]
        return {self.cfg.hook_point_out: _patch(positions, reconstruction[positions.to(reconstruction.device)])}

    def splice_each(self, positions: Tensor, batch: Batch) -> list[dict[str, Replacement]]:
        return [self.splice(positions, batch)]

    # ---------------------------------------------------------------- folding

    @torch.no_grad()
    def fold_activation_scale(self) -> None:
        """Raw input -> raw-scale reconstruction: W_Q, W_K, W_V *= c_in; W_O, b_D /= c_out. Pre-activations and
        feature activations keep their normalised scale; gated scores h * n scale by 1 / c_out, so thresholds do
        too (ungated ones are unchanged)."""
        self._check_foldable()
        c_in = self.dataset_scale(self.cfg.hook_point_in)
        c_out = self.dataset_scale(self.cfg.hook_point_out)
        for weight in (self.W_Q, self.W_K, self.W_V):
            weight.mul_(c_in)
        self.W_O.div_(c_out)
        if self.b_D is not None:
            self.b_D.div_(c_out)
        if self.gating_norm() is not None:
            self.activation_function.fold_(c_out)
        self.cfg = self.cfg.model_copy(deep=True, update={"norm_activation": "inference"})


def _low_rank_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD of left @ right ((D, r) @ (r, D), rank <= r) through QR: left = Q_l R_l, right^T = Q_r R_r, so the
    product is Q_l (R_l R_r^T) Q_r^T and only the r x r core is decomposed."""
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    U, S, Vh = torch.linalg.svd(r_left @ r_right.T)
    return q_left @ U, S, Vh @ q_right.T
