"""Low-rank sparse attention (Lorsa): exact values on fixed weights, RoPE pairings and frequencies, the fused path
against the explicit one, the sparse decode, masks, folding, persistence, exact resume, named config errors, and on
the real SmolLM2: a Lorsa built from layer 3's own attention reproduces that layer's output, initialisation from the
host attention, and a short training run through `lm-saes train`."""

import copy
import dataclasses
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from dictionary_helpers import randomised as randomised_dictionary
from pydantic import ValidationError
from safetensors.torch import load_file
from typer.testing import CliRunner

from lm_saes_core.backend.attention import host_attention
from lm_saes_core.cli import app
from lm_saes_core.config import ConfigError
from lm_saes_core.models import LorsaConfig, LowRankSparseAttention, SparseDictionary, load_sparse_dictionary
from lm_saes_core.models.lorsa import rotary_inverse_frequencies
from lm_saes_core.runners.train import SweepSAESettings, TrainLorsaSettings, train_lorsa
from lm_saes_core.training import Initializer, InitializerConfig, Trainer, TrainerConfig, find_latest_checkpoint

F64 = torch.float64
IN, OUT = "blocks.3.ln1.hook_normalized", "blocks.3.hook_attn_out"


def lorsa_config(**fields) -> LorsaConfig:
    defaults = {"d_model": 8, "d_sae": 12, "n_qk_heads": 3, "d_qk_head": 4, "n_ctx": 16, "hook_point_in": IN,
                "hook_point_out": OUT, "act_fn": "topk", "top_k": 3, "norm_activation": "inference",
                "dtype": F64}  # fmt: skip
    return LorsaConfig(**(defaults | fields))


def randomised(cfg: LorsaConfig, seed: int = 0) -> LowRankSparseAttention:
    return randomised_dictionary(LowRankSparseAttention, cfg, seed)


def contexts(cfg: LorsaConfig, B: int = 3, S: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Raw activations of whole contexts; position 0 (BOS) and trailing padding of the last context masked out."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[:, 0] = False
    mask[-1, S - 2 :] = False
    return {IN: 2 * torch.randn(B, S, cfg.d_model, generator=g, dtype=cfg.dtype),
            OUT: torch.randn(B, S, cfg.d_model, generator=g, dtype=cfg.dtype), "mask": mask}  # fmt: skip


# ------------------------------------------------------------------ exact values on fixed weights


def test_fixed_weights_by_hand():
    """D = 2, one QK head with W_Q = W_K = I and scale 1 (no RoPE), OV heads reading and writing one coordinate each:
    position 1 attends to positions 0 and 1 with weights 1 / (1 + e) and e / (1 + e)."""
    cfg = lorsa_config(d_model=2, d_sae=2, n_qk_heads=1, d_qk_head=2, attn_scale=1.0, act_fn="relu",
                       positional_embedding_type="none")  # fmt: skip
    model = LowRankSparseAttention.from_config(cfg)
    with torch.no_grad():
        model.W_Q.copy_(torch.eye(2)[None])
        model.W_K.copy_(torch.eye(2)[None])
        for bias in (model.b_Q, model.b_K, model.b_V):
            bias.zero_()
        model.W_V.copy_(torch.eye(2))
        model.W_O.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
        model.b_D.copy_(torch.tensor([0.5, -0.5]))
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]], dtype=F64)
    e = math.e
    f, h, y = model.encode_and_reconstruct(x)
    torch.testing.assert_close(h, torch.tensor([[[1.0, 0.0], [1 / (1 + e), e / (1 + e)]]], dtype=F64))
    torch.testing.assert_close(f, h)  # ReLU of positive pre-activations
    expected = [[2.5, -0.5], [2 / (1 + e) + 0.5, 3 * e / (1 + e) - 0.5]]
    torch.testing.assert_close(y, torch.tensor([expected], dtype=F64))
    # TopK k = 1 ranks the heads of each position by h_i ||W_O,i||: at position 1, 3e/(1+e) beats 2/(1+e).
    topk = LowRankSparseAttention.from_config(cfg.model_copy(update={"act_fn": "topk", "top_k": 1}))
    topk.load_state_dict(model.state_dict())
    torch.testing.assert_close(topk.encode(x), torch.tensor([[[1.0, 0.0], [0.0, e / (1 + e)]]], dtype=F64))
    # With RoPE (one pair, frequency base^0 = 1): q at position 1 turns by 1 radian, so q1.k0 = -sin 1, q1.k1 = 1.
    rotary = LowRankSparseAttention.from_config(cfg.model_copy(update={"positional_embedding_type": "rotary"}))
    rotary.load_state_dict(model.state_dict())
    a = torch.softmax(torch.tensor([-math.sin(1.0), 1.0], dtype=F64), 0)
    torch.testing.assert_close(rotary.attend(x)[0][0, 1], a)


