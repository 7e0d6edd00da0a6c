"""Auto-interpretation: examples cut from stored samples, reply parsing, metrics, and `auto_interp` end to end against
a real local LLM (llama-cpp-python serving the bundled SmolLM2 GGUF). The only fake is `misbehaving_endpoint`, an
HTTP server on loopback that times out or answers garbage on purpose, which a real server cannot be made to do."""

import asyncio
import copy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from llm_server import llm_server  # noqa: F401 - the module-scoped server fixture

from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.analysis.autointerp.examples import NON_ACTIVATING_POOL, TOP_POOL, build_examples, decode_pieces
from lm_saes_core.analysis.autointerp.explain import UnusableReplyError, parse_explanation
from lm_saes_core.analysis.autointerp.llm import RateLimiter
from lm_saes_core.analysis.autointerp.parsing import find_json_object
from lm_saes_core.analysis.autointerp.score import binary_metrics, misplaced_highlights, parse_answers
from lm_saes_core.backend import LanguageModelConfig
from lm_saes_core.data import DatasetConfig, load_dataset
from lm_saes_core.models.sae import SAEConfig, SparseAutoEncoder
from lm_saes_core.runners.analyze import AnalyzeSAESettings, analyze_sae
from lm_saes_core.runners.autointerp import AutoInterpSettings, RepeatedFailureError, auto_interp
from lm_saes_core.store import (
    DictionaryRecord,
    FeatureAnalysis,
    FeatureSamples,
    RecordNotFoundError,
    RecordStoreConfig,
    open_store,
)

DICTIONARY = "toy-sae"
D_SAE = 8
CONTEXT = 96
DATASET = "python-docs"


# Test data: real SmolLM2 token ids of the bundled corpus, with feature activations defined by a rule ------------
@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def contexts(tokenizer):
    """(tokens (N, S) int32, lengths (N,), doc_index (N,), doc_position (N,)): BOS + up to 95 tokens of each chunk of
    the first 4 x 95 tokens of every pydoc help topic (255 contexts)."""
    from lm_saes_core.corpus import topic_documents

    rows, doc_index, doc_position = [], [], []
    for doc, record in enumerate(topic_documents()):
        ids = tokenizer(record["text"])["input_ids"]
        for start in range(0, min(len(ids), 4 * (CONTEXT - 1)), CONTEXT - 1):
            rows.append([tokenizer.bos_token_id, *ids[start : start + CONTEXT - 1]])
            doc_index.append(doc)
            doc_position.append(start)
    tokens = np.zeros((len(rows), CONTEXT), dtype=np.int32)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    lengths = np.array([len(row) for row in rows], dtype=np.int32)
    return tokens, lengths, np.array(doc_index), np.array(doc_position)


def rule_activations(tokenizer, tokens: np.ndarray, lengths: np.ndarray, fires) -> np.ndarray:
    """A feature that fires (scale 0.4..1 per context, seeded) on tokens whose text satisfies `fires`, and weakly
    (0.2 x scale) on the token after each."""
    rng = np.random.default_rng(0)
    acts = np.zeros(tokens.shape, dtype=np.float32)
    for row in range(len(tokens)):
        scale = rng.uniform(0.4, 1.0)
        for pos in range(1, int(lengths[row])):
            if fires(tokenizer.decode([int(tokens[row, pos])])):
                acts[row, pos] = scale
                if pos + 1 < lengths[row]:
                    acts[row, pos + 1] = max(acts[row, pos + 1], 0.2 * scale)
    return acts


def pool(name: str, rows: list[int], contexts, acts: np.ndarray) -> FeatureSamples:
    tokens, lengths, doc_index, doc_position = contexts
    return FeatureSamples(
        name=name,
        tokens=tokens[rows],
        activations=acts[rows],
        lengths=lengths[rows],
        doc_index=doc_index[rows].astype(np.int64),
        doc_position=doc_position[rows].astype(np.int64),
        dataset=[DATASET] * len(rows),
    )


