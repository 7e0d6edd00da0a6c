"""What the feature browser shows, as plain JSON-able dicts read from the record store: the HTML pages render these
dicts and the JSON API returns them as they are, so both always agree.

Nothing here reads more than a page needs: the feature table is sorted, filtered and paged by the store's query
(`RecordStore.feature_page`), the frequency histogram comes from a query of frequencies only, and only the feature
page reads sample pools (of one feature).
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np

from lm_saes_core.analysis.feature_analyzer import TOP_POOL
from lm_saes_core.analysis.render import analysed_feature_count, dictionary_label
from lm_saes_core.analysis.z_patterns import shown_sources
from lm_saes_core.store import (
    DictionaryRecord,
    FeatureAnalysis,
    FeatureFilter,
    FeatureRecord,
    FeatureSamples,
    FeatureSummary,
    RecordStore,
)

FREQUENCY_BINS = 40
SAMPLE_HISTOGRAM_BINS = 30
SEARCH_LIMIT = 100

Decode = Callable[[list[int]], list[str]]
"""Token ids -> one piece of text per token (`lm_saes_core.analysis.render.token_pieces` with a tokenizer)."""


class NotFound(LookupError):
    """A dictionary, feature or page that is not in the store; the message says which (shown on the 404 page)."""


class BadRequest(ValueError):
    """A query parameter the browser cannot use; the message names it and what would be right."""


# ------------------------------------------------------------------------------------------------ dictionaries


def metric(metrics: Mapping[str, float], name: str) -> float | None:
    """Evaluation stores `metrics/<name>`; other writers may use the bare name."""
    value = metrics.get(f"metrics/{name}", metrics.get(name))
    return None if value is None else float(value)


def training_tokens(record: DictionaryRecord) -> int | None:
    """Tokens the dictionary was trained on, when the record holds them. The runners do not store them yet (the
    trainer logs `details/n_training_tokens`); a metric or config key of that name is read when a writer adds one."""
    for key in ("details/n_training_tokens", "n_training_tokens", "training_tokens"):
        value = record.metrics.get(key, record.cfg.get(key))
        if value is not None:
            return int(value)
    return None


def pipeline_origin(record: DictionaryRecord, dagster_url: str | None) -> dict[str, Any] | None:
    """The Dagster asset a dictionary record came from, with a link into the Dagster UI at `dagster_url`, or None.

    Hook: records hold no explicit origin field. The pipelines store a dictionary as name = item (the asset
    partition), series = pipeline (the asset group and key prefix), with its weights at the artefact layout
    `<root>/<pipeline>/dictionary/<item>`; a record matching that layout is taken to come from the pipeline's
    `dictionary` asset. When a writer records its origin explicitly, read it here instead."""
    parts = Path(record.path).parts
    if len(parts) < 3 or tuple(parts[-3:]) != (record.series, "dictionary", record.name):
        return None
    asset_key = [record.series, "dictionary"]
    url = None
    if dagster_url:
        query = urlencode({"view": "partitions", "partition": record.name})
        url = f"{dagster_url.rstrip('/')}/assets/{'/'.join(quote(part, safe='') for part in asset_key)}?{query}"
    return {"pipeline": record.series, "asset_key": asset_key, "partition": record.name, "url": url}


def analysis_counts(store: RecordStore, record: DictionaryRecord) -> dict[str, int]:
    """Analysis name -> features it covers."""
    return {
        name: store.count_features_with_analysis(record.name, record.series, name)
        for name in store.list_analysis_names(record.name, record.series)
    }


def dictionary_summary(
    store: RecordStore, record: DictionaryRecord, dagster_url: str | None, analyses: dict[str, int] | None = None
) -> dict[str, Any]:
    """`analyses`: `analysis_counts` of the record, when the caller has them already."""
    kind, hooks = dictionary_label(record.cfg)
    analyses = analysis_counts(store, record) if analyses is None else analyses
    return {
        "name": record.name,
        "series": record.series,
        "model": record.model_name,
        "kind": kind,
        "act_fn": record.cfg.get("act_fn"),
        "hooks": hooks,
        "d_sae": record.cfg.get("d_sae"),
        "n_features": analysed_feature_count(record.cfg),
        "training_tokens": training_tokens(record),
        "explained_variance": metric(record.metrics, "explained_variance"),
        "l0": metric(record.metrics, "l0"),
        "dead_fraction": metric(record.metrics, "dead_fraction"),
        "ce_loss_recovered": metric(record.metrics, "ce_loss_recovered"),
        "metrics": dict(record.metrics),
        "analyses": analyses,
        "path": record.path,
        "dagster": pipeline_origin(record, dagster_url),
    }


def list_dictionaries(store: RecordStore, dagster_url: str | None) -> list[dict[str, Any]]:
    return [dictionary_summary(store, record, dagster_url) for record in store.list_dictionaries()]


def resolve_dictionary(store: RecordStore, name: str, series: str | None) -> tuple[DictionaryRecord, list[str]]:
    """The dictionary `name` of `series`, and every series holding a dictionary of that name. Without a series: the
    only one, else "default" when it is among them, else the first in order (the page links the others)."""
    if series is not None:
        record = store.get_dictionary(name, series)
        if record is None:
            raise NotFound(f"no dictionary {name!r} in series {series!r}")
        others = [d.series for d in store.list_dictionaries() if d.name == name]
        return record, others
    matching = [d for d in store.list_dictionaries() if d.name == name]
    if not matching:
        raise NotFound(f"no dictionary {name!r} in the record store")
    chosen = next((d for d in matching if d.series == "default"), matching[0])
    return chosen, [d.series for d in matching]


def choose_analysis(record: DictionaryRecord, names: Sequence[str], analysis: str | None) -> str:
    """`analysis` when the dictionary has it (NotFound otherwise); by default "default", else the first one."""
    if analysis is not None:
        if analysis not in names:
            known = ", ".join(names) or "none"
            raise NotFound(f"dictionary {record.name!r} has no analysis {analysis!r}; it has: {known}")
        return analysis
    return "default" if "default" in names or not names else names[0]


# ------------------------------------------------------------------------------------------------ feature table


def frequency_histogram(frequencies: np.ndarray, bins: int = FREQUENCY_BINS) -> dict[str, Any]:
    """Features per bin of log10 frequency. Bar i covers [min, max), the last one [min, +inf) (it ends at the
    largest frequency), so a bar's `min`/`max` as a `FeatureFilter` select exactly the features it counts. Dead
    features (frequency 0) are counted apart, their filter being `max_frequency` = the smallest positive one."""
    frequencies = np.asarray(frequencies, dtype=np.float64)
    positive = np.sort(frequencies[frequencies > 0])
    dead = int((frequencies <= 0).sum())
    if not len(positive):
        return {"n_features": len(frequencies), "dead": dead, "dead_max": None, "bars": []}
    low, high = positive[0], positive[-1]
    log_edges = np.linspace(math.log10(low), math.log10(high), bins + 1) if high > low else None
    edges = np.array([low, high]) if log_edges is None else 10.0**log_edges
    edges[0], edges[-1] = low, high  # exactly the data's ends: the first and last features stay in their bars
    edges = np.maximum.accumulate(edges)
    counts, _ = np.histogram(positive, bins=edges)
    bars = []
    for i, count in enumerate(counts):
        last = i == len(counts) - 1
        bars.append(
            {
                "min": float(edges[i]),
                "max": None if last else float(edges[i + 1]),
                "log10_min": math.log10(edges[i]),
                "log10_max": math.log10(edges[i + 1]),
                "count": int(count),
            }
        )
    return {"n_features": len(frequencies), "dead": dead, "dead_max": float(low), "bars": bars}


@dataclass
class TableQuery:
    """The feature table's parameters, parsed from a query string (see `parse_table_query`)."""

    series: str | None = None
    analysis: str | None = None
    sort: str = "index"
    descending: bool = False
    where: FeatureFilter | None = None
    page: int = 1
    per_page: int = 50