@pytest.mark.parametrize("adjacent", [True, False])
def test_rotary_pairs_and_frequencies(adjacent):
    """Channel 0 turns towards its partner (1 for adjacent pairs, d/2 for half-split) at frequency base^0; channel 2
    (adjacent: pair 1) / channel 1 (half-split: pair 1) at base^(-2/d)."""
    cfg = lorsa_config(d_qk_head=4, rotary_base=100.0, rotary_adjacent_pairs=adjacent)
    model = LowRankSparseAttention.from_config(cfg)
    p = 5
    q = torch.zeros(1, 1, 8, 4, dtype=F64)  # (batch, head, position, channel): e_0 at position p
    q[0, 0, p, 0] = 1.0
    first_partner, second, second_partner = (1, 2, 3) if adjacent else (2, 1, 3)
    q_second = torch.zeros_like(q)
    q_second[0, 0, p, second] = 1.0
    rotated, rotated_second = model._rope(q)[0, 0, p], model._rope(q_second)[0, 0, p]
    slow = 100.0 ** (-2 / 4) * p
    expected = torch.zeros(4, dtype=F64)
    expected[0], expected[first_partner] = math.cos(p), math.sin(p)
    torch.testing.assert_close(rotated, expected)
    expected = torch.zeros(4, dtype=F64)
    expected[second], expected[second_partner] = math.cos(slow), math.sin(slow)
    torch.testing.assert_close(rotated_second, expected)
    # partial rotary: channels beyond rotary_dim pass through
    partial = LowRankSparseAttention.from_config(cfg.model_copy(update={"rotary_dim": 2}))
    q_last = torch.zeros_like(q)
    q_last[0, 0, p, 3] = 1.0
    torch.testing.assert_close(partial._rope(q_last), q_last)


def test_ntk_by_parts_frequencies_equal_transformers_llama3():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 2048}  # fmt: skip
    hf = LlamaConfig(hidden_size=64, num_attention_heads=1, head_dim=64, rope_parameters=rope)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ntk = {"NTK_by_parts_factor": 8.0, "NTK_by_parts_low_freq_factor": 1.0, "NTK_by_parts_high_freq_factor": 4.0}
    cfg = lorsa_config(d_qk_head=64, rotary_base=500000.0, use_NTK_by_parts_rope=True, old_context_len=2048, **ntk)
    torch.testing.assert_close(rotary_inverse_frequencies(cfg), expected.double(), rtol=1e-6, atol=0)
    assert not torch.allclose(rotary_inverse_frequencies(cfg.model_copy(update={"use_NTK_by_parts_rope": False})),
                              expected.double())  # fmt: skip


# ------------------------------------------------------------------ the two attention paths, sparse decode


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"rotary_adjacent_pairs": False, "use_post_qk_ln": True, "normalization_type": "RMS"},
        {"rotary_dim": 2, "act_fn": "jumprelu"},
        {"positional_embedding_type": "none", "act_fn": "batchtopk", "n_qk_heads": 2, "d_sae": 8},
    ],
)
def test_fused_attention_equals_the_explicit_patterns(fields):
    model = randomised(lorsa_config(**fields))
    x = contexts(model.cfg)[IN]
    fast, _ = model.attend(x)
    f, explicit, pattern = model.encode_with_patterns(x)
    torch.testing.assert_close(fast, explicit, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.encode(x), f, atol=1e-6, rtol=0)
    # patterns: causal rows summing to 1
    assert pattern.shape == (3, model.cfg.n_qk_heads, 7, 7)
    assert (pattern.triu(1) == 0).all()
    torch.testing.assert_close(pattern.sum(-1), torch.ones(3, model.cfg.n_qk_heads, 7, dtype=F64))
    # z-patterns: what each source position adds to a head's pre-activation; they sum to it
    heads = [0, 5, model.cfg.d_sae - 1]
    z = model.z_patterns(x, heads)
    assert z.shape == (3, 3, 7, 7)
    torch.testing.assert_close(z.sum(-1).transpose(1, 2), fast[..., heads], atol=1e-6, rtol=0)


