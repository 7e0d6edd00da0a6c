"""Loading saved sparse dictionaries, local or published on the Hugging Face hub, and the runner-side reference to
saved weights (`PretrainedSAE`).

A name is a local path (a directory, or the .safetensors file beside our config.json) or `hf://OWNER/REPO[/SUBFOLDER]
[@REVISION]` (see `models/hub.py`). The folder may hold our layout (any `sae_type`), a SAELens SAE or a sparsify
hookpoint; the layout is told by its files (`interop/layouts.py`) and a peer's dictionary is converted exactly, as
`import_saelens` / `import_sparsify` do.
"""

import re
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from pydantic import field_validator

from lm_saes_core.config import BaseModelConfig, ConfigError
from lm_saes_core.models.base import SparseDictionary
from lm_saes_core.models.config import SparseDictionaryConfig
from lm_saes_core.models.hub import FORM, HubReference, is_hub_name

if TYPE_CHECKING:
    from lm_saes_core.models.feature_parallel import FeatureShards

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class SavedDictionary(NamedTuple):
    """Where a named dictionary lies on this machine, in which layout, and the name a record of it keeps."""

    path: Path
    layout: str
    """"lm-saes" (ours), "saelens" or "sparsify"."""
    source: str
    """An absolute local path, or the hub name pinned to the commit it resolved to."""


def check_pretrained_name(name: str) -> None:
    """A local path or a well-formed hf:// name; ValueError naming the accepted forms otherwise (nothing is read)."""
    if is_hub_name(name):
        HubReference.parse(name)
        return
    scheme = _SCHEME.match(name)
    if scheme is None:
        return
    hint = ""
    if scheme.group(1).lower() == "saelens":
        hint = (
            "; SAELens release names are not resolved here (sae_lens does not install beside TransformerLens 4): "
            "look the release up in SAELens's pretrained_saes.yaml and write hf://<its repo_id>/<the sae_id's path>"
        )
    raise ValueError(f"{name!r}: unsupported scheme {scheme.group(1)}://; give a local path or {FORM}{hint}")


def locate_dictionary(name_or_path: str | Path) -> SavedDictionary:
    """Resolve a local path or hf:// name (downloading into the hub cache when allowed) and tell its layout."""
    from lm_saes_core.interop.layouts import ALL_LAYOUT_FILES, detect_layout, missing_files, no_layout_message

    if not is_hub_name(name_or_path):
        path = Path(name_or_path)
        return SavedDictionary(path, detect_layout(path), str(path.resolve()))
    try:
        reference = HubReference.parse(str(name_or_path))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    folder, commit = reference.resolve(ALL_LAYOUT_FILES)
    try:
        layout = detect_layout(folder)
    except FileNotFoundError:
        layout = None
    if layout is None or missing_files(folder, layout):  # e.g. a folder copied without its weights, or a run's root
        raise reference.not_found(no_layout_message(folder))
    return SavedDictionary(folder, layout, str(reference.pinned(commit)))


def load_sparse_dictionary(
    name_or_path: str | Path,
    *,
    device: str | None = None,
    dtype: torch.dtype | str | None = None,
    fold_activation_scale: bool = False,
    strict_loading: bool = True,
) -> SparseDictionary:
    """Load a saved dictionary (a local path or hf:// name; our layout as the kind its `sae_type` names, or a SAELens
    or sparsify SAE) in eval mode (ready for inference)."""
    from lm_saes_core.interop.layouts import load_layout

    saved = locate_dictionary(name_or_path)
    return load_layout(
        saved.path,
        saved.layout,
        device=device,
        dtype=dtype,
        fold_activation_scale=fold_activation_scale,
        strict_loading=strict_loading,
    )


def read_pretrained_config(name_or_path: str | Path) -> tuple[SparseDictionaryConfig, dict]:
    """(the validated config, the config as a record stores it) of a saved dictionary, without loading its weights."""
    from lm_saes_core.interop.layouts import read_layout_config

    saved = locate_dictionary(name_or_path)
    return read_layout_config(saved.path, saved.layout)


class PretrainedSAE(BaseModelConfig):
    """Saved weights to start from or to evaluate/analyse: a local directory (written by `save_pretrained`, or a
    SAELens or sparsify SAE directory) or a dictionary published on the Hugging Face hub."""

    pretrained_name_or_path: str
    """A local path, or `hf://OWNER/REPO[/SUBFOLDER][@REVISION]` (e.g. `hf://EleutherAI/sae-pythia-70m-32k/layers.3`,
    a SAELens release's `hf://<repo_id>/<path>`), fetched into the Hugging Face cache when the job runs (read from
    it alone with HF_HUB_OFFLINE=1)."""
    fold_activation_scale: bool = True
    """Fold a dataset-wise model's activation scale into its weights after loading, so it takes raw activations."""
    strict_loading: bool = True

    @field_validator("pretrained_name_or_path")
    @classmethod
    def _known_form(cls, value: str) -> str:
        check_pretrained_name(value)
        return value

    def locate(self) -> SavedDictionary:
        return locate_dictionary(self.pretrained_name_or_path)

    def load(self, shards: "FeatureShards | None" = None) -> SparseDictionary:
        """The dictionary; with `shards`, this process's feature shard of it (from our layout, only its slices are
        read)."""
        saved = self.locate() if shards is not None else None
        if saved is not None and saved.layout == "lm-saes":
            return SparseDictionary.from_pretrained(
                saved.path,
                device=self.device,
                dtype=self.dtype,
                fold_activation_scale=self.fold_activation_scale,
                strict_loading=self.strict_loading,
                shards=shards,
            )
        model = load_sparse_dictionary(
            self.pretrained_name_or_path,
            device=self.device,
            dtype=self.dtype,
            fold_activation_scale=self.fold_activation_scale,
            strict_loading=self.strict_loading,
        )
        if shards is None:
            return model
        from lm_saes_core.models.feature_parallel import shard_model

        return shard_model(model, shards)

    def read_config(self) -> tuple[SparseDictionaryConfig, dict]:
        """(the validated config, the config as a record stores it), without loading the weights."""
        return read_pretrained_config(self.pretrained_name_or_path)

    def source(self) -> str:
        """What a record of this dictionary keeps: its absolute path, or its hub name pinned to the resolved commit."""
        return self.locate().source
