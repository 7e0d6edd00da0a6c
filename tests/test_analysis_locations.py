"""Where a crosscoder's or CLT's feature lives: decoder norms per head / output layer, a crosscoder's cosines between
its heads' decoders and the location label, on fixed weights whose answer is known; the analysis attaches them (and
nothing to a plain SAE's features), the record stores and the export keep them, a store of the previous schema still
opens and reads, and `lm-saes show feature` prints them. CPU, tiny sizes, no language model."""

import sqlite3
from dataclasses import replace
from pathlib import Path

import mongomock
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lm_saes_core.analysis import FeatureAnalyzer, FeatureAnalyzerConfig
from lm_saes_core.analysis.feature_analyzer import decoder_locations
from lm_saes_core.cli import app
from lm_saes_core.models import CLTConfig, CrossCoder, CrossCoderConfig, CrossLayerTranscoder, SAEConfig
from lm_saes_core.models.sae import SparseAutoEncoder
from lm_saes_core.store import DictionaryRecord, FeatureAnalysis, RecordStoreConfig, codec, open_store
from lm_saes_core.store.export import read_analysis_export, write_analysis_export
from lm_saes_core.store.mongo import MongoRecordStore
from lm_saes_core.store.sqlite import SCHEMA_VERSION, SQLiteRecordStore

HEADS = ["blocks.2.hook_resid_post", "blocks.4.hook_resid_post", "blocks.6.hook_resid_post"]
IN = ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized", "blocks.2.ln2.hook_normalized"]
OUT = ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"]


def fixed_crosscoder(**fields) -> CrossCoder:
    """Decoders (d_model 4) of four features over three heads:
    0: only head 1 ([1, 0, 0, 0]);  1: [0.5, 0.5, 0.5, 0.5] in every head;
    2: e0 in head 0, e1 in head 1 (orthogonal), 0.05 e2 in head 2 (a twentieth of the largest);  3: zero."""
    cfg = CrossCoderConfig(d_model=4, d_sae=4, heads=HEADS, act_fn="relu", norm_activation="inference", **fields)
    model = CrossCoder.from_config(cfg)
    W_D = torch.zeros(3, 4, 4)
    W_D[1, 0, 0] = 1.0
    W_D[:, 1] = 0.5
    W_D[0, 2, 0], W_D[1, 2, 1], W_D[2, 2, 2] = 1.0, 1.0, 0.05
    with torch.no_grad():
        model.W_D.copy_(W_D)
        model.W_E.copy_(W_D.transpose(1, 2))  # each feature reads along its decoders
        model.b_E.zero_()
    return model


def fixed_clt() -> CrossLayerTranscoder:
    """Three layers, d_sae 2: feature 0 of layer 1 (index 2) writes only to its own layer's output (norm 2) and is
    the only one its encoder reads; feature 1 of layer 0 (index 1) writes to outputs 0 (norm 1) and 2 (norm 0.5)."""
    cfg = CLTConfig(
        d_model=4, d_sae=2, hook_points_in=IN, hook_points_out=OUT, act_fn="relu", norm_activation="inference"
    )
    model = CrossLayerTranscoder.from_config(cfg)
    with torch.no_grad():
        for decoder in model.W_D:
            decoder.zero_()
        model.W_D[1][1, 0, 0] = 2.0
        model.W_D[0][0, 1, 0] = 1.0
        model.W_D[2][0, 1, 1] = 0.5
        model.W_E.zero_()
        model.W_E[1, 0, 0] = 1.0
        model.b_E.zero_()
    return model


def stream(hooks: list[str], d_model: int = 4, n_batches: int = 2, rows: int = 2, positions: int = 5) -> list[dict]:
    """2-D items of random contexts (position 0 masked as BOS); every hook's activations positive in dim 0."""
    generator = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n_batches):
        mask = torch.ones(rows, positions, dtype=torch.bool)
        mask[:, 0] = False
        item = {"tokens": torch.randint(3, 1000, (rows, positions), generator=generator), "mask": mask}
        for hook in hooks:
            item[hook] = torch.randn(rows, positions, d_model, generator=generator).abs()
        items.append(item)
    return items


def analyse(sae, **cfg) -> list[FeatureAnalysis]:
    config = FeatureAnalyzerConfig(**{"total_analyzing_tokens": 10**6, "n_top": 2, "bands": [], **cfg})
    return FeatureAnalyzer(config).analyze(sae, stream(sae.cfg.hook_points), source_names=["docs"], progress=False)


