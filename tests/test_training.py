"""Initializer and trainer on synthetic activations from a fixed sparse generative model (CPU, small).

Data: 64 unit-norm "true" directions in d_model=32, 4 active per token with magnitudes U(0.5, 1.5), a constant
offset and a little noise, times 8 (so dataset-wise normalisation matters). A 128-latent SAE can learn it.
Every batch is generated from its own index-seeded generator, so a stream recreated with the same seed yields the
same batches (what resuming requires).
"""

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_saes_core.config import ConfigError
from lm_saes_core.models import SAEConfig, SparseAutoEncoder
from lm_saes_core.training import (
    Initializer,
    InitializerConfig,
    NonFiniteTrainingError,
    Trainer,
    TrainerConfig,
    find_latest_checkpoint,
)
from lm_saes_core.training.checkpoint import load_trainer_state, restore_rng_states
from lm_saes_core.training.initializer import geometric_median
from lm_saes_core.training.optim import build_optimizer, build_scheduler
from lm_saes_core.training.schedules import annealed_k, checkpoint_steps, lr_multiplier, warmup_factor

HOOK = "blocks.0.hook_resid_post"
D_MODEL, N_TRUE, D_SAE, TOKENS_PER_BATCH = 32, 64, 128, 256


def synthetic_batch(index: int, seed: int = 0, n_true: int = N_TRUE) -> dict[str, torch.Tensor]:
    rows = TOKENS_PER_BATCH
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_true, D_MODEL, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    offset = 0.5 * torch.randn(D_MODEL, generator=g)
    g = torch.Generator().manual_seed(seed * 7919 + 1000 + index)
    active = torch.multinomial(torch.ones(rows, n_true), 4, generator=g)
    codes = torch.zeros(rows, n_true).scatter_(1, active, torch.rand(rows, 4, generator=g) + 0.5)
    x = (codes @ directions + offset) * 8 + 0.05 * torch.randn(rows, D_MODEL, generator=g)
    return {HOOK: x, "tokens": torch.arange(rows)}


def synthetic_stream(seed: int = 0, n_true: int = N_TRUE) -> Iterator[dict[str, torch.Tensor]]:
    for index in itertools.count():
        yield synthetic_batch(index, seed, n_true)


def sae_config(act_fn: str, **kwargs) -> SAEConfig:
    return SAEConfig(hook_point_in=HOOK, hook_point_out=HOOK, d_model=D_MODEL, d_sae=D_SAE, act_fn=act_fn, **kwargs)


def trainer_config(tmp_path: Path, steps: int, **kwargs) -> TrainerConfig:
    defaults = dict(
        total_training_tokens=steps * TOKENS_PER_BATCH,
        lr=1e-2,
        lr_warm_up_steps=10,
        log_frequency=50,
        n_checkpoints=0,
        exp_result_path=str(tmp_path),
    )
    return TrainerConfig(**(defaults | kwargs))


def initialized(cfg: SAEConfig, stream, **init_kwargs) -> tuple[SparseAutoEncoder, Iterator]:
    torch.manual_seed(0)
    init = InitializerConfig(grid_search_init_norm=True, bias_init_method="mean", **init_kwargs)
    return Initializer(init).initialize(cfg, stream)


@torch.no_grad()
def explained_variance(model: SparseAutoEncoder, batches: list[dict]) -> float:
    """Explained variance of held-out batches with the model in eval mode (BatchTopK uses its inference threshold)."""
    model.eval()
    errors, spreads = [], []
    for batch in batches:
        out = model.compute_loss(batch)
        errors.append((out.reconstructed - out.label).square().sum(-1))
        spreads.append((out.label - out.label.mean(0)).square().sum(-1))
    return 1 - torch.cat(errors).mean().item() / torch.cat(spreads).mean().item()


# ---------------------------------------------------------------------------------------------- schedules


def test_constantwithwarmup_matches_the_reference_numbers_through_the_real_scheduler():
    # lr 2e-2, W=100, T=976, C=int(0.2*976)=195, r=1/32: the LR logged after n steps is the one step n-1 used.
    cfg = TrainerConfig(lr=2e-2, lr_warm_up_steps=100, lr_cool_down_steps=0.2, total_training_tokens=976)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = build_optimizer(cfg, [{"params": [parameter], "lr": cfg.lr}])
    scheduler = build_scheduler(cfg, optimizer, total_steps=976)
    used = []
    for _ in range(976):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used[0] == pytest.approx(2e-4)  # (0 + 1) / 100 of the peak
    assert used[200 - 1] == pytest.approx(0.02)
    assert used[800 - 1] == pytest.approx(0.018212, abs=5e-7)
    assert used[970 - 1] == pytest.approx(0.001321, abs=5e-7)