@pytest.mark.parametrize("act_fn", ["topk", "batchtopk"])
def test_sparse_decode_equals_the_dense_decode_in_values_and_gradients(act_fn):
    results = []
    for sparse in (True, False):
        model = randomised(lorsa_config(act_fn=act_fn, d_sae=24, top_k=2))
        model.sparse_kernels = sparse
        f, h, y = model.encode_and_reconstruct(contexts(model.cfg)[IN])
        (y.pow(2).sum() + f.sum()).backward()
        results.append((f.detach(), y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (f_sparse, y_sparse, g_sparse), (f_dense, y_dense, g_dense) = results
    active = (f_sparse > 0).sum(-1)  # topk: 2 per position; batchtopk: 2 per position on average
    assert (active <= 2).all() if act_fn == "topk" else 0 < active.sum() <= 2 * active.numel()
    torch.testing.assert_close(f_sparse, f_dense)
    torch.testing.assert_close(y_sparse, y_dense)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], msg=name)


def test_the_loss_reads_valid_positions_only_and_attends_to_all_earlier_ones():
    model = randomised(lorsa_config(d_sae=24, top_k=4))
    batch = contexts(model.cfg)
    out = model.compute_loss(batch)
    x, y, _, _ = model.prepare(batch)
    _, _, y_hat = model.encode_and_reconstruct(x)
    valid = batch["mask"]
    assert out.n_tokens == int(valid.sum()) == out.label.shape[0]
    torch.testing.assert_close(out.l_rec, (y_hat - y)[valid].pow(2).sum(-1).mean())
    changed = dict(batch)
    changed[OUT] = torch.where(valid[..., None], batch[OUT], 1e6)  # labels of BOS and padding: never read
    changed[IN] = batch[IN].clone()
    changed[IN][-1, -2:] = 1e3  # inputs at trailing padding: no valid position reads them (causal)
    torch.testing.assert_close(model.compute_loss(changed).loss, out.loss)
    changed[IN][:, 0] += 1.0  # the BOS position is out of the loss but every later position attends to it
    assert not torch.allclose(model.compute_loss(changed).loss, out.loss)


@pytest.mark.parametrize("sparse", [True, False])
def test_batchtopk_ranks_the_valid_positions_only(sparse):
    """BatchTopK's budget is k per valid token: only the valid positions are activated and decoded, ranked among
    themselves. Ranking every position handed the real tokens BOS's and padding's
    share (k 32 trained as 33.2 per token on SmolLM2 contexts)."""
    model = randomised(lorsa_config(act_fn="batchtopk", d_sae=24, top_k=3))
    model.sparse_kernels = sparse
    batch = contexts(model.cfg)
    valid = batch["mask"]
    out = model.compute_loss(batch)
    assert (out.feature_acts != 0).sum() == 3 * valid.sum() == 48
    x = model.prepare(batch).input
    f, h, y = model.encode_and_reconstruct_valid(x, valid)
    assert f.shape == (16, 24) and y.shape == (16, model.cfg.d_model)
    torch.testing.assert_close(h, model.attend(x)[0][valid])
    alone = model.activation_function(h, model.gating_norm(), 3, update_state=False)
    torch.testing.assert_close(f, alone)
    torch.testing.assert_close(y, model.decode(alone))


def test_aux_k_reconstructs_the_residual_from_the_dead_heads():
    """With k_aux above the number of dead heads, TopK keeps every positive pre-activation of a dead head."""
    from lm_saes_core.models import LossCoefficients

    model = randomised(lorsa_config(d_sae=24, top_k=2))
    batch = contexts(model.cfg)
    dead = torch.zeros(24, dtype=torch.bool)
    dead[[1, 4, 7, 20]] = True
    out = model.compute_loss(batch, LossCoefficients(auxk=0.5, k_aux=10), dead_latents=dead)
    h, residual = out.hidden_pre, out.label - out.reconstructed
    f_dead = torch.where(dead & (h > 0), h, 0.0)
    expected = 0.5 * (residual - f_dead @ model.W_O).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.terms["aux_loss"], expected)
    assert out.loss > out.l_rec
    none_dead = model.compute_loss(batch, LossCoefficients(auxk=0.5), dead_latents=torch.zeros(24, dtype=torch.bool))
    assert none_dead.terms["aux_loss"] == 0