def summary_dict(row: FeatureSummary) -> dict[str, Any]:
    return {
        "index": row.index,
        "act_times": row.act_times,
        "n_analyzed_tokens": row.n_analyzed_tokens,
        "frequency": row.frequency,
        "max_activation": row.max_feature_acts,
        "mean_activation": row.mean_feature_acts,
        "explanation": row.explanation,
        "score": row.score,
        "scores": row.scores,
        "location": row.location,
    }


def feature_table(store: RecordStore, record: DictionaryRecord, query: TableQuery, analysis: str) -> dict[str, Any]:
    offset = (query.page - 1) * query.per_page
    page = store.feature_page(
        record.name,
        record.series,
        analysis_name=analysis,
        sort=query.sort,
        descending=query.descending,
        where=query.where,
        limit=query.per_page,
        offset=offset,
    )
    n_pages = max(1, math.ceil(page.total / query.per_page))
    if query.page > n_pages:
        raise NotFound(f"page {query.page} of the feature table does not exist: there are {n_pages}")
    where = query.where or FeatureFilter()
    return {
        "total": page.total,
        "page": query.page,
        "per_page": query.per_page,
        "n_pages": n_pages,
        "sort": query.sort,
        "descending": query.descending,
        "filter": {key: value for key, value in vars(where).items() if value is not None},
        "rows": [summary_dict(row) for row in page.rows],
    }