def analysis_of(contexts, acts: np.ndarray, name: str = "default") -> FeatureAnalysis:
    """Pools the way the feature analyzer fills them: the 10 strongest contexts, a 0.4-0.7 band, and contexts whose
    max stays below 0.3 x the feature's max."""
    row_max = acts.max(axis=1)
    peak = float(row_max.max())
    by_strength = [int(row) for row in np.argsort(-row_max, kind="stable")]
    top = [row for row in by_strength if row_max[row] > 0][:10]
    band = [row for row in by_strength if 0.4 * peak <= row_max[row] < 0.7 * peak][:8]
    silent = [row for row in by_strength if row_max[row] < 0.3 * peak][:12]
    positive = acts[acts > 0]
    counts, edges = np.histogram(positive, bins=10) if len(positive) else (np.zeros(10), np.zeros(11))
    samples = [pool(TOP_POOL, top, contexts, acts), pool("band_0.4_0.7", band, contexts, acts)]
    if peak > 0:
        samples.append(pool(NON_ACTIVATING_POOL, silent, contexts, acts))
    return FeatureAnalysis(
        name=name,
        act_times=int((acts > 0).sum()),
        n_analyzed_tokens=int(contexts[1].sum()),
        max_feature_acts=peak,
        mean_feature_acts=float(positive.mean()) if len(positive) else 0.0,
        histogram_edges=edges.astype(np.float32),
        histogram_counts=counts.astype(np.int64),
        samples=samples if peak > 0 else [],
    )


def on_function(text: str) -> bool:
    return text.strip().lower() in ("function", "functions")


def on_digits(text: str) -> bool:
    return text.strip().isdigit()


@pytest.fixture(scope="module")
def analyses(tokenizer, contexts) -> list[FeatureAnalysis]:
    """Features 0 ("function"), 1 (digits) and 2 (dead); 3..7 have no analysis."""
    tokens, lengths = contexts[0], contexts[1]
    return [
        analysis_of(contexts, rule_activations(tokenizer, tokens, lengths, on_function)),
        analysis_of(contexts, rule_activations(tokenizer, tokens, lengths, on_digits)),
        analysis_of(contexts, np.zeros(tokens.shape, dtype=np.float32)),
    ]


@pytest.fixture
def store_cfg(tmp_path: Path, analyses) -> RecordStoreConfig:
    cfg = RecordStoreConfig(sqlite_path=str(tmp_path / "records.sqlite"))
    with open_store(cfg) as store:
        store.add_dictionary(
            DictionaryRecord(DICTIONARY, "default", str(tmp_path / "sae"), {"d_sae": D_SAE}, "smollm2-135m")
        )
        store.add_feature_analyses(DICTIONARY, "default", analyses)
    return cfg


def settings(store_cfg: RecordStoreConfig, sae_name: str = DICTIONARY, **interp) -> AutoInterpSettings:
    return AutoInterpSettings(
        sae_name=sae_name,
        model=LanguageModelConfig(model_name="smollm2-135m"),
        auto_interp=AutoInterpConfig(**interp),
        store=store_cfg,
    )


