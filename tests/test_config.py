"""Settings: file formats, unknown keys, dtype spellings, no environment overrides."""

import json

import pytest
import torch

from lm_saes_core.activation.config import ActivationFactoryConfig, ActivationFactoryTarget
from lm_saes_core.config import ConfigError, apply_overrides, dtype_name, load_config, parse_dtype
from lm_saes_core.runners.generate import GenerateActivationsSettings

SETTINGS = {
    "model": {"model_name": "smollm2-135m", "dtype": "torch.bfloat16"},
    "dataset": {"dataset_name_or_path": "python-docs"},
    "hook_points": ["blocks.6.hook_resid_post"],
    "output_dir": "out",
    "batch_size": 8,
    "total_tokens": 1024,
}


@pytest.mark.parametrize(
    ("spelling", "dtype"),
    [
        ("float32", torch.float32),
        ("torch.float32", torch.float32),
        ("fp32", torch.float32),
        ("torch.float", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("half", torch.float16),
        (torch.float64, torch.float64),
    ],
)
def test_dtype_spellings_parse_to_one_canonical_name(spelling, dtype):
    assert parse_dtype(spelling) is dtype
    assert (
        dtype_name(parse_dtype(spelling))
        == "torch."
        + {
            torch.float32: "float32",
            torch.bfloat16: "bfloat16",
            torch.float16: "float16",
            torch.float64: "float64",
        }[dtype]
    )


def test_unknown_dtype_lists_accepted_names():
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*bfloat16"):
        parse_dtype("float8")


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_settings_load_from_each_file_format_and_round_trip(tmp_path, suffix):
    path = tmp_path / f"settings{suffix}"
    if suffix == ".yaml":
        import yaml

        path.write_text(yaml.safe_dump(SETTINGS))
    elif suffix == ".json":
        path.write_text(json.dumps(SETTINGS))
    else:
        path.write_text(
            'hook_points = ["blocks.6.hook_resid_post"]\noutput_dir = "out"\nbatch_size = 8\ntotal_tokens = 1024\n'
            '[model]\nmodel_name = "smollm2-135m"\ndtype = "torch.bfloat16"\n'
            '[dataset]\ndataset_name_or_path = "python-docs"\n'
        )
    settings = load_config(GenerateActivationsSettings, path)
    assert settings.model.dtype is torch.bfloat16
    assert settings.target is ActivationFactoryTarget.ACTIVATIONS_2D
    dumped = settings.model_dump(mode="json")
    assert dumped["model"]["dtype"] == "torch.bfloat16"
    assert GenerateActivationsSettings.model_validate(dumped) == settings


def test_unknown_key_is_an_error_naming_the_key_and_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**SETTINGS, "model": {"model_name": "x", "d_model": 576}}))
    with pytest.raises(ConfigError, match=r"bad.json[\s\S]*unknown key 'model.d_model'"):
        load_config(GenerateActivationsSettings, path)


def test_overrides_are_applied_and_validated(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SETTINGS))
    settings = load_config(GenerateActivationsSettings, path, ["batch_size=16", "model.dtype=float16"])
    assert settings.batch_size == 16 and settings.model.dtype is torch.float16
    with pytest.raises(ConfigError, match="field 'batch_size'"):
        load_config(GenerateActivationsSettings, path, ["batch_size=-1"])


def test_an_override_indexes_lists_and_names_what_it_cannot_reach():
    data = {"factory": {"sources": [{"path": "a"}, {"path": "b"}]}, "hooks": ["x"], "n": 3}
    apply_overrides(data, ["factory.sources.1.path=c", "factory.sources.-2.name=first", "hooks.0=y", "n=4"])
    assert data == {"factory": {"sources": [{"path": "a", "name": "first"}, {"path": "c"}]}, "hooks": ["y"], "n": 4}
    with pytest.raises(ConfigError, match=r"'factory.sources' is a list of 2; '2' is not one of its indices"):
        apply_overrides(data, ["factory.sources.2.path=d"])
    with pytest.raises(ConfigError, match=r"'factory.sources' is a list of 2; 'path' is not one of its indices"):
        apply_overrides(data, ["factory.sources.path=d"])
    with pytest.raises(ConfigError, match=r"'n' is not a mapping or a list"):
        apply_overrides(data, ["n.m=1"])


def test_environment_variables_do_not_change_settings(tmp_path, monkeypatch):
    for name in ("BATCH_SIZE", "MODEL_NAME", "OUTPUT_DIR", "batch_size", "TOTAL_TOKENS"):
        monkeypatch.setenv(name, "999")
    path = tmp_path / "s.json"
    path.write_text(json.dumps(SETTINGS))
    settings = load_config(GenerateActivationsSettings, path)
    assert settings.batch_size == 8 and settings.output_dir == "out" and settings.total_tokens == 1024


def test_missing_file_and_unsupported_suffix(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(GenerateActivationsSettings, tmp_path / "nope.yaml")
    (tmp_path / "s.ini").write_text("x")
    with pytest.raises(ConfigError, match="unsupported config file type '.ini'"):
        load_config(GenerateActivationsSettings, tmp_path / "s.ini")


def test_total_tokens_must_fill_whole_windows_for_2d():
    with pytest.raises(ValueError, match=r"total_tokens \(1000\) must be a multiple of context_size \(128\)"):
        GenerateActivationsSettings.model_validate({**SETTINGS, "total_tokens": 1000})
    GenerateActivationsSettings.model_validate({**SETTINGS, "total_tokens": 1000, "target": "activations-1d"})


def test_sources_are_discriminated_on_type():
    cfg = ActivationFactoryConfig.model_validate(
        {
            "sources": [{"type": "dataset", "name": "a"}, {"type": "activations", "name": "b", "path": "/x"}],
            "target": "activations-1d",
            "hook_points": ["h"],
            "batch_size": 4,
        }
    )
    assert [type(s).__name__ for s in cfg.sources] == [
        "ActivationFactoryDatasetSource",
        "ActivationFactoryActivationsSource",
    ]
    with pytest.raises(ValueError, match="path"):
        ActivationFactoryConfig.model_validate(
            {
                "sources": [{"type": "activations", "name": "b"}],
                "target": "activations-1d",
                "hook_points": ["h"],
                "batch_size": 4,
            }
        )
