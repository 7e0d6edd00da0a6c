"""Feature analyses as one file, for runs without a record store (the reference's `output_dir` path, minus pickle).

The file is an `.npz` (a zip of `.npy` arrays) that `np.load(path, allow_pickle=False)` opens:

- `meta`: UTF-8 JSON as uint8 bytes: format name and version, dictionary, series, analysis name, start index, and per
  feature its scalars, its pools' names and dataset names and, for a crosscoder or CLT, where its decoders write
  (`decoder`, as `codec.decoder_to_doc`; absent for other kinds and in files written before it).
- for each array field K (histogram_edges, histogram_counts, and the pools' tokens, activations, lengths, doc_index,
  doc_position), all items of all features back to back: `K.data` (uint8, each item's C-order bytes), `K.ndim`
  (int64 per item), `K.shape` (int64, the items' shapes concatenated) and `K.dtype` (int64 per item, an index into
  `meta["dtypes"][K]`), so any dtype and shape comes back exactly, in a handful of zip entries however many features.
- a Lorsa's z-patterns: `z_patterns.peaks`, `.sources` and `.contributions` packed the same way, one item per pool
  whose meta entry says `"z_patterns": true` (in pool order); absent in files written before they were exported.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lm_saes_core.io import atomic_path
from lm_saes_core.store.codec import decoder_from_doc, decoder_to_doc
from lm_saes_core.store.records import FeatureAnalysis, FeatureSamples, ZPatterns

FORMAT = "lm-saes-analysis-export"
VERSION = 1
_FEATURE_ARRAYS = ("histogram_edges", "histogram_counts")
_POOL_ARRAYS = ("tokens", "activations", "lengths", "doc_index", "doc_position")
_Z_PATTERN_ARRAYS = ("peaks", "sources", "contributions")


def analysis_export_path(output_dir: str | Path, dictionary: str, series: str, analysis_name: str, n: int) -> Path:
    for field, value in (("dictionary", dictionary), ("series", series), ("analysis_name", analysis_name)):
        if not value or value in (".", "..") or "/" in value or "\\" in value:
            raise ValueError(f"{field} {value!r} cannot be used as a path component of an analysis export")
    return Path(output_dir) / series / dictionary / f"{analysis_name}_analysis_{n}_features.npz"


def _pack_ragged(key: str, items: list[np.ndarray], dtypes: dict[str, list[str]]) -> dict[str, np.ndarray]:
    names: list[str] = []
    codes, ndims, shapes, chunks = [], [], [], []
    for item in items:
        item = np.ascontiguousarray(item)
        if item.dtype.hasobject:
            raise ValueError(f"{key} has dtype {item.dtype}, which cannot be exported without pickle")
        if item.dtype.str not in names:
            names.append(item.dtype.str)
        codes.append(names.index(item.dtype.str))
        ndims.append(item.ndim)
        shapes.extend(item.shape)
        chunks.append(item.tobytes())
    dtypes[key] = names
    return {
        f"{key}.data": np.frombuffer(b"".join(chunks), dtype=np.uint8),
        f"{key}.ndim": np.asarray(ndims, dtype=np.int64),
        f"{key}.shape": np.asarray(shapes, dtype=np.int64),
        f"{key}.dtype": np.asarray(codes, dtype=np.int64),
    }


def _unpack_ragged(key: str, archive: Any, dtypes: dict[str, list[str]]) -> list[np.ndarray]:
    data = archive[f"{key}.data"]
    shapes = archive[f"{key}.shape"].tolist()
    items, offset, shape_at = [], 0, 0
    for ndim, code in zip(archive[f"{key}.ndim"].tolist(), archive[f"{key}.dtype"].tolist(), strict=True):
        dtype = np.dtype(dtypes[key][code])
        shape = tuple(shapes[shape_at : shape_at + ndim])
        shape_at += ndim
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        items.append(data[offset : offset + nbytes].view(dtype).reshape(shape).copy())  # aligned and writable
        offset += nbytes
    return items


def _encode(
    dictionary: str, series: str, analysis_name: str, analyses: Sequence[FeatureAnalysis], start_index: int
) -> dict[str, np.ndarray]:
    features = []
    for offset, analysis in enumerate(analyses):
        decoder = decoder_to_doc(analysis)
        features.append(
            {
                "index": start_index + offset,
                "name": analysis.name,
                "act_times": int(analysis.act_times),
                "n_analyzed_tokens": int(analysis.n_analyzed_tokens),
                "max_feature_acts": float(analysis.max_feature_acts),
                "mean_feature_acts": float(analysis.mean_feature_acts),
                "pools": [
                    {"name": pool.name, "dataset": [str(name) for name in pool.dataset]}
                    | ({"z_patterns": True} if pool.z_patterns is not None else {})
                    for pool in analysis.samples
                ],
            }
            | ({"decoder": decoder} if decoder is not None else {})
        )
    dtypes: dict[str, list[str]] = {}
    arrays: dict[str, np.ndarray] = {}
    for key in _FEATURE_ARRAYS:
        arrays |= _pack_ragged(key, [getattr(analysis, key) for analysis in analyses], dtypes)
    for key in _POOL_ARRAYS:
        arrays |= _pack_ragged(key, [getattr(pool, key) for analysis in analyses for pool in analysis.samples], dtypes)
    z_patterns = [pool.z_patterns for analysis in analyses for pool in analysis.samples if pool.z_patterns is not None]
    if z_patterns:
        for key in _Z_PATTERN_ARRAYS:
            arrays |= _pack_ragged(f"z_patterns.{key}", [getattr(z, key) for z in z_patterns], dtypes)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dictionary": dictionary,
        "series": series,
        "analysis_name": analysis_name,
        "start_index": start_index,
        "dtypes": dtypes,
        "features": features,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return arrays


def write_analysis_export(
    output_dir: str | Path,
    dictionary: str,
    series: str,
    analysis_name: str,
    analyses: Sequence[FeatureAnalysis],
    start_index: int = 0,
) -> Path:
    """Write `analyses` (feature `start_index + i` each) to `<output_dir>/<series>/<dictionary>/
    <analysis_name>_analysis_<n>_features.npz` atomically: a failed write leaves no file, and an earlier file at that
    path stays intact."""
    path = analysis_export_path(output_dir, dictionary, series, analysis_name, len(analyses))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **_encode(dictionary, series, analysis_name, analyses, start_index))
    return path


def read_export_meta(path: str | Path, archive: Any = None) -> dict[str, Any]:
    """The export's JSON header: dictionary, series, analysis_name, start_index, per-feature scalars."""
    if archive is None:
        with np.load(path, allow_pickle=False) as archive:
            return read_export_meta(path, archive)
    if "meta" not in archive.files:
        raise ValueError(f"{path} is not an lm-saes analysis export (no 'meta' entry)")
    meta = json.loads(archive["meta"].tobytes().decode())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an lm-saes analysis export (format {meta.get('format')!r})")
    if meta["version"] > VERSION:
        raise ValueError(f"{path} is export version {meta['version']}; this lm-saes reads up to version {VERSION}")
    return meta


