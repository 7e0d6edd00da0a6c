"""Faults in the middle of real work, in real processes: the disk filling up while a checkpoint or the final weights
are written (a file-size limit, RLIMIT_FSIZE, set part-way through a training run), and the LLM server dying in the
middle of auto-interp. Afterwards nothing half-written may look complete, and a re-run picks up where the work
stopped."""

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_autointerp import analysis_of, contexts, tokenizer  # noqa: F401 - module-scoped fixtures
from test_training import initialized, sae_config, synthetic_stream, trainer_config

from lm_saes_core.analysis.autointerp.config import AutoInterpConfig
from lm_saes_core.analysis.autointerp.local_server import LocalServerUnavailableError, start_local_server
from lm_saes_core.backend import LanguageModelConfig
from lm_saes_core.log import setup_logging
from lm_saes_core.models import SparseAutoEncoder, load_sparse_dictionary
from lm_saes_core.runners.autointerp import AutoInterpSettings, RepeatedFailureError, auto_interp
from lm_saes_core.store import DictionaryRecord, RecordStoreConfig, open_store
from lm_saes_core.training import Trainer, find_latest_checkpoint
from lm_saes_core.training.checkpoint import load_trainer_state

# Training under a file-size limit ---------------------------------------------------------------------------
STEPS = 30  # checkpoints after steps 10 and 20; the final weights after step 30
FILE_SIZE_LIMIT = 16 * 1024  # bytes: config.json fits (~1.5 KB), the weights (~33 KB) and trainer state do not


def train_until_the_disk_fills(exp_dir: str, full_after: str | None) -> None:
    """Child process: train (resuming from the latest checkpoint if there is one). Once `checkpoints/<full_after>`
    exists, every file this process writes is capped at FILE_SIZE_LIMIT bytes, as on a disk that just filled up;
    SIGXFSZ is ignored so the write fails with EFBIG instead of killing the process."""
    setup_logging()
    torch.set_num_threads(1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    marker = Path(exp_dir, "checkpoints", full_after) if full_after else None

    def stream():
        nonlocal marker
        for batch in synthetic_stream():
            if marker is not None and marker.is_dir():
                resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, resource.RLIM_INFINITY))
                marker = None
            yield batch

    model, batches = initialized(sae_config("topk", top_k=4), stream())
    cfg = trainer_config(Path(exp_dir), STEPS, lr_warm_up_steps=5, checkpoint_every_steps=10, log_frequency=10)
    Trainer(cfg).fit(model, batches, resume_from=find_latest_checkpoint(exp_dir))


def train_child(exp_dir: Path, full_after: str | None = None) -> subprocess.Popen:
    # Output through a pipe: the file-size limit does not apply to pipes, so the child can still report its error.
    args = [sys.executable, __file__, "train", str(exp_dir), str(full_after)]
    env = os.environ | {"TQDM_DISABLE": "1", "COLUMNS": "500"}  # log lines unwrapped
    cwd = Path(__file__).parent.parent
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)


def finish(child: subprocess.Popen, timeout_s: float = 240) -> tuple[int, str]:
    output, _ = child.communicate(timeout=timeout_s)
    return child.returncode, output


