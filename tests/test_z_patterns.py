"""Z-patterns of a Lorsa's top contexts: on fixed weights the stored sources and contributions are the attention
weights times the values computed by hand, and they add up to the activation at the peak (minus the value bias
without it); on a random Lorsa streamed in several batches every stored row is the model's own z-pattern of its
context; on the Lorsa that is SmolLM2's layer 3 attention the sources are causal and match the model, survive the
SQLite and MongoDB stores, and `lm-saes show feature` and the browser show them; other kinds' records get none."""

import math
from pathlib import Path

import mongomock
import numpy as np
import pytest
import torch
from starlette.testclient import TestClient
from test_lorsa import IN, OUT, TEXTS, exact_lorsa, layer3, lorsa_config, randomised  # noqa: F401 - layer3: fixture
from typer.testing import CliRunner

from lm_saes_core.analysis import FeatureAnalyzer, FeatureAnalyzerConfig
from lm_saes_core.analysis.z_patterns import N_SOURCES, strongest_sources
from lm_saes_core.backend import LanguageModelConfig
from lm_saes_core.backend.attention import host_attention
from lm_saes_core.browser import create_app
from lm_saes_core.cli import app
from lm_saes_core.models import LowRankSparseAttention, SAEConfig, SparseAutoEncoder
from lm_saes_core.store import DictionaryRecord, FeatureAnalysis, RecordStoreConfig, codec, open_store
from lm_saes_core.store.export import read_analysis_export, write_analysis_export
from lm_saes_core.store.mongo import MongoRecordStore
from lm_saes_core.store.sqlite import SQLiteRecordStore

F64 = torch.float64
E = math.e


def analyse(sae, items: list[dict], **cfg) -> list[FeatureAnalysis]:
    config = FeatureAnalyzerConfig(**{"total_analyzing_tokens": 10**6, "n_top": 3, "n_non_activating": 2, **cfg})
    return FeatureAnalyzer(config).analyze(sae, items, source_names=["docs"], progress=False)


def record_of(sae, name: str, model_name: str | None = None) -> DictionaryRecord:
    cfg = sae.cfg.model_dump(mode="json", exclude={"device", "dtype"})
    return DictionaryRecord(name=name, series="default", path=f"/weights/{name}", cfg=cfg, model_name=model_name)


# ------------------------------------------------------------------------------------------ fixed weights, by hand


def fixed_lorsa() -> LowRankSparseAttention:
    """D = 2, one QK head with W_Q = W_K = I, scale 1, no RoPE; OV head j reads coordinate j with value bias
    b_V = (0.5, -0.25): v_0[s] = x_s[0] + 0.5, v_1[s] = x_s[1] - 0.25."""
    cfg = lorsa_config(d_model=2, d_sae=2, n_qk_heads=1, d_qk_head=2, attn_scale=1.0, act_fn="relu",
                       positional_embedding_type="none")  # fmt: skip
    model = LowRankSparseAttention.from_config(cfg)
    with torch.no_grad():
        model.W_Q.copy_(torch.eye(2)[None])
        model.W_K.copy_(torch.eye(2)[None])
        model.b_Q.zero_()
        model.b_K.zero_()
        model.W_V.copy_(torch.eye(2))
        model.b_V.copy_(torch.tensor([0.5, -0.25]))
        model.W_O.copy_(torch.eye(2))
        model.b_D.zero_()
    return model


# x_0..x_3; position 0 is BOS (masked out, but attended to). At t = 2 the scores x_2 . x_s are (1, 1, 2):
# A[2] = (1, 1, e) / (2 + e). At t = 3 the scores are (0, -1, -1, 1), which leaves both heads below their t = 2 values.
FIXED_X = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, -1.0]]


def fixed_item() -> dict[str, torch.Tensor]:
    x = torch.tensor([FIXED_X], dtype=F64)
    mask = torch.tensor([[False, True, True, True]])
    return {"tokens": torch.tensor([[1, 11, 12, 13]]), "mask": mask, IN: x, OUT: torch.zeros_like(x)}


