"""Run by tests/test_data_parallel.py under `torchrun --nproc-per-node 2`: train one dictionary data-parallel on this
rank's half of each of the given batches (the trainer's own code path, no runner), then save this rank's weights."""

import sys
from pathlib import Path

import torch

from lm_saes_core.models import SAEConfig, SparseAutoEncoder
from lm_saes_core.training import TrainerConfig
from lm_saes_core.training.data_parallel import init_data_parallel
from lm_saes_core.training.trainer import Trainer


def main(batches_file: str, out: str) -> None:
    payload = torch.load(batches_file)
    data_parallel = init_data_parallel(2, "cpu")
    half = payload["batches"][0][payload["hook"]].shape[0] // 2
    rows = slice(data_parallel.rank * half, (data_parallel.rank + 1) * half)
    local = [{key: value[rows] for key, value in batch.items()} for batch in payload["batches"]]
    torch.manual_seed(data_parallel.rank)  # different initialisations: rank 0's must reach every replica
    model = SparseAutoEncoder.from_config(SAEConfig.model_validate(payload["sae"]))
    model.set_dataset_average_activation_norm({payload["hook"]: payload["norm"] + data_parallel.rank})
    result = Trainer(TrainerConfig.model_validate(payload["trainer"]), data_parallel).fit(model, iter(local))
    state = {"weights": model.state_dict(), "norms": model.cfg.dataset_average_activation_norm,
             "metrics": result.last_metrics}  # fmt: skip
    torch.save(state, Path(out) / f"rank{data_parallel.rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
