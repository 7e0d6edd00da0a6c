"""The SparseDictionary base is general: a second kind defined here alone (a two-head dictionary, one set of features
read from and written to two hook points, like a crosscoder over two layers) trains, checkpoints, resumes bitwise,
saves and loads by its `sae_type`, and evaluates (also spliced into a language model at both hooks) through the
generic initializer, trainer and evaluator, with no change to them."""

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lm_saes_core.activation.config import ActivationFactoryConfig, ActivationFactoryTarget
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.backend import HuggingFaceLanguageModel, LanguageModelConfig
from lm_saes_core.data import DatasetConfig, load_dataset
from lm_saes_core.evaluation import EvalConfig, Evaluator
from lm_saes_core.models import SparseDictionary, SparseDictionaryConfig, load_sparse_dictionary
from lm_saes_core.training import Initializer, InitializerConfig, Trainer, TrainerConfig, find_latest_checkpoint

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
D_MODEL, N_TRUE, D_SAE, ROWS = 16, 32, 64, 128


# ------------------------------------------------------------------ the second kind, defined in this file alone


class TwoHeadConfig(SparseDictionaryConfig):
    sae_type: Literal["test_two_head"] = "test_two_head"
    hook_points_both: list[str]

    @property
    def hooks_in(self) -> list[str]:
        return self.hook_points_both

    @property
    def hooks_out(self) -> list[str]:
        return self.hook_points_both

    def hook_widths(self) -> list[tuple[str, int, str]]:
        return [(hook, self.d_model, "d_model") for hook in self.hook_points_both]


class TwoHeadDictionary(SparseDictionary):
    """h = sum_heads x_head @ W_E[head] + b_E,  f = act(h),  y_hat[head] = f @ W_D[head] + b_D[head]."""

    config_class = TwoHeadConfig

    def __init__(self, cfg: TwoHeadConfig):
        super().__init__(cfg)
        heads, d, f = len(cfg.hook_points_both), cfg.d_model, cfg.d_sae
        self.W_E = nn.Parameter(torch.empty(heads, d, f, dtype=cfg.dtype))
        self.b_E = nn.Parameter(torch.empty(f, dtype=cfg.dtype))
        self.W_D = nn.Parameter(torch.empty(heads, f, d, dtype=cfg.dtype))
        self.b_D = nn.Parameter(torch.empty(heads, d, dtype=cfg.dtype))

    @torch.no_grad()
    def init_parameters(self, **kwargs: float) -> None:
        self.W_D.uniform_(-(self.cfg.d_sae**-0.5), self.cfg.d_sae**-0.5)
        self.W_E.copy_(self.W_D.transpose(1, 2))
        self.b_E.zero_()
        self.b_D.zero_()
        self.activation_function.init_parameters(**kwargs)

    def decoder_norm(self) -> torch.Tensor:
        return self.W_D.norm(dim=-1).pow(2).sum(0).sqrt()  # (F,) over both heads

    def encode(self, x: torch.Tensor, return_hidden_pre: bool = False):
        h = torch.einsum("...hd,hdf->...f", x, self.W_E) + self.b_E
        f = self.activation_function(h, self.gating_norm(), self.current_k)
        return (f, h) if return_hidden_pre else f

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...f,hfd->...hd", feature_acts, self.W_D) + self.b_D


def two_head_config(**fields) -> TwoHeadConfig:
    defaults = {"d_model": D_MODEL, "d_sae": D_SAE, "hook_points_both": HOOKS, "act_fn": "topk", "top_k": 4}
    return TwoHeadConfig(**(defaults | fields))


# ------------------------------------------------------------------ data: both hooks read the same sparse codes