# ------------------------------------------------------------------------------------------------ one feature


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def activation_histogram(analysis: FeatureAnalysis) -> dict[str, Any]:
    """The analysis' histogram cut to its filled bins, or (for an analysis that stored none) one of the positive
    activations in its sample pools, with `source` saying which."""
    counts, edges = np.asarray(analysis.histogram_counts), np.asarray(analysis.histogram_edges, dtype=np.float64)
    filled = np.flatnonzero(counts)
    if len(filled) and len(edges) == len(counts) + 1:
        first, last = filled[0], filled[-1]
        return {
            "source": "analysis",
            "edges": [float(edge) for edge in edges[first : last + 2]],
            "counts": [int(count) for count in counts[first : last + 1]],
        }
    values = [pool.activations[row, : int(pool.lengths[row])] for pool in analysis.samples for row in range(len(pool))]
    values = np.concatenate(values) if values else np.zeros(0, np.float32)
    values = values[values > 0].astype(np.float64)
    if not len(values):
        return {"source": "none", "edges": [], "counts": []}
    sample_counts, sample_edges = np.histogram(values, bins=SAMPLE_HISTOGRAM_BINS)
    return {
        "source": "samples",
        "edges": [float(edge) for edge in sample_edges],
        "counts": [int(count) for count in sample_counts],
    }


def context_dict(samples: FeatureSamples, row: int, decode: Decode, window: int) -> dict[str, Any]:
    """One context cropped to ±window tokens around its strongest position: each token's text and activation. A
    character split over several byte-level tokens shows with the token that completes it, carrying the largest
    activation of its parts (as `lm-saes show feature` does)."""
    length = int(samples.lengths[row])
    activations = samples.activations[row, :length].astype(np.float64)
    centre = int(activations.argmax()) if length else 0
    start, end = max(0, centre - window), min(length, centre + window + 1)
    ids = samples.tokens[row, start:end].tolist()
    pieces = decode(ids)
    tokens, carried = [], 0.0
    for position, (piece, activation) in enumerate(zip(pieces, activations[start:end], strict=True), start):
        carried = max(carried, float(activation))
        if not piece:
            continue
        tokens.append(
            {"text": piece, "activation": carried, "position": position, "token_id": int(ids[position - start])}
        )
        carried = 0.0
    return {
        "max_activation": float(activations.max()) if length else 0.0,
        "dataset": samples.dataset[row],
        "doc_index": int(samples.doc_index[row]),
        "doc_position": int(samples.doc_position[row]),
        "length": length,
        "start": start,
        "end": end,
        "tokens": tokens,
        **z_pattern_sources(samples, row, decode),
    }


def z_pattern_sources(samples: FeatureSamples, row: int, decode: Decode) -> dict[str, Any]:
    """A Lorsa's top context: `sources`, the source tokens feeding its peak activation, strongest first (text,
    position, contribution; see `ZPatterns`), and `n_weak_sources` stored but under `MIN_SHOWN_SHARE` of the
    activation; `sources` None for rows without z-patterns."""
    if samples.z_patterns is None:
        return {"sources": None, "n_weak_sources": 0}
    shown, n_weak = shown_sources(samples, row)
    sources = [
        {"text": decode([int(samples.tokens[row, source])])[0], "position": source, "contribution": value}
        for source, value in shown
    ]
    return {"sources": sources, "n_weak_sources": n_weak}


def pools_dicts(analysis: FeatureAnalysis, decode: Decode, window: int, n_top: int, n_other: int) -> list[dict]:
    pools = sorted(analysis.samples, key=lambda pool: pool.name != TOP_POOL)  # top contexts first, then as stored
    shown = []
    for pool in pools:
        n_rows = min(len(pool), n_top if pool.name == TOP_POOL else n_other)
        contexts = [context_dict(pool, row, decode, window) for row in range(n_rows)]
        shown.append({"name": pool.name, "n_contexts": len(pool), "contexts": contexts})
    return shown


def decoder_dict(analysis: FeatureAnalysis) -> dict[str, Any] | None:
    """Where a crosscoder's or CLT's feature writes: its decoder norm per head / output layer (with each norm's share
    of the largest), a crosscoder's cosines between heads, the location label. None for one decoder per feature."""
    if analysis.decoder_norms is None and analysis.location is None:
        return None
    norms = analysis.decoder_norms or {}
    largest = max(norms.values(), default=0.0)
    return {
        "location": analysis.location,
        "norms": [
            {"hook": hook, "norm": float(norm), "share": float(norm) / largest if largest > 0 else 0.0}
            for hook, norm in norms.items()
        ],
        "cosines": analysis.decoder_cosines,
    }


