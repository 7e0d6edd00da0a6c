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


def count_tokens(batch: Batch, hook_point: str) -> int:
    """Valid tokens in a batch: `mask.sum()` for 2-D batches, the number of rows for 1-D ones."""
    if hook_point not in batch:
        raise KeyError(f"batch has no activations for hook point {hook_point!r}; keys: {sorted(batch)}")
    mask = batch.get("mask")
    if mask is not None:
        return int(mask.sum())
    return batch[hook_point].shape[:-1].numel()
