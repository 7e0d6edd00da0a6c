"""Data-parallel training under `torchrun`: N processes, one dictionary replica each, every step's batch split N ways.

Every rank reads the same activation stream (the same seeded shuffles) and trains on its 1/N slice of each batch;
gradients are averaged across ranks before clipping, so the replicas take identical steps and a run equals the
single-process run with the same batch (TopK/ReLU/JumpReLU: up to the order of float sums). Which latents fired is
combined across ranks, so the dead-latent statistics (and Aux-K) see the whole batch. Rank 0 alone writes
checkpoints, the final weights, the run's record files and W&B logs.

Not split: the stream itself (each rank reads or computes all of it) and BatchTopK's batch-wide threshold, which
each rank takes over its own slice. Model parallelism (`model_parallel_size > 1`) is not available.
"""

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lm_saes_core.config import ConfigError


@dataclass(frozen=True)
class DataParallel:
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's contiguous 1/N of every tensor's first dimension (tokens, or sequences of a 2-D batch)."""
        sizes = {value.shape[0] for value in batch.values() if isinstance(value, torch.Tensor) and value.dim() > 0}
        if len(sizes) != 1:
            raise ValueError(f"cannot split a batch whose tensors disagree on their first dimension: {sorted(sizes)}")
        (size,) = sizes
        if size % self.world_size:
            raise ConfigError(
                f"batch_size: a batch of {size} rows does not split evenly over data_parallel_size={self.world_size} "
                "processes; choose a multiple"
            )
        per_rank = size // self.world_size
        rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """All-reduce every gradient as one flat buffer and divide by N (the mean of the ranks' mean losses)."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a boolean tensor over ranks."""
        combined = flags.to(torch.int32)
        dist.all_reduce(combined, op=dist.ReduceOp.MAX)
        return combined.bool()

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's weights and buffers everywhere (replicas start identical whatever their initialisation did)."""
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)

    def barrier(self) -> None:
        dist.barrier()


def init_data_parallel(data_parallel_size: int, device: str) -> DataParallel | None:
    """The process group of a `torchrun --nproc-per-node N` launch when `data_parallel_size` is N > 1, else None.

    gloo on CPU, NCCL on CUDA (each rank on `cuda:LOCAL_RANK`)."""
    if data_parallel_size == 1:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != data_parallel_size:
        raise ConfigError(
            f"data_parallel_size={data_parallel_size} needs as many processes, this launch has {world}: run it with "
            f"`torchrun --nproc-per-node {data_parallel_size} -m lm_saes_core.cli train SETTINGS` (a pipeline item "
            "is launched that way by itself)"
        )
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DataParallel(dist.get_rank(), dist.get_world_size())