def test_fixed_weights_z_pattern_by_hand():
    model = fixed_lorsa()
    analyses = analyse(model, [fixed_item()])
    A = torch.tensor([1.0, 1.0, E], dtype=F64) / (2 + E)  # the pattern row at the peak t = 2
    values = {0: torch.tensor([1.5, 0.5, 1.5], dtype=F64), 1: torch.tensor([-0.25, 0.75, 0.75], dtype=F64)}
    strongest_first = {0: [2, 0, 1], 1: [2, 1, 0]}  # by |A v|: head 1's source 0 is negative and the smallest
    for head, analysis in enumerate(analyses):
        top = analysis.pool("top_activations")
        assert len(top) == 1
        z = top.z_patterns
        peak = int(top.activations[0].argmax())
        assert peak == 2 and z.peaks.tolist() == [2]
        contributions = A * values[head]
        # K = min(8, S) = 4 slots; sources after the peak (t = 3) are never listed
        assert z.sources.tolist() == [strongest_first[head] + [-1]]
        assert z.sources.dtype == np.int32 and z.contributions.dtype == np.float32
        expected = contributions[strongest_first[head]].tolist() + [0.0]
        np.testing.assert_allclose(z.contributions[0], expected, rtol=1e-6, atol=0)
        # all sources kept: they sum to the pre-activation at the peak, which is the activation there
        activation = float(top.activations[0, 2])
        assert activation == pytest.approx(float(contributions.sum()), rel=1e-6)
        assert float(z.contributions[0].sum()) == pytest.approx(activation, rel=1e-6)
        # without the value bias: sum_s A[2, s] x_s . W_V[head] = h - b_V (the pattern row sums to 1)
        x = torch.tensor(FIXED_X[:3], dtype=F64)
        assert float((A * x[:, head]).sum()) == pytest.approx(activation - float(model.b_V.detach()[head]), rel=1e-6)
    assert float(analyses[0].pool("top_activations").z_patterns.contributions[0, 0]) == pytest.approx(
        1.5 * E / (2 + E), rel=1e-6
    )  # head 0's strongest source: x_2 itself, value 1.5, weight e / (2 + e)
    # other pools of a Lorsa have no z-patterns
    assert all(pool.z_patterns is None for a in analyses for pool in a.samples if pool.name != "top_activations")


def test_strongest_sources_keep_the_largest_magnitudes_up_to_the_peak():
    contributions = torch.tensor([[0.1, -0.5, 0.3, 9.0], [2.0, 0.0, 0.0, 0.0]])
    sources, values = strongest_sources(contributions, torch.tensor([2, 0]), 3)
    assert sources.tolist() == [[1, 2, 0], [0, -1, -1]]  # 9.0 at position 3 is after the first row's peak
    assert values.tolist() == [[-0.5, pytest.approx(0.3), pytest.approx(0.1)], [2.0, 0.0, 0.0]]


# ------------------------------------------------------------------------------------------ several batches


def random_items(cfg, n_batches: int = 3, B: int = 4, S: int = 9) -> list[dict[str, torch.Tensor]]:
    """Contexts whose tokens name them: context c has token ids 100 c + position. Position 0 is BOS; the last
    context of each batch is padded after position 6."""
    generator = torch.Generator().manual_seed(3)
    items = []
    for batch in range(n_batches):
        context = torch.arange(batch * B, (batch + 1) * B)
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[:, 0] = False
        mask[-1, 7:] = False
        tokens = 100 * context[:, None] + torch.arange(S)[None, :]
        x = 2 * torch.randn(B, S, cfg.d_model, generator=generator, dtype=cfg.dtype)
        items.append({"tokens": tokens, "mask": mask, IN: x, OUT: torch.zeros_like(x)})
    return items


@pytest.mark.parametrize("fields", [{}, {"rotary_adjacent_pairs": False, "use_post_qk_ln": True,
                                         "normalization_type": "RMS", "act_fn": "relu"}])  # fmt: skip
