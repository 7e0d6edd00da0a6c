"""The language-model contract every backend fulfils: token ids in, activations at named hook points out."""

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lm_saes_core.config import BaseModelConfig, ConfigError

Replacement = Callable[[torch.Tensor], torch.Tensor]


class Observer:
    """A hook function that only reads its activation and returns it unchanged. It may sit on any hook point,
    including those whose activation cannot be replaced (e.g. a transcoder reading hook_resid_mid while spliced)."""

    def __init__(self, read: Callable[[torch.Tensor], None]):
        self.read = read

    def __call__(self, activation: torch.Tensor) -> torch.Tensor:
        self.read(activation)
        return activation


def replaced_hook_points(replacements: dict[str, Replacement]) -> list[str]:
    """The hook points whose activation a replacement set changes (observers excluded)."""
    return [name for name, replace in replacements.items() if not isinstance(replace, Observer)]


"""Receives the activation at a hook point (B, S, D) and returns what the rest of the model sees instead."""


class LanguageModelConfig(BaseModelConfig):
    """Which language model to load and how.

    `model_name` is `smollm2-135m` (the bundled model), a local directory, or a hub name.
    `model_from_pretrained_path` loads weights and tokenizer from that directory instead of resolving the name.
    """

    model_name: str = "smollm2-135m"
    model_from_pretrained_path: str | None = None
    cache_dir: str | None = None
    local_files_only: bool = False
    max_length: int = 2048
    backend: Literal["auto", "huggingface", "transformer_lens"] = "auto"
    prepend_bos: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None


@dataclass(frozen=True)
class Unembedding:
    """The model's path from the residual stream to the logits: final norm, then unembedding (logits = norm(x) W_U
    + b_U). Tensors are the model's own parameters (not copies); read them under no_grad."""

    W_U: torch.Tensor
    """(d_model, d_vocab)"""
    b_U: torch.Tensor | None
    """(d_vocab,), None when the unembedding has no bias."""
    norm_weight: torch.Tensor | None
    """(d_model,) the final norm's elementwise gain as applied (Gemma-style `1 + w` already added); None: no norm."""
    norm_bias: torch.Tensor | None
    """(d_model,) the final LayerNorm's bias; None for RMSNorm."""
    norm_centres: bool
    """LayerNorm subtracts the mean before scaling; RMSNorm does not."""


class UnknownHookPointError(ConfigError):
    """A requested hook point that the model does not have; the message lists the valid names closest to it."""


class UnreplaceableHookPointError(ConfigError):
    """A hook point whose activation a backend can read but cannot faithfully replace."""


def check_replaceable(hook_points: Sequence[str], unsupported_suffixes: Sequence[str], backend: str) -> None:
    """Refuse replacements whose effect would not be what the hook name says."""
    for name in hook_points:
        suffix = name.split(".", 2)[-1]
        if suffix == "hook_resid_mid":
            # Both backends fire hook_resid_mid at the input of ln2, so a new value would reach only the MLP branch
            # while the residual connection keeps the old one.
            raise UnreplaceableHookPointError(
                f"{name!r} cannot be replaced: the new value would reach only the MLP branch, not the residual "
                "stream; replace the hook_mlp_in of that block if the MLP input is what is meant"
            )
        if suffix in unsupported_suffixes:
            raise UnreplaceableHookPointError(
                f"backend {backend!r} cannot replace the activation at {name!r}; use backend 'transformer_lens'"
            )


class _ForwardDone(Exception):
    """Raised from the hook that captures the last requested activation, so the rest of the forward never runs."""


