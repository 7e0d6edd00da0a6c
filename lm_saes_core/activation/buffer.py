"""Re-batching of a stream of row-aligned tensor dicts, optionally through a shuffle buffer.

Without a buffer, rows leave in arrival order in batches of `batch_size`. With `buffer_size`, rows are collected
until the buffer holds `buffer_size`, the whole buffer is permuted, and batches leave until it is half empty; the
next refill mixes the remaining rows with new ones. Tokens of many documents and positions therefore meet in one
batch, and the sequence of permutations depends only on the seed, so a run is reproducible.

On CPU the buffer holds the items as they arrive (a cached chunk's tensors are the mapped file's pages) and gathers
every batch straight from them, so most rows are copied once (`_BufferRows`); elsewhere items are copied into slots
of tensors allocated once and reused, and batches gathered from those. Neither costs a fresh buffer-sized
allocation per refill, whose page faults on CPU cost more than the copies themselves.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

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
    def __init__(
        self,
        batch_size: int,
        buffer_size: int | None = None,
        shuffle: BufferShuffleConfig | None = None,
        hold_items: bool | None = None,
    ):
        """`hold_items`: whether the shuffle buffer holds the items as they arrive (see `_BufferRows`); by default
        on CPU only."""
        if buffer_size is not None and buffer_size < batch_size:
            raise ValueError(f"buffer_size ({buffer_size}) must be at least batch_size ({batch_size})")
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.hold_items = hold_items
        shuffle = shuffle or BufferShuffleConfig()
        self.generator = torch.Generator(device=shuffle.generator_device or "cpu")
        self.generator.manual_seed(shuffle.perm_seed)

    def _permutation(self, rows: int, device: torch.device) -> torch.Tensor:
        return torch.randperm(rows, generator=self.generator, device=self.generator.device).to(device)

    def __call__(self, items: Iterable[Item]) -> Iterator[Item]:
        if self.buffer_size is not None:
            yield from self._shuffled(items, self.buffer_size)
            return
        yield from self._in_order(items)

    def _in_order(self, items: Iterable[Item]) -> Iterator[Item]:
        """Batches in arrival order: the rows an item holds past a batch boundary leave as views of it (no copy),
        only a batch that spans two items is concatenated; with a cache written shuffled this is the whole stream."""
        pending: list[Item] = []  # the next batch's first rows: fewer than batch_size of them
        rows = 0
        for item in map(drop_rows, items):
            size, start = n_rows(item), 0
            if rows:
                start = min(self.batch_size - rows, size)
                pending.append(take_rows(item, slice(0, start)))
                rows += start
                if rows < self.batch_size:
                    continue
                yield concat_items(pending)
                pending, rows = [], 0
            while size - start >= self.batch_size:
                yield take_rows(item, slice(start, start + self.batch_size))
                start += self.batch_size
            if start < size:
                pending, rows = [take_rows(item, slice(start, size))], size - start
        if rows:
            yield concat_items(pending)

    def _shuffled(self, items: Iterable[Item], buffer_size: int) -> Iterator[Item]:
        """Batch b of a refill holding R rows is rows permutation[b * batch_size:][:batch_size] of the buffer; the
        rows from `start` on in permuted order stay, in that order, ahead of the next items."""
        keep = max(buffer_size // 2, self.batch_size)
        buffer = _BufferRows(buffer_size, self.hold_items)
        for item in items:
            buffer.append(item)
            if buffer.rows < buffer_size:
                continue
            permuted = buffer.permuted(self._permutation(buffer.rows, buffer.device))
            leaving = (buffer.rows - keep) // self.batch_size * self.batch_size + self.batch_size
            yield from buffer.batches(permuted[:leaving], self.batch_size)
            buffer.keep(permuted[leaving:], freed=permuted[:leaving])
        if buffer.rows:
            yield from buffer.batches(buffer.permuted(self._permutation(buffer.rows, buffer.device)), self.batch_size)


class _Slots:
    """Row tensors allocated once (grown only for an unusually large item) whose slots are reused: a row copied in
    stays in its slot until it is released."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.tensors: Item = {}
        self.free = torch.zeros(0, dtype=torch.long)  # slots not holding a row

    def _grow(self, like: Item, slots: int) -> None:
        """Tensors like `like`'s with room for `slots` free slots (a new store: room for `capacity` rows and one more
        item like this one, since the buffer fills up to one item past its size, so that equal items never grow it)."""
        used = len(next(iter(self.tensors.values()))) if self.tensors else 0
        size = max(used + slots - len(self.free), self.capacity + slots, used * 5 // 4)
        for key, value in like.items():
            grown = value.new_empty((size, *value.shape[1:]))
            if used:
                grown[:used].copy_(self.tensors[key])
            self.tensors[key] = grown
        device = next(iter(like.values())).device
        self.free = torch.cat([self.free.to(device), torch.arange(used, size, device=device)])

    def put(self, item: Item) -> torch.Tensor:
        """Copy `item`'s rows into free slots (one scatter per tensor); returns their slots."""
        added = n_rows(item)
        if added > len(self.free) or item.keys() != self.tensors.keys():
            self._grow(item, added)
        slots, self.free = self.free[:added], self.free[added:]
        for key, value in item.items():
            self.tensors[key].index_copy_(0, slots, value)
        return slots

    def release(self, slots: torch.Tensor) -> None:
        self.free = torch.cat([self.free, slots])


PACKED = "_packed"

HOLD_UNTIL = 8
"""On CPU an item stays where it arrived until only 1/HOLD_UNTIL of its rows are still buffered; those few are then
copied into the slot store and the item is let go."""


@dataclass
class _Held:
    """An item the buffer holds where it arrived: its tensors, the id of its row 0, its rows, how many are buffered."""

    tensors: Item
    first_id: int
    size: int
    buffered: int


class _BufferRows:
    """The shuffle buffer's rows, each named by an id: row r of a held item is that item's first id + r (>= 0), a row
    in the slot store is -(slot + 1). `order` lists the buffer's rows (as they would be concatenated) by id.

    On CPU an item's tensors are held as they arrived (a cached chunk's are the mapped file's pages), so most rows
    are copied once, into their batch, not twice (into the buffer, then out of it). Every refill takes about half of
    each item's remaining rows, so an item is let go after about log2(HOLD_UNTIL) refills and the items held come
    to about two buffers of rows. Elsewhere (a GPU, where copies are cheap and memory is not) every item is copied
    into the slot store on arrival and the buffer's memory is one buffer.
    """

    def __init__(self, capacity: int, hold: bool | None = None) -> None:
        self.capacity = capacity
        self.hold = hold
        self.slots: _Slots | None = None
        self.keys: list[str] | None = None
        self.packed_keys: list[str] = []  # held items' (rows,) int64 tensors, kept as the columns of one tensor
        self.held: list[_Held] = []  # in arrival order
        self.next_id = 0
        self.order = torch.zeros(0, dtype=torch.long)

    @property
    def rows(self) -> int:
        return len(self.order)

    @property
    def device(self) -> torch.device:
        return self.order.device

    def append(self, item: Item) -> None:
        """Buffer `item`'s rows but those that `KEEP` marks false: held as they are on CPU, else copied into free
        slots (all rows: one scatter of the item as it is beats selecting the kept rows first; the dropped ones'
        slots are free again at once)."""
        keep = item.get(KEEP)
        item = {key: value for key, value in item.items() if key != KEEP}
        if self.keys is None:
            self.keys = sorted(item)
            device = next(iter(item.values())).device
            self.hold = device.type == "cpu" if self.hold is None else self.hold
            packable = [key for key in self.keys if item[key].dim() == 1 and item[key].dtype == torch.long]
            self.packed_keys = packable if self.hold and len(packable) > 1 else []
            self.slots = _Slots(self.capacity // 4 if self.hold else self.capacity)
            self.order = self.order.to(device)
        elif sorted(item) != self.keys:
            raise ValueError(f"every item must have the same keys: {sorted(item)} after {self.keys}")
        assert self.slots is not None
        keep = keep.to(self.device) if keep is not None else None
        if not self.hold:
            slots = self.slots.put(item)
            if keep is not None:
                self.slots.release(slots[~keep])
                slots = slots[keep]
            ids = -1 - slots
        else:
            added = n_rows(item)
            ids = torch.arange(self.next_id, self.next_id + added, device=self.device)
            ids = ids[keep] if keep is not None else ids
            if len(ids):
                self.held.append(_Held(self._packed(item), self.next_id, added, len(ids)))
            self.next_id += added
        self.order = torch.cat([self.order, ids])

    def _packed(self, item: Item) -> Item:
        """`item` with its `packed_keys` as the columns of one tensor: one copy per group of rows for all of them."""
        if not self.packed_keys:
            return item
        packed = {key: value for key, value in item.items() if key not in self.packed_keys}
        packed[PACKED] = torch.stack([item[key] for key in self.packed_keys], dim=1)
        return packed

    def _unpacked(self, item: Item) -> Item:
        if PACKED not in item:
            return item
        item = dict(item)
        columns = item.pop(PACKED).t().contiguous()
        item.update(zip(self.packed_keys, columns, strict=True))
        return item

    def permuted(self, permutation: torch.Tensor) -> torch.Tensor:
        """The ids of the buffer's rows taken in `permutation` order."""
        return self.order[permutation]

    def _item_of(self, ids: torch.Tensor) -> torch.Tensor:
        """Per id: 0 for a row of the slot store, i + 1 for a row of held item i."""
        if not self.held:
            return torch.zeros_like(ids)
        starts = torch.tensor([held.first_id for held in self.held], dtype=torch.long, device=ids.device)
        return torch.searchsorted(starts, ids, right=True)

    def batches(self, ids: torch.Tensor, batch_size: int) -> Iterator[Item]:
        """Fresh tensors of the rows of `ids`, `batch_size` at a time (the caller may keep them: later refills do
        not touch them). Within a batch the rows come grouped by where they live (the slot store, then each held
        item), each group in the order given: the order of rows within a batch carries no meaning, and one copy per
        group beats gathering then reordering. Where the rows of each batch live is worked out once for all."""
        for rows, _ in self._batches(ids, batch_size):
            yield self._unpacked(rows)

    def _batches(self, ids: torch.Tensor, batch_size: int) -> Iterator[tuple[Item, torch.Tensor]]:
        """`batches` as stored (`packed_keys` packed), each with the positions in `ids` of its rows in the order
        they come."""
        sources = [self.slots.tensors, *(held.tensors for held in self.held)]
        source = self._item_of(ids)
        n_batches = -(-len(ids) // batch_size)
        group = torch.arange(len(ids), device=ids.device) // batch_size * len(sources) + source
        grouped = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=n_batches * len(sources)).view(n_batches, -1).tolist()
        first_ids = torch.tensor([0, *(held.first_id for held in self.held)], dtype=torch.long, device=ids.device)
        ids, source = ids[grouped], source[grouped]
        local = torch.where(ids < 0, -1 - ids, ids - first_ids[source])
        start = 0
        for batch_counts in counts:
            size = sum(batch_counts)
            like = next(tensors for tensors, count in zip(sources, batch_counts, strict=True) if count)
            out = {key: value.new_empty((size, *value.shape[1:])) for key, value in like.items()}
            at = 0
            for tensors, count in zip(sources, batch_counts, strict=True):
                if count:
                    rows = local[start + at : start + at + count]
                    for key, value in tensors.items():
                        torch.index_select(value, 0, rows, out=out[key][at : at + count])
                    at += count
            yield out, grouped[start : start + size]
            start += size

    def keep(self, ids: torch.Tensor, freed: torch.Tensor) -> None:
        """The buffer is now the rows of `ids`, in that order; `freed` rows left it. Items none of whose rows are
        buffered are let go; those down to 1/HOLD_UNTIL of their rows have them copied into the slot store."""
        assert self.slots is not None
        self.order = ids
        in_slots = freed < 0
        self.slots.release(-1 - freed[in_slots])
        if not self.held:
            return
        left = torch.bincount(self._item_of(freed[~in_slots]) - 1, minlength=len(self.held)).tolist()
        for held, n in zip(self.held, left, strict=True):
            held.buffered -= n
        copied = [0 < held.buffered and held.buffered * HOLD_UNTIL <= held.size for held in self.held]
        if any(copied):
            moving = torch.tensor([False, *copied], device=self.device)[self._item_of(self.order)].nonzero().squeeze(1)
            rows, grouped = next(self._batches(self.order[moving], len(moving)))
            self.order[moving[grouped]] = -1 - self.slots.put(rows)
        self.held = [held for held, moved in zip(self.held, copied, strict=True) if held.buffered and not moved]