def read_analysis_export(path: str | Path) -> list[FeatureAnalysis]:
    """The analyses in file order (feature `meta["start_index"] + i`); see `read_export_meta` for the header."""
    with np.load(path, allow_pickle=False) as archive:
        meta = read_export_meta(path, archive)
        dtypes = meta["dtypes"]
        feature_arrays = {key: _unpack_ragged(key, archive, dtypes) for key in _FEATURE_ARRAYS}
        pool_arrays = {key: iter(_unpack_ragged(key, archive, dtypes)) for key in _POOL_ARRAYS}
        z_arrays = {
            key: iter(_unpack_ragged(f"z_patterns.{key}", archive, dtypes))
            for key in _Z_PATTERN_ARRAYS
            if f"z_patterns.{key}.data" in archive.files
        }
    analyses = []
    for position, feature in enumerate(meta["features"]):
        samples = [
            FeatureSamples(
                name=pool["name"],
                dataset=pool["dataset"],
                z_patterns=ZPatterns(**{key: next(z_arrays[key]) for key in _Z_PATTERN_ARRAYS})
                if pool.get("z_patterns")
                else None,
                **{key: next(pool_arrays[key]) for key in _POOL_ARRAYS},
            )
            for pool in feature["pools"]
        ]
        analyses.append(
            FeatureAnalysis(
                name=feature["name"],
                act_times=feature["act_times"],
                n_analyzed_tokens=feature["n_analyzed_tokens"],
                max_feature_acts=feature["max_feature_acts"],
                mean_feature_acts=feature["mean_feature_acts"],
                histogram_edges=feature_arrays["histogram_edges"][position],
                histogram_counts=feature_arrays["histogram_counts"][position],
                samples=samples,
                **decoder_from_doc(feature.get("decoder")),
            )
        )
    return analyses
