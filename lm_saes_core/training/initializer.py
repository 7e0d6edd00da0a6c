"""Build a sparse autoencoder ready for training: random weights, dataset-wise norms, data-driven biases and the
grid search of the initial decoder norm.

Every batch the initializer reads is handed back at the front of the returned stream, so initialisation costs no
training data (the reference system silently dropped up to ten batches here).
"""

import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Literal

import torch
from pydantic import Field

from lm_saes_core.config import BaseConfig
from lm_saes_core.models.config import SAEConfig
from lm_saes_core.models.sae import SparseAutoEncoder
from lm_saes_core.training.batches import Batch, to_device, valid_rows

logger = logging.getLogger(__name__)


class InitializerConfig(BaseConfig):
    bias_init_method: Literal["all_zero", "mean", "geometric_median"] = "all_zero"
    """Decoder bias: zero, the mean or the (Weiszfeld) geometric median of the normalised label of one batch."""
    decoder_uniform_bound: float = Field(default=1.0, gt=0)
    encoder_uniform_bound: float = Field(default=1.0, gt=0)
    init_encoder_with_decoder_transpose: bool = True
    init_encoder_with_decoder_transpose_factor: float = Field(default=1.0, gt=0)
    init_log_jumprelu_threshold_value: float | None = None
    """Initial log threshold of JumpReLU dictionaries; None keeps the model's default."""
    grid_search_init_norm: bool = False
    """Choose the decoder row norm (all rows equal) that minimises the reconstruction error of one batch."""
    init_encoder_bias_with_mean_hidden_pre: bool = False
    """Set b_E so the mean pre-activation over one batch is zero."""
    norm_estimation_batches: int = Field(default=8, gt=0)
    """Batches averaged for the dataset-wise mean token norm (dataset-wise normalisation without known norms)."""

    @property
    def needs_batch(self) -> bool:
        return (
            self.bias_init_method != "all_zero"
            or self.grid_search_init_norm
            or self.init_encoder_bias_with_mean_hidden_pre
        )


def estimate_activation_norms(batches: list[Batch], hook_points: list[str]) -> dict[str, float]:
    """Mean L2 norm of the valid tokens of each hook point over `batches`."""
    norms = {}
    for hook in hook_points:
        token_norms = torch.cat([valid_rows(b[hook], b).float().norm(dim=-1) for b in batches])
        norms[hook] = token_norms.mean().item()
    return norms


def geometric_median(points: torch.Tensor, max_iter: int = 200, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of `points`."""
    median = points.mean(dim=0)
    for _ in range(max_iter):
        weights = 1.0 / (points - median).norm(dim=-1).clamp(min=1e-8)
        updated = (weights[:, None] * points).sum(dim=0) / weights.sum()
        converged = (updated - median).norm() <= tol * median.norm().clamp(min=1.0)
        median = updated
        if converged:
            break
    return median


class Initializer:
    def __init__(self, cfg: InitializerConfig):
        self.cfg = cfg
        self.best_decoder_norm: float | None = None  # the grid search's choice, for reporting

    def initialize(self, cfg: SAEConfig, stream: Iterable[Batch]) -> tuple[SparseAutoEncoder, Iterator[Batch]]:
        """Return the initialised model and a stream that still yields every batch, peeked ones first."""
        init = self.cfg
        model = SparseAutoEncoder(cfg)  # holds its own copy of cfg; the norms below go there
        bounds = {
            "encoder_uniform_bound": init.encoder_uniform_bound,
            "decoder_uniform_bound": init.decoder_uniform_bound,
        }
        if init.init_log_jumprelu_threshold_value is not None:
            bounds["init_log_jumprelu_threshold_value"] = init.init_log_jumprelu_threshold_value
        model.init_parameters(**bounds)
        if init.bias_init_method != "all_zero" and not cfg.use_decoder_bias:
            raise ValueError(
                f"bias_init_method={init.bias_init_method!r} needs a decoder bias (use_decoder_bias=False)"
            )

        batches = iter(stream)
        peeked: list[Batch] = []
        known = model.cfg.dataset_average_activation_norm or {}
        if cfg.norm_activation == "dataset-wise" and not all(hook in known for hook in cfg.hook_points):
            peeked = list(itertools.islice(batches, init.norm_estimation_batches))
            if not peeked:
                raise ValueError("the activation stream is empty: cannot estimate dataset-wise activation norms")
            if len(peeked) < init.norm_estimation_batches:
                logger.warning("activation norms estimated from %d batches only (stream ended)", len(peeked))
            norms = estimate_activation_norms(peeked, cfg.hook_points)
            logger.info("dataset-wise activation norms: %s", {k: round(v, 4) for k, v in norms.items()})
            model.set_dataset_average_activation_norm(norms)
        if init.needs_batch and not peeked:
            peeked = list(itertools.islice(batches, 1))
            if not peeked:
                raise ValueError("the activation stream is empty: data-driven initialisation needs one batch")
        if init.needs_batch:
            self._initialize_from_batch(model, to_device(peeked[0], cfg.device))
        else:
            self._reinit_encoder(model, None)
        return model, itertools.chain(peeked, batches)

    @torch.no_grad()
    def _initialize_from_batch(self, model: SparseAutoEncoder, batch: Batch) -> None:
        init = self.cfg
        model.train()
        if init.bias_init_method != "all_zero":
            _, label, _, _ = model.prepare(batch)
            rows = valid_rows(label, batch).float()
            center = rows.mean(dim=0) if init.bias_init_method == "mean" else geometric_median(rows)
            model.b_D.copy_(center.to(model.b_D.dtype))
        self._reinit_encoder(model, batch)
        if init.grid_search_init_norm:
            buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}  # e.g. batchtopk's EMA
            best = self._best_norm(model, batch, torch.linspace(0.1, 5.0, 50).tolist())
            best = self._best_norm(model, batch, torch.linspace(best - 0.09, best + 0.1, 20).tolist())
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
            model.set_decoder_to_fixed_norm(best, force_exact=True)
            self._reinit_encoder(model, batch)
            self.best_decoder_norm = best
            logger.info("grid search: best initial decoder norm %.4f", best)

    def _best_norm(self, model: SparseAutoEncoder, batch: Batch, candidates: list[float]) -> float:
        losses = []
        for norm in candidates:
            model.set_decoder_to_fixed_norm(norm, force_exact=True)
            self._reinit_encoder(model, batch)
            losses.append(model.compute_loss(batch).l_rec.item())
        return candidates[min(range(len(losses)), key=losses.__getitem__)]

    @torch.no_grad()
    def _reinit_encoder(self, model: SparseAutoEncoder, batch: Batch | None) -> None:
        """Encoder = factor * decoder transpose, then (with a batch) b_E = -mean pre-activation, both if enabled."""
        init = self.cfg
        if init.init_encoder_with_decoder_transpose:
            model.init_encoder_with_decoder_transpose(init.init_encoder_with_decoder_transpose_factor)
        if init.init_encoder_bias_with_mean_hidden_pre and batch is not None:
            x, _, _, _ = model.prepare(batch)
            model.b_E.zero_()
            _, hidden_pre = model.encode(x, return_hidden_pre=True)
            model.b_E.copy_(-valid_rows(hidden_pre, batch).float().mean(dim=0).to(model.b_E.dtype))
