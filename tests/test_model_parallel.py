"""Feature (model) parallelism under torchrun on CPU (gloo): a dictionary's features split over `model` shards, its
batches over `data` ranks, equals the one-process run on the same batches; each shard holds half the parameter and
optimiser bytes; the checkpoint a 2-shard run writes resumes in one process and under another layout; misuse is a
named error before any model loads. Real SmolLM2 activations (tests/real_activations.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import torch
from real_activations import smollm2_cache

from lm_saes_core.activation.config import ActivationFactoryConfig
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.io import file_sha256
from lm_saes_core.models import (
    CLTConfig,
    CrossCoder,
    CrossCoderConfig,
    CrossLayerTranscoder,
    LorsaConfig,
    LowRankSparseAttention,
    MixtureOfLinearTransforms,
    MOLTConfig,
    SAEConfig,
    SparseAutoEncoder,
    load_sparse_dictionary,
)
from lm_saes_core.models.feature_parallel import (
    FeatureShards,
    analysed_feature_index,
    feature_parallel_problem,
    shard_model,
)
from lm_saes_core.runners.analyze import AnalyzeSAESettings, analyze_sae
from lm_saes_core.runners.evaluate import EvaluateSAESettings, evaluate_sae
from lm_saes_core.runners.train import TrainCrossCoderSettings, TrainSAESettings
from lm_saes_core.store.sqlite import SQLiteRecordStore
from lm_saes_core.training import Trainer, TrainerConfig
from lm_saes_core.training.checkpoint import checkpoint_problem, find_latest_checkpoint
from lm_saes_dagster.launch import HeavyStepLauncher

pytestmark = pytest.mark.slow
HOOK = "blocks.3.hook_resid_post"
D_SAE = 576 * 2
N_BATCHES, BATCH = 8, 256


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    tokens = (N_BATCHES + 2) * BATCH  # windows hold some padding: more positions than the batches need
    return smollm2_cache(tmp_path_factory.mktemp("mp-cache") / "cache", HOOK, "train[100:200]", tokens)


@pytest.fixture(scope="module")
def batches(cache) -> list[dict[str, torch.Tensor]]:
    source = {"type": "activations", "name": "c", "path": str(cache)}
    config = ActivationFactoryConfig(sources=[source], target="activations-1d", hook_points=[HOOK], batch_size=BATCH)
    stream = ActivationFactory(config).process()
    batches = [{HOOK: next(stream)[HOOK]} for _ in range(N_BATCHES)]
    assert all(batch[HOOK].shape[0] == BATCH for batch in batches)  # data ranks split every batch evenly
    return batches


def _sae(act_fn: str) -> dict:
    return {"sae_type": "sae", "d_model": 576, "d_sae": D_SAE, "hook_point_in": HOOK, "hook_point_out": HOOK,
            "act_fn": act_fn, "top_k": 16}  # fmt: skip


def _trainer(out: Path, **overrides) -> dict:
    return {"lr": 4e-3, "lr_warm_up_steps": 0.1, "total_training_tokens": N_BATCHES * BATCH, "log_frequency": 4,
            "n_checkpoints": 0, "auxk_coefficient": 0.03, "dead_threshold": 512, "exp_result_path": str(out),
            **overrides}  # fmt: skip


def _assert_same_training(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    """Weights of the same steps taken with float sums in another order: Adam divides each update by the gradient's
    running RMS, so where a gradient entry is ~0 that order can move a weight by up to ~lr (a handful of entries in
    10^5); every other entry agrees to 1e-5."""
    for name, value in expected.items():
        difference = (value - actual[name]).abs()
        assert difference.max() < 5e-3 and (difference > 1e-5).float().mean() < 1e-4, (name, difference.max())


def _launch(
    tmp_path: Path, payload: dict, data: int, model: int, resume_from: str = "", name: str = "", head: int = 1
) -> list[dict]:
    out = tmp_path / (name or f"dp{data}xhp{head}xmp{model}")
    out.mkdir(exist_ok=True)
    torch.save(payload, out / "payload.pt")
    n = data * head * model
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(n),
         str(Path(__file__).parent / "mp_worker.py"), str(out / "payload.pt"), str(out), str(data), str(model),
         resume_from, str(head)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(n)]


def _cli(command: str, settings: Path, processes: int = 1) -> None:
    """`lm-saes COMMAND SETTINGS`, under `torchrun --nproc-per-node PROCESSES` for several (one thread each)."""
    bin_dir = Path(sys.executable).parent
    torchrun = [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", str(processes), "-m", "lm_saes_core.cli"]
    launch = [str(bin_dir / "lm-saes")] if processes == 1 else torchrun
    done = subprocess.run([*launch, command, str(settings)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]


def _alone(payload: dict, batches, out: Path) -> tuple[SparseAutoEncoder, dict]:
    torch.manual_seed(0)  # rank 0's initialisation
    model = SparseAutoEncoder.from_config(SAEConfig.model_validate(payload["sae"]))
    model.set_dataset_average_activation_norm({HOOK: payload["norm"]})
    cfg = TrainerConfig.model_validate({**payload["trainer"], "exp_result_path": str(out)})
    return model, Trainer(cfg).fit(model, iter(batches)).last_metrics


@pytest.mark.parametrize(
    ("act_fn", "data", "model"), [("topk", 1, 2), ("batchtopk", 1, 2), ("topk", 2, 2), ("batchtopk", 2, 2)]
)
def test_a_feature_parallel_run_equals_the_one_process_run(batches, tmp_path, act_fn, data, model):
    """The shards select exactly the features one process selects (TopK per token, BatchTopK per batch, both over
    every shard and data rank) and take the same steps; what differs is the order of float sums (the decode's sum over
    shards, the data ranks' gradient average): weights agree as `_assert_same_training` says."""
    norm = float(batches[0][HOOK].norm(dim=-1).mean())
    payload = {"batches": batches, "hook": HOOK, "sae": _sae(act_fn), "trainer": _trainer(tmp_path / "run"),
               "norm": norm}  # fmt: skip
    ranks = _launch(tmp_path, payload, data, model)
    alone, metrics = _alone(payload, batches, tmp_path / "alone")
    for state in ranks[1:]:  # every process ends with the whole trained dictionary
        assert all(torch.equal(state["weights"][name], ranks[0]["weights"][name]) for name in state["weights"])
    _assert_same_training(alone.state_dict(), ranks[0]["weights"])
    for name in ("metrics/l0", "losses/mse_loss", "losses/aux_loss", "metrics/mean_feature_act",
                 "sparsity/above_1e-2", "metrics/decoder_norm", "metrics/gradient_norm_before_clipping"):  # fmt: skip
        assert ranks[0]["metrics"][name] == pytest.approx(metrics[name], rel=1e-4), name
    assert metrics["metrics/l0"] == pytest.approx(16, abs=0.5) if act_fn == "topk" else metrics["metrics/l0"] > 8


def test_each_shard_holds_half_the_parameter_and_optimiser_bytes(batches, tmp_path):
    payload = {"batches": batches[:2], "hook": HOOK, "sae": _sae("topk"), "norm": 1.0,
               "trainer": _trainer(tmp_path / "run", total_training_tokens=2 * BATCH)}  # fmt: skip
    two = _launch(tmp_path, payload, 1, 2)
    d, f = 576, D_SAE
    whole = (d * f + f + f * d + d) * 4 * 3  # W_E, b_E, W_D, b_D; with Adam's two moments
    replicated = d * 4 * 3  # b_D on every shard
    assert [state["bytes"] for state in two] == [(whole - replicated) // 2 + replicated] * 2
    assert [state["whole_bytes"] for state in two] == [0, 0]  # the whole dictionary is freed while its shards train


def test_a_checkpoint_of_two_shards_resumes_under_any_layout(batches, tmp_path):
    """A 2-shard run checkpoints at step 4, each process writing its part (torch.distributed.checkpoint: weights,
    Adam's moments, dead-latent counters); resumed on the same layout it ends bitwise where the uninterrupted run
    ends, and resumed in one process or on two data ranks it ends where the uninterrupted one-process run ends (to
    the tolerance of the first test). `load_sparse_dictionary` reads it whole: the one-process run's step-4 weights."""
    norm = float(batches[0][HOOK].norm(dim=-1).mean())
    payload = {"batches": batches, "hook": HOOK, "sae": _sae("topk"), "norm": norm,
               "trainer": _trainer(tmp_path / "run", checkpoint_every_steps=4, dead_threshold=256)}  # fmt: skip
    uninterrupted = _launch(tmp_path, payload, 1, 2)[0]["weights"]
    checkpoint = tmp_path / "run" / "checkpoints" / "step_4"
    parts = sorted((checkpoint / "sharded").glob("*.distcp"))  # each process wrote its part; nothing was gathered
    assert len(parts) == 2 and not (checkpoint / "sae_weights.safetensors").exists()
    d, f = 576, D_SAE
    tensors = (d * f + f + f * d) * 3 * 4 + f * 8  # W_E, b_E, W_D with Adam's moments; the dead-latent counters
    replicated = d * 4 * 3  # b_D and its moments, written once
    assert sum(part.stat().st_size for part in parts) == pytest.approx(tensors + replicated, rel=0.01)
    assert [part.stat().st_size for part in parts] == pytest.approx([(tensors + replicated) / 2] * 2, rel=0.02)
    broken = tmp_path / "broken" / "checkpoints" / "step_4"
    shutil.copytree(checkpoint, broken)
    os.truncate(broken / "sharded" / parts[1].name, 1000)
    assert checkpoint_problem(broken) == f"sharded/{parts[1].name} is cut short (1000 bytes, its parts need " \
        f"{parts[1].stat().st_size})"  # fmt: skip
    assert find_latest_checkpoint(tmp_path / "broken") is None  # never a resume point
    same = _launch(tmp_path, payload, 1, 2, resume_from=str(checkpoint), name="resumed-dp1xmp2")[0]["weights"]
    assert all(torch.equal(same[name], uninterrupted[name]) for name in uninterrupted)
    alone, _ = _alone(payload, batches, tmp_path / "alone")
    whole = load_sparse_dictionary(checkpoint)  # read in one process, as evaluation or analysis would
    _assert_same_training(load_sparse_dictionary(tmp_path / "alone" / "checkpoints" / "step_4").state_dict(),
                          whole.state_dict())  # fmt: skip
    data_ranks = _launch(tmp_path, payload, 2, 1, resume_from=str(checkpoint), name="resumed-dp2xmp1")[0]["weights"]
    torch.manual_seed(0)
    one = SparseAutoEncoder.from_config(SAEConfig.model_validate(payload["sae"]))
    one.set_dataset_average_activation_norm({HOOK: norm})
    cfg = TrainerConfig.model_validate(payload["trainer"])
    Trainer(cfg).fit(one, iter(batches), resume_from=checkpoint)
    for resumed in (data_ranks, one.state_dict()):
        _assert_same_training(alone.state_dict(), resumed)


def test_lm_saes_train_under_torchrun_writes_one_ordinary_dictionary(cache, tmp_path):
    """The runner end to end (`torchrun -m lm_saes_core.cli sweep` of two items with model_parallel_size 2, trained
    one after the other on both processes): each initialised from the data like one process, trained as two shards,
    saved as one file set that loads anywhere and equals the one-process `train` run of the same settings."""

    def settings(out: Path, model_parallel_size: int) -> Path:
        path = tmp_path / f"{out.name}.json"
        path.write_text(json.dumps({
            "sae": _sae("topk"), "sae_name": "mp", "model_parallel_size": model_parallel_size,
            "activation_factory": {"sources": [{"type": "activations", "name": "c", "path": str(cache)}],
                                   "target": "activations-1d", "hook_points": [HOOK], "batch_size": BATCH},
            "initializer": {"bias_init_method": "mean", "grid_search_init_norm": True},
            "trainer": _trainer(out),
        }))  # fmt: skip
        return path

    two = json.loads(settings(tmp_path / "two", 2).read_text())
    second = {**two, "sae": _sae("batchtopk"), "sae_name": "mp-b", "trainer": _trainer(tmp_path / "two-b")}
    items = [{key: run[key] for key in ("sae", "sae_name", "initializer", "trainer")} for run in (two, second)]
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"activation_factory": two["activation_factory"], "model_parallel_size": 2,
                                 "items": items}))  # fmt: skip
    _cli("sweep", sweep, processes=2)
    _cli("train", settings(tmp_path / "one", 1))
    two, one = load_sparse_dictionary(tmp_path / "two"), load_sparse_dictionary(tmp_path / "one")
    assert two.cfg.d_sae == D_SAE and json.loads((tmp_path / "two" / "train_result.json").read_text())["steps"] == 8
    assert load_sparse_dictionary(tmp_path / "two-b").cfg.act_fn == "batchtopk"
    assert sorted(path.name for path in (tmp_path / "two").glob("*.safetensors")) == ["sae_weights.safetensors"]
    _assert_same_training(one.state_dict(), two.state_dict())


