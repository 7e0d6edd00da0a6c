"""`lm-saes serve`, the read-only feature browser, over HTTP: a store filled by a real analysis and DLA of a small TopK
dictionary on SmolLM2 (the quickstart configs, as tests/test_cli_analysis.py runs them) and by the real analysis of a
crosscoder on fixed weights (tests/test_analysis_locations.py), plus explanations and evaluation metrics written
through the store. Every page and JSON endpoint, the numbers against the store, sorting/filtering/paging against the
same computation in Python, the MongoDB backend (mongomock) against SQLite, 404s and bad parameters, the read-only
guarantees, the CLI's errors, and the real server rendered by headless Chromium."""

import dataclasses
import hashlib
import html
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import mongomock
import numpy as np
import pytest
import torch
from markupsafe import escape
from starlette.testclient import TestClient
from test_analysis_locations import HEADS, analyse, crosscoder_record, fixed_crosscoder
from transformers import AutoTokenizer
from typer.testing import CliRunner

from lm_saes_core.browser import create_app
from lm_saes_core.cli import app as cli
from lm_saes_core.config import load_config
from lm_saes_core.models import SAEConfig, SparseAutoEncoder
from lm_saes_core.runners.analyze import AnalyzeSAESettings, analyze_sae
from lm_saes_core.runners.dla import DirectLogitAttributeSettings, direct_logit_attribute
from lm_saes_core.store import (
    FEATURE_SORT_KEYS,
    DictionaryRecord,
    FeatureFilter,
    Interpretation,
    InterpretationScore,
    RecordStoreConfig,
    StoreSchemaError,
    StoreUnavailableError,
    open_store,
)
from lm_saes_core.store.mongo import MongoRecordStore
from lm_saes_core.store.sqlite import SCHEMA_VERSION, SQLiteRecordStore

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "quickstart"
LM_SAES = ROOT / ".venv" / "bin" / "lm-saes"
CHROMIUM = Path("/usr/bin/chromium")
HOOK = "blocks.6.hook_resid_post"
NAME, SERIES = "quickstart-topk", "quickstart"
N_FEATURES = 48
DAGSTER = "http://dagster.test:3000"
# What the pipeline's evaluation asset writes into the store (update_dictionary_metrics), with its key names.
METRICS = {
    "metrics/explained_variance": 0.8123,
    "metrics/l0": 4.0,
    "metrics/dead_fraction": 0.0625,
    "metrics/ce_loss_recovered": 0.7534,
}
EXPLANATIONS = {  # feature -> (explanation, detection and fuzzing balanced accuracies); filled in for active features
    0: ("Python keywords like def and class", (0.9, 0.7)),
    1: ("URLs and the word fox_hole", (0.6, 0.5)),
    2: ("closing brackets", ()),
}


# ------------------------------------------------------------------------------------------------ the store


def score(method: str, balanced: float) -> InterpretationScore:
    return InterpretationScore(method, balanced + 0.01, balanced, 0.5, 0.5, 20, balanced > 0.55)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("browser")
    torch.manual_seed(0)
    cfg = SAEConfig(d_model=576, d_sae=N_FEATURES, hook_point_in=HOOK, hook_point_out=HOOK, act_fn="topk", top_k=4)
    sae_dir = SparseAutoEncoder.from_config(cfg.model_copy(update={"norm_activation": "inference"})).save_pretrained(
        root / "sae"
    )
    path = root / "records.sqlite"
    shared = [f"sae.pretrained_name_or_path={sae_dir}", f"store.sqlite_path={path}"]
    analyze_sae(
        load_config(AnalyzeSAESettings, CONFIGS / "analyze.yaml", [*shared, "analyzer.total_analyzing_tokens=1024"])
    )
    direct_logit_attribute(load_config(DirectLogitAttributeSettings, CONFIGS / "dla.yaml", shared))
    with SQLiteRecordStore(path) as store:
        store.update_dictionary_metrics(NAME, SERIES, METRICS)
        active = [f.index for f in store.iter_features(NAME, SERIES, with_samples=False) if f.analysis().act_times]
        for slot, (explanation, accuracies) in EXPLANATIONS.items():
            scores = [score(method, value) for method, value in zip(("detection", "fuzzing"), accuracies, strict=False)]
            store.set_interpretation(NAME, SERIES, active[slot], Interpretation(explanation, "test-llm", scores))
        store.set_interpretation(NAME, SERIES, active[3], Interpretation(None, "test-llm", error="timed out"))
        # A crosscoder made by the `circuits` pipeline: its weights at <root>/<pipeline>/dictionary/<item>.
        crosscoder = crosscoder_record("xc")
        crosscoder.series, crosscoder.path = "circuits", str(root / "circuits" / "dictionary" / "xc")
        store.add_dictionary(crosscoder)
        store.add_feature_analyses("xc", "circuits", analyse(fixed_crosscoder()))
        store.set_interpretation("xc", "circuits", 1, Interpretation("a FOX shared by every head", "test-llm"))
        # A dictionary of 16 features of which only feature 3 has records yet.
        store.add_dictionary(
            DictionaryRecord(
                "gappy", "default", str(root / "gappy"), cfg.model_copy(update={"d_sae": 16}).model_dump(mode="json")
            )
        )
        located = analyse(fixed_crosscoder())[0]
        store.add_feature_analyses("gappy", "default", [located], start_index=3)
        # feature 7: an analysis that stored no histogram (all counts 0): the page bins its samples' activations
        unbinned = dataclasses.replace(located, histogram_counts=np.zeros_like(located.histogram_counts))
        store.add_feature_analyses("gappy", "default", [unbinned], start_index=7)
        store.update_dictionary_metrics("gappy", "default", {"metrics/ce_loss_recovered": float("nan")})
    return path


