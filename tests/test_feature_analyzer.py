"""Feature analysis: exact pools and statistics on a hand-made stream, the merge machinery against brute force on a
random stream, and `analyze_sae` on the real SmolLM2 with a dictionary whose first feature detects one token."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from lm_saes_core.activation.config import ActivationFactoryConfig
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.analysis import FeatureAnalyzer, FeatureAnalyzerConfig
from lm_saes_core.analysis.feature_analyzer import (
    ContextBatch,
    ContextStore,
    FeatureAnalysisState,
    context_priority,
)
from lm_saes_core.backend.base import LanguageModelConfig
from lm_saes_core.data import DatasetConfig, load_dataset
from lm_saes_core.models.sae import SAEConfig, SparseAutoEncoder
from lm_saes_core.runners.analyze import AnalyzeSAESettings, analyze_sae
from lm_saes_core.store import RecordStoreConfig, StoreUnavailableError, open_store
from lm_saes_core.store.export import read_analysis_export

BANDS = [{"low": 0.5, "high": 1.0, "n_samples": 2}, {"low": 0.2, "high": 0.5, "n_samples": 2}]


def context_item(acts: list[list[list[float]]], lengths: list[int], doc_index: list[int], doc_start: list[int], source):
    """A 2-D item of B contexts (BOS at position 0, then document tokens, right padding); token ids are
    100 * doc + position so a row's tokens say where it came from."""
    feature_acts = torch.tensor(acts)  # (B, S, F)
    B, S, _ = feature_acts.shape
    positions = torch.arange(S)
    attention = positions[None, :] < torch.tensor(lengths)[:, None]
    mask = attention & (positions[None, :] > 0)
    doc_position = torch.where(mask, torch.tensor(doc_start)[:, None] + positions - 1, -1)
    tokens = torch.where(mask, torch.tensor(doc_index)[:, None] * 100 + doc_position, 0)
    tokens[:, 0] = 1  # BOS
    tokens[~attention] = 2  # padding
    return {
        "feature_acts": feature_acts,
        "tokens": tokens,
        "mask": mask,
        "attention_mask": attention,
        "doc_index": torch.where(attention, torch.tensor(doc_index)[:, None], -1),
        "doc_position": doc_position,
        "source_idx": torch.full((B, S), source),
    }


def given_acts(item) -> torch.Tensor:
    return item["feature_acts"].clone()


def run(items, n_features: int, **cfg) -> list:
    config = FeatureAnalyzerConfig(**{"total_analyzing_tokens": 10**6, **cfg})
    return FeatureAnalyzer(config).analyze_features(
        items, given_acts, n_features=n_features, source_names=["docs", "code"], progress=False
    )


# Three features over four contexts of 4 positions (position 0 is BOS), two batches of two:
#   f0 grows its max: 1.2 in context 0, 0.7 in context 1, then 3.0 in context 2;
#   f1 is dead: only the masked BOS positions carry values (5 and 7), which must not count;
#   f2 fires only in context 1 (0.3 and 1e-4).
# Context 3 is a short row (BOS + 2 tokens) whose padding position holds 4.0 for f0 (masked).
HAND_BATCHES = [
    context_item(
        [
            [[9.0, 5.0, 0.0], [0.2, 0.0, 0.0], [1.2, 0.0, 0.0], [0.5, 0.0, 0.0]],
            [[0.0, 0.0, 0.0], [0.7, 0.0, 0.0], [0.0, 0.0, 0.3], [0.0, 0.0, 1e-4]],
        ],
        lengths=[4, 4],
        doc_index=[10, 10],
        doc_start=[0, 3],
        source=0,
    ),
    context_item(
        [
            [[0.0, 7.0, 0.0], [3.0, 0.0, 0.0], [1.5, 0.0, 0.0], [0.0, 0.0, 0.0]],
            [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [4.0, 0.0, 0.0]],
        ],
        lengths=[4, 3],
        doc_index=[11, 12],
        doc_start=[0, 0],
        source=1,
    ),
]


def docs(samples) -> list[int]:
    return samples.doc_index.tolist()


