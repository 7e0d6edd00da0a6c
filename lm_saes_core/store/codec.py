"""Record <-> plain document conversion shared by the SQLite and MongoDB backends.

Documents hold only str/int/float/bool/None/bytes/lists/dicts. Every NumPy array becomes the bytes of `np.save`
(dtype and shape travel with it, no pickle), never a list of floats. Nested documents that a backend keeps as one
opaque blob (SQLite columns, MongoDB GridFS files) are packed with BSON, which stores bytes natively.
"""

import dataclasses
import io
from collections.abc import Mapping
from typing import Any

import bson
import numpy as np

from lm_saes_core.store.records import (
    DictionaryRecord,
    FeatureAnalysis,
    FeatureLogits,
    FeatureSamples,
    Interpretation,
    InterpretationScore,
    LogitToken,
    ZPatterns,
)

_SAMPLE_ARRAYS = ("tokens", "activations", "lengths", "doc_index", "doc_position")
_Z_PATTERN_ARRAYS = ("peaks", "sources", "contributions")


def array_to_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


def array_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def pack_document(document: Mapping[str, Any]) -> bytes:
    return bson.encode(document)


def unpack_document(data: bytes) -> dict[str, Any]:
    return bson.decode(data)


# samples and analyses ------------------------------------------------------------------------------------------
def samples_to_doc(samples: FeatureSamples) -> dict[str, Any]:
    """A pool's document; a Lorsa's top pool adds a `z_patterns` sub-document (absent for every other pool)."""
    doc: dict[str, Any] = {"name": samples.name}
    for key in _SAMPLE_ARRAYS:
        doc[key] = array_to_bytes(getattr(samples, key))
    doc["dataset"] = [str(name) for name in samples.dataset]
    if samples.z_patterns is not None:
        doc["z_patterns"] = {key: array_to_bytes(getattr(samples.z_patterns, key)) for key in _Z_PATTERN_ARRAYS}
    return doc


def samples_from_doc(doc: Mapping[str, Any]) -> FeatureSamples:
    arrays = {key: array_from_bytes(doc[key]) for key in _SAMPLE_ARRAYS}
    z_doc = doc.get("z_patterns")  # absent: not a Lorsa's top pool, or written before z-patterns were stored
    z_patterns = None
    if z_doc is not None:
        z_patterns = ZPatterns(**{key: array_from_bytes(z_doc[key]) for key in _Z_PATTERN_ARRAYS})
    return FeatureSamples(name=doc["name"], dataset=list(doc["dataset"]), z_patterns=z_patterns, **arrays)


def pack_samples(samples: list[FeatureSamples]) -> bytes:
    """All pools of one analysis as one blob (SQLite column, GridFS file)."""
    return pack_document({"samples": [samples_to_doc(pool) for pool in samples]})


def unpack_samples(data: bytes) -> list[FeatureSamples]:
    return [samples_from_doc(doc) for doc in unpack_document(data)["samples"]]


def decoder_to_doc(analysis: FeatureAnalysis) -> dict[str, Any] | None:
    """Where the feature's decoders write (`decoder_norms`, `decoder_cosines`, `location`) as a JSON-able document,
    or None when the analysis has none (one decoder per feature). Hook names are values, not keys: MongoDB field
    names may not hold the dots of hook points."""
    if analysis.decoder_norms is None and analysis.decoder_cosines is None and analysis.location is None:
        return None
    norms, cosines = analysis.decoder_norms, analysis.decoder_cosines
    return {
        "hooks": None if norms is None else [str(hook) for hook in norms],
        "norms": None if norms is None else [float(value) for value in norms.values()],
        "cosines": None if cosines is None else [[float(value) for value in row] for row in cosines],
        "location": analysis.location,
    }


