"""`SparseDictionary`: what every kind of sparse dictionary provides, so the initializer, trainer, evaluator,
analyzer and runners work with any of them without knowing which.

A kind is one subclass with a `config_class` (whose `sae_type` default names it); defining the subclass registers
it, so `SparseDictionary.from_config` / `from_pretrained` build the kind a config or a saved directory names.

The contract, on normalised activations (multiply raw activations by the scale factors of `prepare`):
- `prepare(batch)` -> the input and label the kind consumes, and their scale factors;
- `encode(x)` -> feature activations (..., *feature_shape); `decode(f)` -> reconstruction;
- `encode_and_reconstruct(x)` -> (f, h, reconstruction), the training forward pass (`forward` returns the last);
- `compute_loss(batch, coefficients, dead_latents)` -> `LossOutput` with named terms;
- `reconstruct(batch)` -> {output hook: raw-scale reconstruction}; `splice(positions)` -> the replacements that put
  those reconstructions into a language model's forward pass;
- `decoder_norm()` per feature, `output_directions()` for logit attribution (kinds that have one direction per
  feature), `fold_activation_scale()`, `save_pretrained` / `from_pretrained`.
Inputs are one row per token (`granularity = "tokens"`, shuffled 1-D activations) unless a kind consumes whole
contexts (`"contexts"`, e.g. attention replacements). A kind with one input and one output hook reads (N, width)
rows; with several, the hooks are stacked on dim -2: (N, n_hooks, width).
"""

import copy
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lm_saes_core.config import ConfigError, format_validation_error
from lm_saes_core.io import atomic_path, atomic_write_text, read_json_object
from lm_saes_core.models.activation_functions import ActivationFunction, build_activation_function
from lm_saes_core.models.config import SparseDictionaryConfig
from lm_saes_core.models.losses import LossCoefficients, LossConfig, LossOutput

if TYPE_CHECKING:
    from lm_saes_core.models.feature_parallel import FeatureShards

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "config.json"
SHARDED_DIR = "sharded"
"""A model-parallel run's checkpoint keeps its tensors here (torch.distributed.checkpoint), not in WEIGHTS_FILE."""
Batch = Mapping[str, Tensor]
Replacement = Any  # lm_saes_core.backend.base.Replacement: a function of the activation, or an Observer

DICTIONARY_KINDS: dict[str, type["SparseDictionary"]] = {}
"""sae_type -> the class of that kind (filled by defining the subclass)."""


class Prepared(NamedTuple):
    """A batch as a dictionary consumes it: normalised input and label, and the factors that normalised them
    (input = raw input * input_scale, label = raw label * label_scale; broadcastable)."""

    input: Tensor
    label: Tensor
    input_scale: Tensor
    label_scale: Tensor


class NoOutputDirectionsError(ValueError):
    """The kind has no single output direction per feature (so no direct logit attribution)."""


