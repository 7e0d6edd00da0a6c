"""On-disk layout of cached activations, shared by the writer and the reader.

```
<root>/manifest.json                       written last; its presence means the cache is complete
<root>/manifest-shard-00003.json           ... or one per shard when generation was split into shards
<root>/<hook point>/chunk-00000000.safetensors   tensors: activation, tokens, mask, attention_mask, doc_index, ...
<root>/<hook point>/chunk-00000000.json          sidecar: shapes, dtypes, file size, token ids and provenance
<root>/<hook point>/shard-3-chunk-00000000.*     chunk names when sharded
```
"""

import re
from dataclasses import dataclass
from pathlib import Path

from lm_saes_core.config import UserError
from lm_saes_core.io import read_json_object

FORMAT_VERSION = 1
TENSOR_FORMATS = ("safetensors", "pt")
_CHUNK_RE = re.compile(r"^(?:shard-(?P<shard>\d+)-)?chunk-(?P<index>\d{8})$")


class ActivationCacheError(UserError, RuntimeError):
    """A cache directory that cannot be read as it is; the message names the file and what to do."""


class ChunkMismatchError(ActivationCacheError):
    """Token ids differ between hook points for the same chunk."""

    def __init__(self, hook_point: str, reference_hook: str, chunk: str, position: tuple[int, ...]):
        self.hook_point, self.reference_hook, self.chunk, self.position = hook_point, reference_hook, chunk, position
        super().__init__(
            f"token mismatch in chunk {chunk}: hook {hook_point!r} differs from {reference_hook!r} "
            f"first at position {position}"
        )


def chunk_name(index: int, shard: int | None = None) -> str:
    return f"chunk-{index:08d}" if shard is None else f"shard-{shard}-chunk-{index:08d}"


def parse_chunk_name(name: str) -> tuple[int, int]:
    """(shard, index) of a chunk name; unsharded chunks are shard 0."""
    match = _CHUNK_RE.match(name)
    if match is None:
        raise ValueError(f"not a chunk name: {name!r}")
    return int(match["shard"] or 0), int(match["index"])


def manifest_name(shard: int | None) -> str:
    return "manifest.json" if shard is None else f"manifest-shard-{shard:05d}.json"


def hook_dir(root: Path, hook_point: str) -> Path:
    return root / hook_point


@dataclass(frozen=True)
class ChunkInfo:
    name: str
    n_rows: int
    n_tokens: int


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ActivationCacheError(f"missing file {path}")
    return read_json_object(path, ActivationCacheError)