def decoder_from_doc(doc: Mapping[str, Any] | None) -> dict[str, Any]:
    """The FeatureAnalysis fields of `decoder_to_doc`'s document (all None for None: stores written before it)."""
    if doc is None:
        return {"decoder_norms": None, "decoder_cosines": None, "location": None}
    hooks, norms, cosines = doc.get("hooks"), doc.get("norms"), doc.get("cosines")
    return {
        "decoder_norms": None if hooks is None else dict(zip(hooks, map(float, norms), strict=True)),
        "decoder_cosines": None if cosines is None else [[float(value) for value in row] for row in cosines],
        "location": doc.get("location"),
    }


def analysis_stats(analysis: FeatureAnalysis) -> dict[str, Any]:
    """The small part of an analysis: scalars (as Python numbers), the histogram and, for dictionaries with several
    decoders per feature, the `decoder` document (absent otherwise)."""
    stats = {
        "name": analysis.name,
        "act_times": int(analysis.act_times),
        "n_analyzed_tokens": int(analysis.n_analyzed_tokens),
        "max_feature_acts": float(analysis.max_feature_acts),
        "mean_feature_acts": float(analysis.mean_feature_acts),
        "histogram_edges": array_to_bytes(analysis.histogram_edges),
        "histogram_counts": array_to_bytes(analysis.histogram_counts),
    }
    decoder = decoder_to_doc(analysis)
    return stats if decoder is None else stats | {"decoder": decoder}


def analysis_to_doc(analysis: FeatureAnalysis) -> dict[str, Any]:
    return analysis_stats(analysis) | {"samples": [samples_to_doc(pool) for pool in analysis.samples]}


def analysis_from_doc(doc: Mapping[str, Any], samples: list[FeatureSamples] | None = None) -> FeatureAnalysis:
    """`samples` overrides the document's own pools (used when they were stored apart from it)."""
    if samples is None:
        samples = [samples_from_doc(pool) for pool in doc.get("samples", [])]
    return FeatureAnalysis(
        name=doc["name"],
        act_times=int(doc["act_times"]),
        n_analyzed_tokens=int(doc["n_analyzed_tokens"]),
        max_feature_acts=float(doc["max_feature_acts"]),
        mean_feature_acts=float(doc["mean_feature_acts"]),
        histogram_edges=array_from_bytes(doc["histogram_edges"]),
        histogram_counts=array_from_bytes(doc["histogram_counts"]),
        samples=samples,
        **decoder_from_doc(doc.get("decoder")),
    )


# logits and interpretations ------------------------------------------------------------------------------------
def logits_to_doc(logits: FeatureLogits) -> dict[str, Any]:
    def tokens(items: list[LogitToken]) -> list[dict[str, Any]]:
        return [
            {"token_id": int(item.token_id), "token": str(item.token), "logit": float(item.logit)} for item in items
        ]

    return {"top_positive": tokens(logits.top_positive), "top_negative": tokens(logits.top_negative)}


def logits_from_doc(doc: Mapping[str, Any]) -> FeatureLogits:
    return FeatureLogits(
        top_positive=[LogitToken(**item) for item in doc["top_positive"]],
        top_negative=[LogitToken(**item) for item in doc["top_negative"]],
    )


def interpretation_to_doc(interpretation: Interpretation) -> dict[str, Any]:
    return dataclasses.asdict(interpretation)


def interpretation_from_doc(doc: Mapping[str, Any]) -> Interpretation:
    return Interpretation(
        explanation=doc["explanation"],
        model=doc["model"],
        scores=[InterpretationScore(**score) for score in doc.get("scores", [])],
        error=doc.get("error"),
        details=dict(doc.get("details") or {}),
    )


# dictionaries --------------------------------------------------------------------------------------------------
def dictionary_to_doc(record: DictionaryRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "series": record.series,
        "path": str(record.path),
        "cfg": dict(record.cfg),
        "model_name": record.model_name,
        "metrics": {str(key): float(value) for key, value in record.metrics.items()},
    }


def dictionary_from_doc(doc: Mapping[str, Any]) -> DictionaryRecord:
    return DictionaryRecord(
        name=doc["name"],
        series=doc["series"],
        path=doc["path"],
        cfg=dict(doc["cfg"]),
        model_name=doc.get("model_name"),
        metrics={key: float(value) for key, value in (doc.get("metrics") or {}).items()},
    )