def assert_same_weights(actual_dir: Path, expected_dir: Path) -> None:
    expected = load_file(expected_dir / "sae_weights.safetensors")
    actual = load_file(actual_dir / "sae_weights.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    exp_dir = tmp_path_factory.mktemp("uninterrupted")
    code, output = finish(train_child(exp_dir))
    assert code == 0, output
    return exp_dir


@pytest.mark.parametrize("failed_write", ["checkpoint", "final weights"])
def test_a_full_disk_leaves_nothing_complete_looking_and_resume_reproduces_the_run(
    tmp_path: Path, reference_run: Path, failed_write: str
):
    exp_dir = tmp_path / "run"
    exp_dir.mkdir()
    if failed_write == "checkpoint":
        full_after = "step_10"  # the checkpoint at step 20 is the first write that fails
    else:
        full_after = "step_20"  # the last checkpoint is written, then the final weights fail
        # The output directory holds an earlier run's final weights: they must not pass for this run's.
        SparseAutoEncoder.from_config(sae_config("topk", top_k=4)).save_pretrained(exp_dir)
    code, output = finish(train_child(exp_dir, full_after))
    assert code != 0, output
    assert "File too large" in output, output  # EFBIG stopped the run and is what it reports

    good = exp_dir / "checkpoints" / full_after
    written = ["step_10"] if full_after == "step_10" else ["step_10", "step_20"]
    assert sorted(path.name for path in (exp_dir / "checkpoints").iterdir()) == written  # no half-written one
    assert find_latest_checkpoint(exp_dir) == good
    assert load_trainer_state(good)["progress"]["step"] == int(full_after.removeprefix("step_"))
    # Nothing at the top loads as a dictionary: no config.json (the earlier run's was withdrawn), no staging left.
    assert sorted(path.name for path in exp_dir.iterdir()) == ["checkpoints"] + (
        ["sae_weights.safetensors"] if failed_write == "final weights" else []
    )
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_sparse_dictionary(exp_dir)

    # A fresh process without the limit resumes from the last good checkpoint and ends where the reference did.
    code, output = finish(train_child(exp_dir))
    assert code == 0, output
    assert f"resumed from {good} at step {good.name.removeprefix('step_')} of {STEPS}" in output, output
    assert_same_weights(exp_dir, reference_run)
    assert load_sparse_dictionary(exp_dir).cfg.d_sae == sae_config("topk", top_k=4).d_sae
    assert_same_weights(exp_dir / "checkpoints" / "step_20", reference_run / "checkpoints" / "step_20")


def cut_short(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_find_latest_checkpoint_passes_over_incomplete_and_truncated_ones(tmp_path: Path, reference_run: Path, caplog):
    """Checkpoints damaged outside our writer (copied by hand, an older version's crash): each newer one lacks
    something, so the latest complete one is step_20, and resuming from a damaged one is a named error."""
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(reference_run / "checkpoints", checkpoints)
    source = checkpoints / "step_20"
    damaged = {
        "step_21": lambda d: (d / "sae_weights.safetensors").unlink(),
        "step_22": lambda d: cut_short(d / "trainer_state.pt"),
        "step_23": lambda d: cut_short(d / "sae_weights.safetensors"),
        "step_24": lambda d: cut_short(d / "sae_weights.safetensors", keep=0.001),  # inside the header
        "step_25": lambda d: (d / "config.json").unlink(),
    }
    for name, damage in damaged.items():
        shutil.copytree(source, checkpoints / name)
        damage(checkpoints / name)
    (checkpoints / "step_99").mkdir()  # not a checkpoint at all
    with caplog.at_level("WARNING", logger="lm_saes_core"):
        assert find_latest_checkpoint(tmp_path) == source
    skipped = sorted(re.search(r"(step_\d+):", message).group(1) for message in caplog.messages)
    assert skipped == ["step_21", "step_22", "step_23", "step_24", "step_25"]
    assert "trainer_state.pt is cut short" in caplog.text and "sae_weights.safetensors is cut short" in caplog.text
    with pytest.raises(ValueError, match="step_22 is not a complete training checkpoint: trainer_state.pt is cut"):
        load_trainer_state(checkpoints / "step_22")
    model = SparseAutoEncoder.from_config(sae_config("topk", top_k=4))
    cfg = trainer_config(tmp_path / "resumed", STEPS, lr_warm_up_steps=5, checkpoint_every_steps=10)
    with pytest.raises(ValueError, match="step_23 is not a complete training checkpoint: sae_weights.safetensors"):
        Trainer(cfg).fit(model, synthetic_stream(), resume_from=checkpoints / "step_23")


# The LLM server dying in the middle of auto-interp -------------------------------------------------------------
WORDS = ("the", "of", "is", "and", "to", "in", "a", "for")  # feature i fires on the token WORDS[i]
KILL_AFTER = 2  # chat requests the server answers before it is killed


@pytest.fixture(scope="module")
def word_features(tokenizer, contexts) -> list:  # noqa: F811 - fixtures imported above
    """One analysis per word of WORDS: the feature fires on that word (scale 0.4..1 per context)."""
    tokens, lengths = contexts[0], contexts[1]
    pieces = {int(token): tokenizer.decode([int(token)]).strip().lower() for token in np.unique(tokens)}
    positions = np.arange(tokens.shape[1])[None, :]
    valid = (positions > 0) & (positions < lengths[:, None])
    scale = np.random.default_rng(0).uniform(0.4, 1.0, (len(tokens), 1)).astype(np.float32)
    analyses = []
    for word in WORDS:
        fires = np.vectorize(lambda token, word=word: pieces[int(token)] == word)(tokens) & valid
        analyses.append(analysis_of(contexts, np.where(fires, scale, 0).astype(np.float32)))
    assert all(analysis.max_feature_acts > 0 for analysis in analyses)
    return analyses


def kill_after_requests(server, n_requests: int, stop: threading.Event) -> None:
    """SIGKILL the server once its access log shows `n_requests` answered chat requests."""
    while not stop.is_set() and server.process.poll() is None:
        if server.chat_requests() >= n_requests:
            server.process.kill()
            return
        time.sleep(0.02)


def test_the_llm_server_dying_mid_run_keeps_finished_features_and_a_rerun_does_the_rest(
    tmp_path: Path, word_features: list
):
    try:
        server = start_local_server(tmp_path / "server.log", n_ctx=1024, n_threads=1)
    except LocalServerUnavailableError as error:
        pytest.skip(f"local LLM server unavailable: {error}")
    store_cfg = RecordStoreConfig(sqlite_path=str(tmp_path / "records.sqlite"))
    with open_store(store_cfg) as store:
        store.add_dictionary(DictionaryRecord("words", "default", str(tmp_path), {"d_sae": len(WORDS)}, "smollm2-135m"))
        store.add_feature_analyses("words", "default", word_features)

    def settings(base_url: str) -> AutoInterpSettings:
        interp = AutoInterpConfig(
            base_url=base_url,
            model="smollm2-135m-instruct",
            scorers=[],  # one request per feature: its explanation
            n_activating_examples=3,
            max_length=12,
            include_cot=False,
            max_tokens_explanation=48,
            max_concurrent_requests=1,  # features one after another, in index order
            request_timeout_s=120,
            max_retries=1,
            retry_backoff_s=0.05,
        )
        model = LanguageModelConfig(model_name="smollm2-135m")
        return AutoInterpSettings(sae_name="words", model=model, auto_interp=interp, store=store_cfg)

    stop = threading.Event()
    killer = threading.Thread(target=kill_after_requests, args=(server, KILL_AFTER, stop))
    killer.start()
    try:
        with pytest.raises(RepeatedFailureError, match="stopped after 3 features in a row") as failure:
            auto_interp(settings(server.base_url))
    finally:
        stop.set()
        killer.join()
        server.stop()
    assert server.process.returncode == -signal.SIGKILL  # it died mid-run, killed by the thread
    first = failure.value.result
    assert "Connection error" in str(failure.value)

    # Every feature the server answered is recorded with its reply; the ones it could not answer with the error.
    with open_store(store_cfg) as store:
        after_kill = {i: store.get_feature("words", "default", i).interpretation for i in range(len(WORDS))}
    answered = [i for i, interp in after_kill.items() if interp and "response" in interp.details["explanation"]]
    assert answered == list(range(len(answered))) and len(answered) >= KILL_AFTER  # in order, up to the kill
    assert sorted(first.interpreted) == [i for i in answered if after_kill[i].error is None]
    assert sorted(first.failed) == [i for i, interp in after_kill.items() if interp is not None and interp.error]
    unanswered = [i for i in first.failed if i not in answered]
    assert len(unanswered) >= 3 and all("Connection error" in after_kill[i].error for i in unanswered)
    assert [i for i, interp in after_kill.items() if interp is None]  # the run stopped before the last features

    # A restarted server (a new process, on a new port): the re-run asks only about the rest, once each.
    server = start_local_server(tmp_path / "server-restarted.log", n_ctx=1024, n_threads=1)
    try:
        second = auto_interp(settings(server.base_url))
        deadline = time.monotonic() + 30  # the server logs a request just after answering it
        while server.chat_requests() < second.n_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.chat_requests() == second.n_requests
    finally:
        server.stop()
    assert sorted(second.skipped_existing) == sorted(first.interpreted)
    assert second.attempted == [i for i in range(len(WORDS)) if i not in first.interpreted]
    assert second.n_requests == len(second.attempted)  # one explanation request each, no retry
    with open_store(store_cfg) as store:
        assert store.interpreted_indices("words", "default", successful_only=False) == set(range(len(WORDS)))
        final = {i: store.get_feature("words", "default", i).interpretation for i in range(len(WORDS))}
    for i in first.interpreted:  # finished before the kill: kept as they were, not asked again
        assert final[i] == after_kill[i]
    for i in second.attempted:
        assert "response" in final[i].details["explanation"] and final[i].details["explanation"]["attempts"] == 1
    assert sorted(second.interpreted) == [i for i in second.attempted if final[i].error is None]
    assert second.interpreted, [final[i].error for i in second.attempted]


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train_until_the_disk_fills(sys.argv[2], None if sys.argv[3] == "None" else sys.argv[3])
