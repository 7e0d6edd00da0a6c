"""Published dictionaries by name: `hf://OWNER/REPO[/SUBFOLDER][@REVISION]` names a folder of a Hugging Face model
repository, resolved with `huggingface_hub.snapshot_download` into the local hub cache (downloaded there when the hub
is reachable and `HF_HUB_OFFLINE` is not set; read from the cache otherwise).

huggingface_hub reads `HF_HUB_CACHE` / `HF_HOME` and `HF_HUB_OFFLINE` once, when it is first imported; they are read
again here at resolution time, so a process (or a test) that sets them after that import is honoured.

A SAELens release is a name for such a folder: its `pretrained_saes.yaml` maps the release to a `repo_id` and each
`sae_id` to a `path` in that repository, so `SAE.from_pretrained(release, sae_id)` is `hf://<repo_id>/<path>` here.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lm_saes_core.config import UserError

HUB_PREFIX = "hf://"
DEFAULT_REVISION = "main"

# Hub repository names: letters, digits, '-', '_', '.'; no '--' or '..'; not ending in '.git' (huggingface_hub's
# validate_repo_id). A revision is a branch, a tag, a commit hash, or a pull request's refs/pr/N.
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*|refs/(?:pr|convert)/[A-Za-z0-9._-]+")
_COMMIT_HASH = re.compile(r"[0-9a-f]{40}")
FORM = "hf://OWNER/REPO[/SUBFOLDER][@REVISION]"


class HubDictionaryNotFoundError(UserError, FileNotFoundError):
    """A published dictionary that is neither in the local Hugging Face cache nor downloadable now; the message names
    the repository, folder and revision, what is missing, and the command that fetches it."""


def is_hub_name(name: str | Path) -> bool:
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


@dataclass(frozen=True)
class HubReference:
    """A folder of a Hugging Face model repository at a revision (`subfolder` "" is the repository's root)."""

    repo_id: str
    subfolder: str = ""
    revision: str | None = None

    @classmethod
    def parse(cls, name: str) -> "HubReference":
        """`hf://OWNER/REPO[/SUBFOLDER][@REVISION]`; ValueError saying what is wrong and the accepted form."""
        if not name.startswith(HUB_PREFIX):
            raise ValueError(f"{name!r} is not a hub name: expected {FORM}")
        body, at, revision = name.removeprefix(HUB_PREFIX).partition("@")
        parts = body.strip("/").split("/")
        if len(parts) < 2 or not all(parts):
            raise ValueError(f"{name!r}: expected {FORM}, e.g. hf://EleutherAI/sae-pythia-70m-32k/layers.3")
        owner, repo, folders = parts[0], parts[1], parts[2:]
        for part, what in ((owner, "owner"), (repo, "repository")):
            if not _REPO_PART.fullmatch(part) or "--" in part or ".." in part or part.endswith(".git"):
                raise ValueError(
                    f"{name!r}: {what} {part!r} is not a Hugging Face name (letters, digits, '-', '_', '.'; no '--' "
                    f"or '..'); expected {FORM}"
                )
        bad = [folder for folder in folders if folder in (".", "..") or "\\" in folder]
        if bad:
            raise ValueError(f"{name!r}: subfolder part {bad[0]!r} is not allowed (no '.', '..' or '\\')")
        if at and not _REVISION.fullmatch(revision):
            raise ValueError(
                f"{name!r}: revision {revision!r} is not a branch, tag, commit hash or refs/pr/N; the revision comes "
                f"last: {FORM}"
            )
        return cls(f"{owner}/{repo}", "/".join(folders), revision if at else None)

    def __str__(self) -> str:
        folder = f"/{self.subfolder}" if self.subfolder else ""
        return f"{HUB_PREFIX}{self.repo_id}{folder}" + (f"@{self.revision}" if self.revision else "")

    def describe(self) -> str:
        """The repository, folder and revision in words, for messages."""
        folder = f"folder {self.subfolder!r}" if self.subfolder else "root"
        return f"{folder} of {self.repo_id} at revision {self.revision or DEFAULT_REVISION!r}"

    def download_command(self) -> str:
        include = f" --include '{self.subfolder}/*'" if self.subfolder else ""
        revision = f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo_id}{include}{revision}"

    def pinned(self, commit: str) -> "HubReference":
        """This folder at `commit`: what a record of the dictionary keeps, to name the same weights after the branch
        moves."""
        return HubReference(self.repo_id, self.subfolder, commit)

    def resolve(self, root_files: tuple[str, ...]) -> tuple[Path, str]:
        """(the local folder holding this reference's files, in the hub cache's snapshot, and that snapshot's commit).

        A subfolder is fetched whole (`SUBFOLDER/*`); the repository's root only as `root_files`, so that the other
        dictionaries of a repository with one folder per dictionary are not downloaded with it."""
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        cache_dir, offline = hub_cache_dir(), hub_offline()
        patterns = [f"{self.subfolder}/*"] if self.subfolder else list(root_files)
        try:
            snapshot = Path(
                snapshot_download(
                    self.repo_id,
                    revision=self.revision,
                    allow_patterns=patterns,
                    cache_dir=cache_dir,
                    local_files_only=offline,
                )
            )
        except (LocalEntryNotFoundError, HfHubHTTPError) as exc:
            missing = [self._missing_from_cache(cache_dir, exc)] if isinstance(exc, LocalEntryNotFoundError) else []
            if not offline:
                missing.append(f"downloading it failed: {_first_line(exc)}")
            raise self.not_found("; ".join(missing)) from exc
        folder = snapshot / self.subfolder if self.subfolder else snapshot
        if not folder.is_dir():
            entries = sorted(path.name for path in snapshot.iterdir()) if snapshot.is_dir() else []
            missing = f"snapshot {snapshot.name} has no folder {self.subfolder!r} (its top level: {entries})"
            raise self.not_found(missing)
        return folder, snapshot.name

    def _missing_from_cache(self, cache_dir: str, error: Exception) -> str:
        """What the cache lacks for this reference, in words."""
        storage = Path(cache_dir) / f"models--{self.repo_id.replace('/', '--')}"
        revision = self.revision or DEFAULT_REVISION
        if not storage.is_dir():
            return f"the cache has no copy of {self.repo_id} (no {storage})"
        refs = storage / "refs"
        if _COMMIT_HASH.fullmatch(revision):
            commit = revision
        elif (refs / revision).is_file():
            commit = (refs / revision).read_text().strip()
        else:
            known = sorted(str(path.relative_to(refs)) for path in refs.rglob("*") if path.is_file())
            return f"the cache has {self.repo_id} but no revision {revision!r} (cached refs: {known})"
        if not (storage / "snapshots" / commit).is_dir():
            return f"the cache has no snapshot of commit {commit} (revision {revision!r}) of {self.repo_id}"
        return _first_line(error)  # e.g. an incomplete snapshot: huggingface_hub names the missing files

    def not_found(self, missing: str) -> HubDictionaryNotFoundError:
        """The error for this reference when the cache lacks `missing` (words) and nothing could be downloaded."""
        cache_dir = hub_cache_dir()
        mode = "HF_HUB_OFFLINE is set: nothing is downloaded" if hub_offline() else "after downloading what it could"
        return HubDictionaryNotFoundError(
            f"{self}: no complete dictionary for the {self.describe()} in the Hugging Face cache {cache_dir} ({mode}): "
            f"{missing}. "
            f"Fetch it on a machine with network access with `{self.download_command()}` (`huggingface-cli download` "
            "with huggingface_hub < 1.0), then copy that machine's cache folder "
            f"models--{self.repo_id.replace('/', '--')} into {cache_dir} (or point HF_HUB_CACHE at a copy)."
        )


def hub_cache_dir() -> str:
    """The hub cache as huggingface_hub would choose it from the environment now: HF_HUB_CACHE (or the older
    HUGGINGFACE_HUB_CACHE), else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub or ~/.cache/huggingface/hub."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not cache:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set to 1/on/yes/true now, or when huggingface_hub was imported."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
