"""Evaluating a sparse dictionary: reconstruction and sparsity statistics over a stream of activations, and the
language model's next-token loss with the dictionary spliced in.

Every statistic is accumulated over all evaluated tokens (sums in float64) and reduced once at the end, so a
result does not depend on how the stream was batched. Spaces:
- `losses/mse_loss` is the training loss: mean over tokens of sum_d (y_hat - y)^2 in the model's normalised space.
- Reconstruction metrics (`explained_variance*`, `l2_norm_error*`) compare the raw activation y with the raw-scale
  reconstruction y_hat / c_out, so token-wise normalisation cannot flatter them.
- Feature statistics (`l0`, `l1`, `mean_feature_act`, frequencies) use the feature activations as `encode` returns
  them; folding a dataset-wise scale into the weights divides them by c_in (L0 and frequencies are unchanged).
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from pydantic import Field

from lm_saes_core.backend.base import LanguageModel, Observer, Replacement
from lm_saes_core.config import BaseConfig
from lm_saes_core.models.sae import SparseAutoEncoder

# sparsity/* keys of the training logs: feature counts with activation frequency above / below a bound.
FREQUENCY_BOUNDS_ABOVE = {"sparsity/above_1e-1": 1e-1, "sparsity/above_1e-2": 1e-2}
FREQUENCY_BOUNDS_BELOW = {"sparsity/below_1e-5": 1e-5, "sparsity/below_1e-6": 1e-6, "sparsity/below_1e-7": 1e-7}


class EvalConfig(BaseConfig):
    total_eval_tokens: int = Field(default=1_000_000, gt=0)
    """Document tokens to evaluate (exactly: the last batch is cut, by mask for 2-D batches)."""
    compute_downstream: bool = True
    """With a language model and 2-D batches: also run the model clean, spliced and zero-ablated."""
    downstream_tokens: int | None = Field(default=None, gt=0)
    """Document tokens of the evaluation that are also spliced into the language model (None: all of them);
    the three extra forward passes per batch dominate the cost of an evaluation with a model."""
    dense_threshold: float = Field(default=0.1, gt=0, le=1)
    """Features active on more than this fraction of tokens count as dense."""
    histogram_bins: int = Field(default=40, gt=0)
    histogram_min_log10: float = Field(default=-8.0, lt=0)
    """Lower edge of the log10 frequency histogram; rarer (but live) features fall in the first bin."""


@dataclass
class FrequencyHistogram:
    bin_edges: torch.Tensor  # (bins + 1,) log10 of the activation frequency
    counts: torch.Tensor  # (bins,) features per bin
    n_dead: int  # features that never fired (log10 0 = -inf lies in no bin)

    def to_json(self) -> dict:
        return {"log10_bin_edges": self.bin_edges.tolist(), "counts": self.counts.tolist(), "n_dead": self.n_dead}


@dataclass
class EvalResult:
    metrics: dict[str, float]
    feature_frequency: torch.Tensor  # (d_sae,) fraction of evaluated tokens on which each feature fired
    frequency_histogram: FrequencyHistogram

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "frequency_histogram": self.frequency_histogram.to_json()}


@dataclass
class _Totals:
    """Float64 sums over evaluated tokens; reduced to metrics once at the end."""

    n_tokens: int = 0
    normalised_sq_error: float = 0.0
    sq_error: float = 0.0
    sum_label: torch.Tensor | None = None  # (d_out,)
    sum_label_sq: float = 0.0
    legacy_explained_variance: float = 0.0
    l2_error: float = 0.0
    l2_label: float = 0.0
    n_active: float = 0.0
    sum_abs_acts: float = 0.0
    sum_acts: float = 0.0
    feature_counts: torch.Tensor | None = None  # (d_sae,)
    # downstream, over predicted positions
    n_predicted: int = 0
    n_spliced: int = 0
    ce: dict[str, float] = field(default_factory=lambda: {"clean": 0.0, "spliced": 0.0, "zero_ablation": 0.0})
    kl: dict[str, float] = field(default_factory=lambda: {"spliced": 0.0, "zero_ablation": 0.0})


def limit_mask(mask: torch.Tensor, budget: int) -> torch.Tensor:
    """The first `budget` true entries of `mask` (row-major), the rest set to false."""
    flat = mask.reshape(-1)
    return (flat & (flat.cumsum(0) <= budget)).reshape(mask.shape)


def splice_replacements(model: SparseAutoEncoder, positions: torch.Tensor) -> dict[str, Replacement]:
    """Replacements that put the dictionary's raw-scale reconstruction at `hook_point_out` on `positions` (B, S)
    and leave every other position (BOS, padding, positions beyond the budget) as the model computed it.

    A transcoder reads its input at `hook_point_in`, which fires earlier in the same forward pass and is unchanged.
    """
    hook_in, hook_out = model.cfg.hook_point_in, model.cfg.hook_point_out
    seen: dict[str, torch.Tensor] = {}

    def capture(activation: torch.Tensor) -> None:
        seen[hook_in] = activation

    def splice(activation: torch.Tensor) -> torch.Tensor:
        where = positions.to(activation.device)
        inputs = {hook_in: seen.get(hook_in, activation), hook_out: activation}
        flat = {hook: value[where].to(model.cfg.device, model.cfg.dtype) for hook, value in inputs.items()}
        spliced = activation.clone()
        spliced[where] = model.reconstruct(flat).to(activation.device, activation.dtype)
        return spliced

    return {hook_in: Observer(capture), hook_out: splice} if hook_in != hook_out else {hook_out: splice}


def zero_ablation(hook_point: str, positions: torch.Tensor) -> dict[str, Replacement]:
    return {hook_point: lambda activation: activation.masked_fill(positions.to(activation.device)[..., None], 0)}


class Evaluator:
    """Runs a dictionary over an activation stream (`ActivationFactory.process`) and reports metrics.

    Over the N evaluated tokens t, with raw label y_t, raw-scale reconstruction y_hat_t and features f_t:
    - metrics/explained_variance = 1 - sum_t ||y_hat_t - y_t||^2 / sum_t ||y_t - y_bar||^2, y_bar = mean_t y_t;
    - metrics/explained_variance_legacy = mean_t (1 - ||y_hat_t - y_t||^2 / ||y_t - y_bar_batch||^2), the mean
      taken per batch (upstream's per-token variant; depends on the batching);
    - metrics/l0 = mean_t #{i: f_ti > 0}, metrics/l1 = mean_t sum_i |f_ti|,
      metrics/mean_feature_act = sum f / #(f > 0);
    - metrics/l2_norm_error = mean_t ||y_hat_t - y_t||, metrics/l2_norm_error_ratio = sum_t ||y_hat_t - y_t|| /
      sum_t ||y_t||;
    - per feature frequency = #(tokens with f_ti > 0) / N; metrics/dead_fraction = fraction of features with
      frequency 0, metrics/dense_fraction = fraction above `dense_threshold`, sparsity/* = counts above/below the
      bounds of the training logs.
    Downstream, over predicted positions p (position t of a 2-D row predicts token t + 1 and counts when that
    token is an evaluated document token, i.e. mask[:, 1:]); the dictionary's reconstruction replaces the
    activation at `hook_point_out` on the evaluated document positions only (BOS and padding keep theirs):
    - metrics/ce_loss_{clean,spliced,zero_ablation} = mean_p -log P(next token), zero ablation setting those
      positions to 0;
    - metrics/ce_loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean): 1 when splicing loses nothing,
      0 when the dictionary is no better than zeroing the activation;
    - metrics/kl_div_{spliced,zero_ablation} = mean_p KL(P_clean || P_run) of the next-token distributions.
    """

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg

    def evaluate(
        self,
        model: SparseAutoEncoder,
        stream: Iterable[Mapping[str, torch.Tensor]],
        language_model: LanguageModel | None = None,
    ) -> dict[str, float]:
        return self.run(model, stream, language_model).metrics

    def run(
        self,
        model: SparseAutoEncoder,
        stream: Iterable[Mapping[str, torch.Tensor]],
        language_model: LanguageModel | None = None,
    ) -> EvalResult:
        """Evaluate on the first `total_eval_tokens` document tokens of `stream` (1-D or 2-D batches)."""
        downstream = language_model is not None and self.cfg.compute_downstream
        totals = _Totals()
        was_training = model.training
        model.eval()  # batchtopk uses its inference threshold, token by token
        try:
            with torch.no_grad():
                for batch in stream:
                    positions = self._positions(batch, self.cfg.total_eval_tokens - totals.n_tokens)
                    self._accumulate(model, batch, positions, totals)
                    if downstream:
                        self._accumulate_downstream(model, language_model, batch, positions, totals)
                    if totals.n_tokens >= self.cfg.total_eval_tokens:
                        break  # before pulling another batch: from a dataset that costs a forward pass
        finally:
            model.train(was_training)
        if totals.n_tokens == 0:
            raise ValueError("the activation stream yielded no document tokens to evaluate")
        return self._reduce(model, totals, downstream)

    # ---- per batch ----
    def _positions(self, batch: Mapping[str, torch.Tensor], budget: int) -> torch.Tensor | int:
        """(B, S) bool of the document tokens to evaluate for 2-D batches, a row count for 1-D ones."""
        if "mask" in batch:
            return limit_mask(batch["mask"].bool(), budget)
        return min(budget, batch["tokens"].shape[0])

    def _accumulate(
        self,
        model: SparseAutoEncoder,
        batch: Mapping[str, torch.Tensor],
        positions: torch.Tensor | int,
        totals: _Totals,
    ) -> None:
        device, dtype = model.cfg.device, model.cfg.dtype
        hooks = dict.fromkeys([model.cfg.hook_point_in, model.cfg.hook_point_out])
        if isinstance(positions, torch.Tensor):
            flat = {hook: batch[hook][positions.to(batch[hook].device)] for hook in hooks}
        else:
            flat = {hook: batch[hook][:positions] for hook in hooks}
        flat = {hook: value.to(device, dtype) for hook, value in flat.items()}
        n = flat[model.cfg.hook_point_out].shape[0]
        if n == 0:
            return
        _, _, _, c_out = model.prepare(flat)
        out = model.compute_loss(flat)

        label = flat[model.cfg.hook_point_out].double()  # (n, d_out) raw
        reconstruction = (out.reconstructed / c_out).double()  # (n, d_out) raw scale
        sq_error = (reconstruction - label).pow(2).sum(-1)  # (n,)
        deviation = (label - label.mean(0)).pow(2).sum(-1)  # (n,) from the batch mean (legacy metric)
        acts = out.feature_acts.double()  # (n, d_sae)
        active = acts > 0

        totals.n_tokens += n
        totals.normalised_sq_error += (out.reconstructed - out.label).double().pow(2).sum().item()
        totals.sq_error += sq_error.sum().item()
        totals.sum_label = label.sum(0) + (totals.sum_label if totals.sum_label is not None else 0)
        totals.sum_label_sq += label.pow(2).sum().item()
        totals.legacy_explained_variance += (1 - sq_error / deviation.clamp_min(1e-30)).sum().item()
        totals.l2_error += sq_error.sqrt().sum().item()
        totals.l2_label += label.norm(dim=-1).sum().item()
        totals.n_active += active.sum().item()
        totals.sum_abs_acts += acts.abs().sum().item()
        totals.sum_acts += acts.sum().item()
        counts = active.sum(0)
        totals.feature_counts = counts if totals.feature_counts is None else totals.feature_counts + counts

    def _accumulate_downstream(
        self,
        model: SparseAutoEncoder,
        language_model: LanguageModel,
        batch: Mapping[str, torch.Tensor],
        positions: torch.Tensor | int,
        totals: _Totals,
    ) -> None:
        if not isinstance(positions, torch.Tensor) or batch["tokens"].ndim != 2:
            raise ValueError(
                "downstream metrics need 2-D batches (tokens (B, S) with mask): use target activations-2d, "
                "or set compute_downstream=False"
            )
        if self.cfg.downstream_tokens is not None:
            positions = limit_mask(positions, self.cfg.downstream_tokens - totals.n_spliced)
        if not positions.any():
            return
        tokens, attention_mask = batch["tokens"], batch["attention_mask"]
        hook = model.cfg.hook_point_out
        # Position t predicts token t + 1; it counts when that token is one of the evaluated document tokens.
        predicted = positions[:, 1:]  # (B, S - 1)

        def next_token_log_probs(replacements: dict[str, Replacement] | None) -> torch.Tensor:
            logits = language_model.logits_with_replacements(tokens, attention_mask, replacements)  # (B, S, V)
            return logits[:, :-1][predicted.to(logits.device)].float().log_softmax(-1)  # (M, V)

        clean = next_token_log_probs(None)
        targets = tokens[:, 1:][predicted.to(tokens.device)].to(clean.device)  # (M,)
        runs = {
            "spliced": next_token_log_probs(splice_replacements(model, positions)),
            "zero_ablation": next_token_log_probs(zero_ablation(hook, positions)),
        }
        totals.n_predicted += targets.numel()
        totals.n_spliced += int(positions.sum())
        totals.ce["clean"] += -clean.gather(-1, targets[:, None]).double().sum().item()
        for name, log_probs in runs.items():
            totals.ce[name] += -log_probs.gather(-1, targets[:, None]).double().sum().item()
            # KL(clean || run) = sum_v p_clean(v) (log p_clean(v) - log p_run(v)), per predicted position
            totals.kl[name] += (clean.exp() * (clean - log_probs)).double().sum().item()

    # ---- reduction ----
    def _reduce(self, model: SparseAutoEncoder, totals: _Totals, downstream: bool) -> EvalResult:
        n = totals.n_tokens
        total_deviation = totals.sum_label_sq - totals.sum_label.pow(2).sum().item() / n
        frequency = totals.feature_counts.double() / n
        metrics = {
            "losses/mse_loss": totals.normalised_sq_error / n,
            "metrics/explained_variance": 1 - totals.sq_error / total_deviation,
            "metrics/explained_variance_legacy": totals.legacy_explained_variance / n,
            "metrics/l0": totals.n_active / n,
            "metrics/l1": totals.sum_abs_acts / n,
            "metrics/l2_norm_error": totals.l2_error / n,
            "metrics/l2_norm_error_ratio": totals.l2_error / totals.l2_label,
            "metrics/mean_feature_act": totals.sum_acts / totals.n_active if totals.n_active else 0.0,
            "metrics/dead_fraction": (frequency == 0).double().mean().item(),
            "metrics/dense_fraction": (frequency > self.cfg.dense_threshold).double().mean().item(),
            **{key: float((frequency > bound).sum()) for key, bound in FREQUENCY_BOUNDS_ABOVE.items()},
            **{key: float((frequency < bound).sum()) for key, bound in FREQUENCY_BOUNDS_BELOW.items()},
            **model.log_statistics(),
            "details/n_tokens": float(n),
        }
        if downstream and totals.n_predicted:
            m = totals.n_predicted
            clean, spliced, zero = (totals.ce[key] / m for key in ("clean", "spliced", "zero_ablation"))
            metrics |= {
                "metrics/ce_loss_clean": clean,
                "metrics/ce_loss_spliced": spliced,
                "metrics/ce_loss_zero_ablation": zero,
                "metrics/ce_loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else float("nan"),
                "metrics/kl_div_spliced": totals.kl["spliced"] / m,
                "metrics/kl_div_zero_ablation": totals.kl["zero_ablation"] / m,
                "details/n_predicted_positions": float(m),
            }
        return EvalResult(metrics, frequency.float(), self._histogram(frequency))

    def _histogram(self, frequency: torch.Tensor) -> FrequencyHistogram:
        edges = torch.linspace(self.cfg.histogram_min_log10, 0.0, self.cfg.histogram_bins + 1, dtype=torch.float64)
        live = frequency[frequency > 0].cpu()
        log_frequency = live.log10().clamp(min=self.cfg.histogram_min_log10)
        counts = torch.histogram(log_frequency, bins=edges).hist.long()
        return FrequencyHistogram(edges, counts, int((frequency == 0).sum()))
