"""train_sae / sweep_sae end to end on real SmolLM2 activations: settings from files, checks before heavy work,
quality on held-out documents, resume through the runner, and a sweep equal to single runs."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from real_activations import heldout_metrics, smollm2_cache

from lm_saes_core.config import ConfigError, load_config
from lm_saes_core.models import SparseAutoEncoder, SparseDictionary
from lm_saes_core.runners.train import SweepSAESettings, TrainSAESettings, sweep_sae, train_sae

HOOK = "blocks.3.hook_resid_post"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-caches")
    # documents 100-299 for training, 400-449 held out (whole documents, never the same ones)
    return (
        smollm2_cache(root / "train", HOOK, "train[100:300]", 128 * 160),
        smollm2_cache(root / "heldout", HOOK, "train[400:450]", 128 * 32),
    )


def settings_dict(cache: Path, out: Path, **trainer) -> dict:
    return {
        "sae": {
            "sae_type": "sae",
            "d_model": 576,
            "expansion_factor": 4,
            "hook_point_in": HOOK,
            "hook_point_out": HOOK,
            "act_fn": "topk",
            "top_k": 32,
        },
        "sae_name": "test",
        "activation_factory": {
            "sources": [{"type": "activations", "name": "c", "path": str(cache), "shuffle_chunks": True}],
            "target": "activations-1d",
            "hook_points": [HOOK],
            "batch_size": 1024,
            "buffer_size": 8192,
        },
        "initializer": {"bias_init_method": "mean", "grid_search_init_norm": True},
        "trainer": {
            "lr": 2e-3,
            "lr_warm_up_steps": 0.05,
            "total_training_tokens": 1024 * 80,
            "log_frequency": 20,
            "n_checkpoints": 0,
            "exp_result_path": str(out),
            **trainer,
        },
    }


def test_settings_file_with_sae_type_and_pretrained_forms(tmp_path):
    data = settings_dict(tmp_path / "cache", tmp_path / "out")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    settings = load_config(TrainSAESettings, path)
    assert settings.sae.d_sae == 576 * 4 and settings.sae.act_fn == "topk"
    data["sae"] = {"pretrained_name_or_path": str(tmp_path / "some-sae"), "fold_activation_scale": False}
    assert load_config(TrainSAESettings, _write(tmp_path, data)).sae.pretrained_name_or_path.endswith("some-sae")
    data["sae"] = {"sae_type": "crosscoderz", "d_model": 4}
    with pytest.raises(ConfigError, match="sae.*unknown sae_type"):
        load_config(TrainSAESettings, _write(tmp_path, data))


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_mismatched_width_or_hook_fails_before_training(caches, tmp_path):
    train_cache, _ = caches
    data = settings_dict(train_cache, tmp_path / "out")
    data["sae"]["d_model"] = 512
    with pytest.raises(
        ValueError, match="sae.d_model is 512 but the activations at 'blocks.3.hook_resid_post' have width 576"
    ):
        train_sae(TrainSAESettings.model_validate(data))
    data = settings_dict(train_cache, tmp_path / "out")
    data["sae"]["hook_point_in"] = data["sae"]["hook_point_out"] = "blocks.5.hook_resid_post"
    with pytest.raises(ValueError, match="'blocks.5.hook_resid_post'.* not produced by the activation factory"):
        train_sae(TrainSAESettings.model_validate(data))
    assert not (tmp_path / "out").exists()


def test_training_on_real_activations_generalises_to_held_out_documents(caches, tmp_path):
    train_cache, heldout = caches
    settings = TrainSAESettings.model_validate(settings_dict(train_cache, tmp_path / "sae"))
    result = train_sae(settings)
    assert result.steps == 80 and not result.reused
    weights = (tmp_path / "sae" / "sae_weights.safetensors").stat().st_mtime_ns
    again = train_sae(settings)  # identical settings: the finished run is reused, nothing is retrained
    assert again.reused and again.steps == 80 and again.n_tokens == result.n_tokens
    assert (tmp_path / "sae" / "sae_weights.safetensors").stat().st_mtime_ns == weights
    metrics = heldout_metrics(tmp_path / "sae", heldout, HOOK, tokens=3000)
    # 4x TopK(32) on 80k tokens of layer 3: measured ~0.87 on held-out documents
    assert metrics["metrics/explained_variance"] > 0.8
    assert metrics["metrics/l0"] == pytest.approx(32, abs=0.5)


def test_training_continues_from_saved_weights(caches, tmp_path):
    """`sae: {pretrained_name_or_path: DIR}` starts from the saved (folded) dictionary, as saved, and trains on."""
    train_cache, heldout = caches
    first = train_sae(TrainSAESettings.model_validate(settings_dict(train_cache, tmp_path / "first",
                                                                    total_training_tokens=1024 * 20)))  # fmt: skip
    data = settings_dict(train_cache, tmp_path / "second", total_training_tokens=1024 * 20)
    data["sae"] = {"pretrained_name_or_path": str(first.output_path)}
    second = train_sae(TrainSAESettings.model_validate(data))
    assert second.steps == 20
    before = heldout_metrics(first.output_path, heldout, HOOK, tokens=3000)["metrics/explained_variance"]
    after = heldout_metrics(second.output_path, heldout, HOOK, tokens=3000)["metrics/explained_variance"]
    assert after > before  # it continued from the first run's weights instead of starting over


@pytest.mark.parametrize("folded", [True, False], ids=["saved-folded", "saved-unfolded"])
def test_a_continued_run_starts_from_exactly_the_saved_weights(caches, tmp_path, folded):
    """A dataset-wise dictionary saved folded (raw-scale weights) or unfolded (with its norms): the continued run's
    first step has exactly the loss the saved dictionary has on that step's batch."""
    train_cache, _ = caches
    first = settings_dict(train_cache, tmp_path / "first", total_training_tokens=1024 * 4, fold_activation_scale=folded)
    first["initializer"]["grid_search_init_norm"] = False
    saved = train_sae(TrainSAESettings.model_validate(first)).output_path
    assert json.loads((saved / "config.json").read_text())["norm_activation"] == (
        "inference" if folded else "dataset-wise"
    )
    data = settings_dict(train_cache, tmp_path / "second", total_training_tokens=1024, log_frequency=1)
    data["sae"] = {"pretrained_name_or_path": str(saved)}
    settings = TrainSAESettings.model_validate(data)
    continued = train_sae(settings)
    assert continued.steps == 1

    sae = SparseDictionary.from_pretrained(saved).train()  # as saved, in the mode the trainer steps in
    first_batch = next(iter(settings.open_stream([sae.cfg])))  # the stream is seeded: the batch the run saw first
    with torch.no_grad():
        expected = sae.compute_loss(first_batch)
    assert continued.last_metrics["losses/mse_loss"] == expected.terms["mse_loss"].item()


