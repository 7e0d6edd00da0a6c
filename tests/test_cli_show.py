"""`lm-saes show feature` and `lm-saes list` on a real SQLite store whose samples are SmolLM2 token ids of known
sentences: the decoded text, statistics, highlight markers, explanation, DLA tokens and metrics appear; bad
arguments are clean errors (exit code 2, no traceback)."""

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from lm_saes_core.analysis.render import token_pieces
from lm_saes_core.backend import LanguageModelConfig
from lm_saes_core.cli import app
from lm_saes_core.models import SAEConfig
from lm_saes_core.store import (
    DictionaryRecord,
    FeatureAnalysis,
    FeatureLogits,
    FeatureSamples,
    Interpretation,
    InterpretationScore,
    LogitToken,
    RecordStoreConfig,
    open_store,
)

FOX = "The quick brown fox jumps over the lazy dog."
PARIS = "Paris is the capital of France."
HELLO = "Hello world, nothing to see here."
# activation per word of the sentence (by its tokens): fox is the feature max
FOX_ACTS = {" brown": 1.0, " fox": 4.0, " jumps": 2.0}
PARIS_ACTS = {" France": 3.0}


def pool(name: str, rows: list[tuple[list[int], list[float]]], tokenizer) -> FeatureSamples:
    width = max(len(tokens) for tokens, _ in rows)
    tokens = np.zeros((len(rows), width), np.int32)
    activations = np.zeros((len(rows), width), np.float32)
    for i, (ids, acts) in enumerate(rows):
        tokens[i, : len(ids)], activations[i, : len(ids)] = ids, acts
    return FeatureSamples(
        name=name,
        tokens=tokens,
        activations=activations,
        lengths=np.array([len(ids) for ids, _ in rows], np.int32),
        doc_index=np.arange(len(rows), dtype=np.int64) + 10,
        doc_position=np.zeros(len(rows), np.int64),
        dataset=["pydoc"] * len(rows),
    )


