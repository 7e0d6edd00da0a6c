"""Writing a stream of activations to disk as chunked safetensors/pt files with JSON sidecars and a manifest.

Every file goes through a temporary name and a rename, chunk files before their sidecars, and the manifest last:
a directory without a manifest is an unfinished run and is cleaned before the next run writes into it.
"""

import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm.auto import tqdm

from lm_saes_core.activation.buffer import ActivationBatcher, Item, n_rows, take_rows
from lm_saes_core.activation.cache_format import (
    FORMAT_VERSION,
    ActivationCacheError,
    chunk_name,
    hook_dir,
    manifest_name,
    parse_chunk_name,
)
from lm_saes_core.config import BaseConfig, dtype_name
from lm_saes_core.io import atomic_path, atomic_write_text, ensure_writable_dir, is_temporary

logger = logging.getLogger(__name__)


class ActivationWriterConfig(BaseConfig):
    hook_points: list[str] = Field(min_length=1)
    cache_dir: str = "activations"
    total_generating_tokens: int | None = Field(default=None, gt=0)
    """Stop after exactly this many token positions (rows x context for 2-D data, rows for 1-D)."""
    n_samples_per_chunk: int | None = Field(default=None, gt=0)
    """Rows (sequences for 2-D, tokens for 1-D) per chunk file; None = one stream batch per chunk."""
    format: Literal["safetensors", "pt"] = "safetensors"
    num_workers: int | None = Field(default=None, ge=0)
    """Threads writing chunks while the model computes the next ones; None or 0 writes synchronously."""
    overwrite: bool = False
    """Replace a complete cache found in `cache_dir` (otherwise that is an error)."""


def positions_of(item: Item) -> int:
    """Token positions in an item: rows x context for (B, S) tokens, rows for (N,) tokens."""
    return item["tokens"].numel()