@pytest.mark.parametrize(
    ("name", "step", "expected"),
    [
        # W=10, T=110, r=0.1: halfway through the decay (s=60) every decaying schedule is at its midpoint value.
        ("linearwarmupdecay", 60, 0.1 + 0.9 * 0.5),
        ("cosineannealingwarmup", 60, 0.1 + 0.9 * 0.5),
        ("exponentialwarmup", 60, 0.1**0.5),
        ("cosineannealing", 55, 0.1 + 0.9 * 0.5),  # no warm-up: midpoint of the whole run
        ("constantwithwarmup", 60, 1.0),  # cool-down C=20 starts at s=90
        ("constantwithwarmup", 100, 0.1 + 0.9 * 10 / 20),
        ("linearwarmupdecay", 4, 0.5),  # warm-up: (s + 1) / W
        ("constant", 4, 1.0),
    ],
)
def test_lr_multiplier_values(name, step, expected):
    value = lr_multiplier(name, step, warmup=10, cooldown=20, total=110, end_ratio=0.1)
    assert value == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "name", ["constantwithwarmup", "linearwarmupdecay", "cosineannealing", "cosineannealingwarmup", "exponentialwarmup"]
)
@pytest.mark.parametrize("end_ratio", [0.25, 1 / 32])
def test_every_decaying_schedule_ends_at_lr_end_ratio(name, end_ratio):
    values = [lr_multiplier(name, s, warmup=10, cooldown=30, total=200, end_ratio=end_ratio) for s in range(201)]
    assert values[200] == pytest.approx(end_ratio, rel=1e-12)  # reached at s = T, after the last step
    assert end_ratio < values[199] <= end_ratio + (1 - end_ratio) / 30  # the last step: one decay step above it
    after_warmup = values[10 if name != "cosineannealing" else 0 :]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:], strict=False))  # never increases again


def test_zero_length_warmups_and_cooldowns_do_not_divide_by_zero():
    for name in ("constantwithwarmup", "linearwarmupdecay", "cosineannealingwarmup", "exponentialwarmup"):
        assert lr_multiplier(name, 0, warmup=0, cooldown=0, total=100, end_ratio=0.5) == 1.0
    assert lr_multiplier("constantwithwarmup", 99, warmup=0, cooldown=0, total=100, end_ratio=0.5) == 1.0
    assert warmup_factor(0, 0) == 1.0
    assert warmup_factor(5, 10) == 0.5
    kwargs = dict(initial_k=64, final_k=8, schedule="linear", exponential_factor=3.0)
    assert annealed_k(0, warmup=0, cold_boot=0, **kwargs) == 8


def test_k_annealing_linear_and_exponential():
    common = dict(initial_k=100, final_k=20, warmup=10, cold_boot=5, exponential_factor=3.0)
    linear = [annealed_k(s, schedule="linear", **common) for s in (0, 4, 5, 10, 14, 15, 100)]
    assert linear == [100, 100, 100, 60, 28, 20, 20]
    # exponential at u = 0.5: 100 - 80 (1 - e^-1.5) / (1 - e^-3) = 34.594 -> ceil 35
    assert annealed_k(10, schedule="exponential", **common) == 35
    assert annealed_k(15, schedule="exponential", **common) == 20


def test_checkpoint_steps_are_in_steps():
    assert checkpoint_steps(1000, 5, "log") == [4, 16, 63, 251]
    assert checkpoint_steps(1000, 5, "linear") == [200, 400, 600, 800]
    assert checkpoint_steps(100, 5, "log") == [3, 6, 16, 40]
    assert checkpoint_steps(100, 0, "log", every=30) == [30, 60, 90]
    assert checkpoint_steps(100, 2, "linear", every=40) == [40, 50, 80]
    assert checkpoint_steps(100, 0, "log") == []