class ActivationCollector:
    """Collects activations by hook name and ends the forward pass as soon as the last requested one arrives.

    Whichever hook completes the set is the deepest one, so this stops after the deepest requested hook without
    the backend knowing the order in which its hooks fire.
    """

    def __init__(self, hook_points: Sequence[str], dtype: torch.dtype):
        self.pending = set(hook_points)
        self.dtype = dtype
        self.values: dict[str, torch.Tensor] = {}

    def store(self, name: str, value: torch.Tensor) -> None:
        self.values[name] = value.detach().to(self.dtype)
        self.pending.discard(name)
        if not self.pending:
            raise _ForwardDone

    def run(self, forward: Callable[[], object]) -> dict[str, torch.Tensor]:
        """Call `forward` (which has this collector's hooks attached) and return the captured activations."""
        if not self.pending:
            return self.values  # nothing requested: no reason to run the model
        try:
            forward()
        except _ForwardDone:
            pass
        if self.pending:
            raise RuntimeError(f"hook points {sorted(self.pending)} never fired during the forward pass")
        return self.values


class ModelShape(ABC):
    """What the checks before a run need of a language model: its hook points, their widths and its longest context.
    A loaded `LanguageModel` is one; `huggingface.ConfigShape` reads them from the model's config, without weights."""

    cfg: LanguageModelConfig

    @property
    @abstractmethod
    def hook_points(self) -> list[str]:
        """Every hook point name this backend can capture."""

    @property
    @abstractmethod
    def max_context(self) -> int:
        """The longest sequence the model accepts (position embeddings / max_position_embeddings)."""

    @abstractmethod
    def hook_dim(self, hook_point: str) -> int:
        """Size of the last dimension of the activation at `hook_point` (d_model for the residual stream)."""

    def validate_hook_points(self, hook_points: Sequence[str]) -> None:
        valid = set(self.hook_points)
        for name in hook_points:
            if name not in valid:
                near = difflib.get_close_matches(name, self.hook_points, n=6, cutoff=0.6)
                hint = f"; closest valid names: {', '.join(near)}" if near else ""
                raise UnknownHookPointError(f"model {self.cfg.model_name!r} has no hook point {name!r}{hint}")


class LanguageModel(ModelShape):
    """A causal language model that returns residual-stream (and other) activations at named hook points.

    Hook names follow TransformerLens conventions (`blocks.6.hook_resid_post`). The forward pass stops at the
    deepest requested hook, so asking for layer 6 of a 30-layer model costs 7 layers.
    """

    tokenizer: "object"  # a transformers PreTrainedTokenizerBase

    @property
    @abstractmethod
    def d_model(self) -> int: ...

    @property
    @abstractmethod
    def n_layers(self) -> int: ...

    @abstractmethod
    def activations(
        self, tokens: torch.Tensor, attention_mask: torch.Tensor, hook_points: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Run the model on `tokens` (B, S) long with `attention_mask` (B, S) and return {hook: (B, S, D)}.

        Runs without gradients, stops after the deepest requested hook, returns tensors in the model's dtype on its
        device. Padding is on the right, so the attention mask only hides trailing pad positions.
        """

    @abstractmethod
    def logits_with_replacements(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        replacements: dict[str, Replacement] | None = None,
    ) -> torch.Tensor:
        """A full forward pass to the unembedding, (B, S) tokens -> (B, S, V) logits, without gradients.

        Each replacement function receives the activation at its hook point (all positions, padding included)
        and returns the tensor the rest of the model sees; its output is cast back to the activation's dtype.
        This is how a dictionary is spliced into the model (evaluation's downstream metrics).
        """

    @abstractmethod
    def unembedding(self) -> Unembedding:
        """The final norm's parameters and the unembedding, for reading directions in vocabulary space (DLA)."""

    # ---- token ids: config overrides win over the tokenizer's own ----
    @property
    def bos_token_id(self) -> int | None:
        return self.cfg.bos_token_id if self.cfg.bos_token_id is not None else self.tokenizer.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.cfg.eos_token_id if self.cfg.eos_token_id is not None else self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        for candidate in (self.cfg.pad_token_id, self.tokenizer.pad_token_id, self.eos_token_id):
            if candidate is not None:
                return candidate
        return 0

    def check_replacements(
        self, replacements: dict[str, Replacement], unsupported: Sequence[str], backend: str
    ) -> None:
        """Replacement hooks must exist, and those that change their activation must be replaceable here."""
        self.validate_hook_points(list(replacements))
        check_replaceable(replaced_hook_points(replacements), unsupported, backend)
