"""The sparse autoencoder, or a transcoder when it reads one hook point and reconstructs another.

Math on normalised activations x (see `scale_factors`): h = x @ W_E + b_E, f = act(h * n) / n with n the decoder
row norms (or act(h) without decoder-norm gating), y_hat = f @ W_D + b_D [+ x @ W_skip.T].
TopK/BatchTopK use the sparse kernels of `kernels.py` (decode and weight gradients only over the k selected
features per token) unless `sparse_kernels` says otherwise.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lm_saes_core.config import ConfigError, format_validation_error
from lm_saes_core.io import atomic_path, atomic_write_text, read_json_object
from lm_saes_core.models import activation_functions as act
from lm_saes_core.models import kernels
from lm_saes_core.models.config import SAEConfig

WEIGHTS_FILE = "sae_weights.safetensors"
CONFIG_FILE = "config.json"
SparsityLossType = Literal["power", "tanh", "tanh-quad", "l0"]
Batch = dict[str, Tensor]


@dataclass
class LossOutput:
    """Loss terms of one batch. Tensors are over the N selected (masked-in) tokens, in normalised space."""

    loss: Tensor
    l_rec: Tensor
    l_sparsity: Tensor | None
    l_lp: Tensor | None
    l_aux: Tensor | None
    feature_acts: Tensor  # (N, d_sae)
    hidden_pre: Tensor  # (N, d_sae); detached in the sparse TopK path
    reconstructed: Tensor  # (N, d_out)
    label: Tensor  # (N, d_out)
    n_tokens: int


class SparseAutoEncoder(nn.Module):
    topk_threshold_momentum = 0.99
    """EMA momentum of the BatchTopK inference threshold: averages ~100 batches, settles within a few hundred steps."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        # A private copy: folding or setting norms on this model must not change another model's config.
        self.cfg = cfg.model_copy(deep=True)
        factory = {"device": torch.device(cfg.device), "dtype": cfg.dtype}
        d_in, d_sae, d_out = cfg.d_model, cfg.d_sae, cfg.d_output
        self.W_E = nn.Parameter(torch.empty(d_in, d_sae, **factory))
        self.b_E = nn.Parameter(torch.empty(d_sae, **factory))
        self.W_D = nn.Parameter(torch.empty(d_sae, d_out, **factory))
        self.b_D = nn.Parameter(torch.empty(d_out, **factory)) if cfg.use_decoder_bias else None
        self.W_skip = nn.Parameter(torch.empty(d_out, d_in, **factory)) if cfg.use_skip_connection else None
        if cfg.act_fn == "jumprelu":
            self.log_jumprelu_threshold = nn.Parameter(torch.empty(d_sae, **factory))
        if cfg.act_fn == "batchtopk":
            # 0 means "not estimated yet": the first training batch sets it directly.
            self.register_buffer("topk_threshold", torch.zeros((), **factory))
        self._current_k = cfg.top_k
        self.sparse_kernels: bool | None = None
        """True/False forces the sparse/dense TopK path; None picks sparse when k <= d_sae / 8 (measured break-even
        on CPU is near d_sae / 4)."""
        self.batch_kth: kernels.KthLargest | None = None
        """How training-mode BatchTopK finds its threshold: None within this batch; a data-parallel trainer sets its
        group's search, so the threshold is that of the whole distributed batch and the replicas stay identical."""

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> "SparseAutoEncoder":
        model = cls(cfg)
        model.init_parameters()
        return model

    # ---------------------------------------------------------------- parameters and norms

    def init_parameters(
        self,
        encoder_uniform_bound: float | None = None,
        decoder_uniform_bound: float | None = None,
        init_log_jumprelu_threshold_value: float = math.log(0.1),
    ) -> None:
        """W_E ~ U(+-1/sqrt(d_in)), W_D ~ U(+-1/sqrt(d_sae)) unless given (nn.Linear's fan-in bounds); biases and
        the skip map start at 0."""
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
            if self.cfg.act_fn == "jumprelu":
                self.log_jumprelu_threshold.fill_(init_log_jumprelu_threshold_value)
            if self.cfg.act_fn == "batchtopk":
                self.topk_threshold.zero_()

    @property
    def current_k(self) -> int:
        return self._current_k

    @current_k.setter
    def current_k(self, k: int) -> None:
        if not 0 < k <= self.cfg.d_sae:
            raise ValueError(f"current_k must lie in [1, d_sae={self.cfg.d_sae}], got {k}")
        self._current_k = int(k)

    def decoder_norm(self) -> Tensor:
        return self.W_D.norm(dim=1)

    def encoder_norm(self) -> Tensor:
        return self.W_E.norm(dim=0)

    @torch.no_grad()
    def set_decoder_to_fixed_norm(self, value: float, force_exact: bool) -> None:
        """Exact: every decoder row gets norm `value`; otherwise rows longer than `value` are shrunk to it."""
        norm = self.decoder_norm()
        self.W_D.mul_((value / (norm if force_exact else norm.clamp(min=value)))[:, None])

    @torch.no_grad()
    def init_encoder_with_decoder_transpose(self, factor: float = 1.0) -> None:
        if self.cfg.d_output != self.cfg.d_model:
            raise ValueError(
                f"init_encoder_with_decoder_transpose needs d_out == d_model, got {self.cfg.d_output} and "
                f"{self.cfg.d_model}"
            )
        self.W_E.copy_(factor * self.W_D.t())

    def jumprelu_threshold(self) -> Tensor:
        return self.log_jumprelu_threshold.exp()

    def parameter_groups(self, lr: float, jumprelu_lr_factor: float = 1.0) -> list[dict[str, Any]]:
        """Optimiser groups: the JumpReLU threshold learns at `jumprelu_lr_factor * lr`."""
        others = [p for name, p in self.named_parameters() if name != "log_jumprelu_threshold"]
        groups = [{"name": "others", "params": others, "lr": lr}]
        if self.cfg.act_fn == "jumprelu":
            groups.append({"name": "jumprelu", "params": [self.log_jumprelu_threshold], "lr": lr * jumprelu_lr_factor})
        return groups

    @torch.no_grad()
    def log_statistics(self) -> dict[str, float]:
        stats = {
            "metrics/encoder_norm": self.encoder_norm().mean().item(),
            "metrics/decoder_norm": self.decoder_norm().mean().item(),
        }
        if self.b_D is not None:
            stats["metrics/decoder_bias_norm"] = self.b_D.norm().item()
        if self.cfg.act_fn in ("topk", "batchtopk"):
            stats["sparsity/k"] = float(self.current_k)
        if self.cfg.act_fn == "jumprelu":
            stats["metrics/mean_jumprelu_threshold"] = self.jumprelu_threshold().mean().item()
        return stats

    # ---------------------------------------------------------------- activation scaling

    def set_dataset_average_activation_norm(self, norms: dict[str, float]) -> None:
        missing = [hook for hook in self.cfg.hook_points if hook not in norms]
        if missing:
            raise KeyError(f"dataset_average_activation_norm lacks hook points {missing}; got {sorted(norms)}")
        bad = {hook: v for hook, v in norms.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"dataset average activation norms must be finite and positive, got {bad}")
        self.cfg.dataset_average_activation_norm = {hook: float(norms[hook]) for hook in self.cfg.hook_points}

    def _dataset_scale(self, hook: str, width: int) -> float:
        norms = self.cfg.dataset_average_activation_norm
        if not norms or hook not in norms:
            raise ValueError(
                f"norm_activation is 'dataset-wise' but dataset_average_activation_norm has no value for {hook!r}; "
                "call set_dataset_average_activation_norm (the initializer does) or load a model that has it"
            )
        return math.sqrt(width) / norms[hook]

    def _scale_factor(self, batch: Batch, hook: str, width: int) -> Tensor:
        mode = self.cfg.norm_activation
        if mode == "inference":
            return torch.ones((), dtype=self.cfg.dtype, device=self.W_E.device)
        if mode == "dataset-wise":
            return torch.tensor(self._dataset_scale(hook, width), dtype=self.cfg.dtype, device=self.W_E.device)
        if hook not in batch:
            raise KeyError(
                f"token-wise scaling needs the activations of {hook!r} (to undo the scaling of the output); "
                f"the batch has {sorted(batch)}"
            )
        # Padding rows may be all zero: clamp so they scale to 0 instead of NaN.
        norm = batch[hook].to(self.cfg.dtype).norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return math.sqrt(width) / norm

    def scale_factors(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(c_in, c_out): multiply the input / label by them to get normalised activations; divide to undo."""
        c_in = self._scale_factor(batch, self.cfg.hook_point_in, self.cfg.d_model)
        if not self.cfg.is_transcoder:
            return c_in, c_in
        return c_in, self._scale_factor(batch, self.cfg.hook_point_out, self.cfg.d_output)

    def prepare(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Normalised input and label (shapes as in the batch) and the factors (c_in, c_out) that made them."""
        for hook in self.cfg.hook_points:
            if hook not in batch:
                raise KeyError(f"the batch has no activations for hook point {hook!r}; it has {sorted(batch)}")
        c_in, c_out = self.scale_factors(batch)
        x = batch[self.cfg.hook_point_in].to(self.cfg.dtype) * c_in
        y = batch[self.cfg.hook_point_out].to(self.cfg.dtype) * c_out
        return x, y, c_in, c_out

    # ---------------------------------------------------------------- encode / decode

    def _use_sparse_kernels(self, k: int) -> bool:
        if self.cfg.act_fn not in ("topk", "batchtopk"):
            return False
        return self.sparse_kernels if self.sparse_kernels is not None else k * 8 <= self.cfg.d_sae

    def _scores(self, hidden_pre: Tensor) -> Tensor:
        """What the activation function sees: h * ||W_D,i|| with decoder-norm gating, else h."""
        return hidden_pre * self.decoder_norm() if self.cfg.sparsity_include_decoder_norm else hidden_pre

    def _update_topk_threshold(self, batch_threshold: Tensor) -> None:
        old, m = self.topk_threshold, self.topk_threshold_momentum
        self.topk_threshold.copy_(torch.where(old > 0, m * old + (1 - m) * batch_threshold, batch_threshold))

    def _batch_threshold(self, scores: Tensor, k: int, update_threshold: bool) -> tuple[Tensor, bool]:
        """BatchTopK threshold and whether it is inclusive: the batch's k-th value in training, the EMA in eval."""
        if not self.training:
            return self.topk_threshold, False
        threshold = act.batchtopk_threshold(scores, k, self.batch_kth)
        if update_threshold and scores.shape[0] > 0:
            self._update_topk_threshold(threshold)
        return threshold, True

    def _activate(self, hidden_pre: Tensor, k: int, update_threshold: bool = True) -> Tensor:
        """Dense feature activations (N, d_sae) from pre-activations."""
        if self.cfg.act_fn == "relu":  # relu(h * n) / n == relu(h) for decoder norms n > 0: gating changes nothing
            return act.relu(hidden_pre)
        if self.cfg.act_fn == "jumprelu" and self.cfg.sparsity_include_decoder_norm:
            threshold, window = self.jumprelu_threshold(), self.cfg.jumprelu_threshold_window
            return act.gated_jumprelu(hidden_pre, self.decoder_norm(), threshold, window)
        scores = self._scores(hidden_pre)
        match self.cfg.act_fn:
            case "relu":
                acts = act.relu(scores)
            case "jumprelu":
                acts = act.jumprelu(scores, self.jumprelu_threshold(), self.cfg.jumprelu_threshold_window)
            case "topk":
                acts = act.topk(scores, k)
            case "batchtopk":
                threshold, inclusive = self._batch_threshold(scores.detach(), k, update_threshold)
                acts = act.threshold_activation(scores, threshold, inclusive)
        return acts / self.decoder_norm() if self.cfg.sparsity_include_decoder_norm else acts

    def _select_sparse(
        self, x: Tensor, hidden_pre: Tensor, k: int, latent_mask: Tensor | None = None, update_threshold: bool = True
    ) -> tuple[kernels.Selection, Tensor]:
        """TopK/BatchTopK as a selection and its values (M,): the values equal the dense activations there."""
        keep = None
        with torch.no_grad():
            scores = self._scores(hidden_pre.detach())
            if latent_mask is not None:
                scores = scores * latent_mask
            if self.cfg.act_fn == "topk":
                selection, keep = kernels.select_topk(scores, k)
            elif self.training:
                selection, threshold = kernels.select_batch_topk(scores, k, self.batch_kth)
                if update_threshold and scores.shape[0] > 0:
                    self._update_topk_threshold(threshold)
            else:
                selection = kernels.select_above(scores, self.topk_threshold)
        # relu(h * n) / n == h on kept entries, so the values are the plain pre-activations there.
        values = kernels.gather_preacts(x, self.W_E, self.b_E, hidden_pre, selection)
        return selection, values * keep if keep is not None else values

    def _features(self, x: Tensor) -> tuple[Tensor, Tensor, tuple[kernels.Selection, Tensor] | None]:
        """(f (N, d_sae), h (N, d_sae), sparse (selection, values) or None) for normalised x (N, d_in)."""
        k = self.current_k
        if self._use_sparse_kernels(k):
            with torch.no_grad():
                hidden_pre = torch.addmm(self.b_E, x, self.W_E)
            selection, values = self._select_sparse(x, hidden_pre, k)
            f = kernels.densify(selection, values, x.shape[0], self.cfg.d_sae)
            return f, hidden_pre, (selection, values)
        hidden_pre = torch.addmm(self.b_E, x, self.W_E)
        return self._activate(hidden_pre, k), hidden_pre, None

    def encode(self, x: Tensor, return_hidden_pre: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Feature activations (..., d_sae) of normalised x (..., d_in); in the sparse TopK path h is detached."""
        leading = x.shape[:-1]
        f, h, _ = self._features(x.to(self.cfg.dtype).reshape(-1, self.cfg.d_model))
        f, h = f.reshape(*leading, self.cfg.d_sae), h.reshape(*leading, self.cfg.d_sae)
        return (f, h) if return_hidden_pre else f

    def decode(self, f: Tensor) -> Tensor:
        """f @ W_D + b_D, without the skip term (which needs x; `forward` adds it)."""
        y = f @ self.W_D
        return y + self.b_D if self.b_D is not None else y

    def _reconstruct_normalised(self, x: Tensor, f: Tensor, sparse: tuple[kernels.Selection, Tensor] | None) -> Tensor:
        y = kernels.sparse_decode(*sparse, self.W_D) if sparse is not None else f @ self.W_D
        if self.b_D is not None:
            y = y + self.b_D
        if self.W_skip is not None:
            y = y + x @ self.W_skip.t()
        return y

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction (..., d_out) of normalised x (..., d_in), in normalised space."""
        leading = x.shape[:-1]
        x = x.to(self.cfg.dtype).reshape(-1, self.cfg.d_model)
        f, _, sparse = self._features(x)
        return self._reconstruct_normalised(x, f, sparse).reshape(*leading, self.cfg.d_output)

    def reconstruct(self, batch_or_x: Batch | Tensor) -> Tensor:
        """Raw activations of hook_point_in (a tensor or a batch) -> raw-scale reconstruction of hook_point_out."""
        batch = batch_or_x if isinstance(batch_or_x, dict) else {self.cfg.hook_point_in: batch_or_x}
        c_in, c_out = self.scale_factors(batch)
        return self.forward(batch[self.cfg.hook_point_in].to(self.cfg.dtype) * c_in) / c_out

    # ---------------------------------------------------------------- loss

    def _token_rows(self, batch: Batch) -> Batch:
        """The hook tensors as (N, width) rows of the tokens to use (the 2-D `mask` selects them)."""
        mask = batch.get("mask")
        rows = {}
        for hook in self.cfg.hook_points:
            if hook not in batch:
                raise KeyError(f"the batch has no activations for hook point {hook!r}; it has {sorted(batch)}")
            value = batch[hook].reshape(-1, batch[hook].shape[-1])
            rows[hook] = value[mask.reshape(-1).to(torch.bool)] if mask is not None else value
        return rows

    def compute_loss(
        self,
        batch: Batch,
        *,
        l1_coefficient: float = 0.0,
        sparsity_loss_type: SparsityLossType | None = None,
        tanh_stretch_coefficient: float = 4.0,
        frequency_scale: float = 0.01,
        p: int = 1,
        lp_coefficient: float = 0.0,
        auxk_coefficient: float = 0.0,
        k_aux: int = 512,
        dead_latents: Tensor | None = None,
    ) -> LossOutput:
        """Reconstruction + optional sparsity, JumpReLU pre-activation (lp) and Aux-K losses, means over tokens."""
        x, y, _, _ = self.prepare(self._token_rows(batch))
        if x.shape[0] == 0:
            raise ValueError("the batch has no tokens to train on (its mask is all False)")
        f, h, sparse = self._features(x)
        y_hat = self._reconstruct_normalised(x, f, sparse)
        l_rec = (y_hat - y).pow(2).sum(-1).mean()
        loss = l_rec

        l_sparsity = None
        if sparsity_loss_type is not None:
            # f * n (N, d_sae) is what each feature adds to the reconstruction; formed only where needed.
            if sparsity_loss_type == "power" and p == 1:
                # Every activation function here gives f >= 0, so the L1 norm of f * n is the product f @ n: one
                # pass over (N, d_sae) forward and backward instead of a product, an abs and their gradients.
                l_sparsity = l1_coefficient * (f @ self.decoder_norm()).mean()
            elif sparsity_loss_type == "power":
                l_sparsity = l1_coefficient * (f * self.decoder_norm()).norm(p=p, dim=-1).mean()
            elif sparsity_loss_type == "tanh":
                contribution = f * self.decoder_norm()
                l_sparsity = l1_coefficient * torch.tanh(tanh_stretch_coefficient * contribution).sum(-1).mean()
            elif sparsity_loss_type == "tanh-quad":
                # One penalty per batch on the soft firing frequency p_i: sum_i p_i (1 + p_i / s).
                freq = torch.tanh(tanh_stretch_coefficient * f * self.decoder_norm()).mean(0)
                l_sparsity = l1_coefficient * (freq * (1 + freq / frequency_scale)).sum()
            elif sparsity_loss_type == "l0":
                # JumpReLU's own L0: count the features over threshold; only the threshold gets a gradient.
                if self.cfg.act_fn != "jumprelu":
                    raise ValueError(f"sparsity_loss_type 'l0' is for act_fn 'jumprelu', not {self.cfg.act_fn!r}")
                count = act.step(self._scores(h), self.jumprelu_threshold(), self.cfg.jumprelu_threshold_window)
                l_sparsity = l1_coefficient * count.sum(-1).mean()
            else:
                raise ValueError(f"unknown sparsity_loss_type {sparsity_loss_type!r}; use power, tanh, tanh-quad or l0")
            loss = loss + l_sparsity

        l_lp = None
        if lp_coefficient > 0:
            if self.cfg.act_fn != "jumprelu":
                raise ValueError(f"lp_coefficient is for act_fn 'jumprelu'; this model uses {self.cfg.act_fn!r}")
            below = (self.jumprelu_threshold() - h).relu() * self.decoder_norm()
            l_lp = lp_coefficient * below.sum(-1).mean()
            loss = loss + l_lp

        l_aux = None
        if auxk_coefficient > 0:
            if dead_latents is None:
                raise ValueError("auxk_coefficient > 0 needs dead_latents (bool, (d_sae,)) from the trainer")
            l_aux = auxk_coefficient * self._aux_loss(x, h, y - y_hat.detach(), dead_latents, k_aux)
            loss = loss + l_aux

        return LossOutput(loss, l_rec, l_sparsity, l_lp, l_aux, f, h, y_hat, y, n_tokens=int(x.shape[0]))

    def _aux_loss(self, x: Tensor, hidden_pre: Tensor, residual: Tensor, dead_latents: Tensor, k_aux: int) -> Tensor:
        """Mean over tokens of ||residual - f_dead @ W_D||^2, f_dead = the activation over the top dead latents."""
        n_dead = int(dead_latents.sum())
        if n_dead == 0:
            return residual.new_zeros(())
        k = min(k_aux, n_dead)
        dead = dead_latents.to(hidden_pre.dtype)
        if self._use_sparse_kernels(k):
            selection, values = self._select_sparse(x, hidden_pre, k, latent_mask=dead, update_threshold=False)
            residual_hat = kernels.sparse_decode(selection, values, self.W_D)
        else:
            residual_hat = self._activate(hidden_pre * dead, k, update_threshold=False) @ self.W_D
        return (residual - residual_hat).pow(2).sum(-1).mean()

    # ---------------------------------------------------------------- folding and persistence

    def _folded_state(self) -> tuple[dict[str, Tensor], SAEConfig]:
        """State and config with the dataset-wise scales folded in: raw input -> raw-scale reconstruction.

        Pre-activations scale by 1/c_in; with decoder-norm gating the thresholds compare h * ||W_D,i||, which
        scales by 1/c_out (the rows are multiplied by c_in / c_out), so thresholds divide by c_out there.
        """
        if self.cfg.norm_activation != "dataset-wise":
            raise ValueError(f"only a dataset-wise model can be folded; this one is {self.cfg.norm_activation!r}")
        c_in = self._dataset_scale(self.cfg.hook_point_in, self.cfg.d_model)
        c_out = self._dataset_scale(self.cfg.hook_point_out, self.cfg.d_output)
        threshold_scale = c_out if self.cfg.sparsity_include_decoder_norm else c_in
        state = {name: tensor.detach().clone() for name, tensor in self.state_dict().items()}
        state["b_E"] /= c_in
        state["W_D"] *= c_in / c_out
        if "b_D" in state:
            state["b_D"] /= c_out
        if "W_skip" in state:
            state["W_skip"] *= c_in / c_out
        if "log_jumprelu_threshold" in state:
            state["log_jumprelu_threshold"] -= math.log(threshold_scale)
        if "topk_threshold" in state:
            state["topk_threshold"] /= threshold_scale
        return state, self.cfg.model_copy(deep=True, update={"norm_activation": "inference"})

    def fold_activation_scale(self) -> None:
        """Dataset-wise -> inference in place: the model then takes raw activations (norms stay in the config)."""
        state, cfg = self._folded_state()
        self.load_state_dict(state)
        self.cfg = cfg

    def save_pretrained(self, path: str | Path, fold_activation_scale: bool = True) -> Path:
        """Write sae_weights.safetensors, then the config.json that describes exactly those weights.

        A dataset-wise model with known norms is saved folded unless `fold_activation_scale=False`; the model in
        memory is left as it is.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        can_fold = self.cfg.norm_activation == "dataset-wise" and self.cfg.dataset_average_activation_norm
        state, cfg = self._folded_state() if fold_activation_scale and can_fold else (self.state_dict(), self.cfg)
        tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "sae_type": cfg.sae_type})
        atomic_write_text(path / CONFIG_FILE, json.dumps(cfg.model_dump(mode="json", exclude={"device"}), indent=2))
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
    ) -> "SparseAutoEncoder":
        config_file, weights_file = locate_pretrained(path)
        data = read_config_json(config_file)
        overrides = {key: value for key, value in (("device", device), ("dtype", dtype)) if value is not None}
        try:
            cfg = SAEConfig.model_validate({**data, **overrides})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, str(config_file))) from None
        model = cls.from_config(cfg)
        model.load_state_dict(read_weights(weights_file, config_file, model, strict_loading), strict=strict_loading)
        if fold_activation_scale and model.cfg.norm_activation == "dataset-wise":
            model.fold_activation_scale()
        return model


# -------------------------------------------------------------------- file helpers shared by dictionary types


def locate_pretrained(path: str | Path) -> tuple[Path, Path]:
    """(config.json, weights file) of a saved dictionary: a directory, or a .safetensors file next to config.json."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        config_file, weights_file = path.parent / CONFIG_FILE, path
    elif path.is_dir():
        config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    else:
        raise FileNotFoundError(f"no saved sparse dictionary at {path} (expected a directory with {CONFIG_FILE})")
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing; {path} is not a complete saved sparse dictionary")
    return config_file, weights_file


def read_config_json(config_file: Path) -> dict[str, Any]:
    return read_json_object(config_file, ConfigError)


def read_weights(weights_file: Path, config_file: Path, model: nn.Module, strict: bool) -> dict[str, Tensor]:
    """The saved tensors, after checking that their names and shapes are the ones the config describes."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    with safe_open(str(weights_file), framework="pt") as handle:
        stored = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
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
    device = next(iter(model.state_dict().values())).device
    tensors = load_file(str(weights_file), device=str(device))
    return {name: tensor for name, tensor in tensors.items() if name in expected}
