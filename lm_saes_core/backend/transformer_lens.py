"""TransformerLens 4 backend: a `TransformerBridge` around the transformers model, for every architecture the
bridge supports and for its full set of hook points (attention patterns, per-head values, MLP internals).

The bridge forces eager attention (so attention-pattern hooks can fire), which is slower than the HuggingFace
backend's sdpa and differs from it by float rounding only.
"""

from collections.abc import Callable, Sequence
from functools import partial

import torch

from lm_saes_core.backend.base import (
    ActivationCollector,
    LanguageModel,
    LanguageModelConfig,
    Replacement,
    Unembedding,
)
from lm_saes_core.backend.huggingface import config_max_context, first_tensor


class TransformerLensLanguageModel(LanguageModel):
    """A transformers causal LM wrapped in a TransformerLens `TransformerBridge` (raw HF weights, no folding)."""

    def __init__(self, cfg: LanguageModelConfig):
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lm_saes_core.backend.registry import resolve_model_dir

        self.cfg = cfg
        path = resolve_model_dir(cfg)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=cfg.dtype).to(cfg.device).eval()
        self.bridge = TransformerBridge.boot_transformers(
            str(path),
            hf_model=hf_model,
            tokenizer=AutoTokenizer.from_pretrained(path),
            device=cfg.device,
            dtype=cfg.dtype,
        )
        self.bridge.eval()
        self.tokenizer = self.bridge.tokenizer
        # hook_mlp_in is off by default in the bridge; it is cheap (a copy of resid_mid) and the HF backend has it.
        self.bridge.set_use_hook_mlp_in(True)
        # The other gated hooks (split q/k/v inputs, per-head results) would change the computation; leave them out.
        self._hook_points = [name for name in self.bridge.hook_dict if self.bridge._gated_hook_reason(name) is None]
        self._hook_dims: dict[str, int] = {}

    @property
    def hook_points(self) -> list[str]:
        return list(self._hook_points)

    @property
    def d_model(self) -> int:
        return self.bridge.cfg.d_model

    @property
    def n_layers(self) -> int:
        return self.bridge.cfg.n_layers

    @property
    def max_context(self) -> int:
        return config_max_context(self.bridge.original_model.config)

    def unembedding(self) -> Unembedding:
        norm, unembed = self.bridge.ln_final, self.bridge.unembed
        weight = norm.original_component.weight
        bias = getattr(norm.original_component, "bias", None)
        return Unembedding(
            W_U=unembed.W_U,
            b_U=getattr(unembed.original_component, "bias", None),
            norm_weight=1.0 + weight if norm.uses_weight_offset else weight,
            norm_bias=None if norm.uses_rms_norm else bias,
            norm_centres=not norm.uses_rms_norm,
        )

    def hook_dim(self, hook_point: str) -> int:
        """Measured once per hook with a one-token forward: the bridge's hooks have many shapes (heads, MLP)."""
        if hook_point not in self._hook_dims:
            token = torch.tensor([[self.bos_token_id or 0]])
            activation = self.activations(token, torch.ones_like(token), [hook_point])[hook_point]
            self._hook_dims[hook_point] = activation.shape[-1]
        return self._hook_dims[hook_point]

    def activations(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, hook_points: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        self.validate_hook_points(hook_points)
        collector = ActivationCollector(hook_points, self.cfg.dtype)
        device = self.bridge.cfg.device
        forward = partial(self.bridge, tokens.to(device), attention_mask=attention_mask.to(device), return_type=None)

        def hook_for(name: str) -> Callable[..., None]:
            def capture(value: torch.Tensor, hook: object) -> None:
                collector.store(name, first_tensor(value))

            return capture

        # bridge.hooks removes its hooks on exit, also when the collector's stop exception passes through.
        # no_grad, not inference_mode: inference tensors could not be saved for backward by a trained SAE.
        with torch.no_grad(), self.bridge.hooks(fwd_hooks=[(n, hook_for(n)) for n in dict.fromkeys(hook_points)]):
            return collector.run(forward)

    def logits_with_replacements(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        replacements: dict[str, Replacement] | None = None,
    ) -> torch.Tensor:
        replacements = replacements or {}
        self.check_replacements(replacements, [], "transformer_lens")
        device = self.bridge.cfg.device

        def hook_for(replace: Replacement) -> Callable[..., torch.Tensor]:
            def swap(value: torch.Tensor, hook: object) -> torch.Tensor:
                return replace(value).to(value.dtype)  # a hook's return value replaces the activation

            return swap

        fwd_hooks = [(name, hook_for(replace)) for name, replace in replacements.items()]
        with torch.no_grad(), self.bridge.hooks(fwd_hooks=fwd_hooks):
            return self.bridge(tokens.to(device), attention_mask=attention_mask.to(device), return_type="logits")
