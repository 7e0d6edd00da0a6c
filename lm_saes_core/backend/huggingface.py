"""Plain-transformers backend: TransformerLens hook names mapped onto torch hooks of the HF decoder layers.

Needs nothing beyond transformers and keeps HF's own attention kernels (sdpa), so it is the fast path for the
architectures whose layer layout it knows. Hook names mean what they mean on a TransformerLens bridge of the same
model (see `_HOOKS`), so activations and dictionaries are interchangeable between the two backends.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lm_saes_core.backend.base import (
    ActivationCollector,
    LanguageModel,
    LanguageModelConfig,
    ModelShape,
    Observer,
    Replacement,
    Unembedding,
)
from lm_saes_core.config import ConfigError


@dataclass(frozen=True)
class _Layout:
    """Where the decoder layers and their parts live in a causal LM of one family."""

    layers: str  # dotted path from the causal LM to the nn.ModuleList of layers
    ln1: str
    attn: str
    ln2: str
    mlp: str
    final_norm: str  # dotted path from the causal LM to the norm before the LM head


_LLAMA = _Layout("model.layers", "input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "model.norm")
_GPT2 = _Layout("transformer.h", "ln_1", "attn", "ln_2", "mlp", "transformer.ln_f")
LAYOUTS: dict[str, _Layout] = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gpt2": _GPT2}

_Read = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _same(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x


def _normalized(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm's input scaled to unit RMS (centred first for LayerNorm), before its weight, as TransformerLens
    defines `ln1.hook_normalized` / `ln2.hook_normalized`; computed in float32 like HF's own RMSNorm."""
    x = x.float()
    if isinstance(norm, nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# hook suffix -> (part of the layer, "in" or "out" of that part, how to read the activation from it)
_HOOKS: dict[str, tuple[str, str, _Read]] = {
    "hook_resid_pre": ("layer", "in", _same),
    "ln1.hook_normalized": ("ln1", "in", _normalized),
    "ln1.hook_out": ("ln1", "out", _same),
    "hook_attn_out": ("attn", "out", _same),
    "hook_resid_mid": ("ln2", "in", _same),
    # TransformerLens' hook_mlp_in is the MLP branch entry before ln2, i.e. a copy of resid_mid.
    "hook_mlp_in": ("ln2", "in", _same),
    "ln2.hook_normalized": ("ln2", "in", _normalized),
    "ln2.hook_out": ("ln2", "out", _same),
    "mlp.hook_in": ("mlp", "in", _same),
    "hook_mlp_out": ("mlp", "out", _same),
    "hook_resid_post": ("layer", "out", _same),
}


def hook_point_names(n_layers: int) -> list[str]:
    """Every hook point this backend offers on a model of `n_layers` decoder layers."""
    return [f"blocks.{layer}.{suffix}" for layer in range(n_layers) for suffix in _HOOKS]


def first_tensor(value: object) -> torch.Tensor:
    """Decoder layers and attention modules return a tensor or a tuple whose first element is the hidden states."""
    return value[0] if isinstance(value, tuple | list) else value  # type: ignore[return-value]


def config_max_context(config: object) -> int:
    """The longest sequence a transformers config admits (`max_position_embeddings`, GPT-2's `n_positions`)."""
    text_config = config.get_text_config()  # type: ignore[attr-defined]
    return getattr(text_config, "max_position_embeddings", None) or text_config.n_positions


def layout_of(model_type: str, cfg: LanguageModelConfig) -> _Layout:
    if model_type not in LAYOUTS:
        raise ConfigError(
            f"backend 'huggingface' does not know the layer layout of model_type {model_type!r} "
            f"(model_name {cfg.model_name!r}); supported: {', '.join(sorted(LAYOUTS))}. "
            "Use backend 'transformer_lens' (or 'auto')."
        )
    return LAYOUTS[model_type]


class ConfigShape(ModelShape):
    """A model of this backend as its config.json describes it: every hook point follows from the number of layers
    and lives in the residual width, so the hooks, widths and context length of a run are checked before any
    weights load."""

    def __init__(self, cfg: LanguageModelConfig, config: object):
        """`config`: the model's transformers `PretrainedConfig`."""
        layout_of(config.model_type, cfg)  # type: ignore[attr-defined]
        text_config = config.get_text_config()  # type: ignore[attr-defined]
        self.cfg = cfg
        self._hook_points = hook_point_names(text_config.num_hidden_layers)
        self.d_model: int = text_config.hidden_size
        self._max_context = config_max_context(config)

    @property
    def hook_points(self) -> list[str]:
        return list(self._hook_points)

    @property
    def max_context(self) -> int:
        return self._max_context

    def hook_dim(self, hook_point: str) -> int:
        self.validate_hook_points([hook_point])
        return self.d_model


class HuggingFaceLanguageModel(LanguageModel):
    """A transformers causal LM (Llama/Mistral/Qwen or GPT-2 layout) read through forward hooks."""

    def __init__(self, cfg: LanguageModelConfig):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from lm_saes_core.backend.registry import resolve_model_dir

        self.cfg = cfg
        path = resolve_model_dir(cfg)
        self.layout = layout_of(AutoConfig.from_pretrained(path).model_type, cfg)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=cfg.dtype).to(cfg.device).eval()
        self.layers: nn.ModuleList = self.model.get_submodule(self.layout.layers)
        self._hook_points = hook_point_names(len(self.layers))

    @property
    def hook_points(self) -> list[str]:
        return list(self._hook_points)

    @property
    def d_model(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def max_context(self) -> int:
        return config_max_context(self.model.config)

    def hook_dim(self, hook_point: str) -> int:
        self.validate_hook_points([hook_point])
        return self.d_model  # every hook this backend offers lives in the residual width

    def unembedding(self) -> Unembedding:
        norm = self.model.get_submodule(self.layout.final_norm)
        lm_head = self.model.get_output_embeddings()
        centres = isinstance(norm, nn.LayerNorm)
        return Unembedding(
            W_U=lm_head.weight.T,
            b_U=lm_head.bias,
            norm_weight=norm.weight,
            norm_bias=norm.bias if centres else None,
            norm_centres=centres,
        )

    def _module(self, name: str) -> tuple[nn.Module, str, _Read]:
        """The module whose input ("in") or output ("out") is the activation named `name`, and how to read it."""
        _, layer, suffix = name.split(".", 2)
        part, side, read = _HOOKS[suffix]
        block = self.layers[int(layer)]
        module = block if part == "layer" else block.get_submodule(getattr(self.layout, part))
        return module, side, read

    def _attach(self, name: str, collector: ActivationCollector) -> RemovableHandle:
        """Register the torch hook that hands the activation named `name` to `collector`."""
        module, side, read = self._module(name)
        if side == "in":

            def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                collector.store(name, read(mod, args[0] if args else kwargs["hidden_states"]))

            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def post_hook(mod: nn.Module, args: tuple, output: object) -> None:
            collector.store(name, read(mod, first_tensor(output)))

        return module.register_forward_hook(post_hook)

    def activations(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, hook_points: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        self.validate_hook_points(hook_points)
        collector = ActivationCollector(hook_points, self.cfg.dtype)
        handles: list[RemovableHandle] = []
        device = self.model.device
        # The base model has no LM head: logits are never needed.
        forward = partial(
            self.model.base_model,
            input_ids=tokens.to(device),
            attention_mask=attention_mask.to(device),
            use_cache=False,
        )
        try:
            for name in dict.fromkeys(hook_points):
                handles.append(self._attach(name, collector))
            # no_grad, not inference_mode: inference tensors could not be saved for backward by a trained SAE.
            with torch.no_grad():
                return collector.run(forward)
        finally:
            for handle in handles:
                handle.remove()

    def _attach_replacement(self, name: str, replace: Replacement) -> RemovableHandle:
        """Register the torch hook that swaps the activation named `name` for `replace(activation)`. An observer
        reads the activation as the hook point defines it (`ln*.hook_normalized`: the norm's input normalised), which
        is not always the tensor the hook sits on."""
        module, side, read = self._module(name)
        if isinstance(replace, Observer):
            observer = replace
            replace = Observer(lambda activation: observer.read(read(module, activation)))  # noqa: E731
        if side == "in":

            def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                if args:
                    return (_replaced(replace, args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": _replaced(replace, kwargs["hidden_states"])}

            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def post_hook(mod: nn.Module, args: tuple, output: object) -> object:
            if isinstance(output, tuple | list):
                return type(output)((_replaced(replace, output[0]), *output[1:]))
            return _replaced(replace, output)  # type: ignore[arg-type]

        return module.register_forward_hook(post_hook)

    def logits_with_replacements(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        replacements: dict[str, Replacement] | None = None,
    ) -> torch.Tensor:
        replacements = replacements or {}
        # ln1/ln2.hook_normalized are computed from the norm's input (they are no tensor of the HF forward).
        self.check_replacements(replacements, ["ln1.hook_normalized", "ln2.hook_normalized"], "huggingface")
        device = self.model.device
        handles = []
        try:
            for name, replace in replacements.items():
                handles.append(self._attach_replacement(name, replace))
            with torch.no_grad():
                output = self.model(
                    input_ids=tokens.to(device), attention_mask=attention_mask.to(device), use_cache=False
                )
            return output.logits
        finally:
            for handle in handles:
                handle.remove()


def _replaced(replace: Replacement, activation: torch.Tensor) -> torch.Tensor:
    return replace(activation).to(activation.dtype)
