"""One attention layer of a host language model as plain per-head tensors, read through either backend: what a Lorsa
is initialised from (`LowRankSparseAttention.init_qk_from_host`, `init_ov_with_active_subspace`,
`init_ov_from_host_svd`).

Both backends run the transformers weights as they are (the TransformerLens bridge wraps the same modules, without
folding), so the tensors are read from the transformers attention module of the layer in either case. The weights
are expressed for the Lorsa's input hook: `ln1.hook_normalized` is the norm's input before its weight, so the norm's
weight (and a LayerNorm's bias) is folded into W_Q, W_K, W_V (and the biases); `ln1.hook_out` is what the attention
reads, so nothing is folded.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lm_saes_core.backend.base import LanguageModel
from lm_saes_core.backend.huggingface import LAYOUTS, HuggingFaceLanguageModel, _Layout
from lm_saes_core.config import ConfigError

INPUT_HOOKS = ("ln1.hook_normalized", "ln1.hook_out")
"""Where a Lorsa built from a host layer may read that layer's attention input."""


@dataclass(frozen=True)
class HostAttention:
    """Attention layer `layer` of a host model, per query head (grouped key/value heads repeated to every query head
    that reads them), for inputs at `input_hook`:

        q_h = rope(norm_q(x W_Q[h] + b_Q[h]))    k_h = rope(norm_k(x W_K[h] + b_K[h]))    v_h = x W_V[h] + b_V[h]
        out = sum_h softmax(q_h k_h^T * scaling + causal) v_h W_O[h] + b_O
    """

    layer: int
    input_hook: str
    W_Q: Tensor  # (n_heads, D, d_head)
    W_K: Tensor  # (n_heads, D, d_head)
    W_V: Tensor  # (n_heads, D, d_head)
    W_O: Tensor  # (n_heads, d_head, D)
    b_Q: Tensor | None  # (n_heads, d_head)
    b_K: Tensor | None
    b_V: Tensor | None
    b_O: Tensor | None  # (D,)
    q_norm: Tensor | None  # (d_head,) QK-norm weights (Qwen3), shared by the heads
    k_norm: Tensor | None
    qk_norm_eps: float | None
    inv_freq: Tensor | None  # (rotary_dim / 2,) RoPE frequencies; None: no rotary embedding
    rope: dict
    """The rotary settings as LorsaConfig fields (empty without RoPE)."""
    scaling: float
    n_kv_heads: int

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[0]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[2]

    @property
    def d_model(self) -> int:
        return self.W_Q.shape[1]

    def lorsa_fields(self) -> dict:
        """The LorsaConfig fields that make a Lorsa's QK circuit the host's: heads, RoPE, scale, QK-norm."""
        fields = {
            "n_qk_heads": self.n_heads,
            "d_qk_head": self.d_head,
            "attn_scale": 1 / self.scaling,
            "use_post_qk_ln": self.q_norm is not None,
            "positional_embedding_type": "rotary" if self.inv_freq is not None else "none",
        }
        if self.q_norm is not None:
            fields |= {"normalization_type": "RMS", "eps": self.qk_norm_eps}
        return fields | self.rope


def host_attention(model: LanguageModel, layer: int, input_hook: str = "ln1.hook_normalized") -> HostAttention:
    """Attention layer `layer` of `model` (HuggingFace or TransformerLens backend) as read from `input_hook`."""
    from lm_saes_core.backend.transformer_lens import TransformerLensLanguageModel

    if isinstance(model, HuggingFaceLanguageModel):
        hf_model, layout = model.model, model.layout
    elif isinstance(model, TransformerLensLanguageModel):
        hf_model = model.bridge.original_model
        layout = LAYOUTS.get(hf_model.config.model_type)
    else:
        raise TypeError(f"cannot read attention weights from a {type(model).__name__}")
    if layout is None or layout.attn != "self_attn":
        raise ConfigError(
            f"reading attention weights needs a Llama-style layer layout (q_proj/k_proj/v_proj/o_proj), which "
            f"model_type {hf_model.config.model_type!r} does not have; supported: "
            f"{sorted(k for k, v in LAYOUTS.items() if v.attn == 'self_attn')}"
        )
    return attention_of_layer(hf_model, layout, layer, input_hook)