class SparseDictionary(nn.Module):
    config_class: ClassVar[type[SparseDictionaryConfig]]
    granularity: ClassVar[Literal["tokens", "contexts"]] = "tokens"
    """What one input row is: a token (the trainer may shuffle them) or a whole context (B, S, width)."""
    legacy_tensor_names: ClassVar[dict[str, str]] = {}
    """Tensor names of files saved by earlier versions -> today's names (applied when loading)."""
    splices_causally: ClassVar[bool] = False
    """Each output depends only on inputs that fire no later than it in the forward pass (see `splice`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config_class = cls.__dict__.get("config_class")
        if config_class is not None:
            DICTIONARY_KINDS[config_class.model_fields["sae_type"].default] = cls

    def __init__(self, cfg: SparseDictionaryConfig):
        super().__init__()
        # A private copy: folding or setting norms on this model must not change another model's config.
        self.cfg = cfg.model_copy(deep=True)
        self.activation_function: ActivationFunction = build_activation_function(
            cfg.act_fn, self.feature_shape, cfg.jumprelu_threshold_window, cfg.device, cfg.dtype
        )
        self._current_k = cfg.top_k

    # ------------------------------------------------------------------------------ building

    @classmethod
    def kind(cls, sae_type: str, source: str = "config") -> type["SparseDictionary"]:
        if sae_type not in DICTIONARY_KINDS:
            raise ConfigError(
                f"{source}: unknown sae_type {sae_type!r}; known dictionary types: {sorted(DICTIONARY_KINDS)}"
            )
        return DICTIONARY_KINDS[sae_type]

    @classmethod
    def from_config(cls, cfg: SparseDictionaryConfig) -> "SparseDictionary":
        """A freshly initialised dictionary of the kind `cfg.sae_type` names (when called on the base class)."""
        kind = cls.kind(cfg.sae_type) if cls is SparseDictionary else cls
        model = kind(cfg)
        model.init_parameters()
        return model

    def init_parameters(self, **kwargs: float) -> None:
        """Random weights (kinds take `encoder_uniform_bound` / `decoder_uniform_bound` where they apply) and the
        activation function's initial state (`init_log_jumprelu_threshold_value`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ feature parallelism

    feature_shards: "FeatureShards | None" = None
    """Set on one shard of a feature-parallel dictionary (`feature_parallel.shard_model`): its place on the mesh."""
    whole_cfg: SparseDictionaryConfig | None = None
    """A shard's: the config of the whole dictionary (`cfg` is the shard's, d_sae / shards features)."""

    def feature_axes(self) -> dict[str, int]:
        """The feature (d_sae) axis of every state tensor that has one, by state-dict name; the others are
        replicated on every shard. A kind that cannot be split by features says so here."""
        from lm_saes_core.models.feature_parallel import feature_parallel_problem

        raise ConfigError(f"model_parallel_size > 1: {feature_parallel_problem(self.cfg, 2)}")

    def feature_blocks(self, name: str | None = None) -> tuple[int, ...] | None:
        """How a shard holds the feature axis of state tensor `name` (None: the features themselves, as per-feature
        vectors and the analysis number them): None, one slice; else the widths of this dictionary's blocks of it, a
        shard's being its slice of each of the whole's blocks (a MOLT's ranks, which every shard shares)."""
        return None

    @property
    def whole_d_sae(self) -> int:
        """d_sae of the whole dictionary (a shard's `cfg.d_sae` is its part)."""
        return (self.whole_cfg or self.cfg).d_sae

    def whole_count(self, flags: Tensor) -> int:
        """How many of `flags` (per feature) are set in the whole dictionary: summed over the shards of a sharded
        one, so that every shard takes the same path after it."""
        count = flags.sum()
        return int(count if self.feature_shards is None else self.feature_shards.sum(count))

    def reduce_features(self, partial: Tensor) -> Tensor:
        """The features' contribution to the output: a shard's partial sum summed over the shards (as is, alone)."""
        return partial if self.feature_shards is None else self.feature_shards.reduce_partial(partial)

    # ------------------------------------------------------------------------------ sizes and state

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return (self.cfg.d_sae,)

    @property
    def n_features(self) -> int:
        return math.prod(self.feature_shape)

    @property
    def n_analysed_features(self) -> int:
        """Features as the analysis sees them (`encode_batch`'s last dim): n_features unless a kind merges some (a
        crosscoder's feature is the largest of its heads)."""
        return self.n_features

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def current_k(self) -> int:
        return self._current_k

    @current_k.setter
    def current_k(self, k: int) -> None:
        if self.activation_function.spans_groups:  # k counts features of every group (layer) together
            if not 0 < k <= self.n_features:
                raise ValueError(f"current_k must lie in [1, n_features={self.n_features}], got {k}")
        elif not 0 < k <= self.whole_d_sae:
            raise ValueError(f"current_k must lie in [1, d_sae={self.whole_d_sae}], got {k}")
        self._current_k = int(k)

    @property
    def uses_k(self) -> bool:
        """The activation function keeps the k largest scores (k can be annealed)."""
        return self.activation_function.uses_k

    @property
    def batch_kth(self):
        return getattr(self.activation_function, "kth", None)

    @batch_kth.setter
    def batch_kth(self, kth) -> None:
        """A data-parallel group's k-th largest search, for activation functions that rank a whole batch."""
        if hasattr(self.activation_function, "kth"):
            self.activation_function.kth = kth

    def decoder_norm(self) -> Tensor:
        """Per-feature norm of what a unit activation adds to the reconstruction, (*feature_shape)."""
        raise NotImplementedError

    def fixed_norm_scale(self, value: float, force_exact: bool) -> Tensor:
        """(*feature_shape): the factor that gives every feature's decoder norm `value` (exact), or shrinks the
        longer ones to it; what `set_decoder_to_fixed_norm` multiplies each kind's decoder by."""
        norm = self.decoder_norm()
        return value / (norm if force_exact else norm.clamp(min=value))

    @torch.no_grad()
    def init_decoder_bias(self, center: Tensor) -> None:
        """b_D = a centre of the normalised label (its mean or geometric median over a batch; one row per output
        hook for a kind with several, as its b_D holds them)."""
        bias = getattr(self, "b_D", None)
        if bias is None:
            raise ValueError("this dictionary has no decoder bias (use_decoder_bias=False)")
        bias.copy_(center.to(bias.dtype))

    def gating_norm(self) -> Tensor | None:
        """The norms the activation function weighs the pre-activations with (decoder-norm gating), or None."""
        gated = self.cfg.sparsity_include_decoder_norm and self.activation_function.gated
        return self.decoder_norm() if gated else None

    def parameter_groups(self, lr: float, jumprelu_lr_factor: float = 1.0) -> list[dict[str, Any]]:
        """Optimiser groups: learned thresholds learn at `jumprelu_lr_factor * lr`."""
        thresholds = self.activation_function.threshold_parameters()
        groups = [{"name": "others", "params": self.clipped_parameters(), "lr": lr}]
        if thresholds:
            groups.append({"name": "jumprelu", "params": thresholds, "lr": lr * jumprelu_lr_factor})
        return groups

    def clipped_parameters(self) -> list[nn.Parameter]:
        """Every parameter but the learned thresholds (whose pseudo-gradients gradient clipping leaves alone)."""
        thresholds = {id(p) for p in self.activation_function.threshold_parameters()}
        return [p for p in self.parameters() if id(p) not in thresholds]

    def encoder_norm(self) -> Tensor | None:
        """Per feature, the norm of the weights that read it (None for a kind without one such vector)."""
        return None

    def norm_statistics(self) -> dict[str, float]:
        """Mean encoder and decoder norms per feature, and the decoder bias's norm (the mean over a kind's heads or
        layers when it has one bias each)."""
        stats = {}
        encoder = self.encoder_norm()
        if encoder is not None:
            stats["metrics/encoder_norm"] = encoder.mean().item()
        stats["metrics/decoder_norm"] = self.decoder_norm().mean().item()
        bias = getattr(self, "b_D", None)
        if bias is not None:
            biases = list(bias) if isinstance(bias, nn.ParameterList) else [bias]
            stats["metrics/decoder_bias_norm"] = torch.stack([b.norm(dim=-1).mean() for b in biases]).mean().item()
        return stats

    @torch.no_grad()
    def log_statistics(self) -> dict[str, float]:
        return self.norm_statistics() | self.activation_function.statistics(self.current_k)

    # ------------------------------------------------------------------------------ metrics per group

    @property
    def metric_groups(self) -> list[str]:
        """The groups (output hooks; a kind's heads or layers) that get metrics of their own: their stacked outputs
        are dim -2 of label and reconstruction, and when `feature_shape` has one leading entry per group, the
        features of group g are `feature_acts[:, g]`. [] for a kind with one output."""
        return list(self.cfg.hooks_out) if len(self.cfg.hooks_out) > 1 else []

    def group_metric_key(self, group: int, metric: str) -> str:
        """The logged name of `metric` for group `group` (kinds keep the names their users know)."""
        return f"metrics/{self.metric_groups[group]}/{metric}"

    def groups_own_features(self) -> bool:
        return len(self.feature_shape) == 2 and self.feature_shape[0] == len(self.metric_groups)

    @torch.no_grad()
    def group_statistics(
        self,
        label: Tensor,
        reconstructed: Tensor,
        feature_acts: Tensor,
        token_errors: tuple[Tensor, Tensor] | None = None,
        active_counts: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """One step's metrics per group, as device tensors (no host sync), over N normalised tokens: explained
        variance (1 - mean squared error / mean squared deviation from the batch mean), `l_rec` (the mean squared
        error summed over the width) and, when the groups own features, `l0` (active features of the group per
        token).

        The metric window has computed the inputs of these already: `token_errors`, the squared error and the squared
        deviation from the batch mean per token and group ((N, G) each, as `token_errors` gives them), and
        `active_counts`, the tokens on which each feature is active ((n_features,) float32); given, they replace
        passes over the label and the dense activations, with the same numbers."""
        groups = self.metric_groups
        if not groups:
            return {}
        error, spread = token_errors if token_errors is not None else self.token_errors(label, reconstructed)
        error, spread = error.reshape(-1, len(groups)).mean(0), spread.reshape(-1, len(groups)).mean(0)  # (G,)
        stats = {}
        for g in range(len(groups)):
            stats[self.group_metric_key(g, "explained_variance")] = 1 - error[g] / spread[g]
            stats[self.group_metric_key(g, "l_rec")] = error[g]
        if self.groups_own_features():
            if active_counts is None:
                l0 = self.group_l0(feature_acts)
            else:
                l0 = self.l0_of_counts(active_counts, feature_acts.numel() // self.n_features)
            if self.feature_shards is not None:
                l0 = self.feature_shards.sum(l0)
            for g in range(len(groups)):
                stats[self.group_metric_key(g, "l0")] = l0[g]
        return stats

    def token_errors(self, label: Tensor, reconstructed: Tensor) -> tuple[Tensor, Tensor]:
        """(N, G) each: per token and group, the squared error summed over the width and the squared deviation from
        the batch mean, in float32."""
        y = label.reshape(-1, len(self.metric_groups), label.shape[-1]).float()
        error = (reconstructed.reshape(y.shape).float() - y).square().sum(-1)
        return error, (y - y.mean(0)).square().sum(-1)

    def group_l0(self, feature_acts: Tensor) -> Tensor:
        """(G,): the active features of each group per token, when the groups own features."""
        return (feature_acts.reshape(-1, *self.feature_shape) > 0).sum(-1).float().mean(0)

    def l0_of_counts(self, active_counts: Tensor, n_tokens: int) -> Tensor:
        """`group_l0` from the tokens on which each feature is active (n_features,): the same numbers, counts of 0/1
        summed exactly in float32."""
        return active_counts.reshape(self.feature_shape).sum(-1) / n_tokens

    # ------------------------------------------------------------------------------ activation scaling

    def set_dataset_average_activation_norm(self, norms: dict[str, float]) -> None:
        missing = [hook for hook in self.cfg.hook_points if hook not in norms]
        if missing:
            raise KeyError(f"dataset_average_activation_norm lacks hook points {missing}; got {sorted(norms)}")
        bad = {hook: v for hook, v in norms.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"dataset average activation norms must be finite and positive, got {bad}")
        self.cfg.dataset_average_activation_norm = {hook: float(norms[hook]) for hook in self.cfg.hook_points}

    def dataset_scale(self, hook: str) -> float:
        """sqrt(width) / mean token norm of `hook`: the dataset-wise scale factor."""
        norms = self.cfg.dataset_average_activation_norm
        if not norms or hook not in norms:
            raise ValueError(
                f"norm_activation is 'dataset-wise' but dataset_average_activation_norm has no value for {hook!r}; "
                "call set_dataset_average_activation_norm (the initializer does) or load a model that has it"
            )
        return math.sqrt(self._widths()[hook]) / norms[hook]

    def _widths(self) -> dict[str, int]:
        return {hook: width for hook, width, _ in self.cfg.hook_widths()}

    def scale_factor(self, batch: Batch, hook: str) -> Tensor:
        """The factor that normalises the activations of `hook`: 0-d (dataset-wise, inference) or per token."""
        mode = self.cfg.norm_activation
        device = self.device
        if mode == "inference":
            return torch.ones((), dtype=self.cfg.dtype, device=device)
        if mode == "dataset-wise":
            return torch.tensor(self.dataset_scale(hook), dtype=self.cfg.dtype, device=device)
        if hook not in batch:
            raise KeyError(
                f"token-wise scaling needs the activations of {hook!r} (to undo the scaling of the output); "
                f"the batch has {sorted(batch)}"
            )
        # Padding rows may be all zero: clamp so they scale to 0 instead of NaN.
        norm = batch[hook].to(self.cfg.dtype).norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return math.sqrt(self._widths()[hook]) / norm

    stacks_one_hook = False
    """Whether a single hook still gets the hooks' axis (dim -2): a kind whose rows are (hooks, width) whatever
    their number (a crosscoder, whose head ranks may hold one head each)."""

    def _stacked_scale(self, batch: Batch, hooks: list[str], cache: dict[str, Tensor]) -> Tensor:
        for hook in hooks:
            if hook not in cache:
                cache[hook] = self.scale_factor(batch, hook)
        if len(hooks) == 1 and not self.stacks_one_hook:
            return cache[hooks[0]]
        return torch.stack([cache[hook].reshape(cache[hook].shape or (1,)) for hook in hooks], dim=-2)

    def scale_factors(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(c_in, c_out): multiply the input / label by them to get normalised activations; divide to undo."""
        cache: dict[str, Tensor] = {}  # a hook both read and reconstructed is scaled once
        c_in = self._stacked_scale(batch, self.cfg.hooks_in, cache)
        return c_in, self._stacked_scale(batch, self.cfg.hooks_out, cache)

    def _stack(self, batch: Batch, hooks: list[str]) -> Tensor:
        for hook in hooks:
            if hook not in batch:
                raise KeyError(f"the batch has no activations for hook point {hook!r}; it has {sorted(batch)}")
        if len(hooks) == 1 and not self.stacks_one_hook:
            return batch[hooks[0]].to(self.cfg.dtype)
        return torch.stack([batch[hook].to(self.cfg.dtype) for hook in hooks], dim=-2)

    def prepare(self, batch: Batch) -> Prepared:
        """Normalised input and label (shapes as in the batch, hooks stacked on dim -2 when there are several)."""
        for hook in self.cfg.hook_points:
            if hook not in batch:
                raise KeyError(f"the batch has no activations for hook point {hook!r}; it has {sorted(batch)}")
        c_in, c_out = self.scale_factors(batch)
        x = self._stack(batch, self.cfg.hooks_in) * c_in
        y = self._stack(batch, self.cfg.hooks_out) * c_out
        return Prepared(x, y, c_in, c_out)

    def token_rows(self, batch: Batch) -> dict[str, Tensor]:
        """The hook tensors as (N, width) rows of the tokens to use (a 2-D batch's `mask` selects them); a kind
        that consumes whole contexts gets them whole."""
        if self.granularity == "contexts":
            return {hook: batch[hook] for hook in self.cfg.hook_points if hook in batch} | (
                {"mask": batch["mask"]} if "mask" in batch else {}
            )
        mask = batch.get("mask")
        rows = {}
        for hook in self.cfg.hook_points:
            if hook not in batch:
                raise KeyError(f"the batch has no activations for hook point {hook!r}; it has {sorted(batch)}")
            value = batch[hook].reshape(-1, batch[hook].shape[-1])
            rows[hook] = value[mask.reshape(-1).to(torch.bool)] if mask is not None else value
        return rows

    # ------------------------------------------------------------------------------ the math

    def encode(self, x: Tensor, return_hidden_pre: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Feature activations (..., *feature_shape) of normalised input x (and the pre-activations h)."""
        raise NotImplementedError

    def decode(self, feature_acts: Tensor) -> Tensor:
        """Normalised reconstruction from feature activations alone."""
        raise NotImplementedError

    def encode_and_reconstruct(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(f, h, reconstruction) of normalised x: the training forward pass. A kind whose reconstruction needs more
        than the features (a skip connection, input-dependent transforms) or has a faster path overrides it."""
        f, h = self.encode(x, return_hidden_pre=True)
        return f, h, self.decode(f)

    def encode_and_reconstruct_valid(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(f, h, reconstruction) of the `valid` positions (B, S) of whole contexts x (B, S, ...), as rows (N, ...).
        A kind whose activation ranks across positions activates only them (Lorsa)."""
        f, h, y_hat = self.encode_and_reconstruct(x)
        return f[valid], h[valid], y_hat[valid]

    def forward(self, x: Tensor) -> Tensor:
        """Normalised reconstruction of normalised input x."""
        return self.encode_and_reconstruct(x)[2]

    # ------------------------------------------------------------------------------ loss

    def check_loss(self, loss: LossConfig) -> None:
        """Reject loss settings that do not fit this dictionary, naming the field (before any training)."""
        act_fn, activation = self.cfg.act_fn, self.activation_function
        if loss.initial_k is not None:
            if not self.uses_k:
                raise ValueError(f"initial_k={loss.initial_k} applies to topk/batchtopk dictionaries, not {act_fn!r}")
            if not self.cfg.top_k <= loss.initial_k <= self.cfg.d_sae:
                raise ValueError(
                    f"initial_k={loss.initial_k} must lie between top_k ({self.cfg.top_k}) and d_sae ({self.cfg.d_sae})"
                )
        if loss.lp_coefficient > 0 and not hasattr(activation, "pre_activation_loss"):
            raise ValueError(f"lp_coefficient={loss.lp_coefficient} applies to jumprelu dictionaries, not {act_fn!r}")
        if loss.sparsity_loss_type == "l0" and not hasattr(activation, "active_count"):
            raise ValueError(f"sparsity_loss_type 'l0' is for act_fn 'jumprelu', not {act_fn!r}")
        if loss.sparsity_loss_type is None and activation.needs_sparsity_penalty:
            raise ValueError(f"act_fn={act_fn!r} needs a sparsity penalty: set sparsity_loss_type (e.g. 'power')")
        if loss.auxk_coefficient > 0 and type(self).aux_loss is SparseDictionary.aux_loss:
            raise ValueError(f"auxk_coefficient: Aux-K is not available for sae_type {self.cfg.sae_type!r}")

    def compute_loss(
        self, batch: Batch, coefficients: LossCoefficients | None = None, dead_latents: Tensor | None = None
    ) -> LossOutput:
        """Reconstruction (mean over tokens of the squared error summed over the width) plus, as `coefficients`
        ask, the sparsity penalty, JumpReLU's pre-activation (lp) loss and Aux-K on the `dead_latents`."""
        c = coefficients or LossCoefficients()
        if c.k is not None:
            self.current_k = c.k
        rows = self.token_rows(batch)
        x, y, _, _ = self.prepare(rows)
        if self.granularity == "contexts" and "mask" in rows:  # whole contexts in, the valid tokens' terms out
            valid = rows["mask"].to(torch.bool)
            (f, h, y_hat), y = self.encode_and_reconstruct_valid(x, valid), y[valid]
        else:
            f, h, y_hat = self.encode_and_reconstruct(x)
        if y.shape[0] == 0:
            raise ValueError("the batch has no tokens to train on (its mask is all False)")
        terms = {"mse_loss": (y_hat - y).pow(2).sum(-1).mean()}
        if c.penalty is not None:
            terms["sparsity_loss"] = c.l1 * c.penalty(f, h, self)
        if c.lp > 0:
            if not hasattr(self.activation_function, "pre_activation_loss"):
                raise ValueError(f"lp_coefficient is for act_fn 'jumprelu'; this model uses {self.cfg.act_fn!r}")
            terms["lp_loss"] = c.lp * self.activation_function.pre_activation_loss(h, self.decoder_norm())
        if c.auxk > 0:
            if dead_latents is None:
                raise ValueError("auxk_coefficient > 0 needs dead_latents (bool, (n_features,)) from the trainer")
            terms["aux_loss"] = c.auxk * self.aux_loss(x, h, y - y_hat.detach(), dead_latents, c.k_aux)
        if self.feature_shards is not None:  # a shard's penalties are its features' part: log the whole value
            for name in ("sparsity_loss", "lp_loss"):
                if name in terms:
                    terms[name] = terms[name] + (self.feature_shards.sum(terms[name]) - terms[name]).detach()
        loss = terms["mse_loss"]
        for name, term in terms.items():
            if name != "mse_loss":
                loss = loss + term
        return LossOutput(loss, terms, f, h, y_hat, y, n_tokens=int(y.shape[0]))

    def aux_loss(self, x: Tensor, hidden_pre: Tensor, residual: Tensor, dead_latents: Tensor, k_aux: int) -> Tensor:
        """Aux-K: how well the top `k_aux` dead latents reconstruct the residual (mean over tokens)."""
        raise ValueError(f"auxk_coefficient: Aux-K is not available for sae_type {self.cfg.sae_type!r}")

    # ------------------------------------------------------------------------------ raw-scale use

    def outputs_by_hook(self, values: Tensor) -> dict[str, Tensor]:
        """A label-shaped tensor as {output hook: (..., width)}."""
        hooks = self.cfg.hooks_out
        if len(hooks) == 1:
            return {hooks[0]: values}
        return dict(zip(hooks, values.unbind(-2), strict=True))

    def reconstruct(self, batch: Batch | Tensor) -> dict[str, Tensor]:
        """Raw activations of the input hooks (a batch, or a tensor for a one-input kind) -> {output hook: raw-scale
        reconstruction}."""
        if isinstance(batch, Tensor):
            if len(self.cfg.hooks_in) != 1:
                raise ValueError(f"this dictionary reads {self.cfg.hooks_in}: give a batch keyed by hook point")
            batch = {self.cfg.hooks_in[0]: batch}
        c_in, c_out = self.scale_factors(batch)
        return self.outputs_by_hook(self.forward(self._stack(batch, self.cfg.hooks_in) * c_in) / c_out)

    def encode_batch(self, batch: Batch) -> Tensor:
        """Feature activations (..., n_analysed_features) of a batch of raw activations (scaled as the dictionary
        expects)."""
        x = self.prepare(batch).input
        f = self.encode(x)
        return f.flatten(-len(self.feature_shape)) if len(self.feature_shape) > 1 else f

    def splice(self, positions: Tensor, batch: Batch) -> dict[str, Replacement]:
        """Replacements that put the raw-scale reconstruction of every output hook into a language model's forward
        pass on `positions` (B, S) and leave the other positions (BOS, padding, beyond a budget) as computed.

        A kind that `splices_causally` reads its inputs from the spliced pass itself as the pass reaches them
        (inputs that are not outputs through read-only observers), so the errors of earlier replacements reach
        later ones, as in a replacement model; the inputs the pass has not reached yet do not feed that output, so
        they are given as zeros. Any other kind (e.g. one whose features read a later layer) is
        reconstructed from the clean activations of `batch` (B, S, width) first, then patched in everywhere."""
        if not self.splices_causally:
            clean = {hook: batch[hook][positions.to(batch[hook].device)] for hook in self.cfg.hook_points}
            reconstructions = self.reconstruct({h: v.to(self.device, self.cfg.dtype) for h, v in clean.items()})
            return {hook: _patch(positions, reconstructions[hook]) for hook in self.cfg.hooks_out}

        from lm_saes_core.backend.base import Observer

        hooks_in, hooks_out = self.cfg.hooks_in, self.cfg.hooks_out
        seen: dict[str, Tensor] = {}

        widths = self._widths()

        def replace(hook: str):
            def splice_at(activation: Tensor) -> Tensor:
                if hook in hooks_in:  # what later outputs read here: the activation the pass computed
                    seen[hook] = activation
                where = positions.to(activation.device)
                flat = {
                    h: value[where].to(self.device, self.cfg.dtype) for h, value in {**seen, hook: activation}.items()
                }
                n = flat[hook].shape[0]
                for later in hooks_in:  # not reached yet, so (splicing causally) not read by this output: zeros
                    flat.setdefault(later, torch.zeros(n, widths[later], dtype=self.cfg.dtype, device=self.device))
                return _patch(positions, self.reconstruct(flat)[hook])(activation)

            return splice_at

        observers = {
            hook: Observer(lambda activation, hook=hook: seen.__setitem__(hook, activation))
            for hook in hooks_in
            if hook not in hooks_out
        }
        return observers | {hook: replace(hook) for hook in hooks_out}

    def splice_each(self, positions: Tensor, batch: Batch) -> list[dict[str, Replacement]]:
        """One replacement per output hook, each alone (the other hooks keep their activations), reconstructed from
        the clean activations of `batch`: what each layer costs the model by itself, without the compounding of
        `splice`."""
        clean = {hook: batch[hook][positions.to(batch[hook].device)] for hook in self.cfg.hook_points}
        reconstructions = self.reconstruct({h: v.to(self.device, self.cfg.dtype) for h, v in clean.items()})
        return [{hook: _patch(positions, reconstructions[hook])} for hook in self.cfg.hooks_out]

    def output_directions(self) -> Tensor:
        """(n_features, d_model) each feature's direction in the output hook's raw space (direct logit
        attribution); kinds without one direction per feature raise `NoOutputDirectionsError`."""
        raise NoOutputDirectionsError(f"sae_type {self.cfg.sae_type!r} has no single output direction per feature")

    # ------------------------------------------------------------------------------ folding and persistence

    @property
    def can_fold(self) -> bool:
        return type(self).fold_activation_scale is not SparseDictionary.fold_activation_scale

    def fold_activation_scale(self) -> None:
        """Dataset-wise -> inference in place: the model then takes raw activations and gives raw-scale
        reconstructions (the norms stay in the config)."""
        raise NotImplementedError(f"sae_type {self.cfg.sae_type!r} cannot fold its activation scale")

    def _check_foldable(self) -> None:
        if self.cfg.norm_activation != "dataset-wise":
            raise ValueError(f"only a dataset-wise model can be folded; this one is {self.cfg.norm_activation!r}")
        for hook in self.cfg.hook_points:
            self.dataset_scale(hook)  # raises naming the hook when a norm is missing

    def save_pretrained(self, path: str | Path, fold_activation_scale: bool = True) -> Path:
        """Write sae_weights.safetensors, then the config.json that describes exactly those weights.

        A dataset-wise model with known norms is saved folded unless `fold_activation_scale=False` (or the kind
        cannot fold: then it is saved with its norms, which describes it as exactly); the model in memory is left
        as it is."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model = self
        if (
            fold_activation_scale
            and self.cfg.norm_activation == "dataset-wise"
            and self.cfg.dataset_average_activation_norm
        ):
            if self.can_fold:
                model = copy.deepcopy(self)
                model.fold_activation_scale()
            else:
                logger.info("sae_type %r cannot fold its activation scale: saved with its norms", self.cfg.sae_type)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "sae_type": model.cfg.sae_type})
        save_config(model.cfg, path)
        return path

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        fold_activation_scale: bool = False,
        strict_loading: bool = True,
        shards: "FeatureShards | None" = None,
    ) -> "SparseDictionary":
        """The saved dictionary (of the kind its config names, when called on the base class), in eval mode: ready
        for inference, as transformers' `from_pretrained` returns it (BatchTopK applies its learned threshold).
        With `shards`, this process's shard of it, reading only its slices of the feature axes from the file."""
        config_file, weights_file = locate_pretrained(path)
        cfg = read_dictionary_config(config_file, device=device, dtype=dtype, expected=cls)
        if shards is None:
            model = cls.from_config(cfg)
            state = read_weights(weights_file, config_file, model, strict_loading)
        else:
            from lm_saes_core.models.feature_parallel import local_config

            kind = cls.kind(cfg.sae_type) if cls is SparseDictionary else cls
            model = kind(local_config(cfg, shards.size))  # its weights come from the file
            state = read_weights(weights_file, config_file, model, strict_loading, shards)
        model.load_state_dict(state, strict=strict_loading)
        if fold_activation_scale and model.cfg.norm_activation == "dataset-wise":
            if model.can_fold:
                model.fold_activation_scale()
            else:  # it normalises raw inputs itself, so it is used as it is
                logger.info("%s: sae_type %r cannot fold its activation scale; loaded as saved", path, cfg.sae_type)
        if shards is not None:
            from lm_saes_core.models.feature_parallel import attach_shards

            attach_shards(model, shards, cfg.model_copy(update={"norm_activation": model.cfg.norm_activation}))
        return model.eval()


def _patch(positions: Tensor, values: Tensor):
    """A replacement writing `values` (M, width) at the M true `positions` (B, S) of an activation (B, S, width)."""

    def patch(activation: Tensor) -> Tensor:
        patched = activation.clone()
        patched[positions.to(activation.device)] = values.to(activation.device, activation.dtype)
        return patched

    return patch


# -------------------------------------------------------------------------------- files


def locate_pretrained(path: str | Path) -> tuple[Path, Path]:
    """(config.json, weights file) of a saved dictionary: a directory, or a .safetensors file next to config.json.
    The weights of a model-parallel run's checkpoint are its `sharded/` directory (torch.distributed.checkpoint)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        config_file, weights_file = path.parent / CONFIG_FILE, path
    elif path.is_dir():
        config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not weights_file.exists() and (path / SHARDED_DIR / ".metadata").is_file():
            weights_file = path / SHARDED_DIR
    else:
        raise FileNotFoundError(f"no saved sparse dictionary at {path} (expected a directory with {CONFIG_FILE})")
    for file in (config_file, weights_file):
        if not file.exists():
            raise FileNotFoundError(f"{file} is missing; {path} is not a complete saved sparse dictionary")
    return config_file, weights_file


def save_config(cfg: SparseDictionaryConfig, path: str | Path) -> None:
    """Write `path/config.json` describing a dictionary of config `cfg` (its device is the loader's choice)."""
    atomic_write_text(Path(path) / CONFIG_FILE, json.dumps(cfg.model_dump(mode="json", exclude={"device"}), indent=2))


def read_dictionary_config(
    config_file: str | Path,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    expected: type[SparseDictionary] = SparseDictionary,
) -> SparseDictionaryConfig:
    """The validated config of a saved dictionary (config.json, or the directory holding it), of the kind its
    `sae_type` names; `device` / `dtype` override the saved values."""
    config_file = Path(config_file)
    if config_file.is_dir():
        config_file = config_file / CONFIG_FILE
    data = read_json_object(config_file, ConfigError)
    kind = (
        SparseDictionary.kind(str(data.get("sae_type")), str(config_file)) if expected is SparseDictionary else expected
    )
    overrides = {key: value for key, value in (("device", device), ("dtype", dtype)) if value is not None}
    try:
        return kind.config_class.model_validate({**data, **overrides})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(config_file))) from None


def read_weights(
    weights_file: Path, config_file: Path, model: SparseDictionary, strict: bool, shards: "FeatureShards | None" = None
) -> dict[str, Tensor]:
    """The saved tensors (earlier versions' names renamed), after checking that their names and shapes are the
    ones the config describes; with `shards`, `model` is one shard and only its slices are read."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    axes = model.feature_axes() if shards is not None else {}
    for name, axis in axes.items():  # the file holds the whole dictionary
        expected[name] = tuple(n * shards.size if d == axis else n for d, n in enumerate(expected[name]))
    renamed = model.legacy_tensor_names
    sharded = None
    if weights_file.is_dir():  # a model-parallel run's checkpoint: read whole, in one process
        if shards is not None:
            raise ValueError(f"{weights_file.parent} is a sharded training checkpoint: load it in one process")
        from lm_saes_core.training.sharded_checkpoint import read_whole_weights

        sharded = read_whole_weights(weights_file, model)
        stored = {name: tuple(tensor.shape) for name, tensor in sharded.items()}
    else:
        with safe_open(str(weights_file), framework="pt") as handle:
            stored = {renamed.get(n, n): tuple(handle.get_slice(n).get_shape()) for n in handle.keys()}  # noqa: SIM118
    mismatched = [
        f"'{name}' has shape {list(stored[name])} but the config describes {list(shape)}"
        for name, shape in expected.items()
        if name in stored and stored[name] != shape
    ]
    if mismatched:
        raise ValueError(f"{weights_file} does not match {config_file}: " + "; ".join(mismatched))
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if strict and (missing or unexpected):
        raise ValueError(
            f"{weights_file} does not match {config_file}: missing tensors {missing}, unexpected tensors {unexpected}"
        )
    if sharded is not None:
        return {name: tensor for name, tensor in sharded.items() if name in expected}
    if shards is not None:
        from lm_saes_core.models.feature_parallel import read_shard

        with safe_open(str(weights_file), framework="pt", device=str(model.device)) as handle:
            return {renamed.get(n, n): read_shard(handle, n, axes.get(renamed.get(n, n)), shards,
                                                  model.feature_blocks(renamed.get(n, n)))
                    for n in handle.keys() if renamed.get(n, n) in expected}  # noqa: SIM118  # fmt: skip
    tensors = load_file(str(weights_file), device=str(model.device))
    tensors = {renamed.get(name, name): tensor for name, tensor in tensors.items()}
    return {name: tensor for name, tensor in tensors.items() if name in expected}
