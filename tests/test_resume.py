"""Continuing killed runs without being told from where (`resume_from: auto`, what pipelines use): the newest complete
checkpoint that the same settings wrote, bit for bit the uninterrupted run; a checkpoint of other settings refused by
name; periodic (wall-clock) checkpoints kept to the newest two. Real SmolLM2 activations from a cache."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from real_activations import smollm2_cache

from lm_saes_core.config import ConfigError
from lm_saes_core.models import SparseAutoEncoder
from lm_saes_core.runners.train import SweepSAESettings, TrainSAESettings, settings_changes, sweep_sae, train_sae
from lm_saes_core.training.checkpoint import PERIODIC_MARKER, RUN_SETTINGS_FILE
from lm_saes_core.training.run_log import CURVES_FILE, read_training_log

HOOK = "blocks.3.hook_resid_post"
BATCH = 512
STEPS = 24


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return smollm2_cache(tmp_path_factory.mktemp("resume-cache"), HOOK, "train[100:200]", 128 * 48)


def settings(cache: Path, out: Path, **trainer) -> dict:
    return {
        "sae": {"d_model": 576, "expansion_factor": 2, "hook_point_in": HOOK, "hook_point_out": HOOK,
                "act_fn": "topk", "top_k": 16},
        "sae_name": "resumed",
        "activation_factory": {
            "sources": [{"type": "activations", "name": "c", "path": str(cache), "shuffle_chunks": True}],
            "target": "activations-1d",
            "hook_points": [HOOK],
            "batch_size": BATCH,
            "buffer_size": 4096,
        },
        "initializer": {"bias_init_method": "mean", "grid_search_init_norm": False, "decoder_uniform_bound": 0.04},
        "trainer": {"lr": 4e-3, "total_training_tokens": BATCH * STEPS, "log_frequency": 8, "n_checkpoints": 0,
                    "checkpoint_every_steps": 8, "exp_result_path": str(out), **trainer},
        "resume_from": "auto",
    }  # fmt: skip


def kill_after(out: Path, step: int) -> None:
    """Leave `out` as a run killed right after its checkpoint at `step`: no final weights, no result, no later
    checkpoint."""
    for name in ("config.json", "sae_weights.safetensors", "train_result.json"):
        (out / name).unlink(missing_ok=True)
    for checkpoint in (out / "checkpoints").iterdir():
        if int(checkpoint.name.removeprefix("step_")) > step:
            shutil.rmtree(checkpoint)
    log = out / "training_log.jsonl"
    kept = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= step]
    log.write_text("".join(f"{line}\n" for line in kept))
    (out / CURVES_FILE).unlink()


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = SparseAutoEncoder.from_pretrained(a).state_dict(), SparseAutoEncoder.from_pretrained(b).state_dict()
    assert first.keys() == second.keys()
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train_sae(TrainSAESettings.model_validate(settings(cache, out)))
    assert result.resumed_from_step is None and result.steps == STEPS
    return out


def test_auto_continues_a_killed_run_from_its_newest_complete_checkpoint(cache, uninterrupted, tmp_path):
    shutil.copytree(uninterrupted, tmp_path / "run")
    kill_after(tmp_path / "run", 16)
    # step_16 was being written when the disk filled: cut short, it is passed over for step_8
    weights = tmp_path / "run" / "checkpoints" / "step_16" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    result = train_sae(TrainSAESettings.model_validate(settings(cache, tmp_path / "run")))
    assert result.resumed_from_step == 8 and result.steps == STEPS and not result.reused
    assert_same_weights(uninterrupted, tmp_path / "run")
    # the curves: the resumed run re-logged steps 16 and 24, with the numbers of the uninterrupted run
    assert read_training_log(tmp_path / "run") == read_training_log(uninterrupted)
    assert [record["step"] for record in read_training_log(uninterrupted)] == [8, 16, 24]
    assert (tmp_path / "run" / CURVES_FILE).read_text() == (uninterrupted / CURVES_FILE).read_text()
    # finished: running it again trains nothing
    assert train_sae(TrainSAESettings.model_validate(settings(cache, tmp_path / "run"))).reused


def test_auto_refuses_a_checkpoint_of_other_settings_by_name_and_ignores_neutral_ones(cache, uninterrupted, tmp_path):
    shutil.copytree(uninterrupted, tmp_path / "run")
    kill_after(tmp_path / "run", 16)
    other = settings(cache, tmp_path / "run", lr=1e-3)
    other["activation_factory"]["buffer_size"] = 2048
    with pytest.raises(ConfigError) as raised:
        train_sae(TrainSAESettings.model_validate(other))
    message = str(raised.value)
    assert "checkpoints/step_16 was written by other settings" in message
    assert "trainer.lr: 0.004 -> 0.001" in message and "activation_factory.buffer_size: 4096 -> 2048" in message
    assert not (tmp_path / "run" / "config.json").exists()  # nothing was trained or written
    # log frequency, checkpoint cadence, W&B and the device change neither weights nor batches
    neutral = settings(cache, tmp_path / "run", log_frequency=3, checkpoint_every_minutes=30.0)
    result = train_sae(TrainSAESettings.model_validate(neutral))
    assert result.resumed_from_step == 16
    assert_same_weights(uninterrupted, tmp_path / "run")


def test_auto_without_checkpoints_starts_at_step_zero_and_latest_is_an_error(cache, tmp_path):
    latest = settings(cache, tmp_path / "empty") | {"resume_from": "latest"}
    with pytest.raises(ConfigError, match="resume_from='latest': no checkpoint under"):
        train_sae(TrainSAESettings.model_validate(latest))
    short = settings(cache, tmp_path / "fresh", total_training_tokens=BATCH * 4)
    assert train_sae(TrainSAESettings.model_validate(short)).resumed_from_step is None


def test_every_checkpoint_records_the_settings_that_wrote_it(uninterrupted):
    recorded = json.loads((uninterrupted / "checkpoints" / "step_8" / RUN_SETTINGS_FILE).read_text())
    assert recorded == json.loads((uninterrupted / "train_settings.json").read_text())
    assert settings_changes(recorded, {**recorded, "wandb": {"project": "x"}}) == {}
    assert settings_changes(recorded, {**recorded, "seed": 1}) == {"seed": (42, 1)}


def test_periodic_checkpoints_keep_the_newest_two_beside_the_planned_ones(cache, tmp_path):
    # A cadence far below a step's time: a periodic checkpoint after every step that has no planned one.
    run = settings(cache, tmp_path / "run", checkpoint_every_minutes=1e-9, total_training_tokens=BATCH * 12)
    result = train_sae(TrainSAESettings.model_validate(run))
    kept = sorted((tmp_path / "run" / "checkpoints").iterdir(), key=lambda path: int(path.name.split("_")[1]))
    assert [path.name for path in kept] == ["step_8", "step_10", "step_11"]
    assert [(path / PERIODIC_MARKER).exists() for path in kept] == [False, True, True]
    assert len(result.checkpoints) == 11  # every step but the last (the final weights follow it) wrote one


def test_a_sweep_item_continues_from_its_own_checkpoint(cache, uninterrupted, tmp_path):
    base = settings(cache, tmp_path / "unused")
    items = []
    for name, out in (("resumed", tmp_path / "a"), ("fresh", tmp_path / "b")):
        item = settings(cache, out)
        items.append({key: item[key] for key in ("sae", "initializer", "trainer", "resume_from")} | {"sae_name": name})
    items[1]["sae"]["top_k"] = 8
    shutil.copytree(uninterrupted, tmp_path / "a")
    kill_after(tmp_path / "a", 8)
    sweep = SweepSAESettings.model_validate({"activation_factory": base["activation_factory"], "items": items})
    resumed, fresh = sweep_sae(sweep)
    assert resumed.resumed_from_step == 8 and fresh.resumed_from_step is None
    assert_same_weights(uninterrupted, tmp_path / "a")