def test_convert_topk_to_jumprelu_through_the_runner(caches, tmp_path):
    """A TopK SAE becomes a JumpReLU one calibrated on 16k tokens; compared on the next 8k (held-out documents)."""
    from lm_saes_core.runners.convert import ConvertTopKToJumpReLUSettings, convert_topk_to_jumprelu

    train_cache, heldout = caches
    topk = train_sae(TrainSAESettings.model_validate(settings_dict(train_cache, tmp_path / "topk",
                                                                   total_training_tokens=1024 * 30)))  # fmt: skip
    settings = ConvertTopKToJumpReLUSettings.model_validate(
        {
            "sae": {"pretrained_name_or_path": str(topk.output_path)},
            "sae_name": "converted",
            "activation_factory": {
                "sources": [{"type": "activations", "name": "c", "path": str(train_cache)}],
                "target": "activations-1d",
                "hook_points": [HOOK],
                "batch_size": 1024,
            },
            "calibration_tokens": 16384,
            "evaluation_tokens": 8192,
            "exp_result_path": str(tmp_path / "jumprelu"),
        }
    )
    result = convert_topk_to_jumprelu(settings)
    assert result.jumprelu_metrics["metrics/l0"] == pytest.approx(result.topk_metrics["metrics/l0"], rel=0.1)
    # On held-out documents the thresholds, fitted to the calibration documents, fire a little more (measured: L0
    # 36.3 for k 32). The reconstruction suffers (EV 0.82 -> 0.30): a threshold per feature cannot follow the
    # token norm the way top-k does, so high-norm tokens get hundreds of features and low-norm ones few.
    converted = heldout_metrics(result.output_path, heldout, HOOK, tokens=3000)
    assert converted["metrics/l0"] == pytest.approx(32, rel=0.2)
    recorded = json.loads((result.output_path / "conversion.json").read_text())
    assert recorded["jumprelu"]["metrics/l0"] == result.jumprelu_metrics["metrics/l0"]
    assert json.loads((result.output_path / "config.json").read_text())["act_fn"] == "jumprelu"


