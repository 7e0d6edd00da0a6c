"""Reading cached activations: manifest-checked, chunk by chunk, with threads prefetching the next chunks."""

import os
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lm_saes_core.activation.buffer import Item
from lm_saes_core.activation.cache_format import (
    FORMAT_VERSION,
    ActivationCacheError,
    ChunkMismatchError,
    hook_dir,
    parse_chunk_name,
    read_json,
)
from lm_saes_core.config import dtype_name

REQUIRED_TENSORS = ("activation", "tokens")
_FILE_BYTES = re.compile(rb'"file_bytes"\s*:\s*(\d+)')


def written_bytes(sidecar: Path) -> int:
    """The size a chunk file had when written, as its sidecar records it. The writer puts `file_bytes` before the
    token lists that make up nearly all of a sidecar, so the head of the file is read, not the whole JSON (which
    would cost about as much as reading the chunk itself); a sidecar laid out otherwise is parsed whole."""
    try:
        with open(sidecar, "rb") as handle:
            head = handle.read(4096)
    except FileNotFoundError:
        raise ActivationCacheError(f"missing file {sidecar}") from None
    match = _FILE_BYTES.search(head)
    return int(match[1]) if match else read_json(sidecar)["file_bytes"]


def read_pages(tensors: dict[str, torch.Tensor]) -> None:
    """Read every page of lazily mapped tensors now (one element per 4 KiB page), so that a reader thread, not the
    one that first uses them, pays for reading the file: `safetensors.torch.load_file` maps the file and each page is
    read on first touch. Mapping beats copying: the pages are the page cache's, and no fresh memory is faulted in."""
    for tensor in tensors.values():
        if tensor.numel():
            tensor.reshape(-1)[:: max(1, 4096 // tensor.element_size())].sum()


@dataclass(frozen=True)
class HookSource:
    """Where one hook point's chunks live: its directory and the name it was stored under."""

    directory: Path
    stored_name: str


def first_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    if a.shape != b.shape:
        return (0,)
    index = (a != b).nonzero()[0]
    return tuple(int(i) for i in index)


class CachedActivations:
    """A complete activation cache written by `ActivationWriter` (one or several shards).

    `path` is the root directory (all its hook points, or the subset `hook_points`), or an explicit mapping
    hook name -> hook directory (each inside a cache root), whose keys become the hook names of the items.
    """

    def __init__(self, path: str | Path | dict[str, str | Path], hook_points: list[str] | None = None):
        if isinstance(path, dict):
            self.sources = {hook: HookSource(Path(d), Path(d).name) for hook, d in path.items()}
            roots = {source.directory.parent for source in self.sources.values()}
            if len(roots) != 1:
                raise ActivationCacheError(f"hook directories must share one cache root, got {sorted(map(str, roots))}")
            self.root = roots.pop()
        else:
            self.root = Path(path)
            self.sources = {}
        if not self.root.is_dir():
            raise ActivationCacheError(f"activation cache directory not found: {self.root}")
        self.manifests = self._read_manifests()
        first = self.manifests[0]
        if not self.sources:
            for hook in hook_points or first["hook_points"]:
                self.sources[hook] = HookSource(hook_dir(self.root, hook), hook)
        elif hook_points is not None:
            self.sources = {hook: self.sources[hook] for hook in hook_points}
        for source in self.sources.values():
            if source.stored_name not in first["hook_points"]:
                raise ActivationCacheError(
                    f"hook point {source.stored_name!r} is not in the cache {self.root} "
                    f"(it holds {first['hook_points']})"
                )
        self.chunks: list[dict[str, Any]] = sorted(
            (chunk for manifest in self.manifests for chunk in manifest["chunks"]),
            key=lambda chunk: parse_chunk_name(chunk["name"]),
        )
        self.format: str = first["format"]
        self.dtype: str = first["dtype"]
        self.layout: str = first["layout"]
        self.context_size: int | None = first.get("context_size")
        self.hook_dims: dict[str, int] = {
            hook: first["hook_dims"][source.stored_name] for hook, source in self.sources.items()
        }

    @property
    def hook_points(self) -> list[str]:
        return list(self.sources)

    @property
    def written_shuffled(self) -> bool:
        """Whether every shard was generated through a shuffle buffer (its settings record a `buffer_size`), so that
        reading it in order gives shuffled rows."""
        return all(manifest.get("provenance", {}).get("settings", {}).get("buffer_size") for manifest in self.manifests)

    @property
    def n_tokens(self) -> int:
        return sum(chunk["n_tokens"] for chunk in self.chunks)

    def _read_manifests(self) -> list[dict[str, Any]]:
        paths = sorted(self.root.glob("manifest*.json"))
        if not paths:
            raise ActivationCacheError(
                f"no manifest in {self.root}: generation did not finish (or this is not an activation cache); "
                "re-run generate_activations into it"
            )
        manifests = [read_json(path) for path in paths]
        for path, manifest in zip(paths, manifests, strict=True):
            if manifest.get("format_version") != FORMAT_VERSION or not manifest.get("complete"):
                raise ActivationCacheError(f"{path} is not a complete activation manifest of format {FORMAT_VERSION}")
            for key in ("hook_points", "dtype", "layout", "format", "hook_dims"):
                if manifest[key] != manifests[0][key]:
                    raise ActivationCacheError(f"{path} disagrees with {paths[0]} on {key!r}")
        return manifests

    # ---- one chunk ----
    def chunk_file(self, hook: str, chunk: str) -> Path:
        return self.sources[hook].directory / f"{chunk}.{self.format}"

    def _load_file(self, path: Path, chunk: dict[str, Any], hook: str) -> dict[str, torch.Tensor]:
        written = written_bytes(path.with_suffix(".json"))
        if not path.is_file():
            raise ActivationCacheError(f"chunk file missing: {path}")
        size = os.path.getsize(path)
        if size != written:
            raise ActivationCacheError(
                f"chunk file {path} has {size} bytes but {written} were written: truncated or replaced; delete the "
                "cache and regenerate it"
            )
        try:
            if self.format == "safetensors":
                tensors = load_file(str(path))
                read_pages(tensors)
            else:
                tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupted bytes surface as many exception types
            raise ActivationCacheError(f"chunk file {path} cannot be read ({exc}); regenerate the cache") from exc
        missing = [key for key in REQUIRED_TENSORS if key not in tensors]
        if missing:
            raise ActivationCacheError(f"chunk file {path} lacks tensors {missing}")
        activation = tensors["activation"]
        if dtype_name(activation.dtype) != self.dtype:
            raise ActivationCacheError(
                f"{path}: activation dtype {activation.dtype} but the manifest says {self.dtype}"
            )
        expected_rows, expected_dim = chunk["n_rows"], self.hook_dims[hook]
        if activation.shape[0] != expected_rows or activation.shape[-1] != expected_dim:
            raise ActivationCacheError(
                f"{path}: activation shape {tuple(activation.shape)} does not match the manifest "
                f"({expected_rows} rows of dimension {expected_dim})"
            )
        return tensors

    def load_chunk(self, chunk: dict[str, Any]) -> Item:
        """Load one chunk of every hook point into {hook: activation, tokens, mask, ...} (on CPU)."""
        item: Item = {}
        reference: tuple[str, torch.Tensor] | None = None
        for hook in self.sources:
            tensors = self._load_file(self.chunk_file(hook, chunk["name"]), chunk, hook)
            activation = tensors.pop("activation")
            if reference is None:
                reference = (hook, tensors["tokens"])
                item.update(tensors)
            elif not torch.equal(tensors["tokens"], reference[1]):
                raise ChunkMismatchError(
                    hook, reference[0], chunk["name"], first_difference(tensors["tokens"], reference[1])
                )
            item[hook] = activation
        return item

    def read_tokens(self, hook: str, chunk: str) -> torch.Tensor:
        """The token ids of one chunk file, read without loading its activations."""
        path = self.chunk_file(hook, chunk)
        try:
            if self.format == "safetensors":
                with safe_open(str(path), framework="pt") as handle:
                    return handle.get_tensor("tokens")
            return torch.load(path, map_location="cpu", weights_only=True)["tokens"]
        except FileNotFoundError:
            raise ActivationCacheError(f"chunk file missing: {path}") from None
        except Exception as exc:
            raise ActivationCacheError(f"chunk file {path} cannot be read ({exc}); regenerate the cache") from exc

    # ---- streaming ----
    def chunk_order(self, shuffle_seed: int | None = None, epoch: int = 0) -> list[int]:
        if shuffle_seed is None:
            return list(range(len(self.chunks)))
        generator = torch.Generator().manual_seed(shuffle_seed + epoch)
        return torch.randperm(len(self.chunks), generator=generator).tolist()

    def iterate(
        self,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        num_workers: int = 2,
        prefetch: int | None = 4,
        shuffle_seed: int | None = None,
        epoch: int = 0,
        shard: tuple[int, int] | None = None,
    ) -> Iterator[Item]:
        """Yield chunks in stored order (or a per-epoch seeded permutation), `prefetch` chunks loading ahead.
        `shard=(rank, world)`: every world-th chunk of that order from the rank-th (data-parallel ranks read apart)."""
        order = self.chunk_order(shuffle_seed, epoch)
        if shard is not None:
            rank, world = shard
            if len(order) < world:
                raise ValueError(f"cache {self.root} has {len(order)} chunks, fewer than the {world} ranks reading it")
            order = order[rank::world]

        def finish(item: Item) -> Item:
            out = {}
            for key, value in item.items():
                if key in self.sources and dtype is not None:
                    value = value.to(dtype)
                out[key] = value.to(device, non_blocking=True)
            return out

        if num_workers == 0:
            for index in order:
                yield finish(self.load_chunk(self.chunks[index]))
            return
        depth = max(prefetch or 1, 1)
        with ThreadPoolExecutor(max_workers=num_workers) as executor:
            queue: deque = deque()
            upcoming = iter(order)
            for index in upcoming:
                queue.append(executor.submit(self.load_chunk, self.chunks[index]))
                if len(queue) >= depth:
                    break
            while queue:
                item = queue.popleft().result()
                next_index = next(upcoming, None)
                if next_index is not None:
                    queue.append(executor.submit(self.load_chunk, self.chunks[next_index]))
                yield finish(item)