# ------------------------------------------------------------------------------------------ computed from weights


def test_crosscoder_norms_cosines_and_labels_on_fixed_weights():
    exclusive, shared, pair, dead = decoder_locations(fixed_crosscoder(), threshold=0.1)
    assert exclusive.location == f"exclusive to {HEADS[1]}"
    assert exclusive.decoder_norms == {HEADS[0]: 0.0, HEADS[1]: 1.0, HEADS[2]: 0.0}
    assert exclusive.decoder_cosines == [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]  # zero decoders: 0

    assert shared.location == "shared"
    assert shared.decoder_norms == dict.fromkeys(HEADS, 1.0)
    assert shared.decoder_cosines == [[1.0] * 3] * 3  # identical rows: exactly 1

    assert pair.location == f"shared by {HEADS[0]}, {HEADS[1]}"  # 0.05 < 0.1 of the largest norm (1)
    assert list(pair.decoder_norms) == HEADS and pair.decoder_norms[HEADS[2]] == pytest.approx(0.05)
    assert pair.decoder_cosines == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # orthogonal rows: exactly 0

    assert dead.location == "nowhere (zero decoder)" and dead.decoder_norms == dict.fromkeys(HEADS, 0.0)

    # the threshold is a share of the feature's largest norm: at 0.04 head 2 (0.05) counts, at 1.0 only the largest
    assert decoder_locations(fixed_crosscoder(), threshold=0.04)[2].location == "shared"
    assert decoder_locations(fixed_crosscoder(), threshold=1.0)[1].location == "shared"  # ties all count


def test_clt_norms_per_target_layer_and_numbering():
    locations = decoder_locations(fixed_clt(), threshold=0.1)
    assert len(locations) == 6  # n_layers * d_sae, feature s * d_sae + i
    own = locations[2]  # layer 1, feature 0
    assert own.decoder_norms == {OUT[1]: 2.0, OUT[2]: 0.0}  # writes to outputs t >= 1 only
    assert own.location == f"reads {IN[1]}, writes to {OUT[1]}" and own.decoder_cosines is None
    spread = locations[1]  # layer 0, feature 1
    assert spread.decoder_norms == {OUT[0]: 1.0, OUT[1]: 0.0, OUT[2]: 0.5}
    assert spread.location == f"reads {IN[0]}, writes to {OUT[0]}, {OUT[2]}"
    assert locations[5].decoder_norms == {OUT[2]: 0.0} and locations[5].location == "nowhere (zero decoder)"


def test_unfolded_dataset_wise_crosscoder_gives_the_folded_numbers():
    norms = {HEADS[0]: 2.0, HEADS[1]: 8.0, HEADS[2]: 0.5}
    model = fixed_crosscoder()
    model.cfg = model.cfg.model_copy(
        update={"norm_activation": "dataset-wise", "dataset_average_activation_norm": norms}
    )
    unfolded = decoder_locations(model, threshold=0.1)
    model.fold_activation_scale()
    folded = decoder_locations(model, threshold=0.1)
    for got, want in zip(unfolded, folded, strict=True):
        assert got.decoder_norms == pytest.approx(want.decoder_norms) and got.location == want.location
        np.testing.assert_allclose(got.decoder_cosines, want.decoder_cosines, atol=1e-6)
    # raw decoders: head h's is W_D[h] / (sqrt(d_model) / norm_h), so head 1's exclusive feature has norm 8 / 2
    assert folded[0].decoder_norms[HEADS[1]] == pytest.approx(4.0)
    assert folded[1].location == f"shared by {HEADS[0]}, {HEADS[1]}"  # head 2's 0.25 is under 0.1 * 4


# ------------------------------------------------------------------------------------------ the analysis


def test_analysis_attaches_locations_to_crosscoder_and_clt_features_only():
    crosscoder = analyse(fixed_crosscoder())
    assert [analysis.location for analysis in crosscoder] == [
        f"exclusive to {HEADS[1]}",
        "shared",
        f"shared by {HEADS[0]}, {HEADS[1]}",
        "nowhere (zero decoder)",
    ]
    assert crosscoder[1].decoder_cosines == [[1.0] * 3] * 3 and crosscoder[0].act_times > 0

    clt = analyse(fixed_clt())
    assert [analysis.act_times > 0 for analysis in clt] == [False, False, True, False, False, False]
    assert clt[2].location == f"reads {IN[1]}, writes to {OUT[1]}"  # the feature that fires is the one located

    hook = "blocks.0.hook_resid_post"
    sae = SparseAutoEncoder.from_config(
        SAEConfig(hook_point_in=hook, hook_point_out=hook, d_model=4, d_sae=3, norm_activation="inference")
    )
    for analysis in analyse(sae):
        assert (analysis.decoder_norms, analysis.decoder_cosines, analysis.location) == (None, None, None)


