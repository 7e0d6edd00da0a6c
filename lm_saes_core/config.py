"""Configuration base classes, dtype parsing and loading settings from YAML/TOML/JSON files.

Every config is a plain pydantic v2 model that forbids unknown keys, so a typo is an error naming the key
instead of a silently ignored setting. Settings never read environment variables; the only variables the
package reads are the explicitly prefixed `LM_SAES_*` ones in this module, and the secrets a setting names by
their variable (`AutoInterpConfig.api_key_env`, `MongoDBConfig.mongo_password_env`), read when they are used so that
no settings dump, log line or error message can hold them.
"""

import json
import os
import re
import tomllib
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import InitErrorDetails

# One table of accepted spellings; the first name of each dtype is its canonical (saved) spelling.
_DTYPE_NAMES: dict[torch.dtype, tuple[str, ...]] = {
    torch.float32: ("float32", "float", "fp32"),
    torch.float16: ("float16", "half", "fp16"),
    torch.bfloat16: ("bfloat16", "bf16"),
    torch.float64: ("float64", "double", "fp64"),
    torch.int8: ("int8",),
    torch.int16: ("int16",),
    torch.int32: ("int32", "int"),
    torch.int64: ("int64", "long"),
    torch.bool: ("bool",),
}
_DTYPE_BY_NAME = {name: dtype for dtype, names in _DTYPE_NAMES.items() for name in names}


def parse_dtype(value: Any) -> torch.dtype:
    """Accept a torch.dtype or a string such as "bfloat16", "torch.float16", "fp32"."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        if name in _DTYPE_BY_NAME:
            return _DTYPE_BY_NAME[name]
    accepted = ", ".join(sorted(_DTYPE_BY_NAME))
    raise ValueError(f"unknown dtype {value!r}; accepted: {accepted} (optionally prefixed with 'torch.')")


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical spelling of a dtype, e.g. torch.float32 -> "torch.float32"."""
    return f"torch.{_DTYPE_NAMES[dtype][0]}"


DType = Annotated[torch.dtype, BeforeValidator(parse_dtype), PlainSerializer(dtype_name, return_type=str)]


def _step_count(value: int | float, info: ValidationInfo) -> int | float:
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{info.field_name}={value}: a float is a fraction of the total steps and must lie in [0, 1]; give an "
            "int for an absolute number of steps"
        )
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{info.field_name}={value} must not be negative")
    return value


StepCount = Annotated[int | float, AfterValidator(_step_count)]
"""An int is a number of steps; a float in [0, 1] is a fraction of the total number of training steps."""


class BaseConfig(BaseModel):
    """Base of every config: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)


class BaseModelConfig(BaseConfig):
    """A config of something that lives on a device with a dtype (language models, dictionaries)."""

    device: str = "cpu"
    dtype: DType = torch.float32


class UserError(Exception):
    """A problem the person running a job can fix: a setting, a file, a store or an endpoint that is not as it should
    be. The message alone says what and where, so the CLI prints it as it is, without a traceback."""


class ConfigError(UserError, ValueError):
    """A settings file or mapping that cannot be turned into a valid config; the message names file and field."""


def field_error(location: str, message: str, value: Any) -> ValidationError:
    """An error about the field at dotted `location` (relative to the model being validated) with its `value`, for a
    model validator to raise when a check spans several fields but one of them is wrong: pydantic reports it at that
    field (under the model's own location) instead of at the whole model."""
    loc = tuple(int(part) if part.isdigit() else part for part in location.split("."))
    detail = InitErrorDetails(type="value_error", loc=loc, input=value, ctx={"error": message})
    return ValidationError.from_exception_data("settings", [detail])


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid settings in {source}:"]
    for item in error.errors():
        location = ".".join(_without_repeats(item["loc"])) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{location}' (not a field of this config; check the spelling)")
        elif item["type"] == "missing":
            lines.append(f"  missing required field '{location}'")
        else:
            value = item.get("input")
            got = "" if isinstance(value, dict | list | BaseModel) else f" (got {value!r})"  # a section says nothing
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"  field '{location}': {message}{got}")
    return "\n".join(lines)


def _without_repeats(location: tuple) -> list[str]:
    """A location's parts, a part equal to the one before it dropped: a discriminated union adds the kind it chose to
    the location (`sae.sae.d_model` for the field `sae` holding an SAE), which a person reads as `sae.d_model`."""
    parts = [str(part) for part in location]
    return [part for index, part in enumerate(parts) if index == 0 or part != parts[index - 1]]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file into a plain mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"unsupported config file type '{suffix}' for {path}; use .yaml, .yml, .toml or .json")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a mapping of settings at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML) to a nested mapping; a number indexes a list
    (`activation_factory.sources.0.path=...`)."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r} must look like key.sub_key=value")
        parts = key.split(".")
        target: Any = data
        for depth, part in enumerate(parts[:-1]):
            index = _override_index(target, part, override, parts[:depth])
            target = target.setdefault(index, {}) if isinstance(target, dict) else target[index]
        target[_override_index(target, parts[-1], override, parts[:-1])] = yaml.safe_load(raw)
    return data