@pytest.fixture(scope="module")
def store(store_path: Path):
    with open_store(RecordStoreConfig(sqlite_path=str(store_path)), read_only=True) as opened:
        yield opened


@pytest.fixture(scope="module")
def client(store) -> TestClient:
    return TestClient(create_app(store, dagster_url=DAGSTER), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def features(store) -> dict:
    """index -> FeatureRecord (without samples) of the SmolLM2 dictionary, read straight from the store."""
    return {f.index: f for f in store.iter_features(NAME, SERIES, with_samples=False)}


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def frequency(feature) -> float:
    analysis = feature.analysis()
    return analysis.act_times / analysis.n_analyzed_tokens


def mean_score(feature) -> float | None:
    interpretation = feature.interpretation
    if interpretation is None or not interpretation.scores:
        return None
    return sum(s.balanced_accuracy for s in interpretation.scores) / len(interpretation.scores)


def all_rows(client: TestClient, per_page: int = 7, **params) -> list[dict]:
    """Every row of the feature table, page by page (checks that the pages add up to `total`)."""
    rows, page = [], 1
    while True:
        query = {"series": SERIES, "per_page": per_page, "page": page, **params}
        body = client.get(f"/api/dictionaries/{NAME}/features", params=query).json()
        rows += body["rows"]
        if page >= body["n_pages"]:
            assert len(rows) == body["total"]
            return rows
        assert len(body["rows"]) == per_page
        page += 1


# ------------------------------------------------------------------------------------------------ pages and JSON


def test_index_lists_dictionaries_with_their_metrics_and_pipeline_link(client, store_path):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    text = page.text
    assert f'href="/dictionaries/{NAME}?series={SERIES}"' in text and 'href="/dictionaries/xc?series=circuits"' in text
    row = text[text.index(f">{NAME}</a>") :].split("</tr>")[0]
    for cell in ('data-metric="explained_variance">0.812<', 'data-metric="l0">4.0<', ">6.2%<", ">0.753<"):
        assert cell in row, cell
    assert "sae/topk" in row and HOOK in row and "default: 48" in row

    body = client.get("/api/dictionaries").json()["dictionaries"]
    by_name = {d["name"]: d for d in body}
    topk = by_name[NAME]
    assert (topk["series"], topk["kind"], topk["act_fn"], topk["d_sae"], topk["hooks"]) == (
        SERIES,
        "sae",
        "topk",
        N_FEATURES,
        HOOK,
    )
    assert topk["explained_variance"] == METRICS["metrics/explained_variance"]
    assert topk["l0"] == 4.0 and topk["dead_fraction"] == 0.0625 and topk["ce_loss_recovered"] == 0.7534
    assert topk["analyses"] == {"default": N_FEATURES} and topk["model"] == "smollm2-135m"
    assert topk["dagster"] is None and topk["training_tokens"] is None  # not from a pipeline; not stored
    xc = by_name["xc"]
    assert xc["kind"] == "crosscoder" and xc["analyses"] == {"default": 4}
    assert xc["dagster"] == {
        "pipeline": "circuits",
        "asset_key": ["circuits", "dictionary"],
        "partition": "xc",
        "url": f"{DAGSTER}/assets/circuits/dictionary?view=partitions&partition=xc",
    }
    assert f'href="{html.escape(xc["dagster"]["url"])}"' in text
    assert by_name["gappy"]["ce_loss_recovered"] is None  # NaN (undefined) is null in JSON, blank on the page
    assert client.get("/dictionaries/gappy").text.count('data-metric="ce_loss_recovered">—<') == 1
    script = client.get("/static/browser.js")
    assert script.status_code == 200 and "ArrowLeft" in script.text


def test_frequency_histogram_bars_select_exactly_the_features_they_count(client, features):
    body = client.get(f"/api/dictionaries/{NAME}", params={"series": SERIES}).json()
    histogram = body["frequency_histogram"]
    frequencies = {index: frequency(f) for index, f in features.items()}
    dead = [index for index, value in frequencies.items() if value == 0]
    assert histogram["n_features"] == N_FEATURES and histogram["dead"] == len(dead)
    assert sum(bar["count"] for bar in histogram["bars"]) + histogram["dead"] == N_FEATURES
    assert histogram["bars"][0]["min"] == min(v for v in frequencies.values() if v > 0)
    assert histogram["bars"][-1]["max"] is None
    # each bar's range, as the table's filter (what clicking the bar does), gives exactly its features
    for bar in histogram["bars"]:
        params = {"min_frequency": repr(bar["min"]), "max_frequency": repr(bar["max"]) if bar["max"] else None}
        rows = all_rows(client, **{key: value for key, value in params.items() if value is not None})
        expected = [i for i, v in frequencies.items() if v >= bar["min"] and (bar["max"] is None or v < bar["max"])]
        assert [row["index"] for row in rows] == sorted(expected) and len(expected) == bar["count"]
    dead_rows = all_rows(client, max_frequency=repr(histogram["dead_max"]))
    assert [row["index"] for row in dead_rows] == dead

    page = client.get(f"/dictionaries/{NAME}", params={"series": SERIES})
    svg = re.search(r'<svg id="frequency-histogram".*?</svg>', page.text, re.S).group(0)
    counts = [int(c) for c in re.findall(r'<rect class="bar[^"]*"[^>]*data-count="(\d+)"', svg)]
    assert counts == ([histogram["dead"]] if dead else []) + [bar["count"] for bar in histogram["bars"]]
    first = histogram["bars"][0]
    link = f"min_frequency={first['min']!r}&amp;max_frequency={first['max']!r}"
    assert link in svg  # a bar links to its filter (floats written exactly: repr round-trips)


@pytest.mark.parametrize("sort", FEATURE_SORT_KEYS)
@pytest.mark.parametrize("descending", [False, True])
def test_feature_table_sorts_and_pages_like_python(client, features, sort, descending):
    def key(index: int):
        f = features[index]
        value = {
            "index": index,
            "frequency": frequency(f),
            "max_activation": f.analysis().max_feature_acts,
            "explanation": f.interpretation.explanation if f.interpretation else None,
            "score": mean_score(f),
        }[sort]
        if value is None:
            return (1, 0, index)  # missing values last in either direction
        return (0, value, index) if not descending else (0, _Reversed(value), index)

    rows = all_rows(client, sort=sort, desc=int(descending))
    assert [row["index"] for row in rows] == sorted(features, key=key)
    for row in rows:  # the numbers are the store's
        analysis = features[row["index"]].analysis()
        assert row["act_times"] == analysis.act_times and row["n_analyzed_tokens"] == analysis.n_analyzed_tokens
        assert row["max_activation"] == analysis.max_feature_acts and row["frequency"] == frequency(
            features[row["index"]]
        )
        expected = mean_score(features[row["index"]])
        assert row["score"] is None if expected is None else row["score"] == pytest.approx(expected)


class _Reversed:
    def __init__(self, value):
        self.value = value

    def __lt__(self, other):
        return self.value > other.value

    def __eq__(self, other):
        return self.value == other.value


def test_feature_table_filters(client, features):
    acts = {i: f.analysis().max_feature_acts for i, f in features.items()}
    low, high = sorted(acts.values())[10], sorted(acts.values())[30]
    rows = all_rows(client, min_max_activation=low, max_max_activation=high, sort="max_activation")
    assert sorted(row["index"] for row in rows) == sorted(i for i, a in acts.items() if low <= a < high)
    assert all(low <= row["max_activation"] < high for row in rows)

    rows = all_rows(client, explanation="FOX_HOLE")  # case-insensitive; "_" is a character, not a wildcard
    assert [row["explanation"] for row in rows] == ["URLs and the word fox_hole"]
    assert all_rows(client, explanation="s_a") == []  # "_" is no wildcard: "URLs and" does not match
    rows = all_rows(client, min_score=0.6, sort="score", desc=1)
    assert [(row["explanation"], row["scores"]) for row in rows] == [
        ("Python keywords like def and class", {"detection": 0.9, "fuzzing": 0.7})
    ]

    page = client.get(f"/dictionaries/{NAME}", params={"series": SERIES, "explanation": "keywords"})
    assert page.status_code == 200
    assert page.text.count("<tr data-href=") == 1 and "Python keywords like def and class" in page.text
    assert "1 feature matching" in page.text


def test_dictionary_page_table_links_sorting_and_pagination(client, features):
    page = client.get(
        f"/dictionaries/{NAME}", params={"series": SERIES, "sort": "frequency", "desc": 1, "per_page": 10}
    )
    assert page.status_code == 200
    text = page.text
    shown = [int(i) for i in re.findall(r'<tr data-href="[^"]*" data-index="(\d+)"', text)]
    assert shown == sorted(features, key=lambda i: (-frequency(features[i]), i))[:10]
    assert "page 1 of 5" in text and 'rel="next"' in text and "page=2" in text
    top = features[shown[0]].analysis()
    assert f'data-frequency="{top.act_times / top.n_analyzed_tokens!r}"' in text
    # the sorted column's header toggles the direction; others start with the largest values
    assert "sort=frequency&amp;desc=0" in text and "sort=max_activation&amp;desc=1" in text and "frequency ▼" in text
    assert f'href="/dictionaries/{NAME}/features/{shown[0]}?series={SERIES}"' in text


def test_feature_page_colours_tokens_by_activation(client, store, features, tokenizer):
    # the most frequent feature whose strongest token is a whole character
    for index in sorted(features, key=lambda i: -features[i].analysis().act_times):
        analysis = store.get_feature(NAME, SERIES, index).analysis()
        top = analysis.pool("top_activations")
        row_acts = top.activations[0, : top.lengths[0]]
        position = int(row_acts.argmax())
        token_id = int(top.tokens[0, position])
        text = tokenizer.decode([token_id])
        if "\ufffd" not in text and "\n" not in text and text.strip():
            break
    assert float(row_acts[position]) == analysis.max_feature_acts  # the top context holds the feature's max

    page = client.get(f"/dictionaries/{NAME}/features/{index}", params={"series": SERIES})
    assert page.status_code == 200
    body = page.text
    title = f"{analysis.max_feature_acts:.4g} · heldout doc {int(top.doc_index[0])} · position {position}"
    strongest = (
        f'<span class="tok act" style="background-color: rgba(234, 88, 12, 1.0)" '
        f'data-act="{analysis.max_feature_acts!r}" title="{escape(title)}">{escape(text)}</span>'
    )
    assert strongest in body
    # every activating token of the first context is coloured by its share of the max, the others are not
    first = body[body.index('<div class="context"') :].split('<div class="context"')[1]
    coloured = re.findall(r'rgba\(234, 88, 12, ([0-9.]+)\)" data-act="([^"]+)"', first)
    positive = row_acts[max(0, position - 24) : position + 25]
    assert len(coloured) <= int((positive > 0).sum()) and coloured
    for opacity, value in coloured:
        assert float(opacity) == pytest.approx(min(1.0, float(value) / analysis.max_feature_acts), abs=6e-4)
    assert f"{analysis.act_times:,} of {analysis.n_analyzed_tokens:,} analysed tokens" in body
    assert "tokens decoded with the tokenizer of &#39;smollm2-135m&#39;" in body
    for pool in analysis.samples:
        assert f'id="pool-{pool.name}"' in body
    # the activation histogram: one bar per bin between the first and last filled ones
    filled = np.flatnonzero(analysis.histogram_counts)
    svg = re.search(r'<svg id="activation-histogram".*?</svg>', body, re.S).group(0)
    counts = [int(c) for c in re.findall(r'data-count="(\d+)"', svg)]
    assert counts == analysis.histogram_counts[filled[0] : filled[-1] + 1].tolist()
    # DLA tokens, with the space made visible
    logits = features[index].logits
    promoted = logits.top_positive[0]
    assert html.escape(promoted.token.replace(" ", "␣")) in body and f"{promoted.logit:+.3f}" in body
    assert f"{logits.top_negative[0].logit:+.3f}" in body
    # previous / next / jump
    assert f'rel="prev" href="/dictionaries/{NAME}/features/{index - 1}?series={SERIES}"' in body or index == 0
    assert 'action="/dictionaries/quickstart-topk/jump"' in body


def test_feature_json_is_the_store_record(client, store, features):
    index = max(features, key=lambda i: features[i].analysis().act_times)
    record = store.get_feature(NAME, SERIES, index)
    analysis = record.analysis()
    body = client.get(f"/api/dictionaries/{NAME}/features/{index}", params={"series": SERIES, "window": 5}).json()
    assert body["statistics"] == {
        "act_times": analysis.act_times,
        "n_analyzed_tokens": analysis.n_analyzed_tokens,
        "frequency": analysis.frequency,
        "max_activation": analysis.max_feature_acts,
        "mean_activation": analysis.mean_feature_acts,
    }
    assert body["previous"] == index - 1 if index else body["previous"] is None
    assert body["dictionary"]["n_features"] == N_FEATURES and body["decoder"] is None  # an SAE: one decoder
    assert [pool["name"] for pool in body["pools"]][0] == "top_activations"
    for pool in body["pools"]:
        stored = analysis.pool(pool["name"])
        assert pool["n_contexts"] == len(stored)
        for row, context in enumerate(pool["contexts"]):
            length = int(stored.lengths[row])
            acts = stored.activations[row, :length]
            centre = int(acts.argmax())
            assert (context["start"], context["end"]) == (max(0, centre - 5), min(length, centre + 6))
            assert context["doc_index"] == int(stored.doc_index[row]) and context["dataset"] == stored.dataset[row]
            for token in context["tokens"]:  # each shown token carries its stored id and activation
                assert token["token_id"] == int(stored.tokens[row, token["position"]])
                assert token["activation"] >= float(acts[token["position"]])
    assert body["logits"]["promoted"][0] == {
        "token": record.logits.top_positive[0].token,
        "token_id": record.logits.top_positive[0].token_id,
        "logit": record.logits.top_positive[0].logit,
    }
    assert len(body["logits"]["suppressed"]) == 10


def test_explanation_scores_and_failed_interpretation(client, features):
    index = next(i for i, f in features.items() if f.interpretation and f.interpretation.explanation and mean_score(f))
    explanation = features[index].interpretation.explanation
    body = client.get(f"/dictionaries/{NAME}/features/{index}", params={"series": SERIES}).text
    section = body[body.index('id="explanation"') : body.index('id="statistics"')]
    assert html.escape(explanation) in section and "by test-llm" in section
    for s in features[index].interpretation.scores:
        assert f'<tr data-method="{s.method}"><td>{s.method}</td><td class="num">{s.accuracy:.3f}</td>' in section
        assert f'<td class="num">{s.balanced_accuracy:.3f}</td>' in section
    failed = next(i for i, f in features.items() if f.interpretation and f.interpretation.explanation is None)
    body = client.get(f"/dictionaries/{NAME}/features/{failed}", params={"series": SERIES}).text
    assert "no explanation: timed out" in body


def test_crosscoder_feature_shows_decoder_norms_and_location(client, store):
    stored = store.get_feature("xc", "circuits", 2).analysis()
    body = client.get("/api/dictionaries/xc/features/2").json()  # the only series of that name: found without one
    assert body["dictionary"]["series"] == "circuits"
    assert body["decoder"]["location"] == f"shared by {HEADS[0]}, {HEADS[1]}" == stored.location
    assert [(n["hook"], n["norm"]) for n in body["decoder"]["norms"]] == list(stored.decoder_norms.items())
    assert body["decoder"]["cosines"] == stored.decoder_cosines
    assert body["tokenizer"].endswith("token ids shown")  # no model recorded

    page = client.get("/dictionaries/xc/features/2").text
    for hook, norm in stored.decoder_norms.items():
        assert f'<tr data-hook="{hook}"><td>{hook}</td><td class="num">{norm:.4g}</td>' in page
    assert "decoder cosines between heads" in page and f"shared by {HEADS[0]}, {HEADS[1]}" in page
    table = client.get("/dictionaries/xc").text
    assert "lives in" in table and f"exclusive to {HEADS[1]}" in table


def test_search_across_dictionaries(client):
    body = client.get("/api/search", params={"q": "fox"}).json()
    assert [(h["dictionary"], h["explanation"]) for h in body["hits"]] == [
        ("xc", "a FOX shared by every head"),
        (NAME, "URLs and the word fox_hole"),
    ]  # ordered by series: circuits before quickstart
    assert body["hits"][1]["score"] == pytest.approx(0.55) and body["more"] is False
    page = client.get("/search", params={"q": "fox"}).text
    assert "2 features whose explanation contains “fox”" in page
    assert 'href="/dictionaries/xc/features/1?series=circuits"' in page
    assert client.get("/api/search", params={"q": "   "}).json()["hits"] == []
    assert client.get("/api/search", params={"q": "100%"}).json()["hits"] == []  # % is literal


def test_jump_to_index_redirects_to_the_feature(client):
    response = client.get(f"/dictionaries/{NAME}/jump", params={"series": SERIES, "index": 7}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == f"/dictionaries/{NAME}/features/7?series={SERIES}"
    assert client.get(f"/dictionaries/{NAME}/jump", params={"index": 48}).status_code == 404


TABLE = f"/dictionaries/{NAME}"


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/dictionaries/missing", 404, "no dictionary &#39;missing&#39; in the record store"),
        (f"{TABLE}?series=nope", 404, "no dictionary &#39;quickstart-topk&#39; in series &#39;nope&#39;"),
        (f"{TABLE}/features/48", 404, "feature 48 is out of range for dictionary &#39;quickstart-topk&#39;"),
        (f"{TABLE}/features/-1", 404, "no page at"),
        (f"{TABLE}/features/abc", 404, "no page at"),
        (f"{TABLE}?page=9", 404, "page 9 of the feature table does not exist: there are 1"),
        (f"{TABLE}?analysis=other", 404, "has no analysis &#39;other&#39;; it has: default"),
        (f"{TABLE}?sort=color", 400, "sort must be one of index, frequency, max_activation, explanation, score"),
        (f"{TABLE}?min_frequency=lots", 400, "min_frequency must be a number, got &#39;lots&#39;"),
        (f"{TABLE}?per_page=0", 400, "per_page must be in [1, 1000], got 0"),
        (f"{TABLE}/features/3?window=100000", 400, "window must be in [0, 512], got 100000"),
        ("/nowhere", 404, "no page at /nowhere"),
    ],
)
def test_errors_are_pages_without_tracebacks(client, path, status, message):
    response = client.get(path)
    assert response.status_code == status and response.headers["content-type"].startswith("text/html")
    assert message in response.text and "Traceback" not in response.text
    # the JSON endpoint of the same thing: a table's parameters go to its /features endpoint
    api_path = "/api" + (path.replace("?", "/features?") if path.startswith(f"{TABLE}?") else path)
    api = client.get(api_path)
    assert api.status_code == status and api.headers["content-type"] == "application/json"
    assert set(api.json()) == {"error", "status"} and api.json()["status"] == status
    assert html.unescape(message).replace("no page at /", "no page at /api/") in api.json()["error"]