def test_a_pipeline_item_with_two_feature_shards_runs_through_pipes(cache, tmp_path, monkeypatch):
    """What the pipeline's `dictionary` asset does for an item with model_parallel_size 2: its step under torchrun
    on 2 processes through Dagster Pipes; rank 0 alone reports, and the data version is that of the one file set."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    settings = TrainSAESettings.model_validate({
        "sae": _sae("topk"), "sae_name": "mp", "model_parallel_size": 2,
        "activation_factory": {"sources": [{"type": "activations", "name": "c", "path": str(cache)}],
                               "target": "activations-1d", "hook_points": [HOOK], "batch_size": BATCH},
        "trainer": _trainer(tmp_path / "out"),
    })  # fmt: skip

    @dg.asset
    def dictionary(context: dg.AssetExecutionContext, launcher: HeavyStepLauncher) -> dg.MaterializeResult:
        return launcher.run(context, "train", settings, nproc=2, workdir=tmp_path / "work").get_materialize_result()

    with dg.instance_for_test() as instance:
        result = dg.materialize([dictionary], instance=instance, resources={"launcher": HeavyStepLauncher()})
    assert result.success
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.metadata["steps"].value == 8
    weights = tmp_path / "out" / "sae_weights.safetensors"
    assert event.materialization.tags["dagster/data_version"] == file_sha256(weights)
    assert load_sparse_dictionary(tmp_path / "out").cfg.d_sae == D_SAE


def _analyses(store_path: Path, name: str) -> list:
    with SQLiteRecordStore(store_path) as store:
        return [feature.analysis() for feature in store.iter_features(name, "mp", with_samples=True)]


MOLT = {"sae_type": "molt", "d_model": 576, "rank_counts": {1: 64, 2: 32, 4: 16}, "hook_point_in": HOOK,
        "hook_point_out": HOOK, "act_fn": "topk", "top_k": 4}  # fmt: skip
"""A MOLT of the SAE tests' hook; top_k 4: TopK's sparse path both in one process and on a shard."""


@pytest.mark.parametrize("kind", ["sae", "molt"])
def test_analysis_over_two_feature_shards_records_what_one_process_records(cache, tmp_path, kind):
    """`torchrun -m lm_saes_core.cli analyze` with model_parallel_size 2: each shard analyses its half of the
    features (TopK over both shards per token; a MOLT's half of every rank, numbered as the whole numbers them), rank
    0 records them all; the store holds exactly the records of the one-process analysis (the same counts, maxima,
    histograms, sampled contexts and their activations)."""
    torch.manual_seed(0)
    config = {**(_sae("topk") if kind == "sae" else MOLT), "norm_activation": "inference"}
    model, model_cfg = (SparseAutoEncoder, SAEConfig) if kind == "sae" else (MixtureOfLinearTransforms, MOLTConfig)
    sae = model.from_config(model_cfg.model_validate(config))
    sae_dir = sae.save_pretrained(tmp_path / "sae")

    def settings(name: str, model_parallel_size: int) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({
            "sae": {"pretrained_name_or_path": str(sae_dir)}, "sae_name": name, "sae_series": "mp",
            "activation_factory": {"sources": [{"type": "activations", "name": "c", "path": str(cache)}],
                                   "target": "activations-2d", "hook_points": [HOOK], "batch_size": 4},
            "analyzer": {"total_analyzing_tokens": 1024, "n_top": 4, "n_non_activating": 2},
            "store": {"sqlite_path": str(tmp_path / f"{name}.sqlite")}, "model_parallel_size": model_parallel_size,
        }))  # fmt: skip
        return path

    _cli("analyze", settings("two", 2), processes=2)
    analyze_sae(AnalyzeSAESettings.model_validate_json(settings("one", 1).read_text()))
    two, one = _analyses(tmp_path / "two.sqlite", "two"), _analyses(tmp_path / "one.sqlite", "one")
    k = config["top_k"]
    assert len(two) == len(one) == sae.cfg.d_sae and sum(a.act_times for a in one) > (k - 1) * one[0].n_analyzed_tokens
    for index, (a, b) in enumerate(zip(one, two, strict=True)):
        assert (a.act_times, a.n_analyzed_tokens) == (b.act_times, b.n_analyzed_tokens), index
        assert a.max_feature_acts == pytest.approx(b.max_feature_acts, rel=1e-5), index
        assert np.array_equal(a.histogram_counts, b.histogram_counts), index
        assert [s.name for s in a.samples] == [s.name for s in b.samples], index
        for x, y in zip(a.samples, b.samples, strict=True):
            assert np.array_equal(x.tokens, y.tokens) and np.allclose(x.activations, y.activations, rtol=1e-5)


def test_evaluation_over_two_feature_shards_reports_what_one_process_reports(cache, tmp_path):
    """`torchrun -m lm_saes_core.cli evaluate` with model_parallel_size 2, the downstream metrics included (the
    language model runs on each process with the sharded dictionary spliced in): rank 0 writes the metrics of the
    whole dictionary, those of the one-process evaluation."""
    torch.manual_seed(0)
    sae = SparseAutoEncoder.from_config(SAEConfig.model_validate({**_sae("topk"), "norm_activation": "inference"}))
    sae_dir = sae.save_pretrained(tmp_path / "sae")

    def settings(name: str, model_parallel_size: int) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({
            "sae": {"pretrained_name_or_path": str(sae_dir)}, "sae_name": name, "model": {"model_name": "smollm2-135m"},
            "activation_factory": {"sources": [{"type": "activations", "name": "c", "path": str(cache)}],
                                   "target": "activations-2d", "hook_points": [HOOK], "batch_size": 4},
            "eval": {"total_eval_tokens": 256, "compute_downstream": True},
            "output_path": str(tmp_path / f"{name}.json.out"), "model_parallel_size": model_parallel_size,
        }))  # fmt: skip
        return path

    _cli("evaluate", settings("two", 2), processes=2)
    one = evaluate_sae(EvaluateSAESettings.model_validate_json(settings("one", 1).read_text())).metrics
    two = json.loads((tmp_path / "two.json.out").read_text())["metrics"]
    assert one["metrics/l0"] == pytest.approx(16, abs=0.5) and "metrics/ce_loss_recovered" in one
    assert set(two) == set(one)
    for key, value in one.items():
        assert two[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_a_shard_loads_only_its_slices_of_the_saved_file(tmp_path):
    """Each shard of a saved (dataset-wise, folded on load) JumpReLU SAE is its slice of the whole loaded dictionary,
    read from the file as that slice alone (its tensors own storage of the slice's size, not views of the whole)."""
    torch.manual_seed(0)
    cfg = SAEConfig.model_validate({**_sae("jumprelu"), "norm_activation": "dataset-wise"})
    saved = SparseAutoEncoder.from_config(cfg)
    saved.set_dataset_average_activation_norm({HOOK: 37.0})
    path = saved.save_pretrained(tmp_path / "sae")
    whole = SparseAutoEncoder.from_pretrained(path, fold_activation_scale=True)
    axes = whole.feature_axes()
    for rank in range(2):
        shards = FeatureShards(rank, 2, group=None, world=None)
        shard = SparseAutoEncoder.from_pretrained(path, fold_activation_scale=True, shards=shards)
        assert shard.cfg.d_sae == D_SAE // 2 and shard.whole_cfg.d_sae == D_SAE
        assert shard.whole_cfg.norm_activation == shard.cfg.norm_activation == "inference"  # folded, as the whole
        for name, tensor in shard.state_dict().items():
            expected = whole.state_dict()[name]
            if name in axes:
                expected = expected.narrow(axes[name], rank * D_SAE // 2, D_SAE // 2)
            assert torch.equal(tensor, expected), name
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name


def test_activations_made_on_the_fly_feed_the_shards(tmp_path):
    """No cache: under model_parallel_size 2 each process runs the language model on the same documents (the data
    ranks' part; one data rank here) and trains its shard on what it makes; the result is the one-process run's."""

    def settings(out: Path, model_parallel_size: int) -> Path:
        path = tmp_path / f"{out.name}.json"
        path.write_text(json.dumps({
            "sae": _sae("batchtopk"), "sae_name": "fly", "model_parallel_size": model_parallel_size,
            "model": {"model_name": "smollm2-135m"},
            "datasets": {"docs": {"dataset_name_or_path": "python-docs", "split": "train[:24]"}},
            "activation_factory": {"sources": [{"type": "dataset", "name": "docs"}], "target": "activations-1d",
                                   "hook_points": [HOOK], "context_size": 64, "batch_size": 128, "buffer_size": 512},
            "trainer": _trainer(out, total_training_tokens=128 * 6),
        }))  # fmt: skip
        return path

    _cli("train", settings(tmp_path / "two", 2), processes=2)
    _cli("train", settings(tmp_path / "one", 1))
    two, one = load_sparse_dictionary(tmp_path / "two"), load_sparse_dictionary(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "train_result.json").read_text())["n_tokens"] == 128 * 6
    _assert_same_training(one.state_dict(), two.state_dict())


HEADS = ["blocks.3.hook_resid_post", "blocks.4.hook_resid_post"]


@pytest.fixture(scope="module")
def head_cache(tmp_path_factory) -> Path:
    """One SmolLM2 cache of two residual-stream hooks (a crosscoder's heads)."""
    tokens = (N_BATCHES + 2) * BATCH
    return smollm2_cache(tmp_path_factory.mktemp("mp-heads") / "cache", HEADS, "train[100:200]", tokens)


@pytest.fixture(scope="module")
def head_batches(head_cache) -> list[dict[str, torch.Tensor]]:
    source = {"type": "activations", "name": "c", "path": str(head_cache)}
    config = ActivationFactoryConfig(sources=[source], target="activations-1d", hook_points=HEADS, batch_size=BATCH)
    stream = ActivationFactory(config).process()
    return [{hook: batch[hook] for hook in HEADS} for batch in (next(stream) for _ in range(N_BATCHES))]


@pytest.mark.parametrize(("act_fn", "head", "model"), [("topk", 1, 2), ("batchtopk", 1, 2), ("topk", 2, 1),
                                                       ("batchtopk", 2, 2)])  # fmt: skip
def test_a_feature_parallel_crosscoder_equals_the_one_process_run(head_batches, tmp_path, act_fn, head, model):
    """A crosscoder over two heads, its features split over `model` shards (every head's copy of a feature on the
    same shard) and its heads over `head` ranks (each streaming only its hook): the same steps and per-head metrics
    as one process; at 2 x 2, its checkpoint resumes in one process where that run ends."""
    sae = {"sae_type": "crosscoder", "d_model": 576, "d_sae": 1152, "heads": HEADS, "act_fn": act_fn, "top_k": 16}
    if head > 1:  # the heads' parts of a pre-activation are summed in another order: in float32 a score at the
        sae["dtype"] = "float64"  # BatchTopK threshold can flip; in float64 the steps are the same
    norms = {hook: float(head_batches[0][hook].norm(dim=-1).mean()) for hook in HEADS}
    trainer = _trainer(tmp_path / "run", checkpoint_every_steps=4)
    payload = {"batches": head_batches, "hook": HEADS[0], "sae": sae, "trainer": trainer, "norms": norms}
    ranks = _launch(tmp_path, payload, 1, model, head=head)

    def one_process(out: str, resume_from: Path | None = None) -> tuple[CrossCoder, dict]:
        torch.manual_seed(0)
        alone = CrossCoder.from_config(CrossCoderConfig.model_validate(sae))
        if head > 1:  # head ranks take the dense path; sparse and dense steps round differently (test_loop_fast_paths)
            alone.sparse_kernels = False
        alone.set_dataset_average_activation_norm(norms)
        cfg = TrainerConfig.model_validate({**trainer, "exp_result_path": str(tmp_path / out)})
        return alone, Trainer(cfg).fit(alone, iter(head_batches), resume_from=resume_from).last_metrics

    alone, metrics = one_process("alone")
    _assert_same_training(alone.state_dict(), ranks[0]["weights"])
    if head > 1 and model > 1:  # its checkpoint, each rank's part of its heads' features, resumes in one process
        resumed, _ = one_process("resumed", tmp_path / "run" / "checkpoints" / "step_4")
        _assert_same_training(alone.state_dict(), resumed.state_dict())
    for name in ("metrics/l0", "losses/mse_loss", "crosscoder_metrics/l0_features",
                 f"crosscoder_metrics/{HEADS[1]}/l0", f"crosscoder_metrics/{HEADS[0]}/decoder_norm_share",
                 f"crosscoder_metrics/{HEADS[1]}/explained_variance"):  # fmt: skip
        assert ranks[0]["metrics"][name] == pytest.approx(metrics[name], rel=1e-4), name


def test_lm_saes_train_of_a_crosscoder_over_two_head_ranks(head_cache, tmp_path):
    """`torchrun -m lm_saes_core.cli train` with head_parallel_size 2: each head rank streams only its factory's hook,
    the crosscoder is initialised from every head's first batches, and the saved file set equals the one-process
    run's. In float64: the heads' parts of a pre-activation are summed in another order."""

    def settings(out: Path, head_parallel_size: int) -> Path:
        factories = [
            {
                "sources": [{"type": "activations", "name": "c", "path": str(head_cache)}],
                "target": "activations-1d",
                "hook_points": [hook],
                "batch_size": BATCH,
            }
            for hook in HEADS
        ]
        path = tmp_path / f"{out.name}.json"
        path.write_text(json.dumps({
            "sae": {"sae_type": "crosscoder", "d_model": 576, "d_sae": 1152, "heads": HEADS, "act_fn": "topk",
                    "top_k": 16, "dtype": "float64"},
            "sae_name": "hp", "head_parallel_size": head_parallel_size, "activation_factories": factories,
            "initializer": {"bias_init_method": "mean", "grid_search_init_norm": True},
            "trainer": _trainer(out),
        }))  # fmt: skip
        return path

    _cli("train", settings(tmp_path / "two", 2), processes=2)
    _cli("train", settings(tmp_path / "one", 1))
    two, one = load_sparse_dictionary(tmp_path / "two"), load_sparse_dictionary(tmp_path / "one")
    assert two.cfg.heads == HEADS and json.loads((tmp_path / "two" / "train_result.json").read_text())["steps"] == 8
    _assert_same_training(one.state_dict(), two.state_dict())


@pytest.mark.parametrize("act_fn", ["layertopk", "batchlayertopk", "jumprelu"])
def test_a_feature_parallel_clt_equals_the_one_process_run(head_batches, tmp_path, act_fn):
    """A CLT over two layers (each reading one hook and writing to it and the next), its features split over 2
    shards: the ranking across layers (per token or per batch) is over every shard; the same steps as one process."""
    sae = {"sae_type": "clt", "d_model": 576, "d_sae": 1152, "hook_points_in": HEADS, "hook_points_out": HEADS,
           "act_fn": act_fn, "top_k": 16}  # fmt: skip
    if act_fn != "layertopk":  # a shard's pre-activations round differently (a narrower matmul); in float32 a few
        sae["dtype"] = "float64"  # pre-activations flip at a batch or JumpReLU threshold (which, depends on the CPU's
        # matmul kernels: JumpReLU passed on one CPU and failed on an AMD EPYC, 0.04% of W_E off), in float64 none
    norms = {hook: float(head_batches[0][hook].norm(dim=-1).mean()) for hook in HEADS}
    loss = {"sparsity_loss_type": "tanh", "l1_coefficient": 1e-3} if act_fn == "jumprelu" else {}
    payload = {"batches": head_batches, "hook": HEADS[0], "sae": sae, "norms": norms,
               "trainer": _trainer(tmp_path / "run", **loss)}  # fmt: skip
    ranks = _launch(tmp_path, payload, 1, 2)
    torch.manual_seed(0)
    alone = CrossLayerTranscoder.from_config(CLTConfig.model_validate(sae))
    alone.set_dataset_average_activation_norm(norms)
    cfg = TrainerConfig.model_validate({**payload["trainer"], "exp_result_path": str(tmp_path / "alone")})
    metrics = Trainer(cfg).fit(alone, iter(head_batches)).last_metrics
    _assert_same_training(alone.state_dict(), ranks[0]["weights"])
    penalty = ["losses/sparsity_loss", "metrics/mean_jumprelu_threshold"] if act_fn == "jumprelu" else []
    for name in ("metrics/l0", "losses/mse_loss", "metrics/l0_layer1", "metrics/explained_variance_L0", *penalty):
        assert ranks[0]["metrics"][name] == pytest.approx(metrics[name], rel=1e-4), name


LORSA_HOOKS = ["blocks.3.ln1.hook_normalized", "blocks.3.hook_attn_out"]


@pytest.fixture(scope="module")
def context_batches(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    """Whole contexts (2-D, with their masks) of layer 3's attention input and output, 4 contexts of 128 a batch."""
    cache = smollm2_cache(tmp_path_factory.mktemp("mp-contexts") / "cache", LORSA_HOOKS, "train[100:200]", 32 * 128)
    source = {"type": "activations", "name": "c", "path": str(cache)}
    config = ActivationFactoryConfig(sources=[source], target="activations-2d", hook_points=LORSA_HOOKS, batch_size=4)
    stream = ActivationFactory(config).process()
    return [next(stream) for _ in range(6)]


def test_a_feature_parallel_lorsa_equals_the_one_process_run(context_batches, tmp_path):
    """A Lorsa with its QK heads (and their OV heads) split over 2 shards: attention runs per shard on its own
    heads, the TopK over all OV heads of a position spans both; the same steps as one process."""
    sae = {"sae_type": "lorsa", "d_model": 576, "d_sae": 256, "n_qk_heads": 4, "d_qk_head": 16, "n_ctx": 128,
           "hook_point_in": LORSA_HOOKS[0], "hook_point_out": LORSA_HOOKS[1], "act_fn": "topk", "top_k": 8}  # fmt: skip
    first = context_batches[0]
    norms = {hook: float(first[hook][first["mask"].bool()].norm(dim=-1).mean()) for hook in LORSA_HOOKS}
    tokens = int(first["mask"].sum()) * len(context_batches)  # the run is sized by the first batch's tokens
    payload = {"batches": context_batches, "hook": LORSA_HOOKS[0], "sae": sae, "norms": norms,
               "trainer": _trainer(tmp_path / "run", total_training_tokens=tokens, dead_threshold=1024)}  # fmt: skip
    ranks = _launch(tmp_path, payload, 1, 2)
    torch.manual_seed(0)
    alone = LowRankSparseAttention.from_config(LorsaConfig.model_validate(sae))
    alone.set_dataset_average_activation_norm(norms)
    cfg = TrainerConfig.model_validate({**payload["trainer"], "exp_result_path": str(tmp_path / "alone")})
    result = Trainer(cfg).fit(alone, iter(context_batches))
    assert result.steps == len(context_batches)
    _assert_same_training(alone.state_dict(), ranks[0]["weights"])
    for name in ("metrics/l0", "losses/mse_loss", "metrics/explained_variance"):
        assert ranks[0]["metrics"][name] == pytest.approx(result.last_metrics[name], rel=1e-4), name


def test_a_feature_parallel_molt_equals_the_one_process_run(batches, tmp_path):
    """A MOLT whose shards hold half of every rank's transforms (a shard's W_E columns are a slice of each rank's
    block): the same steps and per-rank metrics as one process; its 2-shard checkpoint (whole tensors in the whole's
    feature order: weights, Adam's moments, dead-latent counters) resumes in one process where that run ends, and
    on 2 shards bitwise where the 2-shard run ends. (top_k and k_aux 4: the TopK and Aux-K selections take the sparse
    path both in one process and on a shard.)"""
    sae = MOLT
    norm = float(batches[0][HOOK].norm(dim=-1).mean())
    trainer = _trainer(tmp_path / "run", checkpoint_every_steps=4, dead_threshold=256, k_aux=4)
    payload = {"batches": batches, "hook": HOOK, "sae": sae, "norm": norm, "trainer": trainer}
    ranks = _launch(tmp_path, payload, 1, 2)

    def one_process(out: Path, resume_from: Path | None = None) -> tuple[MixtureOfLinearTransforms, dict]:
        torch.manual_seed(0)
        model = MixtureOfLinearTransforms.from_config(MOLTConfig.model_validate(sae))
        model.set_dataset_average_activation_norm({HOOK: norm})
        cfg = TrainerConfig.model_validate({**payload["trainer"], "exp_result_path": str(out)})
        return model, Trainer(cfg).fit(model, iter(batches), resume_from=resume_from).last_metrics

    alone, metrics = one_process(tmp_path / "alone")
    _assert_same_training(alone.state_dict(), ranks[0]["weights"])
    assert metrics["losses/aux_loss"] > 0
    for name in ("metrics/l0", "losses/mse_loss", "losses/aux_loss", "metrics/decoder_norm",
                 "molt_metrics/l0_rank1", "molt_metrics/l0_rank4_ratio", "molt_metrics/total_rank_sum"):  # fmt: skip
        assert ranks[0]["metrics"][name] == pytest.approx(metrics[name], rel=1e-4), name
    checkpoint = tmp_path / "run" / "checkpoints" / "step_4"
    whole = load_sparse_dictionary(checkpoint).state_dict()  # its blocks joined in the whole's feature order
    _assert_same_training(load_sparse_dictionary(tmp_path / "alone" / "checkpoints" / "step_4").state_dict(), whole)
    resumed, _ = one_process(tmp_path / "resumed", checkpoint)
    _assert_same_training(alone.state_dict(), resumed.state_dict())
    same = _launch(tmp_path, payload, 1, 2, resume_from=str(checkpoint), name="resumed-dp1xmp2")[0]["weights"]
    assert all(torch.equal(same[name], ranks[0]["weights"][name]) for name in same)


def test_a_shard_numbers_its_analysed_features_as_the_whole_does():
    """A CLT's analysed features are (layer, feature) flattened, a MOLT's are numbered by rank: a shard's are its
    slice of each layer, or of each rank's block."""
    clt = CLTConfig.model_validate({"sae_type": "clt", "d_model": 8, "d_sae": 4, "hook_points_in": HEADS,
                                    "hook_points_out": HEADS, "act_fn": "topk", "top_k": 2})  # fmt: skip
    molt = MOLTConfig(
        d_model=8, rank_counts={1: 4, 2: 2}, hook_point_in="a", hook_point_out="b", act_fn="topk", top_k=4
    )
    for model, expected in ((CrossLayerTranscoder(clt), [[0, 1, 4, 5], [2, 3, 6, 7]]),
                            (MixtureOfLinearTransforms(molt), [[0, 1, 4], [2, 3, 5]])):  # fmt: skip
        for rank in range(2):
            shard = shard_model(model, FeatureShards(rank, 2, group=None, world=None))
            assert analysed_feature_index(shard).tolist() == expected[rank]


def test_what_cannot_be_split_is_named_before_anything_loads():
    lorsa = {"sae_type": "lorsa", "d_model": 8, "d_sae": 12, "n_qk_heads": 3, "d_qk_head": 4, "n_ctx": 16,
             "hook_point_in": "a", "hook_point_out": "b", "act_fn": "topk", "top_k": 2}  # fmt: skip
    assert feature_parallel_problem(LorsaConfig.model_validate(lorsa), 2) == (
        "sae.n_qk_heads=3 does not split into 2 equal shards of QK heads"
    )
    assert feature_parallel_problem(LorsaConfig.model_validate({**lorsa, "d_sae": 12, "n_qk_heads": 6}), 2) is None
    molt = MOLTConfig(
        d_model=8, rank_counts={1: 4, 2: 3}, hook_point_in="a", hook_point_out="b", act_fn="topk", top_k=2
    )
    assert feature_parallel_problem(molt, 2) == "sae.rank_counts[2]=3 does not split into 2 equal shards"
    assert feature_parallel_problem(molt.model_copy(update={"rank_counts": {1: 4, 2: 4}, "d_sae": 8}), 2) is None
    sae = SAEConfig.model_validate({**_sae("topk"), "d_sae": 1000})
    assert feature_parallel_problem(sae, 3) == "sae.d_sae=1000 does not split into 3 equal feature shards"
    factories = [{"sources": [{"type": "activations", "name": "c", "path": "/nonexistent"}], "target": "activations-1d",
                  "hook_points": [hook], "batch_size": BATCH} for hook in HEADS]  # fmt: skip
    crosscoder = {"sae_type": "crosscoder", "d_model": 576, "d_sae": 1152, "heads": HEADS, "act_fn": "topk", "top_k": 4}
    run = {"sae_name": "hp", "activation_factories": factories, "trainer": {"total_training_tokens": 1024}}
    with pytest.raises(ValueError, match="3 head ranks do not split the 2 activation_factories"):
        TrainCrossCoderSettings.model_validate({**run, "sae": crosscoder, "head_parallel_size": 3})
    swapped = {**crosscoder, "heads": HEADS[::-1]}  # head rank 0's factory reads HEADS[0], its head would be HEADS[1]
    with pytest.raises(ValueError, match=r"head rank 0 of 2 streams activation_factories\[0:1\]"):
        TrainCrossCoderSettings.model_validate({**run, "sae": swapped, "head_parallel_size": 2})
