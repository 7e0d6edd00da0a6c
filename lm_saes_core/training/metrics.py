"""Training statistics: the per-window metrics of spec 4.9 and the dead-latent counters that Aux-K needs.

Window values stay on the device as tensors and are read back once per report, so logging costs one sync. What both
need of a step's feature activations, how often each feature fired and their sum, is counted once per step
(`FeatureActivity`): from the selection of the sparse TopK path when the dictionary kept it, else in one pass over the
dense activations.
"""

from collections.abc import Callable
from typing import NamedTuple

import torch

from lm_saes_core.evaluation.frequency import frequency_counts


class FeatureActivity(NamedTuple):
    """What the dead-latent counter and the metric window need of one step's feature activations."""

    counts: torch.Tensor  # (n_features,) float32: the tokens on which each feature is active (> 0)
    total: torch.Tensor  # 0-d float32: the sum of every activation

    @classmethod
    def of(cls, model, feature_acts: torch.Tensor) -> "FeatureActivity":
        """Counted from the selection the dictionary made (`model.feature_activity`, the sparse TopK path: O(tokens x
        k)) when it knows the one that gave `feature_acts`; else from the dense activations (N, *feature_shape)."""
        known = getattr(model, "feature_activity", None)
        counted = known(feature_acts) if known is not None else None
        if counted is not None:
            return cls(*counted)
        with torch.no_grad():
            f = feature_acts.detach().reshape(-1, model.n_features)
            # Activations are never negative, so active means non-zero; a float sum of 0/1 is exact below 2^24 rows.
            return cls((f > 0).sum(0, dtype=torch.float32), f.sum(dtype=torch.float32))


