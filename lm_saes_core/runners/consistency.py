"""`check_activation_consistency`: verify that a cache's hook points hold the same tokens, chunk by chunk."""

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field, model_validator

from lm_saes_core.activation.cache_format import ActivationCacheError, ChunkMismatchError, read_json
from lm_saes_core.activation.reader import CachedActivations, first_difference
from lm_saes_core.config import BaseConfig
from lm_saes_core.log import setup_logging

logger = logging.getLogger(__name__)


class CheckActivationConsistencySettings(BaseConfig):
    paths: dict[str, str] | None = None
    """Hook point -> hook directory (all inside one cache root)."""
    path: str | None = None
    """Alternatively, the cache root: every hook point of its manifest is checked."""
    device: str = "cpu"
    num_workers: int = Field(default=0, ge=0)
    prefetch_factor: int | None = None
    load_activations: bool = True
    """Also read every activation file in full and check its size, dtype and shape against the manifest."""

    @model_validator(mode="after")
    def _one_location(self) -> "CheckActivationConsistencySettings":
        if (self.paths is None) == (self.path is None):
            raise ValueError("give exactly one of 'path' (cache root) or 'paths' (hook point -> directory)")
        return self


@dataclass
class Mismatch:
    hook_point: str
    reference: str
    chunk: str
    position: tuple[int, ...]

    def __str__(self) -> str:
        return f"hook {self.hook_point!r} vs {self.reference!r}, chunk {self.chunk}, position {self.position}"


@dataclass
class ConsistencyReport:
    root: Path
    hook_points: list[str]
    n_chunks: int
    n_tokens: int
    problems: list[str] = field(default_factory=list)
    first_mismatch: Mismatch | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.root}: {len(self.hook_points)} hook point(s), {self.n_chunks} chunks, {self.n_tokens} tokens"
        if self.ok:
            return f"{head}: consistent"
        return f"{head}: {len(self.problems)} problem(s); first: {self.problems[0]}"


def check_activation_consistency(settings: CheckActivationConsistencySettings) -> ConsistencyReport:
    """Compare token ids across hook points (and against each file's sidecar) chunk by chunk.

    Never raises for a bad cache: every problem is listed in the report, the first token mismatch is pinpointed
    as (hook, chunk, position)."""
    setup_logging()
    try:
        cache = CachedActivations(settings.paths or settings.path)
    except ActivationCacheError as exc:
        root = Path(settings.path or next(iter(settings.paths.values()))).resolve()
        return ConsistencyReport(root=root, hook_points=[], n_chunks=0, n_tokens=0, problems=[str(exc)])
    report = ConsistencyReport(cache.root, cache.hook_points, len(cache.chunks), cache.n_tokens)
    for hook, source in cache.sources.items():
        listed = {f"{chunk['name']}.{cache.format}" for chunk in cache.chunks}
        present = {path.name for path in source.directory.glob(f"*.{cache.format}")}
        for name in sorted(listed - present):
            report.problems.append(f"hook {hook!r}: chunk file {name} listed in the manifest is missing")
        for name in sorted(present - listed):
            report.problems.append(f"hook {hook!r}: chunk file {name} is not listed in any manifest")
    for chunk in cache.chunks:
        reference: tuple[str, torch.Tensor] | None = None
        for hook in cache.hook_points:
            try:
                tokens = cache.read_tokens(hook, chunk["name"])
                sidecar = read_json(cache.chunk_file(hook, chunk["name"]).with_suffix(".json"))
            except ActivationCacheError as exc:
                report.problems.append(str(exc))
                continue
            if "tokens" in sidecar and not torch.equal(torch.tensor(sidecar["tokens"]), tokens):
                position = first_difference(torch.tensor(sidecar["tokens"]), tokens)
                report.problems.append(
                    f"hook {hook!r}, chunk {chunk['name']}: tokens differ from the sidecar first at {position}"
                )
            if reference is None:
                reference = (hook, tokens)
            elif not torch.equal(tokens, reference[1]):
                mismatch = Mismatch(hook, reference[0], chunk["name"], first_difference(tokens, reference[1]))
                report.first_mismatch = report.first_mismatch or mismatch
                report.problems.append(f"token mismatch: {mismatch}")
        if settings.load_activations:
            try:
                cache.load_chunk(chunk)
            except ChunkMismatchError:
                pass  # already reported above with its position
            except ActivationCacheError as exc:
                report.problems.append(str(exc))
    (logger.info if report.ok else logger.error)(report.summary())
    return report
