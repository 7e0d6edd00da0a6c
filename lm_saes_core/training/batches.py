"""Small helpers on activation batches (dicts of tensors, 1-D `(N, D)` or 2-D `(B, S, D)` with a `mask`)."""

import contextlib
import queue
import threading
from collections.abc import Iterator, Mapping

import torch

Batch = Mapping[str, torch.Tensor]


def to_device(batch: Batch, device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def valid_rows(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """(..., D) -> (n_valid_tokens, D): token dims flattened, positions outside a 2-D batch's `mask` dropped."""
    rows = values.reshape(-1, values.shape[-1])
    mask = batch.get("mask")
    if mask is not None and mask.numel() == rows.shape[0]:
        rows = rows[mask.reshape(-1).to(torch.bool)]
    return rows


def count_tokens(batch: Batch) -> int:
    """Valid tokens in a batch: `mask.sum()` for 2-D batches, else the token ids' count, else the rows of its
    activations (any of them: every hook of a batch holds the same tokens)."""
    mask = batch.get("mask")
    if mask is not None:
        return int(mask.sum())
    if "tokens" in batch:
        return batch["tokens"].numel()
    activations = [value for value in batch.values() if isinstance(value, torch.Tensor) and value.ndim >= 2]
    if not activations:
        raise KeyError(f"cannot count the tokens of a batch without mask, tokens or activations; keys: {sorted(batch)}")
    return activations[0].shape[:-1].numel()


_END = object()


class Prefetched(Iterator[Batch]):
    """The batches of `stream`, in its order, produced up to `depth` ahead by a background thread: reading,
    decoding and shuffling the next batches overlaps the training step, which waits only when the stream is slower
    than the step. The stream's errors are raised here, where the batch they stopped would have been.

    From construction on the thread alone drives `stream`; `close()` (or leaving a `with` block) stops it after the
    batch in hand and joins it, so that `stream` may be used or closed again by its owner. `depth=0` starts no
    thread: the batches are read when asked for, in the caller's thread."""

    def __init__(self, stream: Iterator[Batch], depth: int = 2):
        if depth < 0:
            raise ValueError(f"prefetch depth must be 0 (no thread) or more, got {depth}")
        self._stream = stream if depth == 0 else None
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, args=(stream,), name="batch-prefetch", daemon=True)
        if depth > 0:
            self._thread.start()

    def _produce(self, stream: Iterator[Batch]) -> None:
        while not self._stop.is_set():  # checked before each read: a put that `close` made room for reads no more
            try:
                batch = next(stream)
            except StopIteration:
                self._put(_END)
                return
            except BaseException as exc:  # handed to the consumer, which raises it
                self._put(exc)
                return
            if not self._put(batch):
                return

    def _put(self, item: object) -> bool:
        """Queue `item` unless closed meanwhile; False when closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> Batch:
        if self._done:
            raise StopIteration
        if self._stream is not None:
            return next(self._stream)
        item = self._queue.get()
        if item is _END or isinstance(item, BaseException):
            self._done = True
            self._thread.join()
            if item is _END:
                raise StopIteration
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # make room for a blocked put, then wait for the thread
                self._queue.get_nowait()
            self._thread.join(timeout=0.05)
        self._done = True

    def __enter__(self) -> "Prefetched":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