def test_location_threshold_is_a_config_field_with_a_default():
    assert FeatureAnalyzerConfig(total_analyzing_tokens=1).location_threshold == 0.1
    located = analyse(fixed_crosscoder(), location_threshold=0.04)
    assert located[2].location == "shared"
    with pytest.raises(ValueError, match="location_threshold"):
        FeatureAnalyzerConfig(total_analyzing_tokens=1, location_threshold=0)


# ------------------------------------------------------------------------------------------ storage


@pytest.fixture(params=["sqlite", "mongomock"])
def store(request, tmp_path):
    if request.param == "sqlite":
        store = SQLiteRecordStore(tmp_path / "records.sqlite")
    else:
        store = MongoRecordStore(client=mongomock.MongoClient(), db="locations")
    yield store
    store.close()


def crosscoder_record(name: str = "xc") -> DictionaryRecord:
    cfg = fixed_crosscoder().cfg.model_dump(mode="json", exclude={"device"})
    return DictionaryRecord(name=name, series="default", path=f"/weights/{name}", cfg=cfg)


def assert_same_location(got: FeatureAnalysis, want: FeatureAnalysis) -> None:
    assert got.decoder_norms == want.decoder_norms and list(got.decoder_norms or ()) == list(want.decoder_norms or ())
    assert got.decoder_cosines == want.decoder_cosines and got.location == want.location


def test_store_round_trip_of_locations(store):
    analyses = analyse(fixed_crosscoder())
    analyses[1].decoder_norms = {HEADS[0]: 1.0234567891234, HEADS[1]: 0.97, HEADS[2]: 1e-30}  # floats kept exactly
    store.add_dictionary(crosscoder_record())
    store.add_feature_analyses("xc", "default", analyses)
    plain = FeatureAnalysis("plain", 0, 10, 0.0, 0.0, np.zeros(2, np.float32), np.zeros(1, np.int64))
    store.add_feature_analyses("xc", "default", [plain])
    for index, want in enumerate(analyses):
        assert_same_location(store.get_feature("xc", "default", index).analysis(), want)
    listed = list(store.iter_features("xc", "default", with_samples=False))
    for record, want in zip(listed, analyses, strict=True):
        assert_same_location(record.analysis(), want)
    stored_plain = store.get_feature("xc", "default", 0).analysis("plain")
    assert (stored_plain.decoder_norms, stored_plain.decoder_cosines, stored_plain.location) == (None, None, None)


def test_export_round_trip_of_locations(tmp_path):
    analyses = analyse(fixed_clt())
    path = write_analysis_export(tmp_path, "clt", "default", "default", analyses)
    for got, want in zip(read_analysis_export(path), analyses, strict=True):
        assert_same_location(got, want)


# Version 1 of the SQLite schema, as files written before locations were stored have it.
V1_TABLES = (
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE models (name TEXT PRIMARY KEY, cfg TEXT NOT NULL)",
    "CREATE TABLE datasets (name TEXT PRIMARY KEY, cfg TEXT NOT NULL)",
    """CREATE TABLE dictionaries (
        name TEXT NOT NULL, series TEXT NOT NULL, path TEXT NOT NULL, cfg TEXT NOT NULL, model_name TEXT,
        metrics TEXT NOT NULL, PRIMARY KEY (name, series))""",
    """CREATE TABLE features (
        dictionary TEXT NOT NULL, series TEXT NOT NULL, idx INTEGER NOT NULL, logits TEXT, interpretation TEXT,
        PRIMARY KEY (dictionary, series, idx))""",
    """CREATE TABLE feature_analyses (
        dictionary TEXT NOT NULL, series TEXT NOT NULL, idx INTEGER NOT NULL, name TEXT NOT NULL,
        act_times INTEGER NOT NULL, n_analyzed_tokens INTEGER NOT NULL, max_feature_acts REAL NOT NULL,
        mean_feature_acts REAL NOT NULL, histogram_edges BLOB NOT NULL, histogram_counts BLOB NOT NULL,
        samples BLOB NOT NULL, PRIMARY KEY (dictionary, series, idx, name))""",
)


