"""Feature analysis: for every feature of a dictionary, activation statistics over a corpus and a few pools of whole
contexts that show what it responds to.

Pools (per feature, each holding at most its own count of contexts; a context's score is its max activation over
valid positions):
- "top_activations": the `n_top` contexts with the highest score (score > 0).
- "band_<lo>_<hi>": contexts whose score lies in (lo * max, hi * max], `max` being the feature's max activation;
  `n_samples` of them drawn at random (a seeded hash priority per (context, feature)), so a band shows the spread of
  its range, not only its strongest members.
- "non_activating": contexts where the feature is 0 at every valid position, drawn at random the same way.

The analysis is one pass over a stream and memory never grows with the number of tokens: per feature and pool
slot it keeps the feature's activations on the context, (F, n, S) per pool, and each context some pool holds keeps
its tokens and provenance once (`ContextStore`, at most about twice the contexts the pools hold). Each batch is
merged into the pools of all features at once, without a loop over features: per-context maxima (B, F) give the
candidates, those that beat a feature's weakest row are ranked with the pool's rows by one segmented sort, and only
the (feature, context) rows that win a slot are written, from the batch's list of positive activations.

The max of a feature grows as the stream goes on, so band membership is decided with the running max: a row enters
a band when it is in the band of the max seen so far (including its own batch), rows that fall out of their band
when the max grows are dropped, and at the end every row is re-checked against the final max. A context seen before
the max grew can therefore be missed by a band (it was above the band then, or lost the draw to rows that were
later dropped), but a band never holds a context outside its final range. Unlike the reference, pools are cut per
feature, never with one count shared by all features, so no row that failed its pool's condition survives.

A crosscoder's or CLT's feature also gets where it lives, from the weights (`decoder_locations`): its decoder norm
per head or output layer, a crosscoder's cosines between its heads' decoders, and a label ("shared", "exclusive to
<head>", ...) by `location_threshold`.
"""

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from pydantic import Field, model_validator
from torch import Tensor
from tqdm.auto import tqdm

from lm_saes_core.analysis.z_patterns import ZPatternRecorder, z_pattern_recorder
from lm_saes_core.config import BaseConfig
from lm_saes_core.models.base import SparseDictionary
from lm_saes_core.models.clt import CrossLayerTranscoder
from lm_saes_core.models.crosscoder import CrossCoder
from lm_saes_core.models.feature_parallel import analysed_feature_index
from lm_saes_core.models.sparse_coder import SparseCoder
from lm_saes_core.store.records import FeatureAnalysis, FeatureSamples

logger = logging.getLogger(__name__)

Item = Mapping[str, Tensor]
TOP_POOL = "top_activations"
NON_ACTIVATING_POOL = "non_activating"


