"""Evaluating a sparse dictionary of any kind: reconstruction and sparsity statistics over a stream of activations
(per output hook when it has several), and the language model's next-token loss with the dictionary spliced in at
every output hook.

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

from lm_saes_core.backend.base import LanguageModel, Replacement
from lm_saes_core.config import BaseConfig
from lm_saes_core.evaluation.frequency import FrequencyHistogram, frequency_counts, frequency_histogram
from lm_saes_core.models.base import SparseDictionary
from lm_saes_core.models.feature_parallel import gather_features


class EvalConfig(BaseConfig):
    total_eval_tokens: int = Field(default=1_000_000, gt=0)
    """Document tokens to evaluate (exactly: the last batch is cut, by mask for 2-D batches)."""
    compute_downstream: bool = True
    """With a language model and 2-D batches: also run the model clean, spliced and zero-ablated."""
    downstream_tokens: int | None = Field(default=None, gt=0)
    """Document tokens of the evaluation that are also spliced into the language model (None: all of them);
    the three extra forward passes per batch dominate the cost of an evaluation with a model."""
    splice_each_output: bool = False
    """For a dictionary with several output hooks (a CLT's layers, a crosscoder's heads), also splice each one
    alone and zero-ablate it alone (two more forward passes per hook and batch), to compare with all at once."""
    dense_threshold: float = Field(default=0.1, gt=0, le=1)
    """Features active on more than this fraction of tokens count as dense."""
    histogram_bins: int = Field(default=40, gt=0)
    histogram_min_log10: float = Field(default=-8.0, lt=0)
    """Lower edge of the log10 frequency histogram; rarer (but live) features fall in the first bin."""


@dataclass
class EvalResult:
    metrics: dict[str, float]
    feature_frequency: torch.Tensor  # (n_features,) fraction of evaluated tokens on which each feature fired
    frequency_histogram: FrequencyHistogram

    def to_json(self) -> dict:
        return {"metrics": self.metrics, "frequency_histogram": self.frequency_histogram.to_json()}


@dataclass
class _HookTotals:
    """Float64 sums over evaluated tokens of one output hook."""

    sq_error: float = 0.0
    sum_label: torch.Tensor | None = None  # (d_out,)
    sum_label_sq: float = 0.0
    legacy_explained_variance: float = 0.0
    l2_error: float = 0.0
    l2_label: float = 0.0

    def add(self, label: torch.Tensor, reconstruction: torch.Tensor) -> None:
        """Raw label and raw-scale reconstruction (n, d_out) of one batch, in float64."""
        sq_error = (reconstruction - label).pow(2).sum(-1)  # (n,)
        deviation = (label - label.mean(0)).pow(2).sum(-1)  # (n,) from the batch mean (legacy metric)
        self.sq_error += sq_error.sum().item()
        self.sum_label = label.sum(0) + (self.sum_label if self.sum_label is not None else 0)
        self.sum_label_sq += label.pow(2).sum().item()
        self.legacy_explained_variance += (1 - sq_error / deviation.clamp_min(1e-30)).sum().item()
        self.l2_error += sq_error.sqrt().sum().item()
        self.l2_label += label.norm(dim=-1).sum().item()

    def deviation(self, n: int) -> float:
        """sum_t ||y_t - y_bar||^2 over the n evaluated tokens."""
        return self.sum_label_sq - self.sum_label.pow(2).sum().item() / n


@dataclass
class _Totals:
    """Float64 sums over evaluated tokens; reduced to metrics once at the end."""

    n_tokens: int = 0
    normalised_sq_error: float = 0.0
    hooks: dict[str, _HookTotals] = field(default_factory=dict)
    n_active: float = 0.0
    sum_abs_acts: float = 0.0
    sum_acts: float = 0.0
    feature_counts: torch.Tensor | None = None  # (n_features,)
    group_sums: dict[str, float] = field(default_factory=dict)  # token-weighted sums of the per-group statistics
    # downstream, over predicted positions
    n_predicted: int = 0
    n_spliced: int = 0
    ce: dict[str, float] = field(default_factory=lambda: {"clean": 0.0, "spliced": 0.0, "zero_ablation": 0.0})
    kl: dict[str, float] = field(default_factory=lambda: {"spliced": 0.0, "zero_ablation": 0.0})
    # with splice_each_output, per output hook g: ce/kl under "spliced_alone/g" and "zero_ablation_alone/g"


def limit_mask(mask: torch.Tensor, budget: int) -> torch.Tensor:
    """The first `budget` true entries of `mask` (row-major), the rest set to false."""
    flat = mask.reshape(-1)
    return (flat & (flat.cumsum(0) <= budget)).reshape(mask.shape)


def zero_ablation(hook_points: list[str], positions: torch.Tensor) -> dict[str, Replacement]:
    """Replacements that set the activations of `hook_points` to 0 on `positions` (B, S)."""

    def zero(activation: torch.Tensor) -> torch.Tensor:
        return activation.masked_fill(positions.to(activation.device)[..., None], 0)

    return dict.fromkeys(hook_points, zero)


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
    With several output hooks, the reconstruction metrics pool them (sums over every hook's tokens; `l2_norm_error`
    per token and hook) and each group (hook, head, layer) gets its own under the kind's name for it
    (`SparseDictionary.group_metric_key`: `metrics/<hook>/<metric>`, a crosscoder's
    `crosscoder_metrics/<head>/<metric>`, a CLT's `metrics/explained_variance_L<l>`, `metrics/l0_layer<l>`), with
    the kind's other per-group statistics (`l0`, `l_rec`, ...) averaged over the evaluated tokens.
    Downstream, over predicted positions p (position t of a 2-D row predicts token t + 1 and counts when that
    token is an evaluated document token, i.e. mask[:, 1:]); the dictionary's reconstructions replace the
    activations at its output hooks on the evaluated document positions only (BOS and padding keep theirs):
    - metrics/ce_loss_{clean,spliced,zero_ablation} = mean_p -log P(next token), zero ablation setting those
      positions to 0;
    - metrics/ce_loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean): 1 when splicing loses nothing,
      0 when the dictionary is no better than zeroing the activation;
    - metrics/kl_div_{spliced,zero_ablation} = mean_p KL(P_clean || P_run) of the next-token distributions;
    - with `splice_each_output`, per output hook (under the kind's group names) `ce_loss_spliced_alone`,
      `ce_loss_recovered_alone` (against zero-ablating that hook alone) and `kl_div_spliced_alone`: that hook
      replaced by its reconstruction from clean activations, every other hook left as computed.
    """

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg

    def evaluate(
        self,
        model: SparseDictionary,
        stream: Iterable[Mapping[str, torch.Tensor]],
        language_model: LanguageModel | None = None,
    ) -> dict[str, float]:
        return self.run(model, stream, language_model).metrics

    def run(
        self,
        model: SparseDictionary,
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
        model: SparseDictionary,
        batch: Mapping[str, torch.Tensor],
        positions: torch.Tensor | int,
        totals: _Totals,
    ) -> None:
        device, dtype = model.cfg.device, model.cfg.dtype
        hooks = model.cfg.hook_points
        contexts = model.granularity == "contexts"
        if contexts and not isinstance(positions, torch.Tensor):
            raise ValueError(
                f"sae_type {model.cfg.sae_type!r} reads whole contexts: evaluate it on 2-D batches (activation "
                "factory target activations-2d)"
            )
        if isinstance(positions, torch.Tensor):
            flat = {hook: batch[hook][positions.to(batch[hook].device)] for hook in hooks}
        else:
            flat = {hook: batch[hook][:positions] for hook in hooks}
        flat = {hook: value.to(device, dtype) for hook, value in flat.items()}  # the evaluated tokens' rows
        n = flat[hooks[0]].shape[0]
        if n == 0:
            return
        _, _, _, c_out = model.prepare(flat)
        if contexts:  # whole contexts in (attention reads every earlier position), the evaluated tokens' rows out
            whole = {hook: batch[hook].to(device, dtype) for hook in hooks}
            out = model.compute_loss(whole | {"mask": positions.to(device)})
        else:
            out = model.compute_loss(flat)
        reconstructions = model.outputs_by_hook(out.reconstructed / c_out)  # raw scale
        for hook, reconstruction in reconstructions.items():
            totals.hooks.setdefault(hook, _HookTotals()).add(flat[hook].double(), reconstruction.double())
        acts = out.feature_acts.reshape(n, model.n_features).double()  # (n, n_features)
        active = acts > 0

        totals.n_tokens += n
        totals.normalised_sq_error += (out.reconstructed - out.label).double().pow(2).sum().item()
        sums = torch.stack([active.sum().double(), acts.abs().sum(), acts.sum()])
        if model.feature_shards is not None:  # a shard's features are a part of the whole's
            sums = model.feature_shards.sum(sums)
        n_active, sum_abs_acts, sum_acts = sums.tolist()
        totals.n_active += n_active
        totals.sum_abs_acts += sum_abs_acts
        totals.sum_acts += sum_acts
        counts = active.sum(0)
        totals.feature_counts = counts if totals.feature_counts is None else totals.feature_counts + counts
        for key, value in model.group_statistics(out.label, out.reconstructed, out.feature_acts).items():
            totals.group_sums[key] = totals.group_sums.get(key, 0.0) + value.item() * n

    def _accumulate_downstream(
        self,
        model: SparseDictionary,
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
        # Position t predicts token t + 1; it counts when that token is one of the evaluated document tokens.
        predicted = positions[:, 1:]  # (B, S - 1)

        def next_token_log_probs(replacements: dict[str, Replacement] | None) -> torch.Tensor:
            logits = language_model.logits_with_replacements(tokens, attention_mask, replacements)  # (B, S, V)
            return logits[:, :-1][predicted.to(logits.device)].float().log_softmax(-1)  # (M, V)

        clean = next_token_log_probs(None)
        targets = tokens[:, 1:][predicted.to(tokens.device)].to(clean.device)  # (M,)
        runs = {
            "spliced": next_token_log_probs(model.splice(positions, batch)),
            "zero_ablation": next_token_log_probs(zero_ablation(model.cfg.hooks_out, positions)),
        }
        if self.cfg.splice_each_output and len(model.cfg.hooks_out) > 1:
            for g, (hook, alone) in enumerate(
                zip(model.cfg.hooks_out, model.splice_each(positions, batch), strict=True)
            ):
                runs[f"spliced_alone/{g}"] = next_token_log_probs(alone)
                runs[f"zero_ablation_alone/{g}"] = next_token_log_probs(zero_ablation([hook], positions))
        totals.n_predicted += targets.numel()
        totals.n_spliced += int(positions.sum())
        totals.ce["clean"] += -clean.gather(-1, targets[:, None]).double().sum().item()
        for name, log_probs in runs.items():
            totals.ce[name] = totals.ce.get(name, 0.0) - log_probs.gather(-1, targets[:, None]).double().sum().item()
            # KL(clean || run) = sum_v p_clean(v) (log p_clean(v) - log p_run(v)), per predicted position
            totals.kl[name] = totals.kl.get(name, 0.0) + (clean.exp() * (clean - log_probs)).double().sum().item()

    # ---- reduction ----
    def _reduce(self, model: SparseDictionary, totals: _Totals, downstream: bool) -> EvalResult:
        n, hooks = totals.n_tokens, totals.hooks
        counts, statistics, shards = totals.feature_counts, model.log_statistics(), model.feature_shards
        if shards is not None:  # the whole dictionary's frequencies and statistics on every shard
            counts = gather_features(counts, model.feature_shape, shards)
            statistics = shards.mean_statistics(statistics)
        frequency = counts.double() / n
        metrics = {
            "losses/mse_loss": totals.normalised_sq_error / (n * len(hooks)),
            **_reconstruction_metrics(list(hooks.values()), n),
            "metrics/l0": totals.n_active / n,
            "metrics/l1": totals.sum_abs_acts / n,
            "metrics/mean_feature_act": totals.sum_acts / totals.n_active if totals.n_active else 0.0,
            "metrics/dead_fraction": (frequency == 0).double().mean().item(),
            "metrics/dense_fraction": (frequency > self.cfg.dense_threshold).double().mean().item(),
            **{key: float(count) for key, count in frequency_counts(frequency).items()},
            **statistics,
            "details/n_tokens": float(n),
        }
        metrics |= {key: total / n for key, total in totals.group_sums.items()}
        if len(hooks) > 1:  # the exact values over all tokens replace the per-batch explained variance
            for group, hook_totals in enumerate(hooks.values()):
                metrics |= {
                    model.group_metric_key(group, key.removeprefix("metrics/")): value
                    for key, value in _reconstruction_metrics([hook_totals], n).items()
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
            for g in range(len(model.cfg.hooks_out)):
                if f"spliced_alone/{g}" not in totals.ce:
                    break
                alone, alone_zero = totals.ce[f"spliced_alone/{g}"] / m, totals.ce[f"zero_ablation_alone/{g}"] / m
                metrics |= {
                    model.group_metric_key(g, "ce_loss_spliced_alone"): alone,
                    model.group_metric_key(g, "ce_loss_recovered_alone"): (
                        (alone_zero - alone) / (alone_zero - clean) if alone_zero != clean else float("nan")
                    ),
                    model.group_metric_key(g, "kl_div_spliced_alone"): totals.kl[f"spliced_alone/{g}"] / m,
                }
        histogram = frequency_histogram(frequency, self.cfg.histogram_bins, self.cfg.histogram_min_log10)
        return EvalResult(metrics, frequency.float(), histogram)


def _reconstruction_metrics(hooks: list[_HookTotals], n: int) -> dict[str, float]:
    """Explained variance and L2 errors pooled over the given output hooks' n tokens each."""
    sq_error = sum(h.sq_error for h in hooks)
    return {
        "metrics/explained_variance": 1 - sq_error / sum(h.deviation(n) for h in hooks),
        "metrics/explained_variance_legacy": sum(h.legacy_explained_variance for h in hooks) / (n * len(hooks)),
        "metrics/l2_norm_error": sum(h.l2_error for h in hooks) / (n * len(hooks)),
        "metrics/l2_norm_error_ratio": sum(h.l2_error for h in hooks) / sum(h.l2_label for h in hooks),
    }