def test_resume_through_the_runner_equals_the_uninterrupted_run(caches, tmp_path):
    train_cache, _ = caches
    full = settings_dict(train_cache, tmp_path / "full", total_training_tokens=1024 * 30, checkpoint_every_steps=10)
    train_sae(TrainSAESettings.model_validate(full))
    checkpoint = tmp_path / "full" / "checkpoints" / "step_20"
    assert checkpoint.is_dir()
    resumed = settings_dict(train_cache, tmp_path / "full", total_training_tokens=1024 * 30, checkpoint_every_steps=10)
    resumed["resume_from"] = str(checkpoint)
    first = SparseAutoEncoder.from_pretrained(tmp_path / "full")
    train_sae(TrainSAESettings.model_validate(resumed))
    second = SparseAutoEncoder.from_pretrained(tmp_path / "full")
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name


def test_sweep_of_two_equals_two_single_runs(caches, tmp_path):
    train_cache, _ = caches
    short = dict(total_training_tokens=1024 * 12)
    base = settings_dict(train_cache, tmp_path / "unused", **short)
    items = []
    for name, k in (("k16", 16), ("k32", 32)):
        item = settings_dict(train_cache, tmp_path / f"sweep-{name}", **short)
        item["sae"]["top_k"] = k
        items.append({key: item[key] for key in ("sae", "initializer", "trainer")} | {"sae_name": name})
    sweep = SweepSAESettings.model_validate({"activation_factory": base["activation_factory"], "items": items})
    assert [result.reused for result in sweep_sae(sweep)] == [False, False]
    # Each item's directory records the settings of the single run that would train it: both ways, nothing retrains.
    assert [result.reused for result in sweep_sae(sweep)] == [True, True]
    assert train_sae(sweep.item_settings(1)).reused
    for item in items:
        single = {**base, **item, "trainer": {**item["trainer"], "exp_result_path": str(tmp_path / "single")}}
        train_sae(TrainSAESettings.model_validate(single))
        from_sweep = SparseAutoEncoder.from_pretrained(item["trainer"]["exp_result_path"])
        alone = SparseAutoEncoder.from_pretrained(tmp_path / "single")
        for name, value in alone.state_dict().items():
            assert torch.equal(value, from_sweep.state_dict()[name]), (item["sae_name"], name)


def test_a_failing_sweep_item_is_named_and_the_others_finish(caches, tmp_path):
    train_cache, _ = caches
    base = settings_dict(train_cache, tmp_path / "unused", total_training_tokens=1024 * 6)
    items = []
    for name, tokens in (("fine", 1024 * 6), ("too-short", 100)):  # fewer tokens than one batch: no step to take
        item = settings_dict(train_cache, tmp_path / name, total_training_tokens=tokens)
        items.append({key: item[key] for key in ("sae", "initializer", "trainer")} | {"sae_name": name})
    sweep = SweepSAESettings.model_validate({"activation_factory": base["activation_factory"], "items": items})
    with pytest.raises(RuntimeError, match="sweep item 'too-short' failed: total_training_tokens=100"):
        sweep_sae(sweep)
    assert not (tmp_path / "too-short" / "sae_weights.safetensors").exists()
    # Nothing the good item trained is lost: the next run finds it finished and trains only what is missing.
    assert train_sae(sweep.item_settings(0)).reused