# Examples -------------------------------------------------------------------------------------------------------
def test_decode_pieces_concatenate_to_the_decoded_text(tokenizer):
    ids = tokenizer("naïve café — 12 ½ functions ∑")["input_ids"]
    pieces = decode_pieces(tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tokenizer.decode(ids)


def subset(samples: FeatureSamples, rows: list[int], name: str) -> FeatureSamples:
    return FeatureSamples(
        name,
        samples.tokens[rows],
        samples.activations[rows],
        samples.lengths[rows],
        samples.doc_index[rows],
        samples.doc_position[rows],
        [samples.dataset[row] for row in rows],
    )


def test_examples_are_centred_windows_and_held_out_examples_were_never_shown(tokenizer, contexts, analyses):
    analysis = copy.deepcopy(analyses[0])
    top = analysis.pool(TOP_POOL)
    # a band that repeats one shown and one held-out context of the top pool: neither may appear twice
    analysis.samples.append(subset(top, [2, 8], "band_0.8_1.0"))
    cfg = AutoInterpConfig(base_url="http://unused", n_activating_examples=4, max_length=20)
    examples = build_examples(analysis, tokenizer, cfg, np.random.default_rng(0))
    assert len(examples.shown) == 4
    assert len(examples.held_out) == 6 + len(analysis.pool("band_0.4_0.7"))
    assert not any(example.source.startswith("band_0.8_1.0") for example in examples.held_out)
    shown = {example.source for example in examples.shown}
    assert shown == {f"{TOP_POOL}[{i}]" for i in range(4)}
    assert not shown & {example.source for example in examples.held_out}
    for example in examples.shown + examples.held_out:
        name, row = example.source.rstrip("]").split("[")
        assert len(example.pieces) == min(20, analysis.pool(name).lengths[int(row)]) and example.max_activation > 0
        # the strongest token is in the window and is the "function" token the feature was built on
        assert on_function(example.pieces[int(np.argmax(example.activations))])
        marked = example.highlighted(example.true_highlights(cfg.activation_threshold))
        assert marked.count("<<") > example.text().count("<<")
        assert example.highlighted(np.zeros(len(example.pieces), bool)) == example.text()
    assert len(examples.non_activating) == 12
    for example in examples.non_activating:
        assert example.max_activation == 0 and not any(on_function(piece) for piece in example.pieces)


def test_windows_follow_the_stored_width_not_a_fixed_one(tokenizer, contexts, analyses):
    """Rows narrower than max_length give whole-row examples; nothing assumes a context width."""
    analysis = copy.deepcopy(analyses[1])
    narrow = analysis.pool(TOP_POOL)
    narrow.tokens, narrow.activations = narrow.tokens[:, :40], narrow.activations[:, :40]
    narrow.lengths = np.minimum(narrow.lengths, 40)
    cfg = AutoInterpConfig(base_url="http://unused", n_activating_examples=3, max_length=64)
    examples = build_examples(analysis, tokenizer, cfg, np.random.default_rng(0))
    assert all(len(example.pieces) == int(narrow.lengths[i]) for i, example in enumerate(examples.shown))


def test_highlights_wrap_runs_and_keep_spaces_outside(tokenizer):
    from lm_saes_core.analysis.autointerp.examples import Example

    example = Example([" New", " York", " is", " big"], np.array([0.9, 1.0, 0.0, 0.8], np.float32), "t")
    assert example.highlighted(example.true_highlights(0.7)) == " <<New York>> is <<big>>"
    mask = misplaced_highlights(example, 0.7, np.random.default_rng(0))
    assert mask.tolist() == [False, False, True, False]  # the only silent token gets the (single) wrong mark


# Parsing and metrics ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"explanation": "This feature activates on dates.", "complexity": 2}', "This feature activates on dates."),
        ('```json\n{"steps": ["a"], "explanation": "numbers",}\n```', "numbers"),
        ("Sure! {'explanation': 'the word cat', 'consistency': 4} Hope it helps.", "the word cat"),
        ("I see. This feature activates on digits in years. More", "This feature activates on digits in years."),
        ('{"Final_Explanation": "capital letters"}', "capital letters"),
        ('{"explanation": "digits \\"1\\"", "complexity": 1, "x": "', 'digits "1"'),  # cut off by max_tokens
        ('{"steps": ["This feature activates on x. Or', "This feature activates on x."),
    ],
)  # fmt: skip
def test_parse_explanation_tolerates_the_usual_deviations(reply: str, expected: str):
    assert parse_explanation(reply).text == expected


def test_parse_explanation_rejects_junk():
    for reply in ("lorem ipsum", '{"answer": 3}', '{"explanation": ""}', "{broken"):
        with pytest.raises(UnusableReplyError, match="no explanation"):
            parse_explanation(reply)


def test_find_json_object_skips_braces_inside_strings():
    assert find_json_object('x {"a": "}{", "b": [1, 2,],} y') == {"a": "}{", "b": [1, 2]}