def attention_of_layer(hf_model: nn.Module, layout: _Layout, layer: int, input_hook: str) -> HostAttention:
    """Layer `layer` of a transformers causal LM with a Llama-style layout."""
    suffix = input_hook.split(".", 2)[-1] if input_hook.startswith("blocks.") else input_hook
    if suffix not in INPUT_HOOKS:
        raise ConfigError(
            f"a Lorsa built from a host attention layer reads its input at one of {list(INPUT_HOOKS)} of that "
            f"layer, not {input_hook!r}"
        )
    layers = hf_model.get_submodule(layout.layers)
    if not 0 <= layer < len(layers):
        raise ConfigError(f"model_layer {layer} is out of range: the host model has {len(layers)} layers")
    block = layers[layer]
    attn, norm = block.get_submodule(layout.attn), block.get_submodule(layout.ln1)
    config = hf_model.config.get_text_config()
    if getattr(attn, "sliding_window", None):
        raise ConfigError(f"layer {layer} uses sliding-window attention, which a Lorsa does not model")
    n_heads, n_kv, d_head = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
    D = config.hidden_size
    repeat = n_heads // n_kv  # query head h reads key/value head h // repeat

    def heads(linear: nn.Linear, count: int) -> tuple[Tensor, Tensor | None]:
        weight = linear.weight.detach().double().reshape(count, d_head, D).transpose(1, 2)  # (count, D, d_head)
        bias = linear.bias.detach().double().reshape(count, d_head) if linear.bias is not None else None
        return weight, bias

    W_Q, b_Q = heads(attn.q_proj, n_heads)
    W_K, b_K = heads(attn.k_proj, n_kv)
    W_V, b_V = heads(attn.v_proj, n_kv)
    W_K, W_V = W_K.repeat_interleave(repeat, 0), W_V.repeat_interleave(repeat, 0)
    b_K = b_K.repeat_interleave(repeat, 0) if b_K is not None else None
    b_V = b_V.repeat_interleave(repeat, 0) if b_V is not None else None
    W_O = attn.o_proj.weight.detach().double().reshape(D, n_heads, d_head).permute(1, 2, 0)  # (n_heads, d_head, D)
    b_O = attn.o_proj.bias.detach().double() if attn.o_proj.bias is not None else None

    if suffix == "ln1.hook_normalized":  # the input is the norm's before its weight (and bias): fold them in
        gamma = norm.weight.detach().double()
        beta = norm.bias.detach().double() if getattr(norm, "bias", None) is not None else None

        def fold(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
            if beta is not None:
                shift = torch.einsum("d,hde->he", beta, weight)
                bias = shift if bias is None else bias + shift
            return gamma[None, :, None] * weight, bias

        (W_Q, b_Q), (W_K, b_K), (W_V, b_V) = fold(W_Q, b_Q), fold(W_K, b_K), fold(W_V, b_V)

    q_norm = k_norm = eps = None
    if hasattr(attn, "q_norm"):
        q_norm, k_norm = attn.q_norm.weight.detach().double(), attn.k_norm.weight.detach().double()
        eps = float(getattr(attn.q_norm, "variance_epsilon", getattr(attn.q_norm, "eps", 1e-6)))
    inv_freq, rope = _rope(hf_model, config)
    return HostAttention(
        layer=layer,
        input_hook=input_hook,
        W_Q=W_Q,
        W_K=W_K,
        W_V=W_V,
        W_O=W_O,
        b_Q=b_Q,
        b_K=b_K,
        b_V=b_V,
        b_O=b_O,
        q_norm=q_norm,
        k_norm=k_norm,
        qk_norm_eps=eps,
        inv_freq=inv_freq,
        rope=rope,
        scaling=float(attn.scaling),
        n_kv_heads=n_kv,
    )


def _rope(hf_model: nn.Module, config) -> tuple[Tensor | None, dict]:
    """The host's RoPE frequencies (as its forward uses them) and the LorsaConfig fields that reproduce them:
    transformers rotates the halves of each head (GPT-NeoX pairing)."""
    rotary = getattr(hf_model.base_model, "rotary_emb", None)
    if rotary is None:
        return None, {}
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise ConfigError("the host's RoPE scales attention (YaRN-style attention_scaling); a Lorsa does not model it")
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    if not parameters:  # transformers < 5
        parameters = {"rope_theta": config.rope_theta, **(getattr(config, "rope_scaling", None) or {})}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    inv_freq = rotary.inv_freq.detach().double()
    fields = {
        "rotary_dim": 2 * inv_freq.shape[0],
        "rotary_base": float(parameters["rope_theta"]),
        "rotary_adjacent_pairs": False,
    }
    if rope_type == "llama3":
        fields |= {
            "use_NTK_by_parts_rope": True,
            "NTK_by_parts_factor": float(parameters["factor"]),
            "NTK_by_parts_low_freq_factor": float(parameters["low_freq_factor"]),
            "NTK_by_parts_high_freq_factor": float(parameters["high_freq_factor"]),
            "old_context_len": int(parameters["original_max_position_embeddings"]),
        }
    elif rope_type != "default":
        raise ConfigError(f"the host's RoPE type {rope_type!r} is not one a Lorsa models ('default', 'llama3')")
    return inv_freq, fields