# ---------------------------------------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"l1_coefficient": -1.0}, "l1_coefficient"),
        ({"auxk_coefficient": -0.1}, "auxk_coefficient"),
        ({"lr_end_ratio": 1.5}, "lr_end_ratio=1.5 must be <= 1"),
        ({"lr_warm_up_steps": 1.5}, "lr_warm_up_steps=1.5"),
        ({"k_warmup_steps": -3}, "k_warmup_steps=-3"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"lr_scheduler_name": "exponentialwarmup", "lr_end_ratio": 0.0}, "exponentialwarmup"),
        ({"lr_scheduler_name": "constant", "lr_end_ratio": 0.5}, "never decays"),
        ({"lr_scheduler_name": "cosineannealing", "lr_warm_up_steps": 100}, "has no warm-up"),
        ({"lr_scheduler_name": "linearwarmupdecay", "lr_cool_down_steps": 100}, "lr_cool_down_steps applies"),
        ({"learning_rate": 1e-3}, "learning_rate"),
    ],
)
def test_trainer_config_rejects_bad_values_naming_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainerConfig(**settings)


def test_loss_keys_are_accepted_where_they_used_to_be_and_named_when_given_twice():
    flat = TrainerConfig(l1_coefficient=0.3, sparsity_loss_type="power", k_aux=64, lr=1e-3)
    nested = TrainerConfig(loss={"l1_coefficient": 0.3, "sparsity_loss_type": "power", "k_aux": 64}, lr=1e-3)
    assert flat == nested and flat.loss.k_aux == 64
    assert "l1_coefficient" not in flat.model_dump() and flat.model_dump()["loss"]["l1_coefficient"] == 0.3
    with pytest.raises(ValueError, match=r"\['l1_coefficient'\] given both directly and under `loss`"):
        TrainerConfig(l1_coefficient=0.3, loss={"l1_coefficient": 0.1})
    assert nested.changes_against(TrainerConfig(loss={"k_aux": 64}, lr=1e-3)) == {
        "loss.l1_coefficient": (8e-5, 0.3),
        "loss.sparsity_loss_type": (None, "power"),
    }


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"lr_warm_up_steps": 5000}, "trainer.lr_warm_up_steps is 5000 steps, but the run has only 20"),
        ({"lr_cool_down_steps": 20}, "trainer.lr_cool_down_steps is 20 steps"),
        ({"sparsity_loss_type": "power", "l1_coefficient_warmup_steps": 25}, "loss.l1_coefficient_warmup_steps"),
        ({"initial_k": 16, "k_cold_booting_steps": 10, "k_warmup_steps": 0.5}, "k_cold_booting_steps \\+ loss.k_warm"),
    ],
)
def test_a_schedule_period_longer_than_the_run_is_refused_before_training(tmp_path, settings, field):
    """A period given in steps that the run never finishes would silently train another dictionary (a learning rate
    that never rises, a k that never reaches top_k): refused before the first step, naming the field."""
    model, stream = initialized(sae_config("topk", top_k=4), synthetic_stream())
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ConfigError, match=field):
        Trainer(trainer_config(tmp_path, 20, **(settings | {"lr_warm_up_steps": settings.get("lr_warm_up_steps", 2)}))
                ).fit(model, stream)  # fmt: skip
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert not (tmp_path / "sae_weights.safetensors").exists()
    # Fractions always fit: the same periods as fractions of the run train.
    fractions = {
        key: 0.5 if isinstance(value, int) and key != "initial_k" else value for key, value in settings.items()
    }
    Trainer(trainer_config(tmp_path, 4, **({"lr_warm_up_steps": 0.5} | fractions))).fit(model, stream)


@pytest.mark.parametrize(
    ("act_fn", "settings", "message"),
    [
        ("topk", {"initial_k": 2}, r"initial_k=2 must lie between top_k \(4\)"),
        ("relu", {"initial_k": 8, "sparsity_loss_type": "power"}, "initial_k=8 applies to topk/batchtopk"),
        ("topk", {"lp_coefficient": 1e-3}, "lp_coefficient=0.001 applies to jumprelu"),
        ("relu", {}, "needs a sparsity penalty"),
    ],
)
def test_trainer_rejects_settings_that_do_not_fit_the_model(tmp_path, act_fn, settings, message):
    model = SparseAutoEncoder.from_config(sae_config(act_fn, top_k=4))
    with pytest.raises(ValueError, match=message):
        Trainer(trainer_config(tmp_path, 10, **settings)).fit(model, synthetic_stream())
    assert not (tmp_path / "sae_weights.safetensors").exists()