def test_parse_answers():
    assert parse_answers('{"answers": [true, "no", 1, "maybe"]}', 5) == [True, False, True, None, None]
    assert parse_answers('{"1": "yes", "3": false}', 3) == [True, None, False]
    assert parse_answers('{"answers": "true, false"}', 2) == [True, False]
    assert parse_answers("no json", 2) == [None, None]


def test_binary_metrics_exact_values():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    predictions = np.array([1, 1, 0, 1, 0, 0, 0, 0], bool)
    metrics = binary_metrics(labels, predictions)
    assert metrics["accuracy"] == pytest.approx(6 / 8)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_rate_limiter_spaces_request_starts():
    async def starts() -> list[float]:
        limiter, times = RateLimiter(requests_per_minute=600), []  # one start per 0.1 s
        for _ in range(4):
            await limiter.wait()
            times.append(time.monotonic())
        return times

    gaps = np.diff(asyncio.run(starts()))
    assert np.all(gaps >= 0.095) and np.all(gaps < 0.3)


# Settings errors ------------------------------------------------------------------------------------------
def test_unknown_dictionary_and_analysis_are_named(store_cfg):
    with pytest.raises(RecordNotFoundError, match="'nope'.*toy-sae"):
        auto_interp(settings(store_cfg, base_url="http://127.0.0.1:9/v1").model_copy(update={"sae_name": "nope"}))
    bad_analysis = settings(store_cfg, base_url="http://127.0.0.1:9/v1").model_copy(update={"analysis_name": "x"})
    with pytest.raises(RecordNotFoundError, match="no analysis 'x'.*default"):
        auto_interp(bad_analysis)
    with pytest.raises(ValueError, match=r"\[8\].*d_sae=8"):
        auto_interp(settings(store_cfg, base_url="http://127.0.0.1:9/v1").model_copy(update={"features": [0, 8]}))


def test_openai_without_a_key_is_refused_before_any_work(store_cfg, monkeypatch):
    monkeypatch.delenv("LM_SAES_TEST_NO_KEY", raising=False)
    with pytest.raises(ValueError, match="LM_SAES_TEST_NO_KEY"):
        auto_interp(settings(store_cfg, api_key_env="LM_SAES_TEST_NO_KEY"))


