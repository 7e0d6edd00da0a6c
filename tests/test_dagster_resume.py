"""A training step killed mid-run inside a real Dagster run: the failure names the step and the signal, the retry
continues from the newest checkpoint, says so in its materialisation, and ends with the weights of an uninterrupted
run, bit for bit. A settings error is not retried. A real instance, the real SmolLM2, real processes and signals."""

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml
from dagster._core.definitions.observe import observe
from pipeline_fixtures import HOOK, small_pipeline

from lm_saes_core.models import SparseAutoEncoder
from lm_saes_core.training.checkpoint import checkpoint_problem
from lm_saes_dagster.artifacts import ArtifactRoot
from lm_saes_dagster.definitions import build_definitions
from lm_saes_dagster.launch import step_failure
from lm_saes_dagster.materialize import register_items

pytestmark = pytest.mark.slow
STEPS = 120


def training_processes(settings_file: Path) -> list[int]:
    """Pids of the Pipes children training with `settings_file` (read from /proc: the real processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lm_saes_core.pipes_entry" in command and str(settings_file).encode() in command:
            pids.append(int(entry.name))
    return pids


def kill_after_first_checkpoint(output: Path, killed: list, stop: threading.Event) -> None:
    """SIGKILL the training process once a complete checkpoint exists (while it keeps training)."""
    settings_file = output / "train.pipes-settings.json"
    while not stop.is_set():
        checkpoints = list((output / "checkpoints").glob("step_*")) if (output / "checkpoints").is_dir() else []
        if any(checkpoint_problem(path) is None for path in checkpoints):
            for pid in training_processes(settings_file):
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, sorted(path.name for path in checkpoints)))
            if killed:
                return
        time.sleep(0.02)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return SparseAutoEncoder.from_pretrained(path).state_dict()


def test_a_killed_training_step_is_retried_from_its_checkpoint_and_ends_bitwise_equal(tmp_path):
    pipeline = small_pipeline("resume", act_fns=("topk",), training_tokens=512 * STEPS)
    pipeline["dictionaries"]["topk"]["trainer"]["checkpoint_every_steps"] = 20
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "resume.yaml").write_text(yaml.safe_dump(pipeline))
    defs, errors = build_definitions(tmp_path / "pipelines", tmp_path / "home")
    assert errors == {}
    graph = defs.resolve_asset_graph()

    def assets(*names: str) -> list[dg.AssetsDefinition]:
        return [graph.assets_def_for_key(dg.AssetKey(["resume", name])) for name in names]

    output = ArtifactRoot(path=str(tmp_path / "home" / "pipelines")).dictionary("resume", "topk")
    with dg.instance_for_test() as instance:
        assert register_items(defs, "resume", instance) == ["topk"]
        observe(assets("item_config"), instance=instance)
        assert dg.materialize(assets("corpus", "tokens"), instance=instance).success
        assert dg.materialize(assets("activations"), partition_key=HOOK, instance=instance).success

        uninterrupted = dg.materialize(assets("dictionary"), partition_key="topk", instance=instance)
        assert uninterrupted.success
        first = uninterrupted.asset_materializations_for_node("resume__dictionary")[0].metadata
        assert first["resumed"].value is False and first["resumed_from_step"].value == 0
        expected = weights(output)
        shutil.rmtree(output)

        killed: list = []
        stop = threading.Event()
        watcher = threading.Thread(target=kill_after_first_checkpoint, args=(output, killed, stop), daemon=True)
        watcher.start()
        try:
            run = dg.materialize(assets("dictionary"), partition_key="topk", instance=instance)
        finally:
            stop.set()
            watcher.join()
        assert killed, "the training process finished before a checkpoint could be seen"
        assert run.success  # the retry policy's second attempt
        retries = [
            event.dagster_event
            for event in instance.all_logs(run.run_id)
            if event.dagster_event is not None and event.dagster_event.event_type_value == "STEP_UP_FOR_RETRY"
        ]
        assert len(retries) == 1
        error, messages = retries[0].event_specific_data.error, []
        while error is not None:  # the retry request, caused by the step's failure
            messages.append(error.message)
            error = error.cause
        message = "\n".join(messages)
        assert "step 'resume__dictionary[topk]' (train)" in message and "killed by SIGKILL" in message, message
        metadata = run.asset_materializations_for_node("resume__dictionary")[0].metadata
        assert metadata["resumed"].value is True
        assert metadata["resumed_from_step"].value % 20 == 0 and 20 <= metadata["resumed_from_step"].value < STEPS
        assert metadata["steps"].value == STEPS
        resumed = weights(output)
        assert resumed.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(value, resumed[name]), name


def test_a_user_error_fails_for_good_and_a_crash_may_be_retried(tmp_path):
    cause = tmp_path / "train.pipes-error.txt"
    cause.write_text("trainer.lr: must be greater than 0 (got -1)\n")
    user = step_failure("p__dictionary[a]", "train", "External execution process failed with code 2", cause)
    assert user.allow_retries is False
    assert user.description == "step 'p__dictionary[a]' (train) stopped on a user error: trainer.lr: must be greater " \
                               "than 0 (got -1)"  # fmt: skip
    crash = step_failure("p__dictionary[a]", "train", "External execution process failed with code 1", tmp_path / "x")
    assert crash.allow_retries is True and "failed with exit status 1" in crash.description
    # torchrun and shells report a child killed by signal N as 128 + N
    oom = step_failure("p__dictionary[a]", "train", "External execution process failed with code 137", tmp_path / "x")
    assert oom.allow_retries is True and "killed by SIGKILL (out of memory" in oom.description