def test_activation_histogram_from_samples_when_the_analysis_stored_none(client, store):
    analysis = store.get_feature("gappy", "default", 7).analysis()
    assert not analysis.histogram_counts.any()
    positive = np.concatenate(
        [pool.activations[row, : pool.lengths[row]] for pool in analysis.samples for row in range(len(pool))]
    )
    positive = positive[positive > 0]
    histogram = client.get("/api/dictionaries/gappy/features/7").json()["histogram"]
    assert histogram["source"] == "samples" and sum(histogram["counts"]) == len(positive) > 0
    assert histogram["edges"][0] == pytest.approx(positive.min()) and histogram["edges"][-1] == pytest.approx(
        positive.max()
    )
    assert client.get("/api/dictionaries/gappy/features/3").json()["histogram"]["source"] == "analysis"
    page = client.get("/dictionaries/gappy/features/7").text
    assert "activations in the sample contexts (the analysis stored no histogram)" in page


def test_feature_in_range_without_records_is_a_404(client):
    assert client.get("/api/dictionaries/gappy/features/3").status_code == 200
    response = client.get("/api/dictionaries/gappy/features/5")
    assert response.status_code == 404
    assert response.json()["error"] == "feature 5 of 'gappy' (series 'default') has no records yet"
    page = client.get("/dictionaries/gappy/features/5")
    assert page.status_code == 404 and "has no records yet" in page.text
    assert client.get("/api/dictionaries/gappy/features/16").status_code == 404  # out of range