# A misbehaving endpoint (fake: a real server cannot be made to time out or answer garbage on demand) ---------
class _MisbehavingHandler(BaseHTTPRequestHandler):
    """/slow/...: answers after 3 s. /not-json/...: a 200 whose body is not JSON. /wrong-shape/...: JSON that is not a
    chat completion. /flaky/...: 503 on every odd request, a chat completion with junk text on every even one."""

    requests: dict[str, int]

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        mode = self.path.split("/")[1]
        self.requests[mode] = self.requests.get(mode, 0) + 1
        if mode == "slow":
            time.sleep(3)
            self._reply(200, b"{}", "application/json")
        elif mode == "not-json":
            self._reply(200, b"<html>gateway says hello</html>", "application/json")
        elif mode == "wrong-shape":
            self._reply(200, b'{"status": "ok"}', "application/json")
        elif self.requests[mode] % 2 == 1:
            self._reply(503, b'{"error": {"message": "overloaded"}}', "application/json")
        else:
            message = {"role": "assistant", "content": "lorem ipsum dolor sit amet"}
            body = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}  # fmt: skip
            self._reply(200, json.dumps(body).encode(), "application/json")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def misbehaving_endpoint():
    handler = type("Handler", (_MisbehavingHandler,), {"requests": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("mode", "error", "requests_per_feature"),
    [
        ("slow", "failed after 2 attempt(s): timed out", 2),
        ("not-json", "not JSON", 1),
        ("wrong-shape", "not a chat completion", 1),
        ("flaky", "no explanation in the reply", 2),  # 503, retried, then a completion whose text is junk
    ],
)
def test_a_misbehaving_endpoint_records_per_feature_failures(
    store_cfg, misbehaving_endpoint, mode: str, error: str, requests_per_feature: int
):
    url, requests = misbehaving_endpoint
    run = settings(
        store_cfg,
        base_url=f"{url}/{mode}/v1",
        request_timeout_s=0.5,
        max_retries=1,
        retry_backoff_s=0.05,
        max_concurrent_requests=1,
    )
    # Both features fail alike: the run fails with that error, and what it did is recorded.
    with pytest.raises(RepeatedFailureError, match="every feature attempted failed with the same error") as failure:
        auto_interp(run)
    assert error in str(failure.value)
    result = failure.value.result
    assert result.interpreted == [] and sorted(result.failed) == [0, 1]
    assert result.skipped_inactive == [2]  # dead feature; 3..7 have no records at all
    assert result.n_requests == requests[mode] == 2 * requests_per_feature
    with open_store(store_cfg) as store:
        for index in (0, 1):
            interpretation = store.get_feature(DICTIONARY, "default", index).interpretation
            assert interpretation.explanation is None and error in interpretation.error
            assert interpretation.details["explanation"]["attempts"] == requests_per_feature
            assert interpretation.details["n_shown"] == 7
        assert store.get_feature(DICTIONARY, "default", 2).interpretation is None


# The real local LLM on a real analysis ----------------------------------------------------------------------
HOOK = "blocks.3.hook_resid_post"
DOCS = DatasetConfig(dataset_name_or_path="python-docs", split="train[:12]")
DETECTED_TOKENS = (314, 1569)  # " is", " object"


@pytest.fixture(scope="module")
def analysed_store(smollm2_hf, tmp_path_factory) -> RecordStoreConfig:
    """`analyze_sae` of a 3-feature ReLU SAE on SmolLM2 layer 3 over the first 12 corpus documents. Features 0 and 1
    detect " is" and " object" (projection onto the difference of the mean activation at the token and elsewhere,
    bias at the midpoint); feature 2 is dead (bias far below any projection)."""
    texts = load_dataset(DOCS)["text"]
    rows = [[smollm2_hf.tokenizer.bos_token_id, *smollm2_hf.tokenizer(text)["input_ids"][:127]] for text in texts]
    tokens = torch.tensor([row + [0] * (128 - len(row)) for row in rows])
    valid = torch.tensor([[0 < i < len(row) for i in range(128)] for row in rows])
    x = smollm2_hf.activations(tokens, valid | (torch.arange(128) == 0), [HOOK])[HOOK][valid]
    tokens = tokens[valid]
    assert all((tokens == token).sum() >= 5 for token in DETECTED_TOKENS)
    w_e = torch.nn.functional.normalize(torch.randn(576, 3, generator=torch.Generator().manual_seed(0)), dim=0)
    b_e = torch.full((3,), -1e4)
    for feature, token in enumerate(DETECTED_TOKENS):
        on, off = x[tokens == token].mean(0), x[tokens != token].mean(0)
        w_e[:, feature] = (on - off) / (on - off).norm()
        b_e[feature] = -(w_e[:, feature] @ (on + off)) / 2
    sae = SparseAutoEncoder.from_config(
        SAEConfig(
            d_model=576,
            d_sae=3,
            hook_point_in=HOOK,
            hook_point_out=HOOK,
            norm_activation="inference",
            sparsity_include_decoder_norm=False,
        )
    )
    with torch.no_grad():
        sae.W_E.copy_(w_e)
        sae.W_D.copy_(w_e.t())
        sae.b_E.copy_(b_e)
    root = tmp_path_factory.mktemp("analysed")
    sae.save_pretrained(root / "sae")
    store = RecordStoreConfig(sqlite_path=str(root / "records.sqlite"))
    factory = {"sources": [{"type": "dataset", "name": "docs"}], "target": "activations-2d", "hook_points": [HOOK],
               "batch_size": 8, "context_size": 32, "model_batch_size": 8}  # fmt: skip
    analyzer = {"total_analyzing_tokens": 3000, "n_top": 8, "n_non_activating": 6,
                "bands": [{"low": 0.2, "high": 0.8, "n_samples": 6}]}  # fmt: skip
    analysis = {
        "sae": {"pretrained_name_or_path": str(root / "sae")},
        "sae_name": "token-sae",
        "activation_factory": factory,
        "model": {"model_name": "smollm2-135m"},
        "datasets": {"docs": DOCS},
        "analyzer": analyzer,
        "store": store,
    }
    analyze_sae(AnalyzeSAESettings.model_validate(analysis))
    return store


def recorded_attempts(interpretation) -> int:
    requests = [interpretation.details.get("explanation", {}), *interpretation.details.get("scorers", {}).values()]
    return sum(request.get("attempts", 0) for request in requests)


def _settle(server, expected: int, timeout_s: float = 30.0) -> int:
    """The server logs a request just after answering it; wait for the log to catch up with `expected`."""
    deadline = time.monotonic() + timeout_s
    while server.chat_requests() < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return server.chat_requests()


@pytest.mark.slow
def test_auto_interp_with_a_real_local_llm_stores_results_and_resumes(analysed_store, llm_server):  # noqa: F811
    # Small prompts and short replies: on 2 busy CPU cores the server evaluates prompts at ~40 tokens/s.
    run = settings(
        analysed_store,
        sae_name="token-sae",
        base_url=llm_server.base_url,
        model="smollm2-135m-instruct",
        n_activating_examples=3,
        n_non_activating_examples=4,
        max_length=16,
        include_cot=False,
        detection_n_examples=2,
        fuzzing_n_correct=2,
        fuzzing_n_incorrect=1,
        max_tokens_explanation=64,
        max_tokens_scoring=32,
        max_concurrent_requests=1,  # the server answers one request at a time anyway
        request_timeout_s=120,
    )
    before = llm_server.chat_requests()
    result = auto_interp(run)
    assert result.attempted == [0, 1] and result.skipped_inactive == [2]
    assert _settle(llm_server, before + result.n_requests) == before + result.n_requests

    with open_store(analysed_store) as store:
        stored = {index: store.get_feature("token-sae", "default", index).interpretation for index in (0, 1)}
        assert store.get_feature("token-sae", "default", 2).interpretation is None
    explained = [index for index, interp in stored.items() if interp.explanation is not None]
    assert explained, f"the model explained no feature: {[interp.error for interp in stored.values()]}"
    # an explanation each, then one request per score; every attempt (retries included) is in the details
    assert result.n_requests >= 2 + sum(len(stored[index].scores) for index in explained)
    assert result.n_requests == sum(recorded_attempts(interp) for interp in stored.values())
    for index, interp in stored.items():
        assert interp.model == "smollm2-135m-instruct"
        if interp.explanation is None:
            assert index in result.failed and interp.error.startswith("explanation")
            continue
        assert interp.details["explanation"]["response"]  # the raw reply is kept
        scored = {score.method for score in interp.scores}
        for method, scorer in interp.details["scorers"].items():
            assert (method in scored) != ("skipped" in scorer)  # a score, or the reason there is none
        for score in interp.scores:
            assert score.n_examples == {"detection": 4, "fuzzing": 3}[score.method]
            assert 0 <= score.balanced_accuracy <= 1 and score.passed == (score.balanced_accuracy >= 0.7)
            scorer = interp.details["scorers"][score.method]
            assert scorer["response"] and scorer["messages"][-1]["content"].startswith("Description:")
            # held-out examples only: nothing the explainer saw is scored
            assert not set(scorer["examples"]) & set(interp.details["explanation"]["examples"])
    assert "detection" in {score.method for score in stored[0].scores} or stored[0].explanation is None

    # A re-run asks only about what failed; finished features cost no request and stay as they were.
    rerun = auto_interp(run)
    assert rerun.attempted == sorted(result.failed)
    assert sorted(rerun.skipped_existing) == sorted(result.interpreted)
    total = before + result.n_requests + rerun.n_requests
    assert _settle(llm_server, total) == total
    if not result.failed:
        assert rerun.n_requests == 0
    with open_store(analysed_store) as store:
        for index in result.interpreted:
            again = store.get_feature("token-sae", "default", index).interpretation
            assert again.explanation == stored[index].explanation and again.details == stored[index].details