# ---------------------------------------------------------------------------------------------- initializer


def counting(stream: Iterator, pulled: list[int]) -> Iterator:
    for batch in stream:
        pulled.append(1)
        yield batch


def test_initializer_hands_back_every_batch_it_peeked_and_grid_search_equalises_decoder_norms():
    pulled: list[int] = []
    originals = [synthetic_batch(i) for i in range(12)]
    init = InitializerConfig(grid_search_init_norm=True, bias_init_method="mean", norm_estimation_batches=8)
    model, stream = Initializer(init).initialize(sae_config("topk", top_k=4), counting(iter(originals), pulled))
    assert len(pulled) == 8  # the norm-estimation batches (the first of them also served the grid search)
    returned = list(stream)
    assert len(returned) == 12 and all(r is o for r, o in zip(returned, originals, strict=True))

    expected_norm = torch.cat([b[HOOK] for b in originals[:8]]).norm(dim=-1).mean().item()
    assert model.cfg.dataset_average_activation_norm[HOOK] == pytest.approx(expected_norm, rel=1e-6)
    norms = model.decoder_norm()
    assert torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-5)
    assert 0.01 < norms[0].item() < 5.1
    assert torch.allclose(model.W_E, model.W_D.t())  # encoder re-tied to the decoder after the search
    _, label, _, _ = model.prepare(originals[0])
    assert torch.allclose(model.b_D, label.mean(0), atol=1e-5)  # bias init "mean" of the normalised label


def test_initializer_reads_nothing_when_it_needs_no_data_and_uses_given_norms():
    pulled: list[int] = []
    cfg = sae_config("relu", norm_activation="dataset-wise", dataset_average_activation_norm={HOOK: 3.0})
    no_data = InitializerConfig(
        bias_init_method="all_zero", grid_search_init_norm=False, init_encoder_bias_with_mean_hidden_pre=False
    )
    model, stream = Initializer(no_data).initialize(cfg, counting(synthetic_stream(), pulled))
    assert pulled == [] and model.cfg.dataset_average_activation_norm == {HOOK: 3.0}
    assert torch.equal(next(stream)[HOOK], synthetic_batch(0)[HOOK])


def test_initializer_estimates_norms_over_masked_tokens_of_2d_batches():
    batch = synthetic_batch(0)
    x = batch[HOOK].reshape(4, 64, D_MODEL).clone()
    mask = torch.ones(4, 64, dtype=torch.bool)
    mask[:, 0] = False  # BOS-like positions with a huge norm must not count
    x[:, 0] = 1000.0
    model, _ = Initializer(InitializerConfig(norm_estimation_batches=1)).initialize(
        sae_config("topk", top_k=4), iter([{HOOK: x, "mask": mask}])
    )
    expected = x[mask].norm(dim=-1).mean().item()
    assert model.cfg.dataset_average_activation_norm[HOOK] == pytest.approx(expected, rel=1e-6)


def test_geometric_median_and_its_initializer_option():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [100.0, 0.0]])
    assert geometric_median(points).tolist() == pytest.approx([2.0, 0.0], abs=1e-3)  # the mean would be 21.2
    init = InitializerConfig(bias_init_method="geometric_median", norm_estimation_batches=1)
    model, _ = Initializer(init).initialize(sae_config("topk", top_k=4), synthetic_stream())
    _, label, _, _ = model.prepare(synthetic_batch(0))
    assert torch.allclose(model.b_D, geometric_median(label), atol=1e-4)


# ---------------------------------------------------------------------------------------------- training quality