class DeadLatentStatistics:
    """Tokens seen since each latent last fired; a latent is dead once that reaches `dead_threshold`."""

    def __init__(self, n_features: int, dead_threshold: int, device: torch.device | str):
        self.dead_threshold = dead_threshold
        self.tokens_since_last_activation = torch.zeros(n_features, dtype=torch.long, device=device)

    @property
    def is_dead(self) -> torch.Tensor:
        return self.tokens_since_last_activation >= self.dead_threshold

    def update(
        self,
        activity: FeatureActivity,
        n_tokens: int,
        combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """`activity` of one step's features; `combine` ORs the fired flags over data-parallel ranks, whose
        activities are of slices of one batch."""
        fired = activity.counts > 0
        if combine is not None:
            fired = combine(fired)
        counter = self.tokens_since_last_activation
        self.tokens_since_last_activation = torch.where(fired, torch.zeros_like(counter), counter + n_tokens)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"tokens_since_last_activation": self.tokens_since_last_activation.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        saved = state["tokens_since_last_activation"]
        if saved.shape != self.tokens_since_last_activation.shape:
            raise ValueError(
                f"checkpoint has dead-latent statistics for {saved.shape[0]} latents, "
                f"the model has {self.tokens_since_last_activation.shape[0]}"
            )
        self.tokens_since_last_activation = saved.to(self.tokens_since_last_activation.device)


class MetricWindow:
    """Accumulates per-step values between two reports; `report()` returns the window's values and resets it.

    A dictionary with several output hooks (stacked on dim -2 of label and reconstruction) pools them in the overall
    values; `group_statistics` (the model's) adds each group's own (per head, per layer)."""

    def __init__(
        self,
        n_features: int,
        device: torch.device | str,
        n_outputs: int = 1,
        group_statistics: Callable[..., dict[str, torch.Tensor]] | None = None,
        shards: tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None = None,
        heads=None,
    ):
        """`shards`, on one part of a feature- or head-parallel dictionary: (sum over the parts, a per-feature vector
        made whole), so that what spans features (l0, frequencies, the mean activation) is the whole dictionary's.
        `heads`, on one head rank (`HeadShards`): the values pooled over output hooks are pooled over every rank's,
        and each rank's per-head values join the report."""
        self.n_features, self.device, self.n_outputs = n_features, device, n_outputs
        self.group_statistics = group_statistics
        self.shards = shards
        self.heads = heads
        self._scratch: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.maxima: dict[str, torch.Tensor] = {}
        self.active_counts = torch.zeros(self.n_features, device=self.device)
        self.tokens = torch.zeros((), device=self.device)
        self.activity_sums: list[torch.Tensor] = []
        """Sharded: per step (sum of activations, active entries) of this shard, summed over shards at the report."""
        self.pooled_sums: list[torch.Tensor] = []
        """Head-parallel: per step, sums over this rank's (token, hook) pairs of what the pooled metrics average."""

    def _scratch_like(self, y: torch.Tensor) -> torch.Tensor:
        """A temporary shaped like `y`, kept from step to step: on CPU a fresh one costs more in page faults than the
        arithmetic done in it."""
        scratch = self._scratch
        if scratch is None or scratch.numel() < y.numel() or (scratch.dtype, scratch.device) != (y.dtype, y.device):
            scratch = self._scratch = torch.empty(y.numel(), dtype=y.dtype, device=y.device)
        return scratch[: y.numel()].view(y.shape)

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def _max(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.maxima[key] = torch.maximum(self.maxima[key], value) if key in self.maxima else value

    @torch.no_grad()
    def update(
        self, out, activity: FeatureActivity, grad_norm_before: torch.Tensor, grad_norm_after: torch.Tensor
    ) -> None:
        """`out` is the model's LossOutput (label, reconstruction and feature acts hold the valid tokens only),
        `activity` that of its feature acts."""
        self.steps += 1
        self._add("losses/overall_loss", out.loss)
        for name, value in out.terms.items():
            self._add(f"losses/{name}", torch.as_tensor(value))
        width = out.label.shape[-1]
        outputs = (-1, self.n_outputs, width) if self.n_outputs > 1 else (-1, width)
        y = out.label.reshape(outputs).float()
        y_hat = out.reconstructed.reshape(outputs).float()
        scratch = self._scratch_like(y)  # squared in place: one temporary, not two, and the same every step
        error = torch.sub(y_hat, y, out=scratch).square_().sum(-1)  # (N,) or (N, hooks)
        spread = torch.sub(y, y.mean(0), out=scratch).square_().sum(-1)  # (N,) or (N, hooks)
        if self.heads is not None:
            parts = [error.sum(), spread.sum(), (error / spread).sum(), error.sqrt().sum(), y.norm(dim=-1).sum()]
            self.pooled_sums.append(torch.stack([*parts, torch.tensor(float(error.numel()), device=error.device)]))
        else:
            self._add("metrics/explained_variance", 1 - error.mean() / spread.mean())
            self._add("metrics/explained_variance_legacy", (1 - error / spread).mean())
        if self.group_statistics is not None:
            computed = self.group_statistics(out.label, out.reconstructed, out.feature_acts, (error, spread),
                                             activity.counts)  # what the window computed already  # fmt: skip
            for key, value in computed.items():
                self._add(key, value)
        if self.shards is None:
            self._add("metrics/mean_feature_act", activity.total / activity.counts.sum().clamp(min=1))
        else:
            self.activity_sums.append(torch.stack([activity.total, activity.counts.sum()]))
        if self.heads is None:
            l2_error = error.sqrt().mean()
            self._add("metrics/l2_norm_error", l2_error)
            self._add("metrics/l2_norm_error_ratio", l2_error / y.norm(dim=-1).mean())
        self.active_counts += activity.counts
        self.tokens += y.shape[0]
        self._max("metrics/gradient_norm_per_param", grad_norm_after)
        self._max("metrics/gradient_norm_before_clipping", grad_norm_before)

    def combine_ranks(self, all_reduce_sum: Callable[[torch.Tensor], None], world_size: int) -> None:
        """Make this window the data-parallel group's (every rank calls it at the same step): per-step means averaged
        over the ranks' equal parts, activation and token counts summed. Gradient norms are already the group's."""
        if self.sums:
            keys = list(self.sums)
            stacked = torch.stack([self.sums[key].reshape(()) for key in keys])
            all_reduce_sum(stacked)
            self.sums = dict(zip(keys, (stacked / world_size).unbind(), strict=True))
        all_reduce_sum(self.active_counts)
        all_reduce_sum(self.tokens)
        for name in ("activity_sums", "pooled_sums"):
            if getattr(self, name):
                stacked = torch.stack(getattr(self, name))
                all_reduce_sum(stacked)
                setattr(self, name, list(stacked))

    def report(self) -> dict[str, float]:
        if self.steps == 0:
            return {}
        active_counts = self.active_counts
        values = {key: total / self.steps for key, total in self.sums.items()} | self.maxima
        if self.shards is not None:
            sum_over_shards, whole = self.shards
            active_counts = whole(active_counts)
            sums = sum_over_shards(torch.stack(self.activity_sums))
            values["metrics/mean_feature_act"] = (sums[:, 0] / sums[:, 1].clamp(min=1)).mean()
        if self.heads is not None:
            values |= self._pooled_over_heads()
        frequency = active_counts / self.tokens.clamp(min=1)
        values["metrics/l0"] = active_counts.sum() / self.tokens.clamp(min=1)
        values |= frequency_counts(frequency)
        keys = list(values)
        numbers = torch.stack([values[key].reshape(()) for key in keys]).tolist()  # one device sync
        self.reset()
        report = dict(zip(keys, numbers, strict=True))
        if self.heads is not None:  # every head rank's own per-head values; the rest are equal on every rank
            for other in self.heads.gather_objects(report):
                report = other | report
        return report

    def _pooled_over_heads(self) -> dict[str, torch.Tensor]:
        """The values pooled over output hooks, from every head rank's sums: per step, then averaged over steps."""
        sums = self.heads.sum(torch.stack(self.pooled_sums))  # (steps, 6)
        error, spread, ratio, root, norm, count = sums.unbind(-1)
        return {
            "metrics/explained_variance": (1 - error / spread).mean(),
            "metrics/explained_variance_legacy": (1 - ratio / count).mean(),
            "metrics/l2_norm_error": (root / count).mean(),
            "metrics/l2_norm_error_ratio": (root / norm).mean(),
        }