def test_an_internal_error_is_a_500_page_without_traceback(store_path):
    closed = SQLiteRecordStore(store_path, read_only=True)
    broken = TestClient(create_app(closed), raise_server_exceptions=False)
    closed.close()  # every query now raises RuntimeError: a bug, not a user error
    page = broken.get("/")
    assert page.status_code == 500 and "internal error (RuntimeError)" in page.text and "Traceback" not in page.text
    api = broken.get("/api/dictionaries")
    assert api.status_code == 500 and api.json()["error"].startswith("internal error (RuntimeError)")


def test_the_browser_is_read_only(client, store, store_path):
    digest = hashlib.sha256(store_path.read_bytes()).hexdigest()
    for method in ("post", "put", "delete", "patch"):
        response = getattr(client, method)(f"/api/dictionaries/{NAME}")
        assert response.status_code == 405 and "read-only" in response.json()["error"]
    assert client.post("/").status_code == 405
    assert client.get(f"/dictionaries/{NAME}").status_code == 200
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.add_model("intruder", {})
    assert hashlib.sha256(store_path.read_bytes()).hexdigest() == digest


def test_read_only_opening_creates_nothing_and_names_bad_files(tmp_path):
    missing = tmp_path / "sub" / "none.sqlite"
    with pytest.raises(StoreUnavailableError, match="cannot open the record store"):
        SQLiteRecordStore(missing, read_only=True)
    assert not missing.parent.exists()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreSchemaError, match="not a usable lm-saes record store"):
        SQLiteRecordStore(junk, read_only=True)
    old = tmp_path / "old.sqlite"
    SQLiteRecordStore(old).close()
    with sqlite3.connect(old) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION - 1,))
    with pytest.raises(StoreSchemaError, match="older than this lm-saes.*lm-saes list --store-path"):
        SQLiteRecordStore(old, read_only=True)