# ------------------------------------------------------------------ folding and persistence


@pytest.mark.parametrize("act_fn", ["topk", "jumprelu"])
def test_folding_the_dataset_scale_is_exact(act_fn):
    cfg = lorsa_config(act_fn=act_fn, norm_activation="dataset-wise", use_post_qk_ln=True, normalization_type="RMS")
    model = randomised(cfg)
    model.set_dataset_average_activation_norm({IN: 5.0, OUT: 0.5})
    raw = contexts(cfg)
    expected, features = model.reconstruct(raw)[OUT], model.encode_batch(raw)
    model.fold_activation_scale()
    assert model.cfg.norm_activation == "inference"
    torch.testing.assert_close(model.reconstruct(raw)[OUT], expected)
    torch.testing.assert_close(model.encode_batch(raw), features)  # features keep the normalised scale


@pytest.mark.parametrize("fold", [True, False])
def test_save_and_load_give_identical_outputs(tmp_path, fold):
    cfg = lorsa_config(
        norm_activation="dataset-wise", use_post_qk_ln=True, normalization_type="RMS", act_fn="batchtopk"
    )
    model = randomised(cfg)
    model.set_dataset_average_activation_norm({IN: 5.0, OUT: 0.5})
    raw = contexts(cfg)
    model.train()
    model.encode(model.prepare(raw).input)  # BatchTopK's inference threshold
    model.eval()
    expected = model.reconstruct(raw)[OUT]
    model.save_pretrained(tmp_path / "lorsa", fold_activation_scale=fold)
    stored = load_file(tmp_path / "lorsa" / "sae_weights.safetensors")
    assert {"W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_D", "ln_q.w", "ln_k.w"} <= stored.keys()
    assert not {"rotary_sin", "rotary_cos"} & stored.keys()  # derived from the config
    saved = json.loads((tmp_path / "lorsa" / "config.json").read_text())
    assert saved["sae_type"] == "lorsa" and saved["attn_scale"] == 2.0
    assert saved["norm_activation"] == ("inference" if fold else "dataset-wise")
    loaded = load_sparse_dictionary(tmp_path / "lorsa")
    assert type(loaded) is LowRankSparseAttention and not loaded.training
    torch.testing.assert_close(loaded.reconstruct(raw)[OUT], expected)


# ------------------------------------------------------------------ training through the generic trainer

TEACHER = lorsa_config(d_model=8, d_sae=6, n_qk_heads=2, act_fn="relu", dtype=torch.float32)


