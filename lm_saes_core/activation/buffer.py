"""Re-batching of a stream of row-aligned tensor dicts, optionally through a shuffle buffer.

Without a buffer, rows leave in arrival order in batches of `batch_size`. With `buffer_size`, rows are collected
until the buffer holds `buffer_size`, the whole buffer is permuted, and batches leave until it is half empty; the
next refill mixes the remaining rows with new ones. Tokens of many documents and positions therefore meet in one
batch, and the sequence of permutations depends only on the seed, so a run is reproducible.

The buffer's memory is kept from one refill to the next (two row stores in turn: the rows that stay are gathered
from one into the other, new items copied in after them), and every batch is gathered straight from the buffer: a
refill costs no fresh buffer-sized allocation, whose page faults on CPU cost more than the copies themselves.
"""

from collections.abc import Iterable, Iterator

import torch

from lm_saes_core.activation.config import BufferShuffleConfig

Item = dict[str, torch.Tensor]

KEEP = "_keep"
"""Optional key of an item: a (rows,) bool tensor, true for the rows that belong to the stream. The batcher drops the
others (padding and BOS positions of flattened sequences) as it copies the rows it keeps, so that flattening a
chunk costs no copy of its own."""


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


def drop_rows(item: Item) -> Item:
    """`item` without its `KEEP` key and the rows it marks false (views when none is)."""
    if KEEP not in item:
        return item
    item = dict(item)
    keep = item.pop(KEEP)
    if bool(keep.all()):
        return item
    index = keep.nonzero().squeeze(1)
    return {key: value.index_select(0, index) for key, value in item.items()}


class ActivationBatcher:
    def __init__(self, batch_size: int, buffer_size: int | None = None, shuffle: BufferShuffleConfig | None = None):
        if buffer_size is not None and buffer_size < batch_size:
            raise ValueError(f"buffer_size ({buffer_size}) must be at least batch_size ({batch_size})")
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        shuffle = shuffle or BufferShuffleConfig()
        self.generator = torch.Generator(device=shuffle.generator_device or "cpu")
        self.generator.manual_seed(shuffle.perm_seed)

    def _permutation(self, rows: int, device: torch.device) -> torch.Tensor:
        return torch.randperm(rows, generator=self.generator, device=self.generator.device).to(device)

    def __call__(self, items: Iterable[Item]) -> Iterator[Item]:
        if self.buffer_size is not None:
            yield from self._shuffled(items, self.buffer_size)
            return
        pending: list[Item] = []
        rows = 0
        for item in map(drop_rows, items):
            pending.append(item)
            rows += n_rows(item)
            if rows < self.batch_size:
                continue
            buffer = concat_items(pending)
            start = 0
            while rows - start >= self.batch_size:
                yield take_rows(buffer, slice(start, start + self.batch_size))
                start += self.batch_size
            pending = [take_rows(buffer, slice(start, rows))] if start < rows else []
            rows -= start
        if rows:
            buffer = concat_items(pending)
            for start in range(0, rows, self.batch_size):
                yield take_rows(buffer, slice(start, start + self.batch_size))

    def _shuffled(self, items: Iterable[Item], buffer_size: int) -> Iterator[Item]:
        """Batch b of a refill holding R rows is rows permutation[b * batch_size:][:batch_size] of the buffer; the
        rows from `start` on in permuted order stay, in that order, ahead of the next items."""
        keep = max(buffer_size // 2, self.batch_size)
        buffer = _RowStore(buffer_size)
        for item in items:
            buffer.append(item)
            if buffer.rows < buffer_size:
                continue
            permuted = buffer.permuted(self._permutation(buffer.rows, buffer.device))
            start = 0
            while buffer.rows - start >= keep:
                yield buffer.gather(permuted[start : start + self.batch_size])
                start += self.batch_size
            buffer.keep(permuted[start:], freed=permuted[:start])
        if buffer.rows:
            permuted = buffer.permuted(self._permutation(buffer.rows, buffer.device))
            for start in range(0, buffer.rows, self.batch_size):
                yield buffer.gather(permuted[start : start + self.batch_size])


class _RowStore:
    """The buffer's rows, in tensors that are allocated once (grown only for an unusually large item) and reused.

    Rows stay where they were copied in: `order` lists the buffer's rows (as they would be concatenated) by their
    slot in the tensors, and a row that leaves frees its slot for a new one, so rows that stay are never moved."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tensors: Item = {}
        self.order = torch.zeros(0, dtype=torch.long)  # (rows,) slot of each buffered row, in buffer order
        self.free = torch.zeros(0, dtype=torch.long)  # slots not holding a buffered row

    @property
    def rows(self) -> int:
        return len(self.order)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def _grow(self, like: Item, slots: int) -> None:
        """Tensors like `like`'s with room for `slots` free slots (a new store: room for a whole buffer and one more
        item like this one, since the buffer fills up to one item past its size, so that equal items never grow it)."""
        if self.tensors and like.keys() != self.tensors.keys():
            raise ValueError(f"every item must have the same keys: {sorted(like)} after {sorted(self.tensors)}")
        used = len(next(iter(self.tensors.values()))) if self.tensors else 0
        size = max(used + slots - len(self.free), self.capacity + slots, used * 5 // 4)
        for key, value in like.items():
            grown = value.new_empty((size, *value.shape[1:]))
            if used:
                grown[:used].copy_(self.tensors[key])
            self.tensors[key] = grown
        device = next(iter(like.values())).device
        self.order, self.free = (
            self.order.to(device),
            torch.cat([self.free.to(device), torch.arange(used, size, device=device)]),
        )

    def append(self, item: Item) -> None:
        """Copy `item`'s rows into free slots; those that `KEEP` drops (copied with the rest: one scatter of the
        item as it is beats selecting the kept rows first) are free again at once."""
        keep = item.get(KEEP)
        item = {key: value for key, value in item.items() if key != KEEP}
        added = n_rows(item)
        if added > len(self.free) or item.keys() != self.tensors.keys():
            self._grow(item, added)
        slots, self.free = self.free[:added], self.free[added:]
        for key, value in item.items():
            self.tensors[key].index_copy_(0, slots, value)
        if keep is None:
            self.order = torch.cat([self.order, slots])
        else:
            keep = keep.to(slots.device)
            self.order = torch.cat([self.order, slots[keep]])
            self.free = torch.cat([self.free, slots[~keep]])

    def permuted(self, permutation: torch.Tensor) -> torch.Tensor:
        """The slots of the buffer's rows taken in `permutation` order."""
        return self.order[permutation]

    def gather(self, slots: torch.Tensor) -> Item:
        """Fresh tensors of the rows in `slots` (the caller may keep them: later refills do not touch them)."""
        return {key: value.index_select(0, slots) for key, value in self.tensors.items()}

    def keep(self, slots: torch.Tensor, freed: torch.Tensor) -> None:
        """The buffer is now the rows in `slots`, in that order; `freed` slots take new rows."""
        self.order, self.free = slots, torch.cat([self.free, freed])