class ActivationWriter:
    def __init__(
        self, cfg: ActivationWriterConfig, *, shard: int | None = None, provenance: dict[str, Any] | None = None
    ):
        self.cfg = cfg
        self.shard = shard
        self.provenance = provenance or {}
        self.root = Path(cfg.cache_dir)
        self._prepared = False

    @property
    def manifest_path(self) -> Path:
        return self.root / manifest_name(self.shard)

    def prepare(self) -> None:
        """Check the directory is writable, refuse to clobber a complete cache, clean an unfinished run."""
        ensure_writable_dir(self.root)
        if self.manifest_path.exists():
            if not self.cfg.overwrite:
                raise FileExistsError(
                    f"{self.root} already holds a complete activation cache ({self.manifest_path.name}); "
                    "set overwrite=true to replace it or choose another output_dir"
                )
            self.manifest_path.unlink()  # first, so an interrupted overwrite never looks complete
        removed = 0
        for hook in self.cfg.hook_points:
            directory = ensure_writable_dir(hook_dir(self.root, hook))
            for path in directory.iterdir():
                if is_temporary(path) or self._is_own_chunk_file(path):
                    path.unlink()
                    removed += 1
        if removed:
            logger.info("removed %d files of an unfinished or replaced run in %s", removed, self.root)
        self._prepared = True

    def _is_own_chunk_file(self, path: Path) -> bool:
        stem = path.name.split(".")[0]
        try:
            shard, _ = parse_chunk_name(stem)
        except ValueError:
            return False
        return (self.shard is None and not stem.startswith("shard-")) or (
            self.shard is not None and shard == self.shard
        )

    def write(self, stream: Iterable[Item], *, expected_tokens: int | None = None) -> dict[str, Any]:
        """Write the stream (stopping at `total_generating_tokens`) and return the manifest."""
        if not self._prepared:
            self.prepare()
        limit = self.cfg.total_generating_tokens
        chunks: list[dict[str, Any]] = []
        item_meta: dict[str, Any] = {}
        written_positions = 0
        workers = self.cfg.num_workers or 0
        executor = ThreadPoolExecutor(max_workers=workers) if workers else None
        pending: list[Future] = []
        bar = tqdm(total=limit or expected_tokens, unit="tok", unit_scale=True, desc="writing activations")
        try:
            for item in self._chunked(self._limited(stream, limit)):
                if not item_meta:
                    item_meta = self._describe(item)
                name = chunk_name(len(chunks), self.shard)
                info = {
                    "name": name,
                    "n_rows": n_rows(item),
                    "n_tokens": positions_of(item),
                    "n_real_tokens": int(item["mask"].sum()) if "mask" in item else n_rows(item),
                }
                chunks.append(info)
                if executor is None:
                    self._write_chunk(name, item)
                else:
                    pending.append(executor.submit(self._write_chunk, name, item))
                    while len(pending) > 2 * workers:
                        pending.pop(0).result()
                written_positions += info["n_tokens"]
                bar.update(info["n_tokens"])
            for future in pending:
                future.result()
        except BaseException:
            for future in pending:
                future.cancel()
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            bar.close()
        if executor is not None:
            executor.shutdown(wait=True)
        if not chunks:
            raise ActivationCacheError(f"the activation stream was empty: nothing was written to {self.root}")
        if limit is not None and written_positions < limit:
            logger.warning("the data ran out after %d of the %d requested tokens", written_positions, limit)
        manifest = {
            "format_version": FORMAT_VERSION,
            "complete": True,
            "shard": self.shard,
            "hook_points": self.cfg.hook_points,
            "format": self.cfg.format,
            **item_meta,
            "n_chunks": len(chunks),
            "n_tokens": written_positions,
            "n_real_tokens": sum(chunk["n_real_tokens"] for chunk in chunks),
            "requested_tokens": limit,
            "chunks": chunks,
            "provenance": self.provenance,
        }
        atomic_write_text(self.manifest_path, json.dumps(manifest, indent=1))
        return manifest

    def _limited(self, stream: Iterable[Item], limit: int | None) -> Iterable[Item]:
        """Pass items through until exactly `limit` positions; the generator upstream is closed when done."""
        if limit is None:
            yield from stream
            return
        seen = 0
        for item in stream:
            positions = positions_of(item)
            if seen + positions >= limit:
                per_row = positions // n_rows(item)
                rows_needed = (limit - seen) // per_row
                if rows_needed * per_row != limit - seen:
                    raise ValueError(
                        f"total tokens {limit} is not a whole number of rows of {per_row} positions; "
                        "for 2-D activations use a multiple of context_size"
                    )
                if rows_needed:
                    yield take_rows(item, slice(0, rows_needed))
                return
            seen += positions
            yield item

    def _chunked(self, stream: Iterable[Item]) -> Iterable[Item]:
        if self.cfg.n_samples_per_chunk is None:
            return stream
        return ActivationBatcher(self.cfg.n_samples_per_chunk)(stream)

    def _describe(self, item: Item) -> dict[str, Any]:
        missing = [hook for hook in self.cfg.hook_points if hook not in item]
        if missing:
            raise KeyError(f"stream items lack hook points {missing}; they have {sorted(item)}")
        first = item[self.cfg.hook_points[0]]
        return {
            "dtype": dtype_name(first.dtype),
            "hook_dims": {hook: int(item[hook].shape[-1]) for hook in self.cfg.hook_points},
            "layout": "2d" if item["tokens"].ndim == 2 else "1d",
            "context_size": int(item["tokens"].shape[1]) if item["tokens"].ndim == 2 else None,
        }

    def _write_chunk(self, name: str, item: Item) -> None:
        item = {key: _compact(value.detach().to("cpu")) for key, value in item.items()}  # once for every hook's file
        extras = {key: value for key, value in item.items() if key not in self.cfg.hook_points}
        sidecar_lists = {key: extras[key].tolist() for key in ("tokens", "doc_index", "doc_position") if key in extras}
        for hook in self.cfg.hook_points:
            tensors = {"activation": item[hook], **extras}
            directory = hook_dir(self.root, hook)
            path = directory / f"{name}.{self.cfg.format}"
            try:
                with atomic_path(path) as tmp:
                    if self.cfg.format == "safetensors":
                        save_file(tensors, str(tmp), metadata={"hook_point": hook, "chunk": name})
                    else:
                        torch.save(tensors, tmp)
                sidecar = {
                    "hook_point": hook,
                    "chunk": name,
                    "file": path.name,
                    "file_bytes": os.path.getsize(path),
                    "shapes": {key: list(value.shape) for key, value in tensors.items()},
                    "dtypes": {key: dtype_name(value.dtype) for key, value in tensors.items()},
                    **sidecar_lists,
                }
                atomic_write_text(directory / f"{name}.json", json.dumps(sidecar, separators=(",", ":")))
            except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as SafetensorError
                reason = getattr(exc, "strerror", None) or str(exc)
                raise OSError(
                    getattr(exc, "errno", None),
                    f"writing {path} failed ({reason}); the cache is not marked complete "
                    "(no manifest) and the next run into this directory starts it over",
                ) from exc


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in memory of its own: a batch can be a view of a larger item, and `torch.save` writes a view's whole
    storage."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)