@pytest.mark.parametrize(
    ("act_fn", "model_kwargs", "settings", "min_explained_variance"),
    [
        # Measured held-out EV before -> after 200 steps (the initializer's defaults centre the pre-activations):
        # topk 0.40 -> 0.89, batchtopk 0.24 -> 0.83 (eval mode: the inference threshold), relu 0.64 -> 0.93 (L0 33),
        # jumprelu 0.64 -> 0.94 (L0 20). Without a sparsity penalty a ReLU SAE's L0 is about half of d_sae.
        ("topk", {"top_k": 4}, {}, 0.8),
        ("batchtopk", {"top_k": 4}, {}, 0.7),
        ("relu", {}, {"sparsity_loss_type": "power", "l1_coefficient": 0.3}, 0.85),
        ("jumprelu", {}, {"sparsity_loss_type": "tanh", "l1_coefficient": 0.1}, 0.85),
    ],
)
def test_training_reduces_the_loss_and_reaches_explained_variance(
    tmp_path, act_fn, model_kwargs, settings, min_explained_variance
):
    held_out = [synthetic_batch(10_000 + i) for i in range(4)]
    model, stream = initialized(sae_config(act_fn, **model_kwargs), synthetic_stream())
    before = explained_variance(model, held_out)
    result = Trainer(trainer_config(tmp_path, 200, **settings)).fit(model, stream)
    after = explained_variance(model, held_out)
    assert result.steps == 200 and result.n_tokens == 200 * TOKENS_PER_BATCH
    assert after > before + 0.25
    assert after > min_explained_variance
    if act_fn in ("topk", "batchtopk"):
        assert result.last_metrics["metrics/l0"] == pytest.approx(4.0, abs=0.05)
    else:
        assert result.last_metrics["metrics/l0"] < 40
    # The saved (folded) model reproduces the trained one on raw activations.
    saved = SparseAutoEncoder.from_pretrained(tmp_path)
    assert saved.cfg.norm_activation == "inference"
    saved.eval()
    torch.testing.assert_close(saved.reconstruct(held_out[0]), model.reconstruct(held_out[0]), rtol=1e-4, atol=1e-4)


def test_aux_k_revives_dead_latents(tmp_path):
    # 128 latents for 128 true directions; many latents lose every top-k contest early and stop firing. Measured
    # dead counts after 200 steps (no firing over the last 50 steps): without Aux-K 57, with Aux-K (alpha=1/32,
    # dead after 10 batches) 45.
    dead = {}
    for alpha in (0.0, 1 / 32):
        model, stream = initialized(sae_config("topk", top_k=4), synthetic_stream(n_true=128))
        settings = dict(auxk_coefficient=alpha, dead_threshold=10 * TOKENS_PER_BATCH, k_aux=32)
        result = Trainer(trainer_config(tmp_path / str(alpha), 200, **settings)).fit(model, stream)
        dead[alpha] = result.last_metrics["sparsity/below_1e-5"]
        assert ("losses/aux_loss" in result.last_metrics) == (alpha > 0)
    assert dead[1 / 32] <= dead[0.0] - 6, dead


# ---------------------------------------------------------------------------------------------- 2-D batches, errors


def test_2d_batches_are_sized_and_counted_by_their_mask(tmp_path):
    def batches():
        for i in itertools.count():
            x = synthetic_batch(i)[HOOK].reshape(4, 64, D_MODEL)
            mask = torch.ones(4, 64, dtype=torch.bool)
            mask[:, 0] = False
            mask[i % 4, 48:] = False  # padding
            yield {HOOK: x, "mask": mask, "tokens": torch.zeros(4, 64, dtype=torch.long)}

    model, stream = initialized(sae_config("topk", top_k=4), batches())
    cfg = trainer_config(tmp_path, 0, total_training_tokens=10 * 236 + 100, lr_warm_up_steps=2)
    result = Trainer(cfg).fit(model, stream)
    assert result.total_steps == 10  # first batch: 256 - 4 (BOS) - 16 (padding) = 236 valid tokens
    assert result.n_tokens == 10 * 236