def test_every_stored_row_is_the_models_z_pattern_of_its_context(fields):
    """Pools fill, evict and reorder over three batches; each stored row (in the pool's order) must still carry its
    own context's z-pattern at its own peak, as `LowRankSparseAttention.z_patterns` computes it."""
    model = randomised(lorsa_config(**fields))
    items = random_items(model.cfg)
    analyses = analyse(model, items, n_top=3)
    x = torch.cat([item[IN] for item in items])  # (contexts, S, D), row = context id
    checked = 0
    for head, analysis in enumerate(analyses):
        top = analysis.pool("top_activations")
        z = top.z_patterns
        assert z.sources.shape == (len(top), N_SOURCES) and z.contributions.shape == (len(top), N_SOURCES)
        for row in range(len(top)):
            context = int(top.tokens[row, 1]) // 100
            peak = int(z.peaks[row])
            assert peak == int(top.activations[row].argmax()) and top.activations[row, peak] > 0
            full = model.z_patterns(x[context : context + 1], [head]).detach()[0, 0, peak]  # (S,)
            want_sources, want_values = strongest_sources(full[None], torch.tensor([peak]), N_SOURCES)
            assert z.sources[row].tolist() == want_sources[0].tolist()
            np.testing.assert_allclose(z.contributions[row], want_values[0].numpy(), rtol=1e-5, atol=1e-7)
            assert float(full.sum()) == pytest.approx(float(top.activations[row, peak]), rel=1e-5)
            checked += 1
    assert checked > 2 * model.cfg.d_sae  # most heads keep several contexts


# ------------------------------------------------------------------------------------------ SmolLM2 layer 3


@pytest.fixture(scope="module")
def layer3_analysis(smollm2_hf, layer3) -> tuple[LowRankSparseAttention, dict, list[FeatureAnalysis]]:  # noqa: F811
    """The Lorsa that is layer 3's attention (576 rank-1 heads), TopK 32, analysed over the three texts."""
    lorsa = exact_lorsa(host_attention(smollm2_hf, 3), act_fn="topk", top_k=32)
    encoded = smollm2_hf.tokenizer(TEXTS, return_tensors="pt", padding=True)
    item = {"tokens": encoded["input_ids"], "attention_mask": encoded["attention_mask"], **layer3}
    return lorsa, item, analyse(lorsa, [item], n_top=3, n_non_activating=1)


def test_layer3_z_patterns_are_causal_and_match_the_model(layer3_analysis):
    lorsa, item, analyses = layer3_analysis
    x = item[IN]
    n_rows = 0
    for head, analysis in enumerate(analyses):
        top = analysis.pool("top_activations")
        if len(top) == 0:
            continue
        z = top.z_patterns
        assert z.sources.shape == (len(top), N_SOURCES)
        for row in range(len(top)):
            peak, sources = int(z.peaks[row]), z.sources[row]
            assert peak == int(top.activations[row].argmax()) < int(top.lengths[row])
            real = sources >= 0
            assert real.sum() == min(N_SOURCES, peak + 1)  # causal: only positions 0..peak, all of them if few
            assert (sources[real] <= peak).all()
            magnitudes = np.abs(z.contributions[row][real])
            assert (np.diff(magnitudes) <= 0).all()  # strongest first
            n_rows += 1
        if head % 97 == 0:  # a spread of heads against the model's own z-patterns (the random test checks them all)
            for row in range(len(top)):
                length = int(top.lengths[row])  # the texts differ from their first token on
                same = (item["tokens"][:, :length].numpy() == top.tokens[row, :length]).all(1)
                context = int(np.flatnonzero(same)[0])
                peak = int(z.peaks[row])
                full = lorsa.z_patterns(x[context : context + 1], [head]).detach()[0, 0, peak]
                real = z.sources[row] >= 0
                np.testing.assert_allclose(
                    z.contributions[row][real], full[z.sources[row][real]].numpy(), rtol=1e-4, atol=1e-6
                )
                assert float(full.sum()) == pytest.approx(float(top.activations[row, peak]), rel=1e-4, abs=1e-5)
    assert n_rows > 500