def test_a_row_that_left_its_band_frees_its_slot_at_once():
    """One slot in band (0.5, 1]: after batch 1 it holds context 0 or 1 (whichever draws higher); context 2 (3.0)
    raises the max, so that row leaves the band and context 2 takes the slot, even with a lower draw than it."""
    priority = {seed: context_priority(torch.arange(4), 3, seed)[:, 0] for seed in range(50)}
    seed = next(seed for seed, p in priority.items() if p[2] < max(p[0], p[1]))
    (f0, *_) = run(HAND_BATCHES, 3, bands=[{"low": 0.5, "high": 1.0, "n_samples": 1}], seed=seed)
    assert docs(f0.pool("band_0.5_1")) == [11]


def test_statistics_are_exact_and_ignore_masked_positions():
    f0, f1, f2 = run(HAND_BATCHES, 3, n_top=2, bands=BANDS, n_non_activating=2)
    assert [a.n_analyzed_tokens for a in (f0, f1, f2)] == [11, 11, 11]  # 3 + 3 + 3 + 2 document tokens
    assert (f0.act_times, f1.act_times, f2.act_times) == (6, 0, 2)
    assert f0.max_feature_acts == pytest.approx(3.0) and f1.max_feature_acts == 0.0
    assert f2.max_feature_acts == pytest.approx(0.3)
    assert f0.mean_feature_acts == pytest.approx((0.2 + 1.2 + 0.5 + 0.7 + 3.0 + 1.5) / 6)
    assert f1.mean_feature_acts == 0.0 and f2.mean_feature_acts == pytest.approx(0.3001 / 2)
    # 60 bins, 10 per decade from 1e-3: bin = floor(10 * (log10 v + 3)); 1e-4 is below range -> first bin
    edges = f0.histogram_edges
    assert edges.shape == (61,) and edges[0] == pytest.approx(1e-3) and edges[-1] == pytest.approx(1e3)
    expected = np.zeros(60, dtype=np.int64)
    for bin_ in (23, 30, 26, 28, 34, 31):  # 0.2, 1.2, 0.5, 0.7, 3.0, 1.5
        expected[bin_] += 1
    assert np.array_equal(f0.histogram_counts, expected)
    assert not f1.histogram_counts.any()
    assert np.nonzero(f2.histogram_counts)[0].tolist() == [0, 24]  # 1e-4, 0.3


def test_histogram_folds_under_and_overflow_into_the_end_bins():
    item = context_item([[[0.0], [1e-4], [0.0015], [2.0], [999.0], [5000.0]]], [6], [0], [0], 0)
    (analysis,) = run([item], 1)
    counts = analysis.histogram_counts
    assert counts.sum() == 5 and counts[0] == 1 and counts[1] == 1 and counts[33] == 1 and counts[59] == 2