def synthetic_batch(index: int, B: int = 4, S: int = 12) -> dict[str, torch.Tensor]:
    """Contexts whose output a random Lorsa computes from the input (BOS and a random tail of padding masked out)."""
    teacher = randomised(TEACHER, seed=7)
    g = torch.Generator().manual_seed(100 + index)
    x = torch.randn(B, S, 8, generator=g)
    with torch.no_grad():
        y = teacher.decode(teacher.attend(x)[0])
    mask = torch.arange(S)[None] < torch.randint(S // 2, S + 1, (B, 1), generator=g)
    mask[:, 0] = False
    y = torch.where(mask[..., None], y, 1e4)  # padding labels far off: visible in any metric that read them
    return {IN: x, OUT: y, "mask": mask, "tokens": torch.zeros(B, S, dtype=torch.long)}


def synthetic_stream():
    for index in itertools.count():
        yield synthetic_batch(index)


def train_config(path: Path, steps: int, **fields) -> TrainerConfig:
    tokens = int(synthetic_batch(0)["mask"].sum())
    defaults = dict(total_training_tokens=steps * tokens, lr=5e-3, log_frequency=100, n_checkpoints=0,
                    exp_result_path=str(path))  # fmt: skip
    return TrainerConfig(**(defaults | fields))


def initialized(**fields):
    torch.manual_seed(0)
    cfg = lorsa_config(**{"d_model": 8, "d_sae": 16, "n_qk_heads": 2, "top_k": 2, "dtype": torch.float32,
                          "norm_activation": "dataset-wise"} | fields)  # fmt: skip
    return Initializer(InitializerConfig(grid_search_init_norm=False)).initialize(cfg, synthetic_stream())


class Recorder:
    """Collects what the trainer logs (the interface of a W&B run)."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.rows.append(metrics)


def test_trainer_metrics_count_the_valid_positions_only(tmp_path):
    model, stream = initialized()
    first = synthetic_batch(0)
    with torch.no_grad():
        out = copy.deepcopy(model).compute_loss(first)
    y, y_hat = out.label, out.reconstructed
    expected_ev = 1 - (y_hat - y).pow(2).sum(-1).mean() / (y - y.mean(0)).pow(2).sum(-1).mean()
    recorder = Recorder()
    Trainer(train_config(tmp_path, 3, log_frequency=1)).fit(model, stream, wandb_run=recorder)
    assert recorder.rows[0]["metrics/explained_variance"] == pytest.approx(expected_ev.item(), abs=1e-5)
    assert recorder.rows[0]["details/n_training_tokens"] == int(first["mask"].sum())
    assert recorder.rows[0]["metrics/l0"] <= 2.0


@pytest.mark.parametrize("factor", [0.0, 0.25])
def test_the_qk_circuit_learns_at_its_own_rate(tmp_path, factor):
    """qk_lr_factor puts W_Q, W_K, b_Q, b_K in an optimiser group of their own at factor * lr; 0 freezes them while
    the OV heads learn."""
    model, stream = initialized(qk_lr_factor=factor)
    groups = {g["name"]: g for g in model.parameter_groups(lr=1e-3)}
    assert groups["qk"]["lr"] == pytest.approx(factor * 1e-3)
    assert {id(p) for p in groups["qk"]["params"]} == {id(p) for p in (model.W_Q, model.W_K, model.b_Q, model.b_K)}
    assert not {id(p) for p in groups["qk"]["params"]} & {id(p) for p in groups["others"]["params"]}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    Trainer(train_config(tmp_path, 3)).fit(model, stream)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert {"W_V", "W_O"} <= moved
    assert ({"W_Q", "W_K"} <= moved) == (factor > 0)
    assert [g["name"] for g in randomised(lorsa_config()).parameter_groups(lr=1.0)] == ["others"]


def test_checkpoint_and_resume_reproduce_the_uninterrupted_run_bitwise(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    model, stream = initialized(act_fn="batchtopk")
    Trainer(train_config(whole, 12, checkpoint_every_steps=6)).fit(model, stream)
    model, stream = initialized(act_fn="batchtopk")
    Trainer(train_config(part, 12, checkpoint_every_steps=6)).fit(model, itertools.islice(stream, 8))
    checkpoint = find_latest_checkpoint(part)
    assert checkpoint == part / "checkpoints" / "step_6"
    fresh = SparseDictionary.from_config(model.cfg)
    Trainer(train_config(part, 12, checkpoint_every_steps=6)).fit(fresh, synthetic_stream(), resume_from=checkpoint)
    expected, actual = load_file(whole / "sae_weights.safetensors"), load_file(part / "sae_weights.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


# ------------------------------------------------------------------ named errors, before any model loads


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"d_sae": 10}, "d_sae (= n_ov_heads) 10 is not divisible by n_qk_heads 3"),
        ({"rotary_dim": 6}, "rotary_dim 6 must be even and at most d_qk_head (4)"),
        ({"normalization_type": "LN"}, "normalization_type 'LN'"),
        ({"use_post_qk_ln": True}, "use_post_qk_ln needs normalization_type 'RMS'"),
        ({"hook_point_out": IN}, "hook_point_in and hook_point_out are both"),
        ({"act_fn": "layertopk"}, "act_fn 'layertopk'"),
        ({"rotary_scale": 2}, "rotary_scale"),  # unknown keys are errors
    ],
)
def test_bad_configs_are_named_errors(fields, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        lorsa_config(**fields)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


def run_settings(tmp_path: Path, target: str = "activations-2d", steps: int = 40, **changes) -> dict:
    host_fields = {"n_qk_heads": 9, "d_qk_head": 64, "attn_scale": 8.0, "rotary_base": 100000.0,
                   "rotary_adjacent_pairs": False}  # fmt: skip
    return {
        "sae": {"sae_type": "lorsa", "d_model": 576, "d_sae": 1152, "n_ctx": 64, "hook_point_in": IN,
                "hook_point_out": OUT, "act_fn": "topk", "top_k": 16, **host_fields},
        "sae_name": "lorsa-l3",
        "initializer": {"initialize_lorsa_with_mhsa": True, "initialize_W_D_with_active_subspace": True,
                        "grid_search_init_norm": False, "norm_estimation_batches": 2},
        "trainer": {"total_training_tokens": steps * 8 * 63, "lr": 3e-3, "log_frequency": 20, "n_checkpoints": 0,
                    "exp_result_path": str(tmp_path / "lorsa")},
        "activation_factory": {"sources": [{"type": "dataset", "name": "docs"}], "target": target,
                               "hook_points": [IN, OUT], "batch_size": 8, "context_size": 64, "model_batch_size": 8},
        "model": {"model_name": "smollm2-135m"},
        "datasets": {"docs": {"dataset_name_or_path": "python-docs", "split": "train[:400]"}},
    } | changes  # fmt: skip


def test_a_1d_stream_or_another_kind_is_refused_before_any_model_loads(tmp_path):
    settings = run_settings(tmp_path, target="activations-1d")
    settings["model"] = {"model_name": str(tmp_path / "no-such-model")}  # loading it would fail differently
    with pytest.raises(ValidationError, match="a hook without positions for Lorsa"):
        TrainLorsaSettings.model_validate(settings)
    item = {key: settings[key] for key in ("sae", "sae_name", "trainer")}
    sweep = {key: settings[key] for key in ("activation_factory", "model", "datasets")} | {"items": [item]}
    with pytest.raises(ValidationError, match="a hook without positions for Lorsa"):
        SweepSAESettings.model_validate(sweep)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(settings))
    result = invoke("train", str(path))
    assert result.exit_code == 2 and "a hook without positions for Lorsa" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    sae = {
        "sae_type": "sae",
        "d_model": 576,
        "d_sae": 1152,
        "hook_point_in": IN,
        "hook_point_out": OUT,
        "act_fn": "topk",
    }
    other = TrainLorsaSettings.model_validate(run_settings(tmp_path, sae=sae, initializer=None))
    with pytest.raises(ConfigError, match="this runner trains sae_type 'lorsa'"):
        train_lorsa(other)
    with pytest.raises(ValueError, match="initialize_lorsa_with_mhsa applies to sae_type 'lorsa'"):
        Initializer(InitializerConfig(initialize_lorsa_with_mhsa=True)).initialize(
            SparseDictionary.kind("sae").config_class(**sae, norm_activation="inference"), iter([])
        )


# ------------------------------------------------------------------ the real SmolLM2, layer 3

TEXTS = [
    "The quick brown fox jumps over the lazy dog. Sparse dictionaries learn the features of language models from "
    "their activations, one layer at a time, and attention replacements read whole contexts.",
    "def add(x, y):\n    return x + y\n\n\nfor i in range(10):\n    print(add(i, 2 * i))\n",
    "In 1905 Albert Einstein published four papers: on the photoelectric effect, Brownian motion, special relativity "
    "and the equivalence of mass and energy, which changed physics.",
]


@pytest.fixture(scope="module")
def layer3(smollm2_hf) -> dict[str, torch.Tensor]:
    """Layer 3's attention input (before the norm's weight) and output on two right-padded texts."""
    encoded = smollm2_hf.tokenizer(TEXTS, return_tensors="pt", padding=True)
    acts = smollm2_hf.activations(encoded["input_ids"], encoded["attention_mask"], [IN, OUT])
    mask = encoded["attention_mask"].bool()
    assert not mask.all()  # the second text is padded
    return {**acts, "mask": mask}


def exact_lorsa(host, **fields) -> LowRankSparseAttention:
    cfg = LorsaConfig(d_model=576, d_sae=host.n_heads * host.d_head, n_ctx=64, hook_point_in=IN, hook_point_out=OUT,
                      norm_activation="inference", **(host.lorsa_fields() | fields))  # fmt: skip
    lorsa = LowRankSparseAttention.from_config(cfg)
    lorsa.init_qk_from_host(host)
    lorsa.init_ov_from_host_svd(host)
    return lorsa


def attention_output_error(lorsa: LowRankSparseAttention, layer3) -> float:
    """Max |Lorsa - hook_attn_out| at the real positions, the activation function switched off (h decoded)."""
    with torch.no_grad():
        y_hat = lorsa.decode(lorsa.attend(layer3[IN])[0])
    return (y_hat - layer3[OUT])[layer3["mask"]].abs().max().item()


def test_a_lorsa_built_from_layer_3_reproduces_its_attention_output(smollm2_hf, layer3):
    """Q/K copied per head (GQA: key head h // 3 for query head h), each head's OV circuit split by SVD into its 64
    rank-1 heads, ln1's weight folded in: the pre-activations decoded are layer 3's attention output to 1e-4
    (measured 7e-6; the output reaches 5.5), so RoPE pairing, grouping, scale and causal mask match the model."""
    host = host_attention(smollm2_hf, 3)
    assert (host.n_heads, host.n_kv_heads, host.d_head) == (9, 3, 64)
    assert host.lorsa_fields() == {"n_qk_heads": 9, "d_qk_head": 64, "attn_scale": 8.0, "use_post_qk_ln": False,
                                   "positional_embedding_type": "rotary", "rotary_dim": 64, "rotary_base": 100000.0,
                                   "rotary_adjacent_pairs": False}  # fmt: skip
    lorsa = exact_lorsa(host)
    assert attention_output_error(lorsa, layer3) < 1e-4
    # each ingredient matters: the test fails by far with the other RoPE pairing, key heads grouped the other way
    # (h % 3), or the scale of another head width
    state = lorsa.state_dict()
    for change in ({"rotary_adjacent_pairs": True}, {"attn_scale": 1.0}):
        wrong = LowRankSparseAttention.from_config(lorsa.cfg.model_copy(update=change))
        wrong.load_state_dict(state)
        assert attention_output_error(wrong, layer3) > 1e-1, change
    kv_heads = host.W_K[:: host.n_heads // host.n_kv_heads]
    ungrouped = dataclasses.replace(host, W_K=kv_heads.repeat(3, 1, 1))
    assert attention_output_error(exact_lorsa(ungrouped), layer3) > 1e-1


def test_host_attention_reads_the_same_weights_through_both_backends(smollm2_hf, smollm2_tl):
    hf, tl = host_attention(smollm2_hf, 3), host_attention(smollm2_tl, 3)
    for field in ("W_Q", "W_K", "W_V", "W_O", "inv_freq"):
        assert torch.equal(getattr(hf, field), getattr(tl, field)), field
    assert hf.lorsa_fields() == tl.lorsa_fields()
    with pytest.raises(ConfigError, match="reads its input at one of"):
        host_attention(smollm2_hf, 3, "blocks.3.hook_resid_pre")


def test_initialised_from_the_host_attention(smollm2_hf, layer3):
    """Two Lorsa QK heads per host head, each a copy of it over the input scale; W_V rows in the span of their host
    head's value weights (the values it reads), W_O = what the host head writes for them; rows of unit norm."""
    host = host_attention(smollm2_hf, 3)
    cfg = LorsaConfig(d_model=576, d_sae=18 * 8, n_ctx=64, hook_point_in=IN, hook_point_out=OUT,
                      norm_activation="dataset-wise", **(host.lorsa_fields() | {"n_qk_heads": 18}))  # fmt: skip
    torch.manual_seed(0)
    lorsa = LowRankSparseAttention.from_config(cfg)
    lorsa.set_dataset_average_activation_norm({IN: 20.0, OUT: 4.0})
    c_in = math.sqrt(576) / 20.0
    lorsa.init_qk_from_host(host)
    for head in range(18):
        torch.testing.assert_close(lorsa.W_Q[head].double(), host.W_Q[head // 2] / c_in)
        torch.testing.assert_close(lorsa.W_K[head].double(), host.W_K[head // 2] / c_in)
    lorsa.init_ov_with_active_subspace(layer3, host)
    torch.testing.assert_close(lorsa.W_V.norm(dim=1), torch.ones(144))
    torch.testing.assert_close(lorsa.W_O.norm(dim=1), torch.ones(144))
    for head in range(9):
        rows = slice(16 * head, 16 * (head + 1))
        basis = torch.linalg.qr(host.W_V[head]).Q  # (576, 64)
        W_V = lorsa.W_V[rows].double()
        torch.testing.assert_close(W_V @ basis @ basis.T, W_V, atol=1e-5, rtol=0)
        writes = W_V @ host.W_V[head] @ host.W_O[head]
        torch.testing.assert_close(lorsa.W_O[rows].double(), writes / writes.norm(dim=1, keepdim=True), atol=1e-5,
                                   rtol=0)  # fmt: skip
    mismatched = LowRankSparseAttention.from_config(cfg.model_copy(update={"rotary_adjacent_pairs": True}))
    with pytest.raises(ValueError, match="rotary_adjacent_pairs is True, the host's is False"):
        mismatched.init_qk_from_host(host)


@pytest.mark.slow
def test_lm_saes_train_learns_layer_3_attention_from_2d_activations(tmp_path):
    """`lm-saes train` on a Lorsa config: SmolLM2 layer 3, 8 contexts of 64 tokens per step, Q/K from the host and
    the per-head active subspace, 45 steps. Measured EV of the last window (steps 41-45) 0.37; 67 steps reach 0.45,
    where a random start (no host initialisation) reaches 0.17."""
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(run_settings(tmp_path)))
    result = invoke("train", str(path))
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "lorsa" / "train_result.json").read_text())["last_metrics"]
    assert metrics["metrics/explained_variance"] > 0.33, metrics
    assert metrics["metrics/l0"] == pytest.approx(16.0)
    loaded = load_sparse_dictionary(tmp_path / "lorsa")
    assert type(loaded) is LowRankSparseAttention and loaded.cfg.norm_activation == "inference"  # folded on save


def signed_lorsa(host, **fields) -> LowRankSparseAttention:
    """The exact Lorsa with each rank-1 head twice, the copy's W_V, b_V and W_O negated: relu(h) u - relu(-h) u = h u,
    so the host attention is reproduced by an activation function that zeroes negative pre-activations (every
    activation function here does) when all heads may fire."""
    exact = exact_lorsa(host)
    cfg = LorsaConfig(**(exact.cfg.model_dump(exclude={"expansion_factor"}) | {"d_sae": 2 * exact.cfg.d_sae} | fields))
    signed = LowRankSparseAttention(cfg)
    state = exact.state_dict()
    for name in ("W_V", "b_V", "W_O"):
        heads = state[name].reshape(host.n_heads, host.d_head, *state[name].shape[1:])
        state[name] = torch.cat([heads, -heads], dim=1).flatten(0, 1)
    signed.load_state_dict(state)
    return signed


def test_evaluation_splices_a_lorsa_in_place_of_the_attention_output(smollm2_hf, layer3):
    """The exact Lorsa of layer 3 (signed pairs, every head allowed: top_k = d_sae) evaluated on whole contexts and
    spliced into the real model in place of blocks.3.hook_attn_out: reconstruction and the language model's loss are
    the model's own; the same Lorsa with 64 heads per position loses part of both."""
    from lm_saes_core.evaluation import EvalConfig, Evaluator

    encoded = smollm2_hf.tokenizer(TEXTS, return_tensors="pt", padding=True)
    batch = {**layer3, "tokens": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    host = host_attention(smollm2_hf, 3)
    evaluator = Evaluator(EvalConfig(total_eval_tokens=10_000))
    exact = evaluator.run(signed_lorsa(host, act_fn="topk", top_k=1152), [batch], smollm2_hf).metrics
    assert exact["metrics/explained_variance"] > 1 - 1e-6
    assert 500 < exact["metrics/l0"] < 652  # about half the heads: one of each signed pair, unless h = 0
    assert exact["metrics/ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["metrics/kl_div_spliced"] < 1e-6
    sparse = evaluator.run(signed_lorsa(host, act_fn="topk", top_k=64), [batch], smollm2_hf).metrics
    assert sparse["metrics/l0"] == 64
    assert 0 < sparse["metrics/explained_variance"] < exact["metrics/explained_variance"]
    assert sparse["metrics/ce_loss_recovered"] < exact["metrics/ce_loss_recovered"]
