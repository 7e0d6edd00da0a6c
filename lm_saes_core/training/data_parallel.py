"""Data-parallel training under `torchrun`: N processes, one dictionary replica each, every step's batch split N ways.

Each rank streams its own part of the data (every N-th document of a dataset source, every N-th chunk of a cache; see
`ActivationFactory.process(shard=...)`) in batches of batch_size / N, so reading and the language model's forward
passes are split too. Gradients are averaged across ranks before clipping, so the replicas take identical steps: a
step is the one-process step on the union of the ranks' batches (up to the order of float sums).
Which latents fired is combined across ranks, so the dead-latent statistics (and Aux-K) see the whole batch. Rank 0
alone writes checkpoints, the final weights, the run's record files and W&B logs; the logged metrics are the group's.

BatchTopK's threshold is that of the whole distributed batch (`kth_largest`: two all-gathers of candidates per
step). With `model_parallel_size > 1` the processes form a (data, model) mesh (`init_parallel`): each data rank's
dictionary is split by features over `model` (models/feature_parallel.py), and these collectives run over `data`.
"""

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lm_saes_core.config import ConfigError
from lm_saes_core.models.base import SparseDictionary
from lm_saes_core.models.collectives import any_process, kth_largest_over
from lm_saes_core.models.feature_parallel import FeatureShards
from lm_saes_core.models.head_parallel import HeadShards


@dataclass(frozen=True)
class DataParallel:
    """This process's place on the `data` axis: `rank` of `world_size` replicas. Under model parallelism the replicas
    are feature shards (`group` spans the data ranks of one shard) and only global rank 0 is the main process."""

    rank: int
    world_size: int
    group: object = None
    """The data ranks' process group (None: every process)."""
    global_rank: int | None = None
    mesh: object = None
    """The (data, head, model) DeviceMesh of a feature- or head-parallel launch: sharded checkpoints are saved on it."""

    @property
    def is_main(self) -> bool:
        return (self.rank if self.global_rank is None else self.global_rank) == 0

    @property
    def shard_of_data(self) -> tuple[int, int]:
        """(rank, world): which part of every data source this rank streams."""
        return self.rank, self.world_size

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """All-reduce every gradient in place and divide by N (the mean of the ranks' mean losses). One collective per
        tensor, all in flight at once: a dictionary has a handful of large tensors, so a flat copy would only double
        the memory of the gradients."""
        grads = [p.grad for p in parameters if p.grad is not None]
        for work in [dist.all_reduce(grad, group=self.group, async_op=True) for grad in grads]:
            work.wait()
        for grad in grads:
            grad.div_(self.world_size)

    def sum_(self, tensor: torch.Tensor) -> None:
        """In place: the sum of `tensor` over ranks."""
        dist.all_reduce(tensor, group=self.group)

    def any(self, flags: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a boolean tensor over ranks."""
        return any_process(flags, self.group)

    def kth_largest(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """The (n x N)-th largest entry of every rank's `values` together (n per rank), clamped at 0."""
        return kth_largest_over(values, n * self.world_size, self.group)

    def broadcast_model(self, model: SparseDictionary) -> None:
        """Rank 0's weights, buffers and dataset-wise input norms on every process (of every data rank and shard):
        the ranks initialised from their own parts of the data, and the replicas must start identical."""
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
        norms = [model.cfg.dataset_average_activation_norm]
        dist.broadcast_object_list(norms, src=0)
        if norms[0] is not None:
            model.set_dataset_average_activation_norm(norms[0])

    def barrier(self) -> None:
        dist.barrier()


def init_parallel(
    data_parallel_size: int, model_parallel_size: int, device: str
) -> tuple[DataParallel | None, FeatureShards | None]:
    """This process's place in a `torchrun` launch of data_parallel_size x model_parallel_size processes: (its data
    replica or None, its feature shard or None). The process count is checked before any work."""
    data, shards, _ = init_mesh(data_parallel_size, 1, model_parallel_size, device)
    return data, shards


def init_mesh(
    data_parallel_size: int, head_parallel_size: int, model_parallel_size: int, device: str
) -> tuple[DataParallel | None, FeatureShards | None, HeadShards | None]:
    """`init_parallel` with a crosscoder's heads split too: a (data, head, model) mesh of dp x hp x mp processes.
    BatchTopK's threshold spans the data and model ranks of one head group (each group has its own heads)."""
    if model_parallel_size == 1 and head_parallel_size == 1:
        return init_data_parallel(data_parallel_size, device), None, None
    sizes = (data_parallel_size, head_parallel_size, model_parallel_size)
    layout = f"data_parallel_size={data_parallel_size} x model_parallel_size={model_parallel_size}"
    if head_parallel_size > 1:
        layout = layout.replace(" x ", f" x head_parallel_size={head_parallel_size} x ")
    _check_world(data_parallel_size * head_parallel_size * model_parallel_size, layout)
    cuda = _init_process_group(device)
    mesh = init_device_mesh("cuda" if cuda else "cpu", sizes, mesh_dim_names=("data", "head", "model"))
    data_rank, head_rank, model_rank = mesh.get_coordinate()
    data = DataParallel(data_rank, data_parallel_size, mesh.get_group("data"), dist.get_rank(), mesh)
    shards = heads = None
    if model_parallel_size > 1:
        world = None
        if head_parallel_size > 1:  # every process creates every group, in the same order
            groups = [dist.new_group(mesh.mesh[:, h, :].flatten().tolist()) for h in range(head_parallel_size)]
            world = groups[head_rank]
        shards = FeatureShards(model_rank, model_parallel_size, mesh.get_group("model"), world, data_parallel_size)
    if head_parallel_size > 1:
        heads = HeadShards(head_rank, head_parallel_size, mesh.get_group("head"))
    return data, shards, heads


def _check_world(processes: int, layout: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != processes:
        raise ConfigError(
            f"{layout} needs {processes} processes, this launch has {world}: run it with `torchrun "
            f"--nproc-per-node {processes} -m lm_saes_core.cli train SETTINGS` (a pipeline item is launched that way "
            "by itself)"
        )


def _init_process_group(device: str) -> bool:
    """gloo on CPU, NCCL on CUDA (each rank on `cuda:LOCAL_RANK`); whether it is CUDA."""
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return cuda


def init_data_parallel(data_parallel_size: int, device: str) -> DataParallel | None:
    """The process group of a `torchrun --nproc-per-node N` launch when `data_parallel_size` is N > 1, else None.

    gloo on CPU, NCCL on CUDA (each rank on `cuda:LOCAL_RANK`)."""
    if data_parallel_size == 1:
        return None
    _check_world(data_parallel_size, f"data_parallel_size={data_parallel_size}")
    _init_process_group(device)
    return DataParallel(dist.get_rank(), dist.get_world_size())
