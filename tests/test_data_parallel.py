"""Data-parallel training under torchrun (2 CPU processes, gloo) on real SmolLM2 activations: the ranks stream
disjoint parts of the data that together are the whole; a data-parallel step equals the one-process step on the union
of the ranks' batches and keeps the replicas identical; launched by Dagster Pipes as a pipeline item with
data_parallel_size 2 is, only rank 0 reports; misuse fails with errors naming the field."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import torch
from typer.testing import CliRunner

from lm_saes_core import DatasetConfig, GenerateActivationsSettings, LanguageModelConfig, generate_activations
from lm_saes_core.activation.config import ActivationFactoryConfig
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.backend import load_model
from lm_saes_core.cli import app
from lm_saes_core.config import ConfigError
from lm_saes_core.data import load_dataset
from lm_saes_core.io import file_sha256
from lm_saes_core.models import SAEConfig, SparseAutoEncoder
from lm_saes_core.runners.train import SweepSAESettings, TrainSAESettings, sweep_sae, train_sae
from lm_saes_core.training import Trainer, TrainerConfig
from lm_saes_dagster.launch import HeavyStepLauncher, torchrun_command
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


def _positions(stream) -> list[tuple[int, int]]:
    pairs = []
    for batch in stream:
        pairs += list(zip(batch["doc_index"].tolist(), batch["doc_position"].tolist(), strict=True))
    return pairs


def test_ranks_stream_disjoint_parts_that_make_up_the_whole(cache):
    factory = ActivationFactory(
        ActivationFactoryConfig(
            sources=[{"type": "activations", "name": "c", "path": str(cache), "shuffle_chunks": True}],
            target="activations-1d", hook_points=[HOOK], batch_size=256, buffer_size=1024,
        )
    )  # fmt: skip
    whole = _positions(factory.process())
    parts = [_positions(factory.process(shard=(rank, 2))) for rank in range(2)]
    assert len(whole) == len(set(whole)) > 0
    assert not set(parts[0]) & set(parts[1]) and set(parts[0]) | set(parts[1]) == set(whole)
    assert abs(len(parts[0]) - len(parts[1])) <= 0.2 * len(whole)  # whole chunks each

    # A dataset source: every other document each, the tokens of the whole pass between them.
    model = load_model(LanguageModelConfig(model_name="smollm2-135m"))
    tokens = ActivationFactory(
        ActivationFactoryConfig(sources=[{"type": "dataset", "name": "d"}], target="tokens", hook_points=[HOOK],
                                batch_size=8, context_size=64)
    )  # fmt: skip
    dataset = {"d": load_dataset(DatasetConfig(dataset_name_or_path="python-docs", split="train[:12]"))}
    documents = []
    for rank in range(2):
        windows = tokens.process(model=model, datasets=dataset, shard=(rank, 2))
        documents.append({int(d) for batch in windows for d in batch["doc_index"][:, 0]})
    assert documents == [set(range(0, 12, 2)), set(range(1, 12, 2))]


@pytest.mark.parametrize("act_fn", ["topk", "batchtopk"])
def test_a_data_parallel_step_is_the_one_process_step_on_the_union(cache, tmp_path, act_fn):
    """The trainer's own code path under torchrun (tests/dp_worker.py): rank r trains on half r of the same batches
    a one-process trainer sees whole; rank 1's different initialisation is replaced by rank 0's. BatchTopK keeps the
    top of the whole distributed batch, so it matches too (and its inference threshold is the same on both ranks)."""
    stream = ActivationFactory(
        ActivationFactoryConfig(
            sources=[{"type": "activations", "name": "c", "path": str(cache)}],
            target="activations-1d", hook_points=[HOOK], batch_size=512, buffer_size=4096,
        )
    ).process()  # fmt: skip
    batches = [next(stream) for _ in range(8)]
    sae = {**settings(cache, tmp_path)["sae"], "act_fn": act_fn}
    trainer = {**settings(cache, tmp_path / "parallel")["trainer"], "total_training_tokens": 512 * 8}
    norm = float(batches[0][HOOK].norm(dim=-1).mean())
    payload = {"batches": batches, "hook": HOOK, "sae": sae, "trainer": trainer, "norm": norm}
    torch.save(payload, tmp_path / "batches.pt")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
         str(Path(__file__).parent / "dp_worker.py"), str(tmp_path / "batches.pt"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    saved = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    (rank0, norms0, metrics0), (rank1, norms1, _) = (state.values() for state in saved)
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)  # identical replicas
    assert norms0 == norms1 == {HOOK: norm}  # rank 0's input norm (rank 1 started from norm + 1)

    torch.manual_seed(0)  # rank 0's initialisation
    alone = SparseAutoEncoder.from_config(SAEConfig.model_validate(sae))
    alone.set_dataset_average_activation_norm({HOOK: norm})
    alone_trainer = TrainerConfig.model_validate({**trainer, "exp_result_path": str(tmp_path / "alone")})
    metrics = Trainer(alone_trainer).fit(alone, iter(batches)).last_metrics
    # The logged metrics are the group's: counts over both halves, losses averaged over the equal halves.
    for name in ("metrics/l0", "losses/mse_loss", "sparsity/above_1e-2"):
        assert metrics0[name] == pytest.approx(metrics[name], rel=1e-4), name
    for name, value in alone.state_dict().items():
        # The same steps; only the order of float sums differs (each rank sums half the batch).
        assert torch.allclose(value, rank0[name], atol=5e-5, rtol=1e-5), (name, (value - rank0[name]).abs().max())


def test_an_item_launched_on_two_processes_through_pipes(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on two cores
    parallel = settings(cache, tmp_path / "parallel", data_parallel_size=2)

    @dg.asset
    def dictionary(context: dg.AssetExecutionContext, launcher: HeavyStepLauncher) -> dg.MaterializeResult:
        run = launcher.run(
            context, "train", TrainSAESettings.model_validate(parallel), nproc=2, workdir=tmp_path / "work"
        )
        return run.get_materialize_result()

    with dg.instance_for_test() as instance:
        result = dg.materialize([dictionary], instance=instance, resources={"launcher": HeavyStepLauncher()})
    assert result.success
    (event,) = result.get_asset_materialization_events()  # rank 0 alone reports
    metadata = event.materialization.metadata
    assert metadata["steps"].value == 12 and metadata["n_tokens"].value == 512 * 12  # both ranks' halves counted
    weights = tmp_path / "parallel" / "sae_weights.safetensors"
    assert event.materialization.tags["dagster/data_version"] == file_sha256(weights)
    # Trained on the same data split differently over the steps: as good as the one-process run.
    alone = train_sae(TrainSAESettings.model_validate(settings(cache, tmp_path / "alone")))
    explained = alone.last_metrics["metrics/explained_variance"]  # the group's: the mean of the ranks' parts
    print(f"explained variance: 2 processes {metadata['explained_variance'].value:.4f}, one {explained:.4f}")
    assert metadata["explained_variance"].value == pytest.approx(explained, abs=0.05)  # measured 0.448 vs 0.428


def _torchrun_train(settings_file: Path) -> None:
    done = subprocess.run(
        torchrun_command("train", settings_file, 2),
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_resumed_data_parallel_run_equals_the_uninterrupted_one(cache, tmp_path):
    """Every rank resumes from rank 0's checkpoint and skips the batches of its own part it had trained on."""
    full = settings(cache, tmp_path / "run", data_parallel_size=2)
    full["trainer"]["checkpoint_every_steps"] = 4
    (tmp_path / "full.json").write_text(json.dumps(full))
    _torchrun_train(tmp_path / "full.json")
    uninterrupted = SparseAutoEncoder.from_pretrained(tmp_path / "run").state_dict()
    checkpoint = tmp_path / "run" / "checkpoints" / "step_8"
    assert checkpoint.is_dir()
    (tmp_path / "resumed.json").write_text(json.dumps({**full, "resume_from": str(checkpoint)}))
    _torchrun_train(tmp_path / "resumed.json")
    resumed = SparseAutoEncoder.from_pretrained(tmp_path / "run").state_dict()
    for name, value in uninterrupted.items():
        assert torch.equal(value, resumed[name]), name