def test_pools_hold_exactly_the_rows_that_qualify():
    f0, f1, f2 = run(HAND_BATCHES, 3, n_top=2, bands=BANDS, n_non_activating=2)
    assert [s.name for s in f0.samples] == ["top_activations", "band_0.5_1", "band_0.2_0.5", "non_activating"]

    top = f0.pool("top_activations")
    assert docs(top) == [11, 10] and top.activations.max(1).tolist() == pytest.approx([3.0, 1.2])
    assert np.allclose(top.activations, [[0.0, 3.0, 1.5, 0.0], [0.0, 0.2, 1.2, 0.5]])  # BOS value 9.0 is masked
    assert top.tokens.tolist() == [[1, 1100, 1101, 1102], [1, 1000, 1001, 1002]]
    assert top.lengths.tolist() == [4, 4] and top.doc_position.tolist() == [0, 0]
    assert top.dataset == ["code", "docs"]
    assert top.tokens.dtype == np.int32 and top.activations.dtype == np.float32

    # Band (0.5, 1] of the running max: contexts 0 (1.2) and 1 (0.7) entered while the max was 1.2, and left when
    # it grew to 3.0; only context 2 is in (1.5, 3.0]. Band (0.2, 0.5] of the final max, (0.6, 1.5], would hold
    # contexts 0 and 1, but they were above that band when they were seen: missed, never wrongly included.
    assert docs(f0.pool("band_0.5_1")) == [11]
    assert len(f0.pool("band_0.2_0.5")) == 0
    # The only context where f0 is 0 at every valid position is the short one (its padding holds 4.0).
    non_activating = f0.pool("non_activating")
    assert docs(non_activating) == [12] and non_activating.lengths.tolist() == [3]
    assert non_activating.tokens.tolist() == [[1, 1200, 1201, 0]] and not non_activating.activations.any()
    assert non_activating.doc_position.tolist() == [0] and non_activating.dataset == ["code"]

    # Dead feature: no top or band rows at all (the reference's global cut would keep 2 rows per pool here, since
    # other features have finite scores), only random all-zero contexts.
    assert [len(s) for s in f1.samples] == [0, 0, 0, 2]
    assert f1.pool("top_activations").tokens.shape == (0, 4)
    # f2 fires in one context: one top row, not two; its band (0.15, 0.3] holds it; 3 contexts qualify as
    # non-activating, 2 are kept: the two with the highest seeded priority.
    assert docs(f2.pool("top_activations")) == [10] and f2.pool("top_activations").doc_position.tolist() == [3]
    assert docs(f2.pool("band_0.5_1")) == [10]
    priority = context_priority(torch.arange(4), 3, seed=0)[:, 2]  # contexts 0..3, feature 2
    drawn = sorted([0, 2, 3], key=lambda c: -priority[c])[:2]
    assert sorted(docs(f2.pool("non_activating"))) == sorted([10, 11, 12][[0, 2, 3].index(c)] for c in drawn)


def test_a_different_seed_draws_other_rows_and_pools_can_be_turned_off():
    # f1 is silent everywhere: all 4 contexts qualify as non-activating; a single slot goes to the context with the
    # highest priority, which depends on the seed.
    drawn = {
        docs(run(HAND_BATCHES, 3, n_non_activating=1, seed=seed)[1].pool("non_activating"))[0] for seed in range(8)
    }
    assert len(drawn) > 1
    (f0, *_) = run(HAND_BATCHES, 3, n_top=0, bands=[], n_non_activating=0)
    assert f0.samples == [] and f0.act_times == 6


def test_token_budget_cuts_after_the_context_that_reaches_it():
    f0, _, _ = run(HAND_BATCHES, 3, total_analyzing_tokens=4)
    assert f0.n_analyzed_tokens == 6 and f0.max_feature_acts == pytest.approx(1.2)  # contexts 0 and 1 only


def test_ignore_token_ids_removes_positions_from_everything():
    f0, _, _ = run(HAND_BATCHES, 3, ignore_token_ids=[1101])  # the position of 1.5 in context 2
    assert f0.act_times == 5 and f0.n_analyzed_tokens == 10
    assert np.allclose(f0.pool("top_activations").activations[0], [0.0, 3.0, 0.0, 0.0])


def test_empty_stream_is_an_error():
    with pytest.raises(ValueError, match="no valid tokens to analyse"):
        run([], 3)
    all_masked = context_item([[[1.0], [1.0]]], [1], [0], [0], 0)  # BOS only
    with pytest.raises(ValueError, match="no valid tokens to analyse"):
        run([all_masked], 1)


# ---- the merge machinery against brute force ----
def random_stream(n_batches: int, batch: int, S: int, F: int, seed: int):
    """Sparse random activations; context 0 holds every feature's max (10), so bands never move after batch 0.
    doc_index = context number, so rows can be identified."""
    generator = torch.Generator().manual_seed(seed)
    items, start = [], 0
    for _ in range(n_batches):
        acts = torch.rand(batch, S, F, generator=generator) * (torch.rand(batch, S, F, generator=generator) < 0.15)
        acts *= torch.rand(batch, 1, F, generator=generator) < 0.6  # many contexts where a feature is silent
        if start == 0:
            acts[0, 1] = 10.0
        lengths = torch.randint(2, S + 1, (batch,), generator=generator).tolist()
        contexts = list(range(start, start + batch))
        items.append(context_item(acts.tolist(), lengths, doc_index=contexts, doc_start=[0] * batch, source=0))
        start += batch
    return items