def two_head_batch(index: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(2, N_TRUE, D_MODEL, generator=g) / D_MODEL**0.5
    g = torch.Generator().manual_seed(1000 + index)
    active = torch.multinomial(torch.ones(ROWS, N_TRUE), 3, generator=g)
    codes = torch.zeros(ROWS, N_TRUE).scatter_(1, active, torch.rand(ROWS, 3, generator=g) + 0.5)
    batch = {hook: 5 * codes @ directions[i] + 0.01 * torch.randn(ROWS, D_MODEL, generator=g) for i, hook in
             enumerate(HOOKS)}  # fmt: skip
    return batch | {"tokens": torch.arange(ROWS)}


def two_head_stream() -> Iterator[dict[str, torch.Tensor]]:
    for index in itertools.count():
        yield two_head_batch(index)


def trainer_config(path: Path, steps: int, **fields) -> TrainerConfig:
    defaults = dict(total_training_tokens=steps * ROWS, lr=1e-2, log_frequency=10, n_checkpoints=0,
                    exp_result_path=str(path))  # fmt: skip
    return TrainerConfig(**(defaults | fields))


def initialized() -> tuple[SparseDictionary, Iterator]:
    torch.manual_seed(0)
    return Initializer(InitializerConfig()).initialize(two_head_config(), two_head_stream())


# ------------------------------------------------------------------ tests


def test_the_kind_is_registered_and_built_from_its_config():
    model = SparseDictionary.from_config(two_head_config())
    assert type(model) is TwoHeadDictionary and model.n_features == D_SAE
    assert model.cfg.hook_points == HOOKS


def test_generic_initializer_and_trainer_learn_it(tmp_path):
    model, stream = initialized()
    # The initializer estimated one dataset-wise norm per hook and skipped the steps this kind lacks.
    assert set(model.cfg.dataset_average_activation_norm) == set(HOOKS)
    held_out = {hook: value for hook, value in two_head_batch(10_000).items() if hook in HOOKS}
    result = Trainer(trainer_config(tmp_path, 150)).fit(model, stream)
    metrics = result.last_metrics
    assert result.steps == 150 and metrics["metrics/l0"] == pytest.approx(4.0)
    for hook in HOOKS:  # one explained variance per output hook, next to the pooled one
        assert metrics[f"metrics/{hook}/explained_variance"] > 0.8, metrics
    assert metrics["metrics/explained_variance"] > 0.8
    # Saved with its norms (this kind cannot fold them); loaded by its sae_type, in eval mode, same outputs.
    loaded = load_sparse_dictionary(tmp_path)
    assert type(loaded) is TwoHeadDictionary and not loaded.training
    model.eval()
    torch.testing.assert_close(loaded.reconstruct(held_out), model.reconstruct(held_out))
    evaluation = Evaluator(EvalConfig(total_eval_tokens=1024)).evaluate(loaded, [two_head_batch(20_000 + i) for i in
                                                                                 range(8)])  # fmt: skip
    assert evaluation["metrics/explained_variance"] > 0.8 and evaluation["details/n_tokens"] == 1024
    assert evaluation["metrics/l0"] == pytest.approx(4.0)


def test_checkpoint_and_resume_reproduce_the_uninterrupted_run_bitwise(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    model, stream = initialized()
    Trainer(trainer_config(whole, 16, checkpoint_every_steps=8)).fit(model, stream)

    model, stream = initialized()
    stopped = Trainer(trainer_config(part, 16, checkpoint_every_steps=8)).fit(model, itertools.islice(stream, 11))
    assert stopped.stream_exhausted and stopped.steps == 11
    checkpoint = find_latest_checkpoint(part)
    assert checkpoint == part / "checkpoints" / "step_8"

    fresh = SparseDictionary.from_config(two_head_config())
    resumed = Trainer(trainer_config(part, 16, checkpoint_every_steps=8)).fit(
        fresh, two_head_stream(), resume_from=checkpoint
    )
    assert resumed.steps == 16
    expected, actual = load_file(whole / "sae_weights.safetensors"), load_file(part / "sae_weights.safetensors")
    assert expected.keys() == actual.keys() == {"W_E", "b_E", "W_D", "b_D"}
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


# ------------------------------------------------------------------ spliced into a language model at both hooks


@pytest.fixture(scope="module")
def tiny_model_and_batches(tiny_llama_dir):
    model = HuggingFaceLanguageModel(LanguageModelConfig(model_name=str(tiny_llama_dir)))
    factory = ActivationFactory(
        ActivationFactoryConfig(
            sources=[{"type": "dataset", "name": "docs"}],
            target=ActivationFactoryTarget.ACTIVATIONS_2D,
            hook_points=HOOKS,
            batch_size=2,
            context_size=24,
            model_batch_size=2,
        )
    )
    dataset = load_dataset(DatasetConfig(dataset_name_or_path="python-docs", split="train[:10]"))
    batches = factory.process(model=model, datasets={"docs": dataset})
    return model, [next(batches) for _ in range(2)]


def identity_two_head(d_model: int) -> TwoHeadDictionary:
    """Features relu(x_h) and relu(-x_h) of each head, decoded back into that head only: exact reconstruction."""
    cfg = two_head_config(d_model=d_model, d_sae=4 * d_model, act_fn="relu", norm_activation="inference",
                          sparsity_include_decoder_norm=False)  # fmt: skip
    model = TwoHeadDictionary(cfg)
    eye, zero = torch.eye(d_model), torch.zeros(d_model, d_model)
    with torch.no_grad():
        model.W_E.copy_(torch.stack([torch.cat([eye, -eye, zero, zero], 1), torch.cat([zero, zero, eye, -eye], 1)]))
        model.W_D.copy_(model.W_E.transpose(1, 2))
        model.b_E.zero_()
        model.b_D.zero_()
    return model


def test_spliced_at_both_hooks_through_the_generic_evaluator(tiny_model_and_batches):
    model, batches = tiny_model_and_batches
    identity = identity_two_head(model.d_model)
    metrics = Evaluator(EvalConfig(total_eval_tokens=10_000)).evaluate(identity, batches, model)
    assert metrics["metrics/ce_loss_spliced"] == metrics["metrics/ce_loss_clean"]
    assert metrics["metrics/ce_loss_recovered"] == 1.0 and metrics["metrics/kl_div_spliced"] == 0.0
    for hook in HOOKS:
        assert metrics[f"metrics/{hook}/explained_variance"] == pytest.approx(1.0, abs=1e-12)

    # Zero decoders: splicing equals zero-ablating both hooks (not just one of them).
    zero = identity_two_head(model.d_model)
    with torch.no_grad():
        zero.W_D.zero_()
    metrics = Evaluator(EvalConfig(total_eval_tokens=10_000)).evaluate(zero, batches, model)
    assert metrics["metrics/ce_loss_spliced"] == metrics["metrics/ce_loss_zero_ablation"]
    assert metrics["metrics/ce_loss_zero_ablation"] > metrics["metrics/ce_loss_clean"]
    # This kind reads layer 1 to encode layer 0, so it is reconstructed from the clean activations and patched in at
    # both hooks: with head 0 zeroed and head 1 exact, layer 1 is restored to its clean value and so are the logits.
    only_second = identity_two_head(model.d_model)
    with torch.no_grad():
        only_second.W_D[0].zero_()
    partial = Evaluator(EvalConfig(total_eval_tokens=10_000)).evaluate(only_second, batches, model)
    assert partial["metrics/ce_loss_spliced"] == partial["metrics/ce_loss_clean"]
    assert partial[f"metrics/{HOOKS[0]}/explained_variance"] < 0.05
    assert partial[f"metrics/{HOOKS[1]}/explained_variance"] == pytest.approx(1.0, abs=1e-12)
    # The pooled value weighs each hook's explained variance by its variance: it lies between the two.
    assert partial[f"metrics/{HOOKS[0]}/explained_variance"] < partial["metrics/explained_variance"] < 1.0
