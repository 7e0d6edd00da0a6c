"""Run by tests/test_model_parallel.py under `torchrun --nproc-per-node DP*MP`: train one dictionary with its features
split over MP shards and its batches over DP data ranks (the trainer's own code path, no runner), then save what rank
0 holds afterwards (the whole trained dictionary) and every rank's parameter + optimiser bytes."""

import sys
from pathlib import Path

import torch

from lm_saes_core.models import SparseDictionary
from lm_saes_core.training import TrainerConfig
from lm_saes_core.training.data_parallel import init_mesh
from lm_saes_core.training.trainer import Trainer


class _Measured(Trainer):
    """Records this shard's parameter and Adam-state bytes after the last step (the tensors, not an estimate)."""

    def _step(self, model, batch, n_tokens, progress, optimizer, scheduler, dead, window):
        result = super()._step(model, batch, n_tokens, progress, optimizer, scheduler, dead, window)
        tensors = [*model.parameters(), *(v for s in optimizer.state.values() for v in s.values() if v.ndim > 0)]
        self.bytes = sum(t.numel() * t.element_size() for t in tensors)
        self.whole_bytes = sum(t.numel() * t.element_size() for t in self.whole.parameters())
        return result


def main(
    batches_file: str, out: str, data_size: str, model_size: str, resume_from: str = "", head_size: str = "1"
) -> None:
    payload = torch.load(batches_file)
    data, shards, heads = init_mesh(int(data_size), int(head_size), int(model_size), "cpu")
    rows = payload["batches"][0][payload["hook"]].shape[0] // data.world_size
    part = slice(data.rank * rows, (data.rank + 1) * rows)
    keys = heads.local_heads(payload["sae"]["heads"]) if heads is not None else payload["batches"][0].keys()
    local = [{key: batch[key][part] for key in keys} for batch in payload["batches"]]  # a head rank: its hooks only
    torch.manual_seed(torch.distributed.get_rank())  # different initialisations: rank 0's must reach every shard
    kind = SparseDictionary.kind(payload["sae"]["sae_type"])
    model = kind.from_config(kind.config_class.model_validate(payload["sae"]))
    model.set_dataset_average_activation_norm(payload.get("norms") or {payload["hook"]: payload["norm"]})
    trainer = _Measured(TrainerConfig.model_validate(payload["trainer"]), data, feature_shards=shards,
                        head_shards=heads)  # fmt: skip
    trainer.whole = model
    result = trainer.fit(model, iter(local), resume_from=resume_from or None)
    rank = torch.distributed.get_rank()
    state = {"weights": model.state_dict(), "metrics": result.last_metrics, "bytes": trainer.bytes,
             "whole_bytes": trainer.whole_bytes}  # fmt: skip
    torch.save(state, Path(out) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
