"""Settings fuzzing: the shipped settings files, mutated (values of other types, out-of-range numbers, missing and
extra keys, another or an unknown sae_type), either validate or fail with our `ConfigError`, never another exception.
Validation only: no model, dataset or dictionary is loaded."""

import copy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lm_saes_core.config import ConfigError, read_config_file, validate_config
from lm_saes_core.models import KNOWN_SAE_TYPES
from lm_saes_core.runners import (
    AnalyzeSAESettings,
    AutoInterpSettings,
    ConvertTopKToJumpReLUSettings,
    DirectLogitAttributeSettings,
    EvaluateSAESettings,
    GenerateActivationsSettings,
    SweepSAESettings,
    TrainSAESettings,
)

CONFIGS = Path(__file__).parent.parent / "configs"
SEEDS = {
    "quickstart/generate.yaml": GenerateActivationsSettings,
    "quickstart/train.yaml": TrainSAESettings,
    "quickstart/evaluate.yaml": EvaluateSAESettings,
    "quickstart/analyze.yaml": AnalyzeSAESettings,
    "quickstart/dla.yaml": DirectLogitAttributeSettings,
    "quickstart/autointerp.yaml": AutoInterpSettings,
    "quality/circuits/generate.yaml": GenerateActivationsSettings,
    "quality/circuits/sweep.yaml": SweepSAESettings,
    "quality/circuits/convert.yaml": ConvertTopKToJumpReLUSettings,
    "quality/circuits/evaluate.yaml": EvaluateSAESettings,
}

EDGES = [-1, 0, 1, 3, 2**31, 2**63, -0.5, 0.0, 0.5, 1.0, 1.5, 1e30, float("nan"), float("inf"), -float("inf")]
KINDS = [*KNOWN_SAE_TYPES, "SAE", "transcoder", "lorsa", "", None, 3]
VALUES = st.one_of(
    st.sampled_from(EDGES),
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["torch.float32", "bfloat16", "cpu", "activations-2d", "topk", "jumprelu", "dataset-wise"]),
    st.lists(st.one_of(st.integers(), st.text(max_size=6)), max_size=3),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=6)), max_size=2),
)


def locations(node, found=None) -> list[tuple[dict | list, str | int]]:
    """(container, key) of every value in a nested mapping, nested ones included."""
    found = [] if found is None else found
    keys = node.keys() if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else ()
    for key in keys:
        found.append((node, key))
        locations(node[key], found)
    return found


def containers(node) -> list[dict]:
    return [node] + [value for parent, key in locations(node) if isinstance(value := parent[key], dict)]


@st.composite
def mutated(draw, seed: dict) -> dict:
    data = copy.deepcopy(seed)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "sae_type"]))
        if action == "add":
            draw(st.sampled_from(containers(data)))[draw(st.text(min_size=1, max_size=12))] = draw(VALUES)
        elif action == "sae_type":
            kind = draw(st.sampled_from(KINDS))
            for mapping in containers(data):
                if "sae_type" in mapping or "pretrained_name_or_path" in mapping:
                    mapping["sae_type"] = kind
        elif spots := locations(data):
            container, key = draw(st.sampled_from(spots))
            if action == "delete":
                del container[key]
            else:
                container[key] = draw(VALUES)
    return data


@pytest.mark.parametrize("name", SEEDS)
def test_the_shipped_settings_files_validate(name):
    validate_config(SEEDS[name], read_config_file(CONFIGS / name), source=name)


@pytest.mark.parametrize("name", SEEDS)
def test_mutated_settings_validate_or_raise_config_error(name):
    seed = read_config_file(CONFIGS / name)

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(data=mutated(seed))
    def validates_or_names_the_error(data: dict) -> None:
        try:
            validate_config(SEEDS[name], data, source=name)
        except ConfigError as error:
            assert str(error).startswith(f"invalid settings in {name}:")

    validates_or_names_the_error()