def test_serve_reports_a_missing_or_bad_store_and_exits_2(tmp_path, monkeypatch):
    runner = CliRunner()
    missing = tmp_path / "none.sqlite"
    result = runner.invoke(cli, ["serve", "--store", str(missing)])
    assert result.exit_code == 2 and f"no record store at {missing}" in result.stderr
    assert "Traceback" not in result.output and not missing.exists()
    monkeypatch.setenv("LM_SAES_HOME", str(tmp_path / "home"))  # the default store too must exist
    result = runner.invoke(cli, ["serve"])
    assert result.exit_code == 2 and "no record store at" in result.stderr and "home/records.sqlite" in result.stderr
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    result = runner.invoke(cli, ["serve", "--store-path", str(junk)])
    assert result.exit_code == 2 and "not a usable lm-saes record store" in result.stderr


# ------------------------------------------------------------------------------------------------ MongoDB


@pytest.fixture(scope="module")
def mongo_store(store) -> MongoRecordStore:
    """The same records written into a MongoDB backend (mongomock) through the store's write API, then opened
    read-only as `lm-saes serve --mongo-uri` opens it."""
    client = mongomock.MongoClient()
    writer = MongoRecordStore(client=client, db="browser")
    writer.add_model("smollm2-135m", store.get_model("smollm2-135m").cfg)
    for record in store.list_dictionaries():
        writer.add_dictionary(record)
        stored = list(store.iter_features(record.name, record.series))
        for feature in stored:
            for analysis in feature.analyses:
                writer.add_feature_analyses(record.name, record.series, [analysis], start_index=feature.index)
            if feature.interpretation is not None:
                writer.set_interpretation(record.name, record.series, feature.index, feature.interpretation)
        logits = {feature.index: feature.logits for feature in stored if feature.logits is not None}
        if logits:
            writer.set_feature_logits(record.name, record.series, logits)
    return MongoRecordStore(client=client, db="browser", read_only=True)


