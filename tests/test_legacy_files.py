"""Files written before the SparseDictionary family (tests/fixtures/legacy_v1, made by the single-class
`SparseAutoEncoder` of commit ec02bdb with tests/fixtures/make_legacy_v1.py) load and give the same outputs bitwise,
and a training checkpoint of that code resumes to the very weights that code ended with."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_saes_core.models import SparseAutoEncoder, SparseDictionary, load_sparse_dictionary, read_dictionary_config
from lm_saes_core.training import Trainer, TrainerConfig

LEGACY = Path(__file__).parent / "fixtures" / "legacy_v1"
CASES = ["topk_dataset_wise", "batchtopk_folded", "jumprelu_folded", "relu_transcoder_skip"]


def legacy_script():
    spec = importlib.util.spec_from_file_location("make_legacy_v1", LEGACY.parent / "make_legacy_v1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("case", CASES)
def test_legacy_dictionary_loads_with_identical_outputs(case):
    inputs = load_file(LEGACY / "inputs.safetensors")
    expected = load_file(LEGACY / case / "expected_outputs.safetensors")
    model = load_sparse_dictionary(LEGACY / case)
    assert isinstance(model, SparseAutoEncoder) and not model.training  # ready for inference
    features = model.encode(model.prepare(inputs).input)
    (reconstruction,) = model.reconstruct(inputs).values()
    assert torch.equal(features, expected["features"])
    assert torch.equal(reconstruction, expected["reconstruction"])


def test_legacy_tensor_names_map_to_the_activation_function():
    jumprelu = load_sparse_dictionary(LEGACY / "jumprelu_folded")
    stored = load_file(LEGACY / "jumprelu_folded" / "sae_weights.safetensors")
    assert "log_jumprelu_threshold" in stored  # the old name in the file ...
    assert torch.equal(jumprelu.activation_function.log_jumprelu_threshold, stored["log_jumprelu_threshold"])
    batchtopk = load_sparse_dictionary(LEGACY / "batchtopk_folded")
    threshold = load_file(LEGACY / "batchtopk_folded" / "sae_weights.safetensors")["topk_threshold"]
    assert threshold > 0 and torch.equal(batchtopk.activation_function.topk_threshold, threshold)
    assert read_dictionary_config(LEGACY / "topk_dataset_wise").sae_type == "sae"


def test_legacy_checkpoint_resumes_to_the_weights_the_old_code_ended_with(tmp_path):
    """The checkpoint's trainer state has the loss keys at the top level of the trainer config and the old tensor
    names; resumed from step 6 with today's trainer, the 12-step run ends bitwise where the old code's did."""
    run = LEGACY / "run"
    shutil.copytree(run / "checkpoints", tmp_path / "checkpoints")
    settings = json.loads((run / "trainer_config.json").read_text())
    assert "l1_coefficient" in settings and "loss" not in settings  # the old layout
    cfg = TrainerConfig.model_validate({**settings, "exp_result_path": str(tmp_path)})
    assert cfg.loss.sparsity_loss_type == "tanh" and cfg.loss.auxk_coefficient == 0.1
    checkpoint = tmp_path / "checkpoints" / "step_6"
    model = SparseDictionary.from_config(read_dictionary_config(checkpoint))
    result = Trainer(cfg).fit(model, legacy_script().stream(), resume_from=checkpoint)
    assert result.steps == 12
    expected = load_file(run / "sae_weights.safetensors")
    actual = load_file(tmp_path / "sae_weights.safetensors")
    renamed = {SparseAutoEncoder.legacy_tensor_names.get(name, name): value for name, value in expected.items()}
    assert renamed.keys() == actual.keys()
    for name, value in renamed.items():
        assert torch.equal(actual[name], value), name