def test_a_store_of_the_previous_schema_opens_reads_and_takes_locations(tmp_path):
    path = tmp_path / "old.sqlite"
    old = analyse(fixed_crosscoder())[0]
    with sqlite3.connect(path) as conn:
        for statement in V1_TABLES:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.execute(
            "INSERT INTO dictionaries VALUES (?, ?, ?, ?, ?, ?)", ("xc", "default", "/weights/xc", "{}", None, "{}")
        )
        conn.execute("INSERT INTO features (dictionary, series, idx) VALUES ('xc', 'default', 0)")
        stats = codec.analysis_stats(replace(old, decoder_norms=None, decoder_cosines=None, location=None))
        assert "decoder" not in stats
        keys = ("name", "act_times", "n_analyzed_tokens", "max_feature_acts", "mean_feature_acts")
        values = [stats[key] for key in (*keys, "histogram_edges", "histogram_counts")]
        conn.execute(
            "INSERT INTO feature_analyses VALUES ('xc', 'default', 0, ?, ?, ?, ?, ?, ?, ?, ?)",
            (*values, codec.pack_samples(old.samples)),
        )
    conn.close()

    with SQLiteRecordStore(path) as store:
        read = store.get_feature("xc", "default", 0).analysis()
        assert (read.act_times, read.max_feature_acts) == (old.act_times, old.max_feature_acts)
        assert [pool.name for pool in read.samples] == [pool.name for pool in old.samples]
        assert (read.decoder_norms, read.decoder_cosines, read.location) == (None, None, None)
        store.add_feature_analyses("xc", "default", [old], start_index=1)  # a new analysis into the old file
        assert_same_location(store.get_feature("xc", "default", 1).analysis(), old)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()


# ------------------------------------------------------------------------------------------ show feature


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture
def shown_store(tmp_path) -> Path:
    path = tmp_path / "records.sqlite"
    with open_store(RecordStoreConfig(sqlite_path=str(path))) as store:
        store.add_dictionary(crosscoder_record())
        store.add_feature_analyses("xc", "default", analyse(fixed_crosscoder()))
        clt = fixed_clt()
        cfg = clt.cfg.model_dump(mode="json", exclude={"device"})
        store.add_dictionary(DictionaryRecord(name="clt", series="default", path="/weights/clt", cfg=cfg))
        store.add_feature_analyses("clt", "default", analyse(clt))
    return path


def test_show_feature_prints_where_a_crosscoder_feature_lives(shown_store):
    result = invoke("show", "feature", "xc", "2", "--store-path", str(shown_store))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"lives in: shared by {HEADS[0]}, {HEADS[1]} ({HEADS[0]} 1, {HEADS[1]} 1, {HEADS[2]} 0.05)" in out
    assert "decoder cosines between heads:" in out
    rows = [line.split() for line in out.splitlines() if any(f"│ {head} " in line for head in HEADS)]
    assert [row[1:5] for row in rows] == [
        [HEADS[0], "1.00", "0.00", "0.00"],
        [HEADS[1], "0.00", "1.00", "0.00"],
        [HEADS[2], "0.00", "0.00", "1.00"],
    ]
    assert out.index("lives in:") < out.index("Activation times")  # before the statistics

    result = invoke("show", "feature", "xc", "0", "--store-path", str(shown_store))
    assert f"lives in: exclusive to {HEADS[1]} ({HEADS[0]} 0, {HEADS[1]} 1, {HEADS[2]} 0)" in result.stdout


def test_show_feature_of_a_clt_takes_layer_major_indices(shown_store):
    result = invoke("show", "feature", "clt", "2", "--store-path", str(shown_store))  # past d_sae: layer 1
    assert result.exit_code == 0, result.output
    assert f"lives in: reads {IN[1]}, writes to {OUT[1]} ({OUT[1]} 2, {OUT[2]} 0)" in result.stdout
    assert "decoder cosines" not in result.stdout

    result = invoke("show", "feature", "clt", "6", "--store-path", str(shown_store))
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert "feature index 6 is out of range: dictionary 'clt' has 6 features (2 per layer) (0 <= INDEX < 6)" in message