def interpretation_dict(record: FeatureRecord) -> dict[str, Any] | None:
    interpretation = record.interpretation
    if interpretation is None:
        return None
    return {
        "explanation": interpretation.explanation,
        "model": interpretation.model,
        "error": interpretation.error,
        "scores": [
            {
                "method": score.method,
                "accuracy": score.accuracy,
                "balanced_accuracy": score.balanced_accuracy,
                "precision": score.precision,
                "recall": score.recall,
                "n_examples": score.n_examples,
                "passed": score.passed,
            }
            for score in interpretation.scores
        ],
    }


def logits_dict(record: FeatureRecord) -> dict[str, Any] | None:
    if record.logits is None:
        return None

    def tokens(items) -> list[dict[str, Any]]:
        return [{"token": item.token, "token_id": item.token_id, "logit": item.logit} for item in items]

    return {"promoted": tokens(record.logits.top_positive), "suppressed": tokens(record.logits.top_negative)}


def check_feature_index(record: DictionaryRecord, index: int) -> int | None:
    """The dictionary's feature count; NotFound for an index outside it."""
    n_features = analysed_feature_count(record.cfg)
    if index < 0 or (n_features is not None and index >= n_features):
        bound = f"0 <= index < {n_features}" if n_features is not None else "index >= 0"
        raise NotFound(f"feature {index} is out of range for dictionary {record.name!r} ({bound})")
    return n_features


def feature_detail(
    store: RecordStore,
    record: DictionaryRecord,
    index: int,
    analysis_name: str | None,
    decode: Decode,
    tokenizer_note: str,
    *,
    window: int = 24,
    n_top: int = 10,
    n_other: int = 5,
) -> dict[str, Any]:
    """Everything stored about one feature; `decode` turns a context's token ids into its pieces of text."""
    n_features = check_feature_index(record, index)
    feature = store.get_feature(record.name, record.series, index)
    if feature is None:
        raise NotFound(f"feature {index} of {record.name!r} (series {record.series!r}) has no records yet")
    names = [analysis.name for analysis in feature.analyses]
    if analysis_name is not None and analysis_name not in names:
        raise NotFound(f"feature {index} of {record.name!r} has no analysis {analysis_name!r}; it has: {names}")
    analysis = feature.analysis(analysis_name or "default") or (feature.analyses[0] if feature.analyses else None)
    kind, hooks = dictionary_label(record.cfg)
    detail: dict[str, Any] = {
        "dictionary": {
            "name": record.name,
            "series": record.series,
            "kind": kind,
            "hooks": hooks,
            "model": record.model_name,
            "d_sae": record.cfg.get("d_sae"),
            "n_features": n_features,
        },
        "index": index,
        "previous": index - 1 if index > 0 else None,
        "next": index + 1 if n_features is None or index + 1 < n_features else None,
        "analysis": analysis.name if analysis is not None else None,
        "analyses": names,
        "tokenizer": tokenizer_note,
        "window": window,
        "statistics": None,
        "histogram": None,
        "pools": [],
        "decoder": None,
        "logits": logits_dict(feature),
        "interpretation": interpretation_dict(feature),
    }
    if analysis is not None:
        detail["statistics"] = {
            "act_times": analysis.act_times,
            "n_analyzed_tokens": analysis.n_analyzed_tokens,
            "frequency": analysis.frequency,
            "max_activation": _finite_or_none(analysis.max_feature_acts),
            "mean_activation": _finite_or_none(analysis.mean_feature_acts),
        }
        detail["histogram"] = activation_histogram(analysis)
        detail["pools"] = pools_dicts(analysis, decode, window, n_top, n_other)
        detail["decoder"] = decoder_dict(analysis)
    return detail


# ------------------------------------------------------------------------------------------------ search


def search(store: RecordStore, text: str, limit: int = SEARCH_LIMIT) -> dict[str, Any]:
    """Explanations of every dictionary containing `text` (case-insensitive); `more` when the limit cut the list."""
    text = text.strip()
    if not text:
        return {"query": text, "hits": [], "more": False}
    hits = store.search_explanations(text, limit=limit + 1)
    return {
        "query": text,
        "hits": [
            {
                "dictionary": hit.dictionary,
                "series": hit.series,
                "index": hit.index,
                "explanation": hit.explanation,
                "score": hit.score,
            }
            for hit in hits[:limit]
        ],
        "more": len(hits) > limit,
    }


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (strict JSON has no NaN; evaluation stores NaN for an
    undefined CE loss recovered)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [finite_json(item) for item in value]
    return value
