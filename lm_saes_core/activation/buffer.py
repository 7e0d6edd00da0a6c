"""Re-batching of a stream of row-aligned tensor dicts, optionally through a shuffle buffer.

Without a buffer, rows leave in arrival order in batches of `batch_size`. With `buffer_size`, rows are collected
until the buffer holds `buffer_size`, the whole buffer is permuted, and batches leave until it is half empty; the
next refill mixes the remaining rows with new ones. Tokens of many documents and positions therefore meet in one
batch, and the sequence of permutations depends only on the seed, so a run is reproducible.
"""

from collections.abc import Iterable, Iterator

import torch

from lm_saes_core.activation.config import BufferShuffleConfig

Item = dict[str, torch.Tensor]


def n_rows(item: Item) -> int:
    lengths = {key: value.shape[0] for key, value in item.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"all tensors of an item must have the same number of rows, got {lengths}")
    return next(iter(lengths.values()))


def concat_items(items: list[Item]) -> Item:
    if len(items) == 1:
        return items[0]
    return {key: torch.cat([item[key] for item in items]) for key in items[0]}


def take_rows(item: Item, index: slice | torch.Tensor) -> Item:
    return {key: value[index] for key, value in item.items()}


class ActivationBatcher:
    def __init__(self, batch_size: int, buffer_size: int | None = None, shuffle: BufferShuffleConfig | None = None):
        if buffer_size is not None and buffer_size < batch_size:
            raise ValueError(f"buffer_size ({buffer_size}) must be at least batch_size ({batch_size})")
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        shuffle = shuffle or BufferShuffleConfig()
        self.generator = torch.Generator(device=shuffle.generator_device or "cpu")
        self.generator.manual_seed(shuffle.perm_seed)

    def _permute(self, buffer: Item) -> Item:
        rows = n_rows(buffer)
        permutation = torch.randperm(rows, generator=self.generator, device=self.generator.device)
        return take_rows(buffer, permutation.to(next(iter(buffer.values())).device))

    def __call__(self, items: Iterable[Item]) -> Iterator[Item]:
        pending: list[Item] = []
        rows = 0
        threshold = self.buffer_size or self.batch_size
        for item in items:
            pending.append(item)
            rows += n_rows(item)
            if rows < threshold:
                continue
            buffer = concat_items(pending)
            start = 0
            if self.buffer_size is None:
                while rows - start >= self.batch_size:
                    yield take_rows(buffer, slice(start, start + self.batch_size))
                    start += self.batch_size
            else:
                buffer = self._permute(buffer)
                keep = max(self.buffer_size // 2, self.batch_size)
                while rows - start >= keep:
                    yield take_rows(buffer, slice(start, start + self.batch_size))
                    start += self.batch_size
            pending = [take_rows(buffer, slice(start, rows))] if start < rows else []
            rows -= start
        if rows:
            buffer = concat_items(pending)
            if self.buffer_size is not None:
                buffer = self._permute(buffer)
            for start in range(0, rows, self.batch_size):
                yield take_rows(buffer, slice(start, start + self.batch_size))