@pytest.mark.parametrize(
    "where",
    [
        None,
        FeatureFilter(min_frequency=0.01, max_frequency=0.2),
        FeatureFilter(min_max_activation=5.0),
        FeatureFilter(explanation_contains="FOX"),
        FeatureFilter(min_score=0.5),
    ],
)
def test_mongo_backend_pages_like_sqlite(store, mongo_store, where):
    for sort in FEATURE_SORT_KEYS:
        for descending in (False, True):
            for offset in (0, 9):
                pages = [
                    backend.feature_page(
                        NAME, SERIES, sort=sort, descending=descending, where=where, limit=9, offset=offset
                    )
                    for backend in (store, mongo_store)
                ]
                assert pages[0].total == pages[1].total
                for got, want in zip(pages[1].rows, pages[0].rows, strict=True):
                    assert got.index == want.index and got.explanation == want.explanation
                    assert (got.act_times, got.max_feature_acts, got.scores) == (
                        want.act_times,
                        want.max_feature_acts,
                        want.scores,
                    )
                    assert got.score == pytest.approx(want.score)


def test_mongo_backend_serves_the_same_json(store, mongo_store):
    np.testing.assert_array_equal(
        mongo_store.feature_frequencies(NAME, SERIES), store.feature_frequencies(NAME, SERIES)
    )
    assert mongo_store.search_explanations("fox") == store.search_explanations("fox")
    sqlite_client = TestClient(create_app(store))
    mongo_client = TestClient(create_app(mongo_store))
    for path in (
        "/api/dictionaries",
        f"/api/dictionaries/{NAME}?series={SERIES}",
        f"/api/dictionaries/{NAME}/features?series={SERIES}&sort=score&desc=1&per_page=5",
        f"/api/dictionaries/{NAME}/features/3?series={SERIES}",
        "/api/dictionaries/xc/features/1",
        "/api/search?q=fox",
    ):
        assert mongo_client.get(path).json() == sqlite_client.get(path).json(), path


