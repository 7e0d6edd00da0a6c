"""Z-patterns of a Lorsa's top contexts: which positions feed a feature's activation at a context's peak.

Feature i of a Lorsa is OV head i, reading the pattern A of QK head g = i // ov_group_size. At the peak position t
of a context (its max activation), each source position s <= t contributes

    z_i[t, s] = A[t, s] * v_i[s],        v_i[s] = x[s] . W_V[i] + b_V[i]

and the contributions sum to the pre-activation: sum_s z_i[t, s] = h_i[t], which is the activation there (every
activation function keeps h where it fires). Without the value bias, sum_s A[t, s] x[s] . W_V[i] = h_i[t] - b_V[i],
the row of A summing to 1.

The analysis records, for every row of the "top_activations" pool, the `n_sources` sources with the largest
|contribution| (`ZPatterns` of `FeatureSamples`). They are computed while the stream runs, when a context enters a
feature's top pool (a row's peak and z-pattern depend on its own context only, so an entering row's is final), for
the entering (context, feature) pairs of a batch at once: one Q/K/V projection and the attention patterns of the
contexts some pair entered from, then per pair the pattern row at its peak times the head's values, so the cost
never grows with the features that do not enter. Rows evicted later have had theirs computed for nothing; once the
pools are full few rows enter.
A second pass over the stream would compute only the rows kept, but re-reading a stream means generating its
activations again (the language model's forward), and the analysis reads a stream once.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from lm_saes_core.models.lorsa import LowRankSparseAttention
from lm_saes_core.store.records import FeatureAnalysis, FeatureSamples, ZPatterns

if TYPE_CHECKING:
    from lm_saes_core.analysis.feature_analyzer import SamplePool

N_SOURCES = 8
"""Sources kept per top context (the strongest by |contribution|)."""
MIN_SHOWN_SHARE = 0.01
"""Views list a stored source when |contribution| is at least this share of the activation at the peak (the reference
system's cut); the rest are counted."""
PATTERN_CHUNK_ELEMENTS = 1 << 24
"""Contexts whose attention patterns (contexts, n_qk_heads, S, S) are formed at once hold about this many numbers."""


def _peak_rows(
    lorsa: LowRankSparseAttention, x: Tensor, rows: Tensor, heads: Tensor, peaks: Tensor
) -> Iterator[tuple[Tensor, Tensor]]:
    """The contributions A[t, s] * v_i[s] (P, S) to OV head `heads[p]` at position `peaks[p]` of context `rows[p]`
    of the normalised contexts x (B, S, D), 0 at sources after the peak: `lorsa.z_patterns` of that context and head
    at its peak, from the model's own patterns. By chunks of contexts: (indices of the chunk's pairs, their rows)."""
    q, k, v = lorsa.queries_keys_values(x)  # (B, H, S, E), (B, H, S, E), (B, H, S, ov_group_size)
    B, H, S, _ = q.shape
    group = lorsa.cfg.ov_group_size
    qk_heads, channels = heads // group, heads % group
    chunk = max(1, PATTERN_CHUNK_ELEMENTS // (H * S * S))
    for start in range(0, B, chunk):
        pattern = lorsa.attention_pattern(q[start : start + chunk], k[start : start + chunk])  # (b, H, S, S)
        pairs = ((rows >= start) & (rows < start + chunk)).nonzero().squeeze(1)
        r, g = rows[pairs], qk_heads[pairs]
        yield pairs, pattern[r - start, g, peaks[pairs]] * v[r, g, :, channels[pairs]]  # (p, S) * v of head i


def strongest_sources(contributions: Tensor, peaks: Tensor, n_sources: int) -> tuple[Tensor, Tensor]:
    """The `n_sources` sources s <= peak with the largest |contribution| of each row of (P, S): (sources, values)
    (P, K), K = min(n_sources, S), strongest first; -1 and 0 past a row's peak + 1 sources."""
    S = contributions.shape[-1]
    after_peak = torch.arange(S, device=contributions.device)[None, :] > peaks[:, None]
    strength = contributions.abs().masked_fill(after_peak, -1.0)  # below every real source, even a zero one
    strength, sources = strength.topk(min(n_sources, S), dim=-1)
    real = strength >= 0
    values = contributions.gather(1, sources)
    return torch.where(real, sources, -1), torch.where(real, values, torch.zeros_like(values))


class ZPatternRecorder:
    """Follows a Lorsa analysis batch by batch (`observe` after the top pool took the batch) and attaches the
    z-patterns of the top pool's rows to the features' records at the end (`finish`)."""

    def __init__(self, lorsa: LowRankSparseAttention, n_sources: int = N_SOURCES):
        if n_sources <= 0:
            raise ValueError(f"n_sources must be positive, got {n_sources}")
        self.lorsa = lorsa
        self.n_sources = n_sources
        self.peaks: Tensor | None = None  # (F, capacity) per slot of the top pool
        self.sources: Tensor | None = None  # (F, capacity, K)
        self.values: Tensor | None = None  # (F, capacity, K)

    def observe(self, item: Mapping[str, Tensor], top: "SamplePool", first_context_id: int) -> None:
        """Compute the z-patterns of the rows that entered `top` from this batch: the contexts with ids
        first_context_id, first_context_id + 1, ... are the item's rows in order."""
        if top.capacity == 0:
            return
        if self.peaks is None:
            self._allocate(top)
        features, slots = ((top.priority > -torch.inf) & (top.context_id >= first_context_id)).nonzero(as_tuple=True)
        if features.numel() == 0:
            return
        rows = top.context_id[features, slots] - first_context_id
        peaks = top.activations[features, slots].argmax(-1)  # first max; the row's max is > 0 at a valid position
        used, rows = torch.unique(rows, return_inverse=True)  # project only the contexts some pair entered from
        lorsa = self.lorsa
        batch = {hook: item[hook][used.to(item[hook].device)].to(lorsa.device) for hook in lorsa.cfg.hook_points}
        x = lorsa.prepare(batch).input
        pair_rows, pair_heads, pair_peaks = rows.to(x.device), features.to(x.device), peaks.to(x.device)
        for pairs, contributions in _peak_rows(lorsa, x, pair_rows, pair_heads, pair_peaks):
            sources, values = strongest_sources(contributions, pair_peaks[pairs], self.n_sources)
            pairs = pairs.to(features.device)
            self.sources[features[pairs], slots[pairs]] = sources.to(self.sources)
            self.values[features[pairs], slots[pairs]] = values.to(self.values)
        self.peaks[features, slots] = peaks.to(self.peaks)

    def _allocate(self, top: "SamplePool") -> None:
        n_features, capacity, S = top.activations.shape
        device = top.activations.device
        K = min(self.n_sources, S)
        self.peaks = torch.zeros((n_features, capacity), dtype=torch.int32, device=device)
        self.sources = torch.full((n_features, capacity, K), -1, dtype=torch.int32, device=device)
        self.values = torch.zeros((n_features, capacity, K), dtype=torch.float32, device=device)

    def finish(self, top: "SamplePool", analyses: Sequence[FeatureAnalysis]) -> None:
        """Set `z_patterns` of each feature's `top.name` pool, its rows in the pool's order (`sorted_slots`)."""
        if self.peaks is None:
            return
        order, counts = top.sorted_slots()
        peaks = self.peaks.gather(1, order).cpu().numpy()
        index = order[..., None].expand_as(self.sources)
        sources = self.sources.gather(1, index).cpu().numpy()
        values = self.values.gather(1, index).cpu().numpy()
        for i, (analysis, n) in enumerate(zip(analyses, counts.tolist(), strict=True)):
            pool = analysis.pool(top.name)
            if pool is None or len(pool) != n:
                raise RuntimeError(f"feature {i}'s {top.name!r} record does not hold the pool's {n} rows")
            pool.z_patterns = ZPatterns(
                peaks=np.ascontiguousarray(peaks[i, :n]),
                sources=np.ascontiguousarray(sources[i, :n]),
                contributions=np.ascontiguousarray(values[i, :n]),
            )


def shown_sources(
    samples: FeatureSamples, row: int, min_share: float = MIN_SHOWN_SHARE
) -> tuple[list[tuple[int, float]], int]:
    """The stored (source, contribution) pairs of a row with |contribution| >= min_share * its peak activation,
    strongest first, and how many stored ones are weaker; ([], 0) for a row without z-patterns."""
    z = samples.z_patterns
    if z is None:
        return [], 0
    cut = min_share * abs(float(samples.activations[row, int(z.peaks[row])]))
    stored = [
        (source, value)
        for source, value in zip(z.sources[row].tolist(), z.contributions[row].tolist(), strict=True)
        if source >= 0
    ]
    shown = [(source, value) for source, value in stored if abs(value) >= cut]
    return shown, len(stored) - len(shown)


def z_pattern_recorder(sae, n_sources: int = N_SOURCES) -> ZPatternRecorder | None:
    """The recorder of a Lorsa's analysis; None for every other kind (their records get no z-patterns)."""
    return ZPatternRecorder(sae, n_sources) if isinstance(sae, LowRankSparseAttention) else None
