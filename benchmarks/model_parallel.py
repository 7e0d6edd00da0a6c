"""Feature (model) parallelism: one TopK SAE trained by the `Trainer` with its features on 1 process and split over
N (torchrun, gloo on CPU / NCCL on GPU), side by side in one run.

    python benchmarks/model_parallel.py                                # 576 x 4608, k 32, 1 vs 2 shards
    python benchmarks/model_parallel.py --d-model 2048 --d-sae 65536 --k 64 --shards 4 --device cuda

Each contender trains on the same random batches already in memory (the step and its collectives, no reader), Aux-K
on, metrics every 10 steps; tokens/s over the steps after the first 3. Per rank: the bytes of its parameters and
Adam's moments (from the tensors), its peak resident memory (ru_maxrss, which includes torch itself, ~0.4 GB) and
the bytes it writes for the run's one checkpoint, after the timed steps (sharded: its own part; alone: the whole).
On a CPU the processes share the cores (torch threads per process = cores / N), so the ratio shows what the
collectives cost, not a speed-up; on GPUs it shows the scaling and the memory saved.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args: argparse.Namespace) -> None:
    from lm_saes_core.models import SAEConfig, SparseAutoEncoder
    from lm_saes_core.training import Trainer, TrainerConfig
    from lm_saes_core.training.data_parallel import init_parallel

    data, shards = init_parallel(1, args.shards, args.device)
    torch.manual_seed(0)
    cfg = SAEConfig(sae_type="sae", d_model=args.d_model, d_sae=args.d_sae, hook_point_in="h", hook_point_out="h",
                    act_fn="topk", top_k=args.k, device=args.device)  # fmt: skip
    model = SparseAutoEncoder.from_config(cfg)
    model.set_dataset_average_activation_norm({"h": args.d_model**0.5})
    generator = torch.Generator().manual_seed(1)
    batches = [{"h": torch.randn(args.batch, args.d_model, generator=generator).to(args.device)}
               for _ in range(args.steps)]  # fmt: skip
    trainer_cfg = TrainerConfig(lr=1e-3, total_training_tokens=args.batch * args.steps, log_frequency=10,
                                n_checkpoints=0, checkpoint_every_steps=args.steps - 1, auxk_coefficient=1 / 32,
                                dead_threshold=args.batch * 4, exp_result_path=args.out)  # fmt: skip
    times, sizes = [], []

    class Timed(Trainer):
        def _step(self, model, batch, n_tokens, progress, optimizer, scheduler, dead, window):
            start = time.perf_counter()
            result = super()._step(model, batch, n_tokens, progress, optimizer, scheduler, dead, window)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            states = [v for state in optimizer.state.values() for v in state.values() if v.ndim > 0]
            sizes[:] = [sum(t.numel() * t.element_size() for t in [*model.parameters(), *states])]
            return result

    Timed(trainer_cfg, data, prefetch=0, feature_shards=shards).fit(model, iter(batches))
    rank = int(os.environ.get("RANK", "0"))
    record = {"seconds": sum(times[3:]), "tokens": args.batch * len(times[3:]), "bytes": sizes[0],
              "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # fmt: skip
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out is not None:
        return worker(args)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="mp-bench-") as work:
        for nproc in (1, args.shards):
            out = Path(work, f"mp{nproc}")
            out.mkdir()
            sizes = {"d-model": args.d_model, "d-sae": args.d_sae, "k": args.k, "batch": args.batch}
            flags = [*(f"--{key}={value}" for key, value in sizes.items()), f"--steps={args.steps}",
                     f"--shards={nproc}", f"--device={args.device}", f"--out={out}"]  # fmt: skip
            torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={nproc}"]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(cores // nproc, 1))}
            subprocess.run([*torchrun, __file__, *flags], check=True, env=env, stdout=subprocess.DEVNULL)
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(nproc)]
            rate = ranks[0]["tokens"] / max(r["seconds"] for r in ranks)
            written = max(_checkpoint_bytes(out, rank) for rank in range(nproc))
            rows.append((nproc, rate, max(r["bytes"] for r in ranks), max(r["maxrss"] for r in ranks), written))
    print(f"TopK SAE {args.d_model} x {args.d_sae}, k {args.k}, batch {args.batch}, {args.device}, {cores} cores")
    print(f"{'shards':>6} {'tokens/s':>10} {'ratio':>6} {'params+Adam/rank':>17} {'ratio':>6} {'peak RSS/rank':>14} "
          f"{'checkpoint/rank':>16}")  # fmt: skip
    for nproc, rate, size, rss, written in rows:
        print(f"{nproc:>6} {rate:>10,.0f} {rate / rows[0][1]:>6.2f} {size / 2**20:>13.1f} MiB "
              f"{size / rows[0][2]:>6.2f} {rss / 2**20:>10.0f} MiB {written / 2**20:>12.1f} MiB")  # fmt: skip


def _checkpoint_bytes(out: Path, rank: int) -> int:
    """What rank `rank` wrote for the checkpoint: its DCP part (rank 0 also the trainer state and config), or every
    file of a one-process checkpoint."""
    (checkpoint,) = (out / "checkpoints").iterdir()
    files = [path for path in checkpoint.rglob("*") if path.is_file()]
    if (checkpoint / "sharded").is_dir():
        own = f"__{rank}_"
        files = [p for p in files if p.name.startswith(own) or (rank == 0 and p.parent == checkpoint)]
    return sum(path.stat().st_size for path in files)


if __name__ == "__main__":
    main()
