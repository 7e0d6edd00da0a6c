"""Data-parallel training under torchrun (2 CPU processes, gloo) on real SmolLM2 activations: launched by Dagster
Pipes as a pipeline item with data_parallel_size 2 is, only rank 0 reports, and the result equals the single-process
run with the same batch; misuse fails with errors naming the field."""

import json
import os
from pathlib import Path

import dagster as dg
import pytest
import torch
from typer.testing import CliRunner

from lm_saes_core import DatasetConfig, GenerateActivationsSettings, LanguageModelConfig, generate_activations
from lm_saes_core.cli import app
from lm_saes_core.config import ConfigError
from lm_saes_core.io import file_sha256
from lm_saes_core.models import SparseAutoEncoder
from lm_saes_core.runners.train import SweepSAESettings, TrainSAESettings, train_sae
from lm_saes_dagster.launch import HeavyStepLauncher
from lm_saes_dagster.pipeline_config import DictionaryItem

HOOK = "blocks.3.hook_resid_post"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    result = generate_activations(
        GenerateActivationsSettings(
            model=LanguageModelConfig(model_name="smollm2-135m"),
            dataset=DatasetConfig(dataset_name_or_path="python-docs", split="train[100:200]"),
            hook_points=[HOOK],
            output_dir=str(tmp_path_factory.mktemp("dp-cache") / "cache"),
            context_size=128,
            model_batch_size=16,
            batch_size=16,
            total_tokens=128 * 64,
        )
    )
    return result.output_dir


def settings(cache: Path, out: Path, data_parallel_size: int = 1) -> dict:
    return {
        "sae": {"sae_type": "sae", "d_model": 576, "expansion_factor": 2, "hook_point_in": HOOK,
                "hook_point_out": HOOK, "act_fn": "topk", "top_k": 16},
        "sae_name": "dp",
        "activation_factory": {
            "sources": [{"type": "activations", "name": "c", "path": str(cache), "shuffle_chunks": True}],
            "target": "activations-1d", "hook_points": [HOOK], "batch_size": 512, "buffer_size": 4096,
        },
        "initializer": {"bias_init_method": "mean", "grid_search_init_norm": True},
        "trainer": {"lr": 4e-3, "lr_warm_up_steps": 0.1, "total_training_tokens": 512 * 12, "auxk_coefficient": 0.03,
                    "dead_threshold": 1024, "log_frequency": 4, "n_checkpoints": 0, "exp_result_path": str(out)},
        "data_parallel_size": data_parallel_size,
    }  # fmt: skip


def test_two_processes_through_pipes_equal_one_process(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores
    parallel = settings(cache, tmp_path / "parallel", data_parallel_size=2)

    @dg.asset
    def dictionary(context: dg.AssetExecutionContext, launcher: HeavyStepLauncher) -> dg.MaterializeResult:
        run = launcher.run(context, "train", parallel, nproc=2, workdir=tmp_path / "work")  # torchrun, 2 ranks
        return run.get_materialize_result()

    with dg.instance_for_test() as instance:
        result = dg.materialize([dictionary], instance=instance, resources={"launcher": HeavyStepLauncher()})
    assert result.success
    (event,) = result.get_asset_materialization_events()  # rank 0 alone reports
    metadata = event.materialization.metadata
    assert metadata["steps"].value == 12 and metadata["n_tokens"].value == 512 * 12  # whole batches, both halves
    weights = tmp_path / "parallel" / "sae_weights.safetensors"
    assert event.materialization.tags["dagster/data_version"] == file_sha256(weights)

    alone = train_sae(TrainSAESettings.model_validate(settings(cache, tmp_path / "alone")))
    assert alone.steps == 12
    one = SparseAutoEncoder.from_pretrained(tmp_path / "alone").state_dict()
    two = SparseAutoEncoder.from_pretrained(tmp_path / "parallel").state_dict()
    for name, value in one.items():
        # Same steps; only the order of float sums differs (each rank sums half the batch, then halves are averaged).
        assert torch.allclose(value, two[name], atol=5e-5, rtol=1e-5), (name, (value - two[name]).abs().max())
    explained = alone.last_metrics["metrics/explained_variance"]  # rank 0's metrics cover its half of each batch
    assert metadata["explained_variance"].value == pytest.approx(explained, abs=0.02)


def test_misuse_is_a_named_error(cache, tmp_path):
    os.environ.pop("WORLD_SIZE", None)
    with pytest.raises(ConfigError, match=r"data_parallel_size=2 needs as many processes, this launch has 1"):
        train_sae(TrainSAESettings.model_validate(settings(cache, tmp_path / "x", data_parallel_size=2)))
    settings_file = tmp_path / "dp.json"
    settings_file.write_text(json.dumps(settings(cache, tmp_path / "x", data_parallel_size=2)))
    done = CliRunner().invoke(app, ["train", str(settings_file)])
    assert done.exit_code == 2 and "torchrun --nproc-per-node 2 -m lm_saes_core.cli train" in done.output
    sweep = settings(cache, tmp_path / "y", data_parallel_size=2)
    items = [{key: sweep[key] for key in ("sae", "sae_name", "trainer")}]
    with pytest.raises(ValueError, match="a sweep trains its items in threads of one process"):
        SweepSAESettings.model_validate({"activation_factory": sweep["activation_factory"], "items": items,
                                         "data_parallel_size": 2})  # fmt: skip
    with pytest.raises(ValueError, match="model parallelism is not available"):
        TrainSAESettings.model_validate({**settings(cache, tmp_path / "z"), "model_parallel_size": 2})
    item = {"sae": settings(cache, tmp_path)["sae"], "trainer": {"total_training_tokens": 1024}}
    with pytest.raises(ValueError, match="model_parallel_size"):
        DictionaryItem.model_validate({**item, "model_parallel_size": 2})
    with pytest.raises(ValueError, match="batch_size=4097 does not split evenly over data_parallel_size=2"):
        DictionaryItem.model_validate({**item, "batch_size": 4097, "data_parallel_size": 2})
