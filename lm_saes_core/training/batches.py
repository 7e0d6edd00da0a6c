"""Small helpers on activation batches (dicts of tensors, 1-D `(N, D)` or 2-D `(B, S, D)` with a `mask`)."""

from collections.abc import Mapping

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