@pytest.fixture(params=["sqlite", "mongomock"])
def store(request, tmp_path):
    if request.param == "sqlite":
        store = SQLiteRecordStore(tmp_path / "records.sqlite")
    else:
        store = MongoRecordStore(client=mongomock.MongoClient(), db="z_patterns")
    yield store
    store.close()


def test_layer3_z_patterns_round_trip_through_the_store(store, layer3_analysis):
    lorsa, _, analyses = layer3_analysis
    store.add_dictionary(record_of(lorsa, "lorsa3"))
    indices = [0, 5, 300, 575]
    store.add_feature_analyses("lorsa3", "default", [analyses[i] for i in indices])
    for stored_index, index in enumerate(indices):
        for pool in store.get_feature("lorsa3", "default", stored_index).analysis().samples:
            want = analyses[index].pool(pool.name).z_patterns
            if want is None:
                assert pool.z_patterns is None
                continue
            for field in ("peaks", "sources", "contributions"):
                got, expected = getattr(pool.z_patterns, field), getattr(want, field)
                assert got.dtype == expected.dtype and np.array_equal(got, expected), field


def test_layer3_z_patterns_round_trip_through_the_analysis_export(tmp_path, layer3_analysis):
    """The .npz export (analysis without a record store) keeps them too, dtypes and values exact; the pools without
    any come back with None."""
    _, _, analyses = layer3_analysis
    chosen = [analyses[i] for i in (0, 5, 300, 575)]
    path = write_analysis_export(tmp_path, "lorsa3", "default", "default", chosen)
    n_patterns = 0
    for got, want in zip(read_analysis_export(path), chosen, strict=True):
        for pool, expected_pool in zip(got.samples, want.samples, strict=True):
            want_z = expected_pool.z_patterns
            if want_z is None:
                assert pool.z_patterns is None
                continue
            n_patterns += 1
            for field in ("peaks", "sources", "contributions"):
                got_field, expected = getattr(pool.z_patterns, field), getattr(want_z, field)
                assert got_field.dtype == expected.dtype and np.array_equal(got_field, expected), field
    assert n_patterns == len(chosen)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def shown_store(tmp_path_factory, layer3_analysis) -> Path:
    lorsa, _, analyses = layer3_analysis
    path = tmp_path_factory.mktemp("z_show") / "records.sqlite"
    with open_store(RecordStoreConfig(sqlite_path=str(path))) as store:
        store.add_model("smollm2-135m", LanguageModelConfig(model_name="smollm2-135m").model_dump(mode="json"))
        store.add_dictionary(record_of(lorsa, "lorsa3", model_name="smollm2-135m"))
        store.add_feature_analyses("lorsa3", "default", analyses)
    return path


def strongest_active_head(analyses: list[FeatureAnalysis]) -> int:
    return max(range(len(analyses)), key=lambda i: analyses[i].max_feature_acts)