def _override_index(target: Any, part: str, override: str, path: list[str]) -> str | int:
    """`part` as a key of the mapping or an index of the list `target` (reached by `path`), or the error naming it."""
    if isinstance(target, dict):
        return part
    if not isinstance(target, list):
        raise ConfigError(f"override {override!r}: '{path[-1]}' is not a mapping or a list")
    if not part.lstrip("-").isdigit() or not -len(target) <= int(part) < len(target):
        raise ConfigError(
            f"override {override!r}: '{'.'.join(path)}' is a list of {len(target)}; '{part}' is not one of its indices"
        )
    return int(part)


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def validate_config(cls: type[ConfigT], data: dict[str, Any], source: str = "settings") -> ConfigT:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(cls: type[ConfigT], path: str | Path, overrides: list[str] | None = None) -> ConfigT:
    """Load and validate a config of type `cls` from a file, with optional `key=value` overrides."""
    data = apply_overrides(read_config_file(path), overrides or [])
    return validate_config(cls, data, source=str(path))


def save_config(config: BaseModel, path: str | Path) -> None:
    """Write a config as JSON (or YAML by suffix) atomically."""
    from lm_saes_core.io import atomic_write_text

    path = Path(path)
    payload = config.model_dump(mode="json")
    text = (
        yaml.safe_dump(payload, sort_keys=False) if path.suffix in (".yaml", ".yml") else json.dumps(payload, indent=2)
    )
    atomic_write_text(path, text)


def lm_saes_home() -> Path:
    """Artefact root: `$LM_SAES_HOME`, default `./.lm_saes`."""
    return Path(os.environ.get("LM_SAES_HOME", ".lm_saes")).expanduser()


def lm_saes_cache() -> Path:
    """Cache of converted models and built corpora, shared by runs: `$LM_SAES_CACHE`, default `~/.cache/lm_saes`."""
    return Path(os.environ.get("LM_SAES_CACHE", Path.home() / ".cache" / "lm_saes")).expanduser()


_URL_PASSWORD = re.compile(r"(//[^:@/\s]*):[^@/\s]*@")


def redact_credentials(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` URL in it replaced by ***."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def scrub_secrets(text: str, secrets: list[str | None]) -> str:
    """`text` without URL passwords and without any of `secrets` (as given, or URL-quoted) in it."""
    text = redact_credentials(text)
    for secret in secrets:
        if secret:
            for form in {secret, urllib.parse.quote_plus(secret), urllib.parse.quote(secret, safe="")}:
                text = text.replace(form, "***")
    return text


class MongoDBConfig(BaseConfig):
    """Where the MongoDB record store lives (used by the record store; see `lm_saes_core.store`). A password comes
    from the environment (`mongo_password_env`), never from a settings file: settings are dumped beside outputs,
    into W&B and Dagster, and quoted in errors."""

    mongo_uri: str = "mongodb://localhost:27017/"
    """Without a password: `mongodb://host:27017/`, or `mongodb://USER@host:27017/` with `mongo_password_env`."""
    mongo_db: str = "mechinterp"
    mongo_password_env: str | None = None
    """Environment variable holding the password of the user `mongo_uri` names; None connects as the URI says."""

    @model_validator(mode="after")
    def _password_goes_with_a_user(self) -> "MongoDBConfig":
        if self.mongo_password_env is None:
            return self
        match = re.match(r"^mongodb(?:\+srv)?://([^@/]*)@", self.mongo_uri)
        if match is None or not match.group(1) or ":" in match.group(1):
            raise field_error(
                "mongo_uri",
                f"with mongo_password_env ({self.mongo_password_env}) the URI must name the user and no password: "
                "mongodb://USER@host:27017/",
                redact_credentials(self.mongo_uri),
            )
        return self

    def connection_uri(self) -> str:
        """The URI to connect with: `mongo_uri` with the password from `mongo_password_env` (URL-quoted) after its
        user. For the client only: never log it or put it in a message."""
        if self.mongo_password_env is None:
            return self.mongo_uri
        password = os.environ.get(self.mongo_password_env)
        if not password:
            raise ConfigError(
                f"mongo.mongo_password_env: the environment variable {self.mongo_password_env} holds no password for "
                f"{redact_credentials(self.mongo_uri)}; set it, or unset mongo_password_env"
            )
        scheme, _, rest = self.mongo_uri.partition("://")
        user, _, hosts = rest.partition("@")
        return f"{scheme}://{user}:{urllib.parse.quote_plus(password)}@{hosts}"
