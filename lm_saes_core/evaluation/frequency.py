"""Feature activation frequencies: the bounds that training logs and evaluations count features against, and the
log-frequency histogram of an evaluation."""

from dataclasses import dataclass

import torch
from torch import Tensor

FREQUENCY_BOUNDS = {"above_1e-1": 1e-1, "above_1e-2": 1e-2, "below_1e-5": 1e-5, "below_1e-6": 1e-6, "below_1e-7": 1e-7}
"""`sparsity/<name>`: how many features fire on more (above_) or fewer (below_) than this fraction of tokens."""


def frequency_counts(frequency: Tensor) -> dict[str, Tensor]:
    """{"sparsity/<name>": number of features beyond each bound} of per-feature frequencies, as 0-d tensors (so a
    training window reads them back with its other values in one sync)."""
    counts = {}
    for name, bound in FREQUENCY_BOUNDS.items():
        selected = frequency > bound if name.startswith("above") else frequency < bound
        counts[f"sparsity/{name}"] = selected.sum().float()
    return counts


@dataclass
class FrequencyHistogram:
    bin_edges: Tensor  # (bins + 1,) log10 of the activation frequency
    counts: Tensor  # (bins,) features per bin
    n_dead: int  # features that never fired (log10 0 = -inf lies in no bin)

    def to_json(self) -> dict:
        return {"log10_bin_edges": self.bin_edges.tolist(), "counts": self.counts.tolist(), "n_dead": self.n_dead}


def frequency_histogram(frequency: Tensor, bins: int, min_log10: float) -> FrequencyHistogram:
    """Features by log10 frequency in `bins` bins from `min_log10` to 0; rarer (but live) features fall in the first."""
    edges = torch.linspace(min_log10, 0.0, bins + 1, dtype=torch.float64)
    live = frequency[frequency > 0].cpu()
    log_frequency = live.log10().clamp(min=min_log10)
    counts = torch.histogram(log_frequency, bins=edges).hist.long()
    return FrequencyHistogram(edges, counts, int((frequency == 0).sum()))
