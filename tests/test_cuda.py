"""The same model, trainer and evaluator paths on a CUDA device: the sparse TopK kernels against the dense path,
a short training run that learns, save/load across devices, and exact resume. Skipped without a GPU (CI has none);
run on a GPU machine with `pytest tests/test_cuda.py`."""

import pytest
import torch
from test_training import (
    HOOK,
    TOKENS_PER_BATCH,
    explained_variance,
    initialized,
    sae_config,
    synthetic_batch,
    synthetic_stream,
    trainer_config,
)

from lm_saes_core.models import LossConfig, SAEConfig, SparseAutoEncoder
from lm_saes_core.training import Trainer, find_latest_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.mark.parametrize("act_fn", ["topk", "batchtopk"])
def test_sparse_kernels_equal_the_dense_path_on_cuda(act_fn):
    torch.manual_seed(0)
    cfg = SAEConfig(
        d_model=64, d_sae=1024, hook_point_in="in", hook_point_out="in", act_fn=act_fn, top_k=16,
        norm_activation="inference", device="cuda",
    )  # fmt: skip
    model = SparseAutoEncoder.from_config(cfg)
    with torch.no_grad():
        model.b_E.normal_(0, 0.1)
    batch = {"in": torch.randn(4096, 64, device="cuda")}
    dead = torch.rand(1024, device="cuda") > 0.5
    results = {}
    for sparse in (True, False):
        model.sparse_kernels = sparse
        model.zero_grad()
        out = model.compute_loss(batch, LossConfig(auxk_coefficient=0.5, k_aux=32).coefficients(), dead)
        out.loss.backward()
        results[sparse] = (out, {name: p.grad.clone() for name, p in model.named_parameters()})
    (sparse_out, sparse_grads), (dense_out, dense_grads) = results[True], results[False]
    for field in ("loss", "l_rec", "l_aux", "feature_acts", "reconstructed"):
        torch.testing.assert_close(getattr(sparse_out, field), getattr(dense_out, field), rtol=1e-4, atol=1e-5)
    for name, grad in dense_grads.items():
        assert ((sparse_grads[name] - grad).norm() / grad.norm()).item() < 1e-4, name


@pytest.mark.parametrize(
    "act_fn,model_kwargs,settings,min_ev",
    [
        ("topk", {"top_k": 4}, {}, 0.8),
        ("batchtopk", {"top_k": 4}, {}, 0.7),
        ("jumprelu", {}, {"sparsity_loss_type": "tanh", "l1_coefficient": 0.1}, 0.85),
    ],
)
def test_training_on_cuda_learns_and_saves_a_model_that_loads_on_cpu(tmp_path, act_fn, model_kwargs, settings, min_ev):
    held_out = [synthetic_batch(10_000 + i) for i in range(4)]
    model, stream = initialized(sae_config(act_fn, device="cuda", **model_kwargs), synthetic_stream())
    assert model.W_E.device.type == "cuda"
    result = Trainer(trainer_config(tmp_path, 200, **settings)).fit(model, stream)
    assert result.steps == 200
    on_cpu = SparseAutoEncoder.from_pretrained(tmp_path, device="cpu")
    on_cpu.eval()
    assert explained_variance(on_cpu, held_out) > min_ev
    model.eval()
    on_gpu = {HOOK: held_out[0][HOOK].cuda()}
    on_gpu_reconstruction = {hook: value.cpu() for hook, value in model.reconstruct(on_gpu).items()}
    torch.testing.assert_close(on_cpu.reconstruct(held_out[0]), on_gpu_reconstruction, rtol=1e-4, atol=1e-4)


def test_resumed_run_on_cuda_equals_the_uninterrupted_run(tmp_path):
    def run(path, steps, resume_from=None):
        model, stream = initialized(sae_config("topk", top_k=4, device="cuda"), synthetic_stream())
        cfg = trainer_config(path, 60, checkpoint_every_steps=20)
        trainer = Trainer(cfg)
        if steps < 60:  # stop early by feeding only `steps` batches
            stream = (batch for _, batch in zip(range(steps), stream, strict=False))
        trainer.fit(model, stream, resume_from=resume_from)
        return model

    whole = run(tmp_path / "whole", 60)
    run(tmp_path / "part", 40)
    checkpoint = find_latest_checkpoint(tmp_path / "part")
    assert checkpoint is not None
    resumed = run(tmp_path / "part", 60, resume_from=checkpoint)
    batch = {HOOK: synthetic_batch(99_999)[HOOK].cuda()}
    assert TOKENS_PER_BATCH == len(batch[HOOK])
    # Bitwise on CPU (tests/test_training.py); on CUDA the scatter-adds of the sparse kernels sum in a
    # nondeterministic order, so the runs agree to float rounding.
    torch.testing.assert_close(resumed.reconstruct(batch), whole.reconstruct(batch), rtol=1e-5, atol=1e-5)