def test_nan_in_a_batch_stops_training_naming_the_step_without_writing_poisoned_weights(tmp_path):
    def poisoned():
        for i, batch in enumerate(synthetic_stream()):
            if i == 12:
                batch[HOOK][3, 5] = float("nan")
            yield batch

    model = SparseAutoEncoder.from_config(sae_config("topk", top_k=4, norm_activation="token-wise"))
    trainer = Trainer(trainer_config(tmp_path, 40, checkpoint_every_steps=5))
    with pytest.raises(NonFiniteTrainingError, match=r"non-finite loss nan at step 12 \(batch 13 of the stream\)"):
        trainer.fit(model, poisoned())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_10", "step_5"]
    assert not (tmp_path / "sae_weights.safetensors").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_stream_shorter_than_the_run_ends_training_early_and_still_saves(tmp_path):
    model = SparseAutoEncoder.from_config(sae_config("topk", top_k=4, norm_activation="token-wise"))
    short = (synthetic_batch(i) for i in range(7))
    result = Trainer(trainer_config(tmp_path, 20)).fit(model, short)
    assert (result.steps, result.total_steps, result.stream_exhausted) == (7, 20, True)
    assert (tmp_path / "sae_weights.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- checkpoints and resume


def test_checkpoint_files_and_resume_rules(tmp_path):
    cfg = trainer_config(tmp_path, 20, checkpoint_every_steps=10, auxk_coefficient=1 / 32, dead_threshold=512)
    model, stream = initialized(sae_config("batchtopk", top_k=4), synthetic_stream())
    result = Trainer(cfg).fit(model, stream)
    checkpoint = tmp_path / "checkpoints" / "step_10"
    assert result.checkpoints == [checkpoint]
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "config.json",
        "sae_weights.safetensors",
        "trainer_state.pt",
    ]
    assert SparseAutoEncoder.from_pretrained(checkpoint).cfg.norm_activation == "dataset-wise"  # never folded
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["progress"] == {
        "step": 10,
        "n_tokens": 10 * TOKENS_PER_BATCH,
        "batches_consumed": 10,
        "total_steps": 20,
        "tokens_per_batch": TOKENS_PER_BATCH,
    }
    assert set(state["rng"]) >= {"torch", "numpy", "python"}
    assert state["dead_latents"]["tokens_since_last_activation"].shape == (D_SAE,)

    (tmp_path / "checkpoints" / ".tmp-0000-step_99").mkdir()  # what a crash mid-write leaves behind
    (tmp_path / "checkpoints" / "step_50").mkdir()  # not a checkpoint: no trainer_state.pt
    assert find_latest_checkpoint(tmp_path) == checkpoint

    fresh = SparseAutoEncoder.from_config(sae_config("batchtopk", top_k=4))
    with pytest.raises(ConfigError, match=r"lr: 0.01 -> 0.02"):
        Trainer(cfg.model_copy(update={"lr": 2e-2})).fit(fresh, synthetic_stream(), resume_from=checkpoint)
    with pytest.raises(ConfigError, match=r"top_k: 4 -> 8"):
        other = SparseAutoEncoder.from_config(sae_config("batchtopk", top_k=8))
        Trainer(cfg).fit(other, synthetic_stream(), resume_from=checkpoint)
    with pytest.raises(ValueError, match="ended after 3 batches, but the checkpoint had consumed 10"):
        Trainer(cfg).fit(fresh, (synthetic_batch(i) for i in range(3)), resume_from=checkpoint)

    # Run-neutral settings may change; the resumed run then equals the uninterrupted one.
    expected = {name: t.clone() for name, t in model.state_dict().items()}
    neutral = cfg.model_copy(update={"log_frequency": 7, "exp_result_path": str(tmp_path / "resumed")})
    resumed = Trainer(neutral).fit(fresh, synthetic_stream(), resume_from=checkpoint)
    assert resumed.steps == 20
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    import random

    import numpy as np

    model = SparseAutoEncoder.from_config(sae_config("topk", top_k=4, norm_activation="token-wise"))
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    Trainer(trainer_config(tmp_path, 6, checkpoint_every_steps=5, lr_warm_up_steps=2)).fit(model, synthetic_stream())
    # The checkpoint at step 5 captured the RNG states of that moment; draws after restoring them repeat.
    restore_rng_states(load_trainer_state(tmp_path / "checkpoints" / "step_5")["rng"])
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_states(load_trainer_state(tmp_path / "checkpoints" / "step_5")["rng"])
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and (first[1] == second[1]).all() and first[2] == second[2]


RESUME_SCRIPT_STEPS = 40


def resumable_run(exp_dir: str, hang_after: int | None) -> None:
    """Child process: train (resuming from the latest checkpoint if any); the stream hangs after `hang_after`
    batches, after writing a marker file, so the parent can SIGKILL the process at a known point."""
    torch.set_num_threads(1)

    def stream():
        for index, batch in enumerate(synthetic_stream()):
            if hang_after is not None and index == hang_after:
                Path(exp_dir, "hanging").write_text("")
                time.sleep(600)
            yield batch

    model, batches = initialized(sae_config("topk", top_k=4), stream())
    cfg = trainer_config(
        Path(exp_dir),
        RESUME_SCRIPT_STEPS,
        lr_warm_up_steps=5,
        lr_cool_down_steps=0.5,
        initial_k=16,
        k_warmup_steps=0.5,
        auxk_coefficient=1 / 32,
        dead_threshold=4 * TOKENS_PER_BATCH,
        k_aux=16,
        clip_grad_norm=0.02,
        checkpoint_every_steps=10,
        log_frequency=10,
    )
    Trainer(cfg).fit(model, batches, resume_from=find_latest_checkpoint(exp_dir))