def test_misuse_is_a_named_error(cache, tmp_path):
    os.environ.pop("WORLD_SIZE", None)
    with pytest.raises(ConfigError, match=r"data_parallel_size=2 needs 2 processes, this launch has 1"):
        train_sae(TrainSAESettings.model_validate(settings(cache, tmp_path / "x", data_parallel_size=2)))
    settings_file = tmp_path / "dp.json"
    settings_file.write_text(json.dumps(settings(cache, tmp_path / "x", data_parallel_size=2)))
    done = CliRunner().invoke(app, ["train", str(settings_file)])
    assert done.exit_code == 2 and "torchrun --nproc-per-node 2 -m lm_saes_core.cli train" in done.output
    sweep = settings(cache, tmp_path / "y", data_parallel_size=2)
    items = [{key: sweep[key] for key in ("sae", "sae_name", "trainer")}]
    with pytest.raises(ValueError, match=r"items\[0\]: sae.d_sae=1152 does not split into 5 equal feature shards"):
        SweepSAESettings.model_validate({"activation_factory": sweep["activation_factory"], "items": items,
                                         "model_parallel_size": 5})  # fmt: skip
    with pytest.raises(ConfigError, match=r"data_parallel_size=2 needs 2 processes, this launch has 1"):
        sweep_sae(SweepSAESettings.model_validate({"activation_factory": sweep["activation_factory"], "items": items,
                                                   "data_parallel_size": 2}))  # fmt: skip
    with pytest.raises(ValueError, match="sae.d_sae=1152 does not split into 5 equal feature shards"):
        TrainSAESettings.model_validate({**settings(cache, tmp_path / "z"), "model_parallel_size": 5})
    item = {"sae": settings(cache, tmp_path)["sae"], "trainer": {"total_training_tokens": 1024}}
    with pytest.raises(ValueError, match="model_parallel_size=5: sae.d_sae=1152 does not split into 5 equal"):
        DictionaryItem.model_validate({**item, "model_parallel_size": 5})
    with pytest.raises(ValueError, match="batch_size=4097 does not split evenly over data_parallel_size=2"):
        DictionaryItem.model_validate({**item, "batch_size": 4097, "data_parallel_size": 2})
