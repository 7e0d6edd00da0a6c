"""Repositories written into a Hugging Face hub cache exactly as `huggingface_hub` (2.x) lays them out after a
`snapshot_download`, for tests that load published files with no network:

    $HF_HUB_CACHE/models--OWNER--REPO/
        blobs/<etag>                          the file contents, named by git blob sha1, or sha256 for LFS files
        refs/<branch or tag>                  the commit hash it points at (no newline)
        snapshots/<commit>/<path>             relative symlinks into ../blobs
        trees/<commit>.json                   the commit's file listing, which marks a snapshot complete or not
"""

import hashlib
import json
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".pt", ".bin", ".npz")
"""Files the hub stores through git LFS (their etag is the content's sha256)."""


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def publish(
    cache: Path, repo_id: str, files: dict[str, Path], *, refs: tuple[str, ...] = ("main",), salt: str = ""
) -> str:
    """Put `files` ({path in the repository: local file}, a folder's files under "folder/name") into `cache` as
    one commit of `repo_id` that `refs` point at; returns the commit hash (derived from the contents and `salt`)."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    contents = {path: Path(local).read_bytes() for path, local in sorted(files.items())}
    commit = hashlib.sha1(
        (salt + "".join(f"{path}:{hashlib.sha256(data).hexdigest()}" for path, data in contents.items())).encode()
    ).hexdigest()
    listing = {}
    for path, data in contents.items():
        is_lfs = path.endswith(LFS_SUFFIXES)
        etag = hashlib.sha256(data).hexdigest() if is_lfs else _git_blob_sha1(data)
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        entry: dict = {"size": len(data), "blob_id": _git_blob_sha1(data)}
        if is_lfs:  # the git blob of an LFS file is its pointer
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{etag}\nsize {len(data)}\n".encode()
            entry = {"size": len(data), "blob_id": _git_blob_sha1(pointer), "lfs_sha256": etag, "lfs_size": len(data)}
        listing[path] = entry
    (storage / "trees").mkdir(parents=True, exist_ok=True)
    (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}, indent=1))
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return commit


def folder_files(folder: Path, prefix: str) -> dict[str, Path]:
    """{f"{prefix}/{name}": file} for the files of a local folder (a dictionary published as repository folder
    `prefix`; "" for the repository's root)."""
    return {f"{prefix}/{path.name}".lstrip("/"): path for path in sorted(folder.iterdir()) if path.is_file()}
