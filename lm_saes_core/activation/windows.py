"""Cutting documents into fixed-length token windows with provenance.

Each document is tokenised once and cut into consecutive windows of `context_size` positions: the BOS token
(when the model prepends one) followed by the next `context_size - 1` tokens of the document; the last window of a
document is padded on the right. No window mixes two documents, so the model never attends across a document
boundary, and every position records which document and which token of it it holds, so any activation can be
traced back to its text.
"""

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

# Per-position tensors every item of the pipeline carries, (B, S) before filtering and (N,) after.
ROW_KEYS = ("tokens", "attention_mask", "mask", "doc_index", "doc_position", "source_idx")


def window_starts(n_tokens: int, body: int) -> range:
    """Start offsets of the windows covering a document of `n_tokens` with `body` document tokens per window."""
    return range(0, n_tokens, body)


def build_windows(
    documents: Sequence[Sequence[int]],
    doc_indices: Sequence[int],
    *,
    context_size: int,
    bos_token_id: int | None,
    pad_token_id: int,
    ignore_token_ids: Iterable[int] = (),
) -> dict[str, np.ndarray]:
    """Cut tokenised documents into (n_windows, context_size) arrays: tokens, attention_mask, mask, doc_index,
    doc_position. `mask` is true for document tokens that are not in `ignore_token_ids` (never BOS or padding);
    `doc_position` is the token's index in its document (-1 for BOS and padding)."""
    lead = 1 if bos_token_id is not None else 0
    body = context_size - lead
    n_windows = sum(len(window_starts(len(doc), body)) for doc in documents)
    tokens = np.full((n_windows, context_size), pad_token_id, dtype=np.int64)
    doc_index = np.full((n_windows, context_size), -1, dtype=np.int64)
    doc_position = np.full((n_windows, context_size), -1, dtype=np.int64)
    attention_mask = np.zeros((n_windows, context_size), dtype=bool)
    row = 0
    for doc, index in zip(documents, doc_indices, strict=True):
        for start in window_starts(len(doc), body):
            piece = doc[start : start + body]
            if lead:
                tokens[row, 0] = bos_token_id
            tokens[row, lead : lead + len(piece)] = piece
            doc_index[row, : lead + len(piece)] = index
            doc_position[row, lead : lead + len(piece)] = np.arange(start, start + len(piece))
            attention_mask[row, : lead + len(piece)] = True
            row += 1
    mask = doc_position >= 0
    ignored = list(ignore_token_ids)
    if ignored:
        mask &= ~np.isin(tokens, ignored)
    return {
        "tokens": tokens,
        "attention_mask": attention_mask,
        "mask": mask,
        "doc_index": doc_index,
        "doc_position": doc_position,
    }


def iter_window_batches(
    texts: Iterable[tuple[int, str]],
    tokenizer,
    *,
    batch_rows: int,
    context_size: int,
    bos_token_id: int | None,
    pad_token_id: int,
    ignore_token_ids: Iterable[int] = (),
    tokenize_batch: int = 64,
) -> Iterator[dict[str, torch.Tensor]]:
    """Stream (doc_index, text) pairs as batches of `batch_rows` token windows (the last batch may be smaller).

    Documents are tokenised `tokenize_batch` at a time with the fast tokenizer, without special tokens (BOS is
    placed by the window policy above)."""
    ignore = tuple(ignore_token_ids)
    pending: list[dict[str, np.ndarray]] = []
    pending_rows = 0

    def tokenised_windows() -> Iterator[dict[str, np.ndarray]]:
        batch: list[tuple[int, str]] = []
        for item in texts:
            batch.append(item)
            if len(batch) == tokenize_batch:
                yield _windows_of(batch)
                batch = []
        if batch:
            yield _windows_of(batch)

    def _windows_of(batch: list[tuple[int, str]]) -> dict[str, np.ndarray]:
        ids = tokenizer([text for _, text in batch], add_special_tokens=False)["input_ids"]
        return build_windows(
            ids,
            [index for index, _ in batch],
            context_size=context_size,
            bos_token_id=bos_token_id,
            pad_token_id=pad_token_id,
            ignore_token_ids=ignore,
        )

    for windows in tokenised_windows():
        pending.append(windows)
        pending_rows += len(windows["tokens"])
        while pending_rows >= batch_rows:
            merged = {key: np.concatenate([p[key] for p in pending]) for key in pending[0]}
            yield {key: torch.from_numpy(value[:batch_rows]) for key, value in merged.items()}
            rest = {key: value[batch_rows:] for key, value in merged.items()}
            pending, pending_rows = [rest], len(rest["tokens"])
    if pending_rows:
        merged = {key: np.concatenate([p[key] for p in pending]) for key in pending[0]}
        yield {key: torch.from_numpy(value) for key, value in merged.items()}