def run_child(exp_dir: Path, hang_after: int | None = None) -> subprocess.Popen:
    log = open(exp_dir.parent / f"{exp_dir.name}.log", "w")  # noqa: SIM115 (closed with the process)
    args = [sys.executable, __file__, str(exp_dir), str(hang_after)]
    env = os.environ | {"TQDM_DISABLE": "1"}
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parent.parent)


def test_sigkill_and_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    uninterrupted.mkdir()
    interrupted.mkdir()
    reference = run_child(uninterrupted)
    victim = run_child(interrupted, hang_after=26)  # checkpoints at steps 10 and 20, then 6 more steps, then hangs
    deadline = time.monotonic() + 300
    while not (interrupted / "hanging").exists():
        assert victim.poll() is None, (tmp_path / "interrupted.log").read_text()
        assert time.monotonic() < deadline, "the child never reached the hanging batch"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert find_latest_checkpoint(interrupted) == interrupted / "checkpoints" / "step_20"
    assert not (interrupted / "sae_weights.safetensors").exists()

    assert run_child(interrupted).wait(timeout=300) == 0, (tmp_path / "interrupted.log").read_text()
    assert reference.wait(timeout=300) == 0, (tmp_path / "uninterrupted.log").read_text()
    expected = load_file(uninterrupted / "sae_weights.safetensors")
    actual = load_file(interrupted / "sae_weights.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    # The resumed run really continued: its checkpoint at step 30 matches the reference's too.
    step_30 = load_file(uninterrupted / "checkpoints" / "step_30" / "sae_weights.safetensors")
    assert torch.equal(
        load_file(interrupted / "checkpoints" / "step_30" / "sae_weights.safetensors")["W_D"], step_30["W_D"]
    )
    assert not math.isnan(expected["W_D"].sum().item())


# ---------------------------------------------------------------------------------------------- W&B


def test_wandb_offline_run_receives_the_metric_keys(tmp_path):
    pytest.importorskip("wandb")
    from lm_saes_core.wandb_logging import WandbConfig, start_wandb_run

    run = start_wandb_run(WandbConfig(wandb_mode="offline", wandb_dir=str(tmp_path), wandb_project="test"))
    model, stream = initialized(sae_config("topk", top_k=4), synthetic_stream())
    cfg = trainer_config(
        tmp_path / "out", 20, log_frequency=10, checkpoint_every_steps=10, auxk_coefficient=1 / 32, dead_threshold=512
    )
    result = Trainer(cfg).fit(model, stream, wandb_run=run)
    run.finish()
    expected_keys = {
        "losses/overall_loss",
        "losses/mse_loss",
        "losses/aux_loss",
        "metrics/explained_variance",
        "metrics/explained_variance_legacy",
        "metrics/l0",
        "metrics/mean_feature_act",
        "metrics/l2_norm_error",
        "metrics/l2_norm_error_ratio",
        "sparsity/above_1e-1",
        "sparsity/above_1e-2",
        "sparsity/below_1e-5",
        "sparsity/below_1e-6",
        "sparsity/below_1e-7",
        "metrics/gradient_norm_per_param",
        "metrics/gradient_norm_before_clipping",
        "details/current_learning_rate",
        "details/n_training_tokens",
        "details/l1_coefficient",
        "details/lp_coefficient",
        "details/auxk_coefficient",
        "metrics/encoder_norm",
        "metrics/decoder_norm",
        "metrics/decoder_bias_norm",
        "sparsity/k",
    }
    assert set(result.last_metrics) == expected_keys
    (log_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while True:  # wandb-core may still be flushing the run file when finish() returns
        content = log_file.read_bytes()
        missing = [key for key in expected_keys if key.encode() not in content]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing
    assert Trainer.checkpoint_wandb_run_id(result.checkpoints[0]) == run.id


if __name__ == "__main__":
    resumable_run(sys.argv[1], None if sys.argv[2] == "None" else int(sys.argv[2]))