def sentence(tokenizer, text: str, acts: dict[str, float]) -> tuple[list[int], list[float]]:
    """BOS + the sentence's token ids, and an activation per token looked up by its decoded text."""
    ids = [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    return ids, [acts.get(tokenizer.decode([i]), 0.0) for i in ids]


def dictionary_cfg(d_sae: int) -> dict:
    hook = "blocks.6.hook_resid_post"
    return SAEConfig(hook_point_in=hook, hook_point_out=hook, d_model=576, d_sae=d_sae).model_dump(mode="json")


@pytest.fixture(scope="module")
def store_path(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    path = tmp_path_factory.mktemp("cli_store") / "records.sqlite"
    fox, paris = sentence(tokenizer, FOX, FOX_ACTS), sentence(tokenizer, PARIS, PARIS_ACTS)
    hello = sentence(tokenizer, HELLO, {})
    assert max(fox[1]) == 4.0 and max(paris[1]) == 3.0  # the words are single tokens of this vocabulary
    edges = np.geomspace(1e-3, 1e3, 61).astype(np.float32)
    counts = np.zeros(60, np.int64)
    counts[[30, 35, 40]] = [30, 10, 2]
    analysis = FeatureAnalysis(
        name="default",
        act_times=42,
        n_analyzed_tokens=10_000,
        max_feature_acts=4.0,
        mean_feature_acts=1.75,
        histogram_edges=edges,
        histogram_counts=counts,
        samples=[
            pool("top_activations", [fox, paris], tokenizer),
            pool("band_0.6_0.8", [paris], tokenizer),
            pool("non_activating", [hello], tokenizer),
        ],
    )
    other = FeatureAnalysis("other", 1, 50, 0.5, 0.5, edges, counts, [pool("top_activations", [hello], tokenizer)])
    fox_id = tokenizer.encode(" fox", add_special_tokens=False)[0]
    logits = FeatureLogits(
        top_positive=[LogitToken(fox_id, " fox", 1.5), LogitToken(12, "wolf", 1.25)],
        top_negative=[LogitToken(13, " cat", -2.0)],
    )
    interpretation = Interpretation(
        explanation="the animal word fox",
        model="test-llm",
        scores=[InterpretationScore("detection", 0.9, 0.85, 0.8, 0.75, 20, True)],
    )
    metrics = {"metrics/explained_variance": 0.8123, "metrics/l0": 31.5, "metrics/dead_fraction": 0.0625}
    with open_store(RecordStoreConfig(sqlite_path=str(path))) as store:
        store.add_model("smollm2-135m", LanguageModelConfig(model_name="smollm2-135m").model_dump(mode="json"))
        store.add_dictionary(
            DictionaryRecord("demo", "default", "/sae/demo", dictionary_cfg(16), "smollm2-135m", metrics)
        )
        store.add_feature_analyses("demo", "default", [analysis], start_index=3)
        store.add_feature_analyses("demo", "default", [other], start_index=3)
        store.set_feature_logits("demo", "default", {3: logits})
        store.set_interpretation("demo", "default", 3, interpretation)
        # A dictionary of no known model: its contexts are shown as token ids.
        store.add_dictionary(DictionaryRecord("anon", "s2", "/sae/anon", dictionary_cfg(8)))
        store.add_feature_analyses("anon", "s2", [analysis], start_index=0)
    return path


def invoke(*args: str):
    # Wide and colourless: one line per context and the « » markers instead of colours.
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


def test_show_feature_renders_text_stats_highlights_explanation_and_logits(store_path):
    result = invoke("show", "feature", "demo", "3", "--store-path", str(store_path))
    assert result.exit_code == 0, result.output
    out = result.stdout
    # decoded text with the activating tokens marked by band of the max (4.0): 1.0 low, 2.0 middle, 4.0 top
    assert "The quick« brown»«« fox»»« jumps» over the lazy dog." in out
    assert "Paris is the capital of«« France»»." in out  # 3.0 / 4.0 is in the top band
    assert "tokens decoded with the tokenizer of 'smollm2-135m'" in out
    assert "42 of 10,000 analysed tokens" in out
    assert "0.4200% (1 in 238)" in out
    assert "Max activation    4" in out
    assert "1.75" in out
    assert "(42 activations, log counts)" in out
    assert "the animal word fox" in out and "detection" in out and "0.900" in out
    assert "␣fox" in out and "+1.500" in out and "␣cat" in out and "-2.000" in out
    assert "top_activations (2 of 2 contexts)" in out
    assert "band_0.6_0.8 (1 of 1 contexts)" in out
    assert "non_activating (1 of 1 contexts)" in out and "Hello world, nothing to see here." in out
    assert out.index("top_activations") < out.index("band_0.6_0.8")


def test_show_feature_window_and_analysis_choice(store_path):
    result = invoke("show", "feature", "demo", "3", "--window", "1", "--samples", "1", "--store-path", str(store_path))
    assert result.exit_code == 0, result.output
    assert "…« brown»«« fox»»« jumps»…" in result.stdout
    assert "Paris" not in result.stdout.split("band_0.6_0.8")[0]  # only one top context

    result = invoke("show", "feature", "demo", "3", "-a", "other", "--store-path", str(store_path))
    assert result.exit_code == 0, result.output
    assert "analysis 'other'" in result.stdout and "1 of 50 analysed tokens" in result.stdout


def test_show_feature_without_a_tokenizer_shows_token_ids(store_path, smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    fox_id = tokenizer.encode(" fox", add_special_tokens=False)[0]
    result = invoke("show", "feature", "anon", "0", "--series", "s2", "--store-path", str(store_path))
    assert result.exit_code == 0, result.output
    assert "names no model; token ids shown" in result.stdout
    assert f"««[{fox_id}] »»" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "16"], "feature index 16 is out of range: dictionary 'demo' has d_sae 16"),
        (["demo", "5"], "feature 5 of 'demo' (series 'default') has no records yet"),
        (["missing", "0"], "no dictionary 'missing' in series 'default'; stored dictionaries: demo (default), anon"),
        (["demo", "3", "-a", "nope"], "has no analysis 'nope'; it has: default, other"),
    ],
)
def test_show_feature_errors_are_clean(store_path, args, message):
    result = invoke("show", "feature", *args, "--store-path", str(store_path))
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def test_show_feature_needs_an_existing_store(tmp_path):
    result = invoke("show", "feature", "demo", "0", "--store-path", str(tmp_path / "none.sqlite"))
    assert result.exit_code == 2 and "no record store at" in result.stderr
    assert not (tmp_path / "none.sqlite").exists()


def test_list_prints_dictionaries_with_metrics(store_path):
    result = invoke("list", "--store-path", str(store_path))
    assert result.exit_code == 0, result.output
    demo = next(line for line in result.stdout.splitlines() if " demo " in line)
    for cell in ("default", "smollm2-135m", "sae/relu", "16", "blocks.6.hook_resid_post", "0.812", "31.5", "6.2%"):
        assert cell in demo
    assert "default: 1, other: 1" in demo  # one feature analysed by each analysis
    result = invoke("list", "--series", "s2", "--store-path", str(store_path))
    assert " anon " in result.stdout and " demo " not in result.stdout


def test_token_pieces_keep_split_characters_whole(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "The fox 🦊 said café — 狐狸."
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = token_pieces(tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    # the emoji is three byte-level tokens: the last one carries the character, the others show nothing
    assert pieces[pieces.index(" 🦊") - 2 : pieces.index(" 🦊")] == ["", ""]
    assert token_pieces(None, [5, 7]) == ["[5]", "[7]"]