def test_show_feature_prints_the_source_tokens_of_a_lorsa_feature(shown_store, layer3_analysis, smollm2_hf):
    _, _, analyses = layer3_analysis
    head = strongest_active_head(analyses)
    result = invoke("show", "feature", "lorsa3", str(head), "--store-path", str(shown_store))
    assert result.exit_code == 0, result.output
    out = result.stdout
    top = analyses[head].pool("top_activations")
    assert "the source tokens (position) feeding a context's max" in out
    lines = [line for line in out.splitlines() if "← '" in line]
    assert len(lines) == min(5, len(top))  # one per shown top context
    for row, line in enumerate(lines):
        z = top.z_patterns
        source, value = int(z.sources[row, 0]), float(z.contributions[row, 0])
        text = smollm2_hf.tokenizer.decode([int(top.tokens[row, source])]).replace("\n", "↵")
        assert f"← '{text}'({source}) {value:.3g}" in line
        # sources under 1% of the activation at the peak are counted, not listed
        weak = (z.sources[row] >= 0) & (np.abs(z.contributions[row]) < 0.01 * top.activations[row, z.peaks[row]])
        if weak.any():
            assert line.rstrip(" │").endswith(f"+{int(weak.sum())} under 1% of the max")
    # an SAE's feature: no source lines
    hook = "blocks.3.hook_resid_post"
    sae = SparseAutoEncoder.from_config(
        SAEConfig(hook_point_in=hook, hook_point_out=hook, d_model=2, d_sae=2, norm_activation="inference")
    )
    with open_store(RecordStoreConfig(sqlite_path=str(shown_store))) as store:
        store.add_dictionary(record_of(sae, "sae"))
        item = {"tokens": torch.tensor([[1, 2, 3]]), hook: torch.tensor([[[1.0, 2.0], [2.0, 1.0], [1.0, 1.0]]])}
        store.add_feature_analyses("sae", "default", analyse(sae, [item]))
    result = invoke("show", "feature", "sae", "0", "--store-path", str(shown_store))
    assert result.exit_code == 0, result.output
    assert "top_activations" in result.stdout and "←" not in result.stdout


def test_browser_feature_page_lists_the_sources(shown_store, layer3_analysis):
    _, _, analyses = layer3_analysis
    head = strongest_active_head(analyses)
    top = analyses[head].pool("top_activations")
    with SQLiteRecordStore(shown_store, read_only=True) as store:
        client = TestClient(create_app(store))
        detail = client.get(f"/api/dictionaries/lorsa3/features/{head}").json()
        page = client.get(f"/dictionaries/lorsa3/features/{head}")
    assert page.status_code == 200
    pools = {pool["name"]: pool for pool in detail["pools"]}
    for row, context in enumerate(pools["top_activations"]["contexts"]):
        z = top.z_patterns
        # listed: the stored sources of at least 1% of the activation at the peak; the others counted
        strong = (z.sources[row] >= 0) & (np.abs(z.contributions[row]) >= 0.01 * top.activations[row, z.peaks[row]])
        assert [s["position"] for s in context["sources"]] == z.sources[row][strong].tolist()
        np.testing.assert_allclose([s["contribution"] for s in context["sources"]], z.contributions[row][strong])
        assert context["n_weak_sources"] == int((z.sources[row] >= 0).sum() - strong.sum()) > 0
    assert all(c["sources"] is None for name, p in pools.items() if name != "top_activations" for c in p["contexts"])
    first = top.z_patterns.sources[0, 0]
    assert f'class="z-source" data-position="{first}"' in page.text
    assert page.text.count('class="z-pattern"') == len(pools["top_activations"]["contexts"])


# ------------------------------------------------------------------------------------------ other kinds


def test_other_kinds_records_have_no_z_patterns(tmp_path):
    hook = "blocks.3.hook_resid_post"
    sae = SparseAutoEncoder.from_config(
        SAEConfig(hook_point_in=hook, hook_point_out=hook, d_model=4, d_sae=3, norm_activation="inference")
    )
    generator = torch.Generator().manual_seed(0)
    items = [{"tokens": torch.randint(3, 100, (2, 5), generator=generator),
              hook: torch.randn(2, 5, 4, generator=generator).abs()} for _ in range(2)]  # fmt: skip
    analyses = analyse(sae, items)
    assert any(len(a.pool("top_activations")) for a in analyses)
    for analysis in analyses:
        for pool in analysis.samples:
            assert pool.z_patterns is None
            assert "z_patterns" not in codec.samples_to_doc(pool)  # the stored document is as before
    with SQLiteRecordStore(tmp_path / "records.sqlite") as store:
        store.add_dictionary(record_of(sae, "sae"))
        store.add_feature_analyses("sae", "default", analyses)
        for index in range(3):
            stored = store.get_feature("sae", "default", index).analysis()
            assert all(pool.z_patterns is None for pool in stored.samples)