@pytest.mark.parametrize(("batch", "compact"), [(1, False), (3, False), (8, False), (1, True), (4, True)])
def test_pools_equal_brute_force_on_a_random_stream(batch, compact, monkeypatch):
    """`compact`: drop contexts no pool holds from the context store as often as it allows."""
    if compact:
        monkeypatch.setattr(ContextStore, "MIN_COMPACT_ROWS", 0)
    n_top, bands, n_non = 4, [{"low": 0.05, "high": 0.08, "n_samples": 3}], 5
    F, S = 16, 6
    items = random_stream(48 // batch, batch, S, F, seed=1)
    analyses = run(items, F, n_top=n_top, bands=bands, n_non_activating=n_non, seed=3)

    acts = torch.cat([item["feature_acts"] * item["mask"][..., None] for item in items])  # (N, S, F)
    valid = torch.cat([item["mask"] for item in items]).any(1)
    scores = acts.amax(1)  # (N, F)
    priority = context_priority(torch.arange(len(acts)), F, seed=3)
    for f, analysis in enumerate(analyses):
        score = scores[:, f]
        active = (score > 0).nonzero().squeeze(1).tolist()
        expected_top = sorted(active, key=lambda c: (-score[c].item(), c))[:n_top]
        assert docs(analysis.pool("top_activations")) == expected_top, f
        for name, qualifies, n in (
            ("band_0.05_0.08", (score > 0.5) & (score <= 0.8), 3),
            ("non_activating", (score == 0) & valid, n_non),
        ):
            candidates = qualifies.nonzero().squeeze(1).tolist()
            drawn = sorted(candidates, key=lambda c: -priority[c, f].item())[:n]
            pool = analysis.pool(name)
            assert sorted(docs(pool)) == sorted(drawn), (name, f)
            # rows in score order, with the feature's own activations
            assert list(pool.activations.max(1)) == sorted(pool.activations.max(1), reverse=True)
            for row, context in enumerate(docs(pool)):
                assert np.array_equal(pool.activations[row], acts[context, :, f].numpy())
        assert analysis.act_times == int((acts[..., f] > 0).sum())
        assert analysis.mean_feature_acts == pytest.approx(acts[..., f][acts[..., f] > 0].double().mean().item())


def test_context_store_keeps_only_what_the_pools_hold(monkeypatch):
    monkeypatch.setattr(ContextStore, "MIN_COMPACT_ROWS", 0)
    cfg = FeatureAnalyzerConfig(total_analyzing_tokens=10**6, n_top=1, bands=[], n_non_activating=1)
    items = random_stream(60, 2, 6, 3, seed=2)
    state = FeatureAnalysisState(cfg, n_features=3, context_size=6, device=torch.device("cpu"))
    largest = 0
    for item in items:
        state.update(item["feature_acts"].clone(), ContextBatch.from_item(item))
        largest = max(largest, state.contexts.size)
    live = torch.unique(state._live_context_ids())
    assert len(live) <= 6  # 3 features x 2 one-row pools
    assert largest <= 2 * 6 + 4 * 2  # never more than twice what the pools held, plus a clean-up's margin
    stored = state.contexts.merged()["ids"]
    assert torch.isin(live, stored).all() and len(stored) < 120


def test_config_errors_name_the_field():
    for bad, field in (
        ({"total_analyzing_tokens": 0}, "total_analyzing_tokens"),
        ({"n_top": -1}, "n_top"),
        ({"n_non_activating": -2}, "n_non_activating"),
        ({"bands": [{"low": 0.6, "high": 0.4}]}, "bands.0"),
        ({"bands": [{"low": 0.5, "high": 1.2}]}, "bands.0.high"),
        ({"bands": [{"low": -0.1, "high": 0.4}]}, "bands.0.low"),
        ({"bands": [{"low": 0.1, "high": 0.4, "n_samples": -1}]}, "bands.0.n_samples"),
        ({"histogram_min": 10.0, "histogram_max": 1.0}, "histogram_max"),
    ):
        with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
            FeatureAnalyzerConfig(**{"total_analyzing_tokens": 100, **bad})


# ---- analyze_sae on the real SmolLM2 ----
HOOK = "blocks.3.hook_resid_post"
CONTEXT = 32
TOKEN = 314  # " is", ~1.6% of the corpus tokens
DOCS = DatasetConfig(dataset_name_or_path="python-docs", split="train[:12]")


def factory_config(**overrides) -> dict:
    return {
        "sources": [{"type": "dataset", "name": "docs"}],
        "target": "activations-2d",
        "hook_points": [HOOK],
        "batch_size": 8,
        "context_size": CONTEXT,
        "model_batch_size": 8,
        **overrides,
    }


@pytest.fixture(scope="module")
def token_sae(smollm2_hf, tmp_path_factory) -> Path:
    """A ReLU SAE on raw layer-3 activations: feature 0 projects onto (mean at TOKEN - mean elsewhere), with the
    bias at the midpoint of the two means, so it fires on TOKEN; 7 random directions fire on about half the
    positions."""
    factory = ActivationFactory(ActivationFactoryConfig.model_validate(factory_config()))
    stream = factory.process(model=smollm2_hf, datasets={"docs": load_dataset(DOCS)})
    batches = [next(stream) for _ in range(3)]
    x = torch.cat([b[HOOK][b["mask"]] for b in batches])
    tokens = torch.cat([b["tokens"][b["mask"]] for b in batches])
    assert (tokens == TOKEN).sum() >= 5
    on, off = x[tokens == TOKEN].mean(0), x[tokens != TOKEN].mean(0)
    direction = (on - off) / (on - off).norm()
    generator = torch.Generator().manual_seed(0)
    random_directions = torch.randn(576, 7, generator=generator) / 576**0.5
    w_e = torch.cat([direction[:, None], random_directions], 1)
    cfg = SAEConfig(
        d_model=576,
        d_sae=8,
        hook_point_in=HOOK,
        hook_point_out=HOOK,
        norm_activation="inference",
        sparsity_include_decoder_norm=False,
    )
    sae = SparseAutoEncoder.from_config(cfg)
    with torch.no_grad():
        sae.W_E.copy_(w_e)
        sae.W_D.copy_(w_e.t())
        sae.b_E.zero_()
        sae.b_E[0] = -(direction @ (on + off)) / 2
    path = tmp_path_factory.mktemp("token_sae")
    sae.save_pretrained(path)
    return path


def settings(sae_path: Path, tmp_path: Path, **overrides) -> AnalyzeSAESettings:
    base = {
        "sae": {"pretrained_name_or_path": str(sae_path)},
        "sae_name": "token-sae",
        "sae_series": "test",
        "activation_factory": factory_config(),
        "model": LanguageModelConfig(model_name="smollm2-135m"),
        "datasets": {"docs": DOCS},
        "analyzer": {"total_analyzing_tokens": 1500, "n_top": 5},
        "store": {"sqlite_path": str(tmp_path / "records.sqlite")},
        "output_dir": str(tmp_path / "export"),
    }
    return AnalyzeSAESettings.model_validate({**base, **overrides})


@pytest.mark.slow
def test_analyze_sae_on_smollm2_stores_true_activations(token_sae, smollm2_hf, tmp_path):
    analyses = analyze_sae(settings(token_sae, tmp_path))
    assert len(analyses) == 8
    assert analyses[0].n_analyzed_tokens >= 1500 and analyses[0].act_times > 0

    # The token feature: its strongest positions are TOKEN.
    top = analyses[0].pool("top_activations")
    assert len(top) == 5
    for row in range(len(top)):
        assert top.tokens[row, top.activations[row].argmax()] == TOKEN
    assert top.dataset == ["docs"] * 5

    # The stored rows are what the model and the SAE give on the stored tokens, position by position.
    sae = SparseAutoEncoder.from_pretrained(token_sae)
    for feature in (0, 3):
        pool = analyses[feature].pool("top_activations")
        assert len(pool) > 0
        for row in range(len(pool)):
            length = int(pool.lengths[row])
            tokens = torch.from_numpy(pool.tokens[row, :length]).long()[None]
            x = smollm2_hf.activations(tokens, torch.ones_like(tokens, dtype=torch.bool), [HOOK])[HOOK]
            expected = sae.encode(x)[0, :, feature].detach()
            expected[0] = 0.0  # BOS never counts
            assert tokens[0, 0] == smollm2_hf.bos_token_id
            torch.testing.assert_close(torch.from_numpy(pool.activations[row, :length]), expected, atol=1e-4, rtol=0)
            assert not pool.activations[row, length:].any() and not pool.tokens[row, length:].any()

    # Record store and export hold the same analyses.
    with open_store(RecordStoreConfig(sqlite_path=str(tmp_path / "records.sqlite"))) as store:
        record = store.get_dictionary("token-sae", "test")
        assert record.model_name == "smollm2-135m" and record.cfg["d_sae"] == 8
        assert record.path == str(token_sae.resolve())
        stored = store.get_feature("token-sae", "test", 0).analysis("default")
    exported = read_analysis_export(tmp_path / "export" / "test" / "token-sae" / "default_analysis_8_features.npz")
    for copy in (stored, exported[0]):
        assert copy.act_times == analyses[0].act_times
        assert copy.max_feature_acts == pytest.approx(analyses[0].max_feature_acts)
        assert np.array_equal(copy.histogram_counts, analyses[0].histogram_counts)
        assert [s.name for s in copy.samples] == [s.name for s in analyses[0].samples]
        assert np.array_equal(copy.pool("top_activations").activations, top.activations)
        assert np.array_equal(copy.pool("top_activations").tokens, top.tokens)


def test_analyze_sae_refuses_1d_activations(token_sae, tmp_path):
    with pytest.raises(ValueError, match=r"activation_factory\.target is 'activations-1d'"):
        analyze_sae(settings(token_sae, tmp_path, activation_factory=factory_config(target="activations-1d")))


def test_analyze_sae_refuses_a_hook_the_factory_does_not_produce(token_sae, tmp_path):
    other = factory_config(hook_points=["blocks.4.hook_resid_post"])
    with pytest.raises(ValueError, match=r"\['blocks\.3\.hook_resid_post'\] are not produced"):
        analyze_sae(settings(token_sae, tmp_path, activation_factory=other))
    assert not (tmp_path / "records.sqlite").exists()  # failed before the store was opened


def test_analyze_sae_fails_on_an_unreachable_store_before_loading_the_model(token_sae, tmp_path):
    """The model name does not exist: had the model been loaded first, that would be the error."""
    unreachable = {"mongo": {"mongo_uri": "mongodb://127.0.0.1:9/"}}
    missing_model = LanguageModelConfig(model_name="no-such-model")
    with pytest.raises(StoreUnavailableError, match="127.0.0.1:9"):
        analyze_sae(settings(token_sae, tmp_path, store=unreachable, model=missing_model))


@pytest.mark.slow
def test_analyze_sae_on_an_empty_dataset_is_an_error(token_sae, tmp_path):
    empty = DatasetConfig(dataset_name_or_path="python-docs", split="train[:0]")
    with pytest.raises(ValueError, match="has no documents"):
        analyze_sae(settings(token_sae, tmp_path, datasets={"docs": empty}))


def test_priorities_are_uniform_and_fixed():
    draws = context_priority(torch.arange(2000), 50, seed=0)
    assert draws.min() >= 0 and draws.max() < 1 and abs(draws.mean().item() - 0.5) < 0.01
    assert torch.equal(draws[1000:], context_priority(torch.arange(1000, 2000), 50, seed=0))
    assert not torch.equal(draws, context_priority(torch.arange(2000), 50, seed=1))
    assert math.isclose(float((draws[:, 0] < 0.1).float().mean()), 0.1, abs_tol=0.03)
