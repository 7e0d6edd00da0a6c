"""Atomic file writes: every artefact is written under a temporary name in its final directory and renamed,
so a crash, a full disk or Ctrl-C never leaves a file that looks complete."""

import hashlib
import os
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

TMP_MARKER = ".tmp-"


def temporary_path(path: Path) -> Path:
    return path.with_name(f"{TMP_MARKER}{uuid.uuid4().hex[:8]}-{path.name}")


def is_temporary(path: Path) -> bool:
    return path.name.startswith(TMP_MARKER)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to `path`; on success fsync and rename it to `path`, on failure remove it."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` and check that files can be created in it, with an error naming the directory."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temporary_path(path / "write-probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"output directory {path} is not writable: {exc.strerror or exc}") from exc
    return path


def read_json_object(path: Path, error: type[Exception] = ValueError) -> dict:
    """A JSON file that must hold an object; unreadable JSON or another top-level type raises `error` naming it."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"cannot parse {path} as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (data versions of artefacts)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