# ------------------------------------------------------------------------------------------------ a real server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(store_path: Path, tmp_path: Path):
    """`lm-saes serve` on a free loopback port, stopped by its pid afterwards."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [str(LM_SAES), "serve", "--store", str(store_path), "--port", str(port), "--dagster-url", DAGSTER],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"lm-saes serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/dictionaries", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"lm-saes serve did not answer within 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert "read-only at http://127.0.0.1:" in log.read_text()


def chromium(url: str, profile: Path, *action: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    flags += ["--disable-component-update", "--disable-sync", "--window-size=1400,1800", "--virtual-time-budget=5000"]
    return subprocess.run(
        [str(CHROMIUM), *flags, f"--user-data-dir={profile}", *action, url], capture_output=True, text=True, timeout=90
    )


def test_served_pages_render_in_headless_chromium(server, features, tmp_path):
    with urllib.request.urlopen(f"{server}/", timeout=30) as response:  # real HTTP on loopback
        assert response.status == 200 and NAME in response.read().decode()
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install the Debian package chromium (`make ui-deps`) for this test")
    index = max(features, key=lambda i: features[i].analysis().act_times)
    pages = {
        "dictionary": f"{server}/dictionaries/{NAME}?series={SERIES}&sort=frequency&desc=1",
        "feature": f"{server}/dictionaries/{NAME}/features/{index}?series={SERIES}",
    }
    for name, url in pages.items():
        png = tmp_path / f"browser-{name}.png"
        result = chromium(url, tmp_path / "profile", f"--screenshot={png}")
        assert png.is_file(), f"chromium wrote no screenshot (exit {result.returncode}):\n{result.stderr[-3000:]}"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        if os.environ.get("LM_SAES_SAVE_SCREENSHOTS") == "1":
            (ROOT / "tests" / "artifacts").mkdir(exist_ok=True)
            shutil.copy(png, ROOT / "tests" / "artifacts" / png.name)

    dom = chromium(pages["dictionary"], tmp_path / "profile", "--dump-dom").stdout
    svg = re.search(r'<svg id="frequency-histogram".*?</svg>', dom, re.S)
    assert svg, dom[-2000:]
    heights = [float(h) for h in re.findall(r'<rect class="bar[^"]*"[^>]*height="([0-9.]+)"', svg.group(0))]
    assert heights and max(heights) == 140 and sum(h > 0 for h in heights) >= 5  # the histogram is drawn
    assert dom.count("<tr data-href=") == N_FEATURES  # one page of 50 holds all 48

    dom = chromium(pages["feature"], tmp_path / "profile", "--dump-dom").stdout
    spans = re.findall(r'<span class="tok act" style="background-color: rgba\(234, 88, 12, ([0-9.]+)\);?"', dom)
    assert len(spans) >= 10 and "1.0" in spans, dom[-2000:]  # coloured tokens, the strongest at full opacity
    assert '<svg id="activation-histogram"' in dom and 'id="pool-top_activations"' in dom