class ActivationBand(BaseConfig):
    """Contexts whose max activation lies in (low * max, high * max] of the feature's max activation."""

    low: float = Field(ge=0, lt=1)
    high: float = Field(gt=0, le=1)
    n_samples: int = Field(default=5, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "ActivationBand":
        if self.low >= self.high:
            raise ValueError(f"band low ({self.low}) must be below high ({self.high})")
        return self

    @property
    def name(self) -> str:
        return f"band_{self.low:g}_{self.high:g}"


def _default_bands() -> list[ActivationBand]:
    return [ActivationBand(low=0.6, high=0.8), ActivationBand(low=0.4, high=0.6), ActivationBand(low=0.2, high=0.4)]


class FeatureAnalyzerConfig(BaseConfig):
    total_analyzing_tokens: int = Field(gt=0)
    """Valid (masked-in) tokens to analyse. The stream is cut after the context that reaches the budget, so whole
    contexts are analysed and which ones does not depend on the batch size."""
    n_top: int = Field(default=10, ge=0)
    """Contexts with the highest max activation kept per feature."""
    bands: list[ActivationBand] = Field(default_factory=_default_bands)
    """Random samples per band of the feature's max activation."""
    n_non_activating: int = Field(default=10, ge=0)
    """Random contexts where the feature is 0 at every valid position."""
    histogram_min: float = Field(default=1e-3, gt=0)
    histogram_max: float = Field(default=1e3, gt=0)
    histogram_bins: int = Field(default=60, gt=0)
    """Activation histogram: `histogram_bins` log-spaced bins from `histogram_min` to `histogram_max` (default 10 per
    decade over 1e-3..1e3), the same edges for every feature; smaller positive values count in the first bin, larger
    ones in the last."""
    ignore_token_ids: list[int] | None = None
    """Token ids that never count (in addition to the batch `mask`, which already excludes BOS and padding)."""
    seed: int = 0
    """Seed of the random draws of the band and non-activating pools."""
    location_threshold: float = Field(default=0.1, gt=0, le=1)
    """Where a crosscoder's or CLT's feature lives: a head (crosscoder) or output layer (CLT) holds the feature when
    its decoder norm is at least this fraction of the feature's largest decoder norm. A crosscoder feature held by
    every head is "shared", by one "exclusive to <head>", else "shared by <heads>". The default 0.1 calls a
    two-head feature exclusive when its relative decoder norm ||d_A|| / (||d_A|| + ||d_B||) is above about 0.91 (the
    usual cut in model diffing is 0.9)."""

    @model_validator(mode="after")
    def _check(self) -> "FeatureAnalyzerConfig":
        if self.histogram_max <= self.histogram_min:
            raise ValueError(f"histogram_max ({self.histogram_max}) must be above histogram_min ({self.histogram_min})")
        names = [band.name for band in self.bands]
        if len(set(names)) != len(names):
            raise ValueError(f"bands: each band must be distinct, got {names}")
        return self

    def histogram_edges(self) -> Tensor:
        """(bins + 1,) float32 log-spaced edges."""
        return torch.logspace(
            math.log10(self.histogram_min), math.log10(self.histogram_max), self.histogram_bins + 1
        ).float()

    def pool_sizes(self) -> dict[str, int]:
        """Pool name -> rows per feature, in the order the pools are stored."""
        return {
            TOP_POOL: self.n_top,
            **{band.name: band.n_samples for band in self.bands},
            NON_ACTIVATING_POOL: self.n_non_activating,
        }


# ---------------------------------------------------------------------------------------------------- batches


@dataclass
class ContextBatch:
    """B whole contexts with what the pools keep of them; masks are bool (B, S)."""

    tokens: Tensor  # (B, S)
    mask: Tensor  # (B, S) positions that count
    lengths: Tensor  # (B,) int64: positions up to the last non-padding one
    doc_index: Tensor  # (B,) int64 document of the row (-1 when it has no document token)
    doc_position: Tensor  # (B,) int64 position in the document of the row's first document token
    source_idx: Tensor  # (B,) int64 index of the factory source the row came from

    @classmethod
    def from_item(cls, item: Item, ignore_token_ids: Sequence[int] | None = None) -> "ContextBatch":
        """From a 2-D activation-factory item (tokens, mask, attention_mask, doc_index, doc_position, source_idx)."""
        tokens = item["tokens"]
        if tokens.ndim != 2:
            raise ValueError(
                f"feature analysis needs whole contexts: tokens of shape (batch, context), got {tuple(tokens.shape)}; "
                "use activation_factory.target 'activations-2d'"
            )
        mask = item["mask"].bool() if "mask" in item else torch.ones_like(tokens, dtype=torch.bool)
        if ignore_token_ids:
            mask = mask & ~torch.isin(tokens, torch.tensor(ignore_token_ids, device=tokens.device))
        attended = item["attention_mask"].bool() if "attention_mask" in item else mask
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        lengths = torch.where(attended | mask, positions, -1).amax(1) + 1
        doc_position = item.get("doc_position")
        if doc_position is None:
            doc_position = torch.where(mask, positions, -1)
        first = torch.where(doc_position >= 0, positions, tokens.shape[1]).amin(1).clamp(max=tokens.shape[1] - 1)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        has_doc = doc_position[rows, first] >= 0
        doc_index = item["doc_index"][rows, first] if "doc_index" in item else torch.full_like(rows, -1)
        source_idx = item["source_idx"][rows, first] if "source_idx" in item else torch.zeros_like(rows)
        return cls(
            tokens=tokens,
            mask=mask,
            lengths=lengths,
            doc_index=torch.where(has_doc, doc_index.long(), -1),
            doc_position=torch.where(has_doc, doc_position[rows, first].long(), -1),
            source_idx=source_idx.long(),
        )

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def take(self, n_rows: int) -> "ContextBatch":
        return ContextBatch(*(getattr(self, name)[:n_rows] for name in self.__dataclass_fields__))


def context_priority(context_ids: Tensor, n_features: int, seed: int, feature_index: Tensor | None = None) -> Tensor:
    """(B, F) float32 in [0, 1): a fixed pseudo-random priority per (context, feature), so a draw depends on the
    stream order and the seed, not on how the stream was batched (nor on how the features are split into shards:
    `feature_index` (F,) gives a shard's features their indices in the whole dictionary; None: 0 ... F - 1).
    lowbias32-style mixing on 32-bit values held in int64 (products may wrap; only their low 32 bits are kept, and
    those are exact)."""
    mask32 = 0xFFFFFFFF
    if feature_index is None:
        features = torch.arange(n_features, device=context_ids.device, dtype=torch.int64)
    else:
        features = feature_index.to(context_ids.device, torch.int64)
    x = (context_ids[:, None] & mask32) * 0x9E3779B1 + features[None, :] * 0x85EBCA77 + (seed & mask32) * 0xC2B2AE3D
    x = x & mask32
    for shift, multiplier in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = ((x ^ (x >> shift)) * multiplier) & mask32
    x = x ^ (x >> 16)
    return (x >> 8).float() * 2.0**-24  # 24 bits: exact in float32


# ---------------------------------------------------------------------------------------------------- pools


class SamplePool:
    """Up to `capacity` contexts per feature, the ones with the highest priority among those offered.

    Slots are unordered while streaming (a new row takes the slot of the row it evicts, so rows never move);
    `sorted_slots` orders them by the context's max activation at the end. A slot holds the feature's activations
    on the context and the context's id; the context's tokens and provenance are kept once in a `ContextStore`."""

    def __init__(self, name: str, n_features: int, capacity: int, context_size: int, device: torch.device):
        self.name = name
        self.capacity = capacity
        shape = (n_features, capacity)
        self.priority = torch.full(shape, -math.inf, device=device)  # -inf: empty slot
        self.score = torch.zeros(shape, device=device)  # the context's max activation of this feature
        self.context_id = torch.full(shape, -1, dtype=torch.int64, device=device)
        self.activations = torch.zeros((*shape, context_size), device=device)

    def drop(self, keep: Tensor) -> None:
        """Empty the slots where `keep` (F, n) is false."""
        self.priority.masked_fill_(~keep, -math.inf)

    def offer(self, priority: Tensor, scores: Tensor, active: "ActiveEntries", context_ids: Tensor) -> Tensor:
        """Merge a batch: `priority` (B, F) with -inf where a context does not qualify for this pool; `scores` (B, F)
        the contexts' max activations; `active` the batch's positive activations. Returns the batch rows that
        entered (with repeats).

        Per feature, the pool's rows and the batch's candidates are ranked together and the best `capacity` stay.
        Only candidates that beat a feature's weakest row take part, and the ranking is one segmented sort over
        (feature, priority) pairs, so a batch costs little once the pools are full and never loops over features."""
        n, device = self.capacity, priority.device
        if n == 0:
            return torch.zeros(0, dtype=torch.int64, device=device)
        rows, features = (priority > self.priority.amin(1)[None, :]).nonzero(as_tuple=True)  # candidates, by row
        if rows.numel() == 0:
            return rows
        affected = torch.unique(features)  # (A,) sorted
        entry_feature = torch.cat([affected.repeat_interleave(n), features])
        entry_priority = torch.cat([self.priority[affected].reshape(-1), priority[rows, features]])
        slots = torch.arange(n, device=device).repeat(len(affected))
        entry_ref = torch.cat([slots, rows])  # old entries: their slot; candidates: their batch row
        n_old = len(slots)
        # segmented sort: by feature, then priority descending; ties keep the older row, then the earlier context
        order = torch.argsort(entry_priority, descending=True, stable=True)
        order = order[torch.argsort(entry_feature[order], stable=True)]
        feature_sorted = entry_feature[order]
        is_old = order < n_old
        selected = (_rank_in_segment(feature_sorted, self.priority.shape[0]) < n) & (entry_priority[order] > -math.inf)
        free = is_old & ~selected  # slots whose row leaves (or that were empty)
        entering = ~is_old & selected
        free_feature, free_slot = feature_sorted[free], entry_ref[order[free]]
        enter_feature, enter_row = feature_sorted[entering], entry_ref[order[entering]]
        if enter_row.numel() == 0:
            return enter_row
        # the k-th entering row of a feature takes its k-th free slot (there are at least as many free slots)
        n_features = self.priority.shape[0]
        free_start = _segment_starts(free_feature, n_features)
        slot = free_slot[free_start[enter_feature] + _rank_in_segment(enter_feature, n_features)]
        self.priority[enter_feature, slot] = entry_priority[order[entering]]
        self.score[enter_feature, slot] = scores[enter_row, enter_feature].float()
        self.context_id[enter_feature, slot] = context_ids[enter_row]
        self._write_rows(enter_feature * n + slot, enter_row * n_features + enter_feature, active, len(scores))
        return enter_row

    def _write_rows(self, slot_index: Tensor, pair_index: Tensor, active: "ActiveEntries", batch_size: int) -> None:
        """Fill slots (flat index feature * n + slot) with the activations of (row, feature) pairs (flat index
        row * F + feature). Built from the batch's positive entries, not read from the dense (B, S, F) activations:
        a row of one feature is S values F apart in memory, so reading P rows costs P * S cache misses, while the
        positive entries are few and already listed."""
        rows = self.activations.view(-1, self.activations.shape[-1])  # (F * n, S)
        rows.index_fill_(0, slot_index, 0)
        target = torch.full((batch_size * self.priority.shape[0],), -1, dtype=torch.int64, device=slot_index.device)
        target[pair_index] = slot_index
        entry_slot = target[active.pair]
        keep = entry_slot >= 0
        rows[entry_slot[keep], active.position[keep]] = active.value[keep]

    def sorted_slots(self) -> tuple[Tensor, Tensor]:
        """(order (F, n) of slots: filled ones by score descending, ties by stream order; counts (F,))."""
        filled = self.priority > -math.inf
        key_id = torch.where(filled, self.context_id, torch.iinfo(torch.int64).max)
        by_id = torch.argsort(key_id, dim=1, stable=True)
        key_score = torch.where(filled, self.score, -math.inf).gather(1, by_id)
        order = by_id.gather(1, torch.argsort(key_score, dim=1, descending=True, stable=True))
        return order, filled.sum(1)


class SparseFeatureActs(NamedTuple):
    """Feature activations (B, S, F) given by lists of their entries (any order; a pair may repeat only with the
    value 0): what a dictionary's sparse path selects, without the dense tensor."""

    shape: tuple[int, int, int]
    token: Tensor  # b * S + s
    feature: Tensor
    value: Tensor

    @property
    def device(self) -> torch.device:
        return self.value.device


@dataclass
class ActiveEntries:
    """The positive entries of a batch's feature activations (B, S, F), as flat lists in memory order."""

    pair: Tensor  # row * F + feature
    position: Tensor  # position in the context
    feature: Tensor
    value: Tensor  # float32

    @classmethod
    def of(cls, feature_acts: Tensor) -> "ActiveEntries":
        flat = feature_acts.view(-1)
        index = flat.nonzero().squeeze(1)
        return cls.at(index, flat[index], feature_acts.shape)

    @classmethod
    def at(cls, index: Tensor, value: Tensor, shape: Sequence[int]) -> "ActiveEntries":
        """The entries at flat indices `index` (sorted) of a (B, S, F) tensor, with their values."""
        _, S, F = shape
        feature = index % F
        row, position = index // (S * F), index // F % S
        return cls(pair=row * F + feature, position=position, feature=feature, value=value.float())


def _segment_starts(sorted_keys: Tensor, n_keys: int) -> Tensor:
    """(n_keys,) index of the first element of each key's run in `sorted_keys` (ints in [0, n_keys), sorted)."""
    counts = torch.bincount(sorted_keys, minlength=n_keys)
    return counts.cumsum(0) - counts


def _rank_in_segment(sorted_keys: Tensor, n_keys: int) -> Tensor:
    """Position of each element within its key's run of `sorted_keys`."""
    return torch.arange(len(sorted_keys), device=sorted_keys.device) - _segment_starts(sorted_keys, n_keys)[sorted_keys]


class ContextStore:
    """Tokens and provenance of the contexts some pool holds, each stored once (pools keep context ids).

    Contexts are appended in stream order, so ids stay sorted; contexts no pool holds any more are dropped whenever
    the store has doubled since the last clean-up, which bounds it by twice the contexts the pools hold."""

    FIELDS = ("tokens", "lengths", "doc_index", "doc_position", "source_idx")
    MIN_COMPACT_ROWS = 1024
    """No clean-up below this many stored contexts (plus four batches): a clean-up scans every pool."""

    def __init__(self, context_size: int, device: torch.device):
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        self.chunks = [
            {
                "ids": empty,
                **{field: empty for field in self.FIELDS},
                "tokens": torch.zeros((0, context_size), dtype=torch.int32, device=device),
            }
        ]
        self.size = 0
        self.compacted_size = 0

    def add(self, batch: ContextBatch, context_ids: Tensor, rows: Tensor) -> None:
        rows = torch.unique(rows)
        if rows.numel() == 0:
            return
        chunk = {"ids": context_ids[rows], **{field: getattr(batch, field)[rows].long() for field in self.FIELDS}}
        chunk["tokens"] = chunk["tokens"].to(torch.int32)
        self.chunks.append(chunk)
        self.size += len(rows)

    def merged(self) -> dict[str, Tensor]:
        if len(self.chunks) > 1:
            self.chunks = [{key: torch.cat([chunk[key] for chunk in self.chunks]) for key in self.chunks[0]}]
        return self.chunks[0]

    def compact_if_grown(self, live_ids: Callable[[], Tensor], min_size: int) -> None:
        if self.size < max(2 * self.compacted_size, min_size):
            return
        store = self.merged()
        keep = torch.isin(store["ids"], live_ids())
        self.chunks = [{key: value[keep] for key, value in store.items()}]
        self.size = self.compacted_size = int(keep.sum())

    def lookup(self, ids: Tensor) -> dict[str, Tensor]:
        """The stored fields of contexts `ids` (any shape; each must be stored)."""
        store = self.merged()
        if len(store["ids"]) == 0:  # no pool holds a context: any lookup is of empty slots
            store = {
                key: torch.zeros((1, *value.shape[1:]), dtype=value.dtype, device=value.device)
                for key, value in store.items()
            }
        index = torch.searchsorted(store["ids"], ids.reshape(-1)).clamp(max=len(store["ids"]) - 1)
        return {field: store[field][index].reshape(*ids.shape, *store[field].shape[1:]) for field in self.FIELDS}


# ---------------------------------------------------------------------------------------------------- analyzer


class FeatureAnalysisState:
    """Running statistics and pools of F features; `update` takes one batch of feature activations."""

    def __init__(
        self,
        cfg: FeatureAnalyzerConfig,
        n_features: int,
        context_size: int,
        device: torch.device,
        feature_index: Tensor | None = None,
    ):
        """`feature_index` (F,): these features' indices in the dictionary (a shard's are a part of them; None: all
        of them, in order)."""
        self.cfg = cfg
        self.n_features = n_features
        self.feature_index = feature_index
        self.device = device
        self.act_times = torch.zeros(n_features, dtype=torch.int64, device=device)
        self.sum_acts = torch.zeros(n_features, dtype=torch.float64, device=device)
        self.max_acts = torch.zeros(n_features, device=device)
        self.histogram_edges = cfg.histogram_edges().to(device)
        self.histogram = torch.zeros(n_features * cfg.histogram_bins, dtype=torch.int64, device=device)
        self.n_analyzed_tokens = 0
        self.n_contexts = 0
        sizes = cfg.pool_sizes()
        self.pools = {name: SamplePool(name, n_features, n, context_size, device) for name, n in sizes.items()}
        self.bands = {band.name: band for band in cfg.bands}
        self.contexts = ContextStore(context_size, device)

    def update(self, feature_acts: Tensor | SparseFeatureActs, batch: ContextBatch) -> None:
        """`feature_acts` (B, S, F) of the batch's contexts, dense (then modified in place: masked positions and
        negative values set to 0) or as lists of entries (the same analysis, without passes over a dense tensor)."""
        B, S, F = feature_acts.shape
        if F != self.n_features or B != len(batch) or S != batch.tokens.shape[1]:
            raise ValueError(
                f"feature activations of shape {tuple(feature_acts.shape)} do not match {len(batch)} contexts of "
                f"{batch.tokens.shape[1]} positions and {self.n_features} features"
            )
        if isinstance(feature_acts, SparseFeatureActs):
            active, scores = _positive_entries(feature_acts, batch.mask)
        else:
            feature_acts = feature_acts if feature_acts.is_contiguous() else feature_acts.contiguous()
            masked = (~batch.mask.reshape(-1)).nonzero().squeeze(1)
            feature_acts.view(B * S, F).index_fill_(0, masked, 0)  # masked positions never count (touch only those)
            feature_acts.clamp_(min=0)
            active = ActiveEntries.of(feature_acts)
            scores = feature_acts.amax(1)  # (B, F) each context's max

        # statistics over the positive entries only (sparse: cheap)
        self.act_times += torch.bincount(active.feature, minlength=F)
        self.sum_acts += torch.bincount(active.feature, weights=active.value.double(), minlength=F)
        bins = torch.bucketize(active.value, self.histogram_edges[1:-1], right=True)
        self.histogram += torch.bincount(
            active.feature * self.cfg.histogram_bins + bins, minlength=self.histogram.numel()
        )

        self.max_acts = torch.maximum(self.max_acts, scores.amax(0).float())
        context_ids = torch.arange(self.n_contexts, self.n_contexts + B, device=self.device)
        self._merge_pools(scores, active, batch, context_ids)
        self.n_analyzed_tokens += int(batch.mask.sum())
        self.n_contexts += B

    def _merge_pools(self, scores: Tensor, active: ActiveEntries, batch: ContextBatch, context_ids: Tensor) -> None:
        top = self.pools[TOP_POOL]
        entered = [top.offer(torch.where(scores > 0, scores.float(), -math.inf), scores, active, context_ids)]
        random_pools = [name for name in self.bands if self.pools[name].capacity] + (
            [NON_ACTIVATING_POOL] if self.pools[NON_ACTIVATING_POOL].capacity else []
        )
        if random_pools:
            draw = context_priority(context_ids, self.n_features, self.cfg.seed, self.feature_index)  # (B, F)
        for name in random_pools:
            pool = self.pools[name]
            if name == NON_ACTIVATING_POOL:
                qualifies = (scores == 0) & batch.mask.any(1, keepdim=True)
            else:
                low, high = self.bands[name].low * self.max_acts, self.bands[name].high * self.max_acts
                pool.drop(pool.score > low[:, None])  # the max grew: rows now below the band leave it
                qualifies = (scores > low) & (scores <= high)
            entered.append(pool.offer(torch.where(qualifies, draw, -math.inf), scores, active, context_ids))
        self.contexts.add(batch, context_ids, torch.cat(entered))
        self.contexts.compact_if_grown(self._live_context_ids, 4 * len(batch) + self.contexts.MIN_COMPACT_ROWS)

    def _live_context_ids(self) -> Tensor:
        return torch.cat([pool.context_id[pool.priority > -math.inf] for pool in self.pools.values()])

    def results(self, analysis_name: str, source_names: Sequence[str]) -> list[FeatureAnalysis]:
        """One FeatureAnalysis per feature (index order), on the CPU as NumPy arrays."""
        for name, band in self.bands.items():  # re-check every band against the final max
            self.pools[name].drop(self.pools[name].score > band.low * self.max_acts[:, None])
        act_times = self.act_times.cpu().numpy()
        mean = (self.sum_acts / self.act_times.clamp(min=1)).cpu().numpy()
        max_acts = self.max_acts.cpu().numpy()
        histogram = self.histogram.view(self.n_features, -1).cpu().numpy()
        edges = self.histogram_edges.cpu().numpy()
        pools = [(name, *self._pool_arrays(pool, source_names)) for name, pool in self.pools.items() if pool.capacity]

        analyses = []
        for i in range(self.n_features):
            samples = []
            for name, counts, (tokens, acts, lengths, doc_index, doc_position, dataset) in pools:
                n = counts[i]
                samples.append(
                    FeatureSamples(
                        name=name,
                        tokens=tokens[i, :n],
                        activations=acts[i, :n],
                        lengths=lengths[i, :n],
                        doc_index=doc_index[i, :n],
                        doc_position=doc_position[i, :n],
                        dataset=dataset(i, n),
                    )
                )
            analyses.append(
                FeatureAnalysis(
                    name=analysis_name,
                    act_times=int(act_times[i]),
                    n_analyzed_tokens=self.n_analyzed_tokens,
                    max_feature_acts=float(max_acts[i]),
                    mean_feature_acts=float(mean[i]),
                    histogram_edges=edges,
                    histogram_counts=histogram[i],
                    samples=samples,
                )
            )
        return analyses

    def _pool_arrays(self, pool: SamplePool, source_names: Sequence[str]) -> tuple[list[int], list]:
        """Counts (F,) and the pool's row arrays (F, n, ...) in sorted order, padding past each row's length cut,
        and `dataset(feature, count)`: the dataset names of the feature's first `count` rows."""
        order, counts = pool.sorted_slots()
        context = self.contexts.lookup(pool.context_id.gather(1, order))
        lengths = context["lengths"].to(torch.int32)
        beyond = torch.arange(pool.activations.shape[-1], device=order.device)[None, None, :] >= lengths[..., None]
        acts = pool.activations.gather(1, order[..., None].expand_as(pool.activations)).masked_fill_(beyond, 0)
        tokens = context["tokens"].masked_fill_(beyond, 0)
        arrays = [tokens, acts, lengths, context["doc_index"], context["doc_position"]]
        source = context["source_idx"].cpu().numpy()
        names = [*source_names, *(f"source_{i}" for i in range(len(source_names), source.max() + 1))]
        counts = counts.cpu()
        filled = source[(torch.arange(source.shape[1])[None, :] < counts[:, None]).numpy()]
        if filled.size == 0 or (filled == filled[0]).all():  # one source (the usual case): no lookup per row
            name = names[filled[0]] if filled.size else ""

            def dataset(feature: int, count: int) -> list[str]:
                return [name] * count
        else:
            rows = source.tolist()

            def dataset(feature: int, count: int) -> list[str]:
                return [names[index] for index in rows[feature][:count]]

        return counts.tolist(), [*(array.cpu().numpy() for array in arrays), dataset]


Encoder = Callable[[Item], Tensor]
"""Feature activations (B, S, F) of a 2-D item's contexts."""


class FeatureAnalyzer:
    def __init__(self, cfg: FeatureAnalyzerConfig):
        self.cfg = cfg

    def analyze(
        self,
        sae,
        stream: Iterable[Item],
        *,
        source_names: Sequence[str] = (),
        analysis_name: str = "default",
        progress: bool = True,
    ) -> list[FeatureAnalysis]:
        """Analyse every feature of `sae` (any SparseDictionary) over the stream's contexts; under no_grad, in eval
        mode (BatchTopK uses its inference threshold), on the raw activations scaled as the dictionary expects."""
        was_training = sae.training
        sae.eval()
        shards = sae.feature_shards
        feature_index = None if shards is None else analysed_feature_index(sae)
        try:
            analyses = self.analyze_features(
                stream,
                lambda item: encode_contexts(sae, item),
                n_features=sae.n_analysed_features,
                source_names=source_names,
                analysis_name=analysis_name,
                progress=progress,
                z_patterns=z_pattern_recorder(sae),  # a Lorsa's top contexts: see analysis/z_patterns.py
                feature_index=feature_index,
            )
        finally:
            sae.train(was_training)
        locations = decoder_locations(sae, self.cfg.location_threshold)
        if locations is not None:
            for analysis, location in zip(analyses, locations, strict=True):
                analysis.decoder_norms, analysis.decoder_cosines, analysis.location = location
        if shards is not None:  # every shard analysed its own features: the whole list, in feature order, everywhere
            parts = [None] * shards.size
            torch.distributed.all_gather_object(parts, (feature_index.tolist(), analyses), group=shards.group)
            whole: list = [None] * sum(len(part) for _, part in parts)
            for indices, part in parts:
                for index, analysis in zip(indices, part, strict=True):
                    whole[index] = analysis
            analyses = whole
        return analyses

    @torch.no_grad()
    def analyze_features(
        self,
        stream: Iterable[Item],
        encode: Encoder,
        *,
        n_features: int,
        source_names: Sequence[str] = (),
        analysis_name: str = "default",
        progress: bool = True,
        z_patterns: ZPatternRecorder | None = None,
        feature_index: Tensor | None = None,
    ) -> list[FeatureAnalysis]:
        """The analysis of any dictionary: `encode` maps a 2-D item (restricted to the contexts being analysed) to
        feature activations (B, S, F); the rest (budget, masks, statistics, pools) is shared. `z_patterns` (a Lorsa)
        sees each batch after the pools took it and adds z-patterns to the top pools' records."""
        budget = self.cfg.total_analyzing_tokens
        state: FeatureAnalysisState | None = None
        bar = tqdm(total=budget, unit="tok", desc="analysing features", disable=not progress, leave=False)
        try:
            for item in stream:
                batch = ContextBatch.from_item(item, self.cfg.ignore_token_ids)
                counts = batch.mask.sum(1)
                remaining = budget - (state.n_analyzed_tokens if state else 0)
                reaching = (counts.cumsum(0) >= remaining).nonzero()
                n_rows = int(reaching[0]) + 1 if len(reaching) else len(batch)
                if n_rows < len(batch):
                    batch = batch.take(n_rows)
                    item = {key: value[:n_rows] for key, value in item.items()}
                feature_acts = encode(item)
                if state is None:
                    state = FeatureAnalysisState(self.cfg, n_features, batch.tokens.shape[1], feature_acts.device,
                                                 feature_index)  # fmt: skip
                before = state.n_analyzed_tokens
                state.update(feature_acts, _to_device(batch, feature_acts.device))
                if z_patterns is not None:  # the batch's contexts are ids n_contexts - len(batch) ... n_contexts - 1
                    z_patterns.observe(item, state.pools[TOP_POOL], state.n_contexts - len(batch))
                bar.update(state.n_analyzed_tokens - before)
                if state.n_analyzed_tokens >= budget:
                    break
        finally:
            bar.close()
        if state is None or state.n_analyzed_tokens == 0:
            raise ValueError(
                "the activation stream yielded no valid tokens to analyse (empty dataset or cache, or every position "
                "masked out)"
            )
        analyses = state.results(analysis_name, source_names)
        if z_patterns is not None:
            z_patterns.finish(state.pools[TOP_POOL], analyses)
        return analyses


def _positive_entries(acts: SparseFeatureActs, mask: Tensor) -> tuple[ActiveEntries, Tensor]:
    """The positive entries at unmasked positions, in the order `ActiveEntries.of` lists a dense tensor's (so sums
    over them add up in the same order), and each context's max per feature (B, F)."""
    B, S, F = acts.shape
    keep = (acts.value > 0) & mask.reshape(-1)[acts.token]
    index = acts.token[keep] * F + acts.feature[keep]
    index, order = index.sort()
    value = acts.value[keep][order]
    active = ActiveEntries.at(index, value, acts.shape)
    scores = value.new_zeros(B * F).scatter_reduce_(0, active.pair, value, "amax")
    return active, scores.view(B, F)


def _to_device(batch: ContextBatch, device: torch.device) -> ContextBatch:
    if batch.tokens.device == device:
        return batch
    return ContextBatch(*(getattr(batch, name).to(device) for name in batch.__dataclass_fields__))


def encode_contexts(sae, item: Item) -> Tensor | SparseFeatureActs:
    """Feature activations (B, S, F) of a dictionary on a 2-D item's raw activations (scaled as it expects): as
    lists of entries when its sparse path gives them (the TopK family of the kinds whose analysed features are their
    features), else dense."""
    hooks = sae.cfg.hook_points
    missing = [hook for hook in hooks if hook not in item]
    if missing:
        raise KeyError(f"the activation stream has no {missing}; it has {sorted(item)}")
    batch = {hook: item[hook].to(sae.device) for hook in hooks}
    if _encodes_sparsely(sae):
        x = sae.prepare(batch).input
        entries = sae.encode_sparse(x)
        if entries is not None:
            B, S = x.shape[:2]
            return SparseFeatureActs((B, S, sae.n_features), *entries)
    return sae.encode_batch(batch)


def _encodes_sparsely(sae) -> bool:
    """Whether `encode_batch` is the base's prepare-then-encode, with features as the analysis sees them (a kind
    that merges features, e.g. a crosscoder's heads, or encodes otherwise, is analysed densely)."""
    return (
        isinstance(sae, SparseCoder)
        and type(sae).encode_batch is SparseDictionary.encode_batch
        and type(sae).encode is SparseCoder.encode
        and sae.n_analysed_features == sae.n_features
    )


# ---------------------------------------------------------------------------------------------------- decoder locations


class DecoderLocation(NamedTuple):
    """Where one feature writes (the FeatureAnalysis fields of the same names)."""

    decoder_norms: dict[str, float]
    decoder_cosines: list[list[float]] | None
    location: str


@torch.no_grad()
def decoder_locations(sae, threshold: float) -> list[DecoderLocation] | None:
    """Per analysed feature (in `encode_batch` order), where its decoders write: a crosscoder's heads or a CLT's
    output layers; None for kinds with one decoder per feature. Computed once from the weights, all features of a
    head or layer at a time.

    A norm is that of what one unit of the feature's activation, as the analysis reports it, adds to the raw
    output: a folded dictionary's decoder as it is; an unfolded dataset-wise one's divided by the output hook's
    dataset-wise scale, which gives the folded numbers (a CLT's differ from its folded ones by the input scale its
    activations differ by). Cosines are those of the decoder vectors, which positive scales do not change."""
    if isinstance(sae, CrossCoder):
        return _crosscoder_locations(sae, threshold)
    if isinstance(sae, CrossLayerTranscoder):
        return _clt_locations(sae, threshold)
    return None


def _crosscoder_locations(sae: CrossCoder, threshold: float) -> list[DecoderLocation]:
    heads = sae.cfg.heads
    norms = sae.decoder_norm().float() / _output_scales(sae, heads)[:, None]  # (H, F)
    cosines = sae.decoder_similarities().float().clamp(-1, 1)  # (F, H, H)

    def label(holding: list[str]) -> str:
        if len(holding) == 1:
            return f"exclusive to {holding[0]}"
        return "shared" if len(holding) == len(heads) else f"shared by {', '.join(holding)}"

    labels = _labels(norms, threshold, heads, label)
    return [
        DecoderLocation(dict(zip(heads, row, strict=True)), matrix, name)
        for row, matrix, name in zip(norms.t().tolist(), cosines.tolist(), labels, strict=True)
    ]


def _clt_locations(sae: CrossLayerTranscoder, threshold: float) -> list[DecoderLocation]:
    """Feature s * d_sae + i is feature i of layer s (`encode_batch` flattens (L, F)); it writes to outputs t >= s."""
    hooks_in, hooks_out = sae.cfg.hook_points_in, sae.cfg.hook_points_out
    scales = _output_scales(sae, hooks_out)
    locations = []
    for s, hook_in in enumerate(hooks_in):  # a few layers; each at once for all its features
        targets = hooks_out[s:]
        norms = torch.stack([sae.W_D[t][s].float().norm(dim=-1) / scales[t] for t in range(s, len(hooks_out))])
        reads = f"reads {hook_in}, writes to "
        labels = _labels(norms, threshold, targets, lambda holding, reads=reads: reads + ", ".join(holding))
        locations += [
            DecoderLocation(dict(zip(targets, row, strict=True)), None, name)
            for row, name in zip(norms.t().tolist(), labels, strict=True)
        ]
    return locations


def _output_scales(sae, hooks: Sequence[str]) -> Tensor:
    """(len(hooks),) the dataset-wise scale of each output hook of an unfolded dataset-wise dictionary, else ones."""
    if sae.cfg.norm_activation != "dataset-wise":
        return torch.ones(len(hooks), device=sae.device)
    return torch.tensor([sae.dataset_scale(hook) for hook in hooks], device=sae.device)


def _labels(norms: Tensor, threshold: float, names: Sequence[str], label: Callable[[list[str]], str]) -> list[str]:
    """Per feature (column of `norms` (K, F)), `label` of the names whose norm is at least `threshold` times the
    feature's largest; "nowhere (zero decoder)" when every norm is 0. Each distinct pattern is labelled once."""
    holds = (norms >= threshold * norms.amax(0)) & (norms.amax(0) > 0)  # (K, F)
    patterns, inverse = torch.unique(holds.t(), dim=0, return_inverse=True)
    texts = []
    for pattern in patterns.tolist():
        holding = [name for name, held in zip(names, pattern, strict=True) if held]
        texts.append(label(holding) if holding else "nowhere (zero decoder)")
    return [texts[i] for i in inverse.tolist()]
