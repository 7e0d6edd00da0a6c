"""Reading cached activations against a plain sequential read of the same chunk files (the physical limit).

"Sequential read" reads every chunk file of the hook points, in stored order, into one reused buffer (`readinto`):
what the disk (or the page cache) gives. "Reader" is `CachedActivations.iterate` in a shuffled chunk order, each
chunk decoded to tensors on the training device (on CPU every page of them touched, so lazily mapped bytes count only
once read). "Training stream" is the activation factory as training uses it: the reader, 2-D chunks flattened to
1-D tokens, a 32,768-row shuffle buffer and batches of 4,096 tokens, on the device, freed memory kept for reuse as
`Trainer.fit` keeps it: once as a run's first epoch, whose shuffle buffer is faulted in afresh, and once as a later
epoch, which reuses the memory the epoch before it freed (timed after an untimed epoch). Rates are chunk-file bytes
per second (the training stream drops padding and BOS tokens, so it moves fewer bytes than it reads), medians of
interleaved rounds. The files sit in the page cache after the warm-up pass (dropping it needs root and disturbs other
work), so the limit is memory bandwidth: the tightest test of the reader's own overhead. On CPU the stream copies most
rows once, as the sequential read does (the buffer holds the mapped chunks and gathers each batch from them), but at
random rows, and the reader's threads fault the mapped pages in on the other core.

A random gather of a pass costs, on its own, about as long as the sequential read (rows scattered over 600 MB), so
a stream that shuffles as it trains cannot come near the read on a CPU. A cache written shuffled can: "cache written
shuffled" reads a 1-D cache whose rows were permuted when it was generated (`buffer_size` in `lm-saes generate`),
chunks in shuffled order and no training buffer, so its batches are views of the mapped chunks; its ratio is against
its own files' sequential read. Make it with (~4 min on 2 cores):

    lm-saes generate configs/quickstart/generate.yaml --set target=activations-1d --set total_tokens=245760 \
        --set batch_size=4096 --set buffer_size=245760 --set n_samples_per_chunk=8192 \
        --set output_dir=.lm_saes/bench/shuffled-1d

    python benchmarks/cache_reader.py [--cache .lm_saes/quickstart/activations] [--hooks H ...] [--rounds 5]
        [--device cpu] [--workers 2] [--shuffled-cache .lm_saes/bench/shuffled-1d]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lm_saes_core.activation.config import ActivationFactoryConfig
from lm_saes_core.activation.factory import ActivationFactory
from lm_saes_core.activation.reader import CachedActivations
from lm_saes_core.training.memory import freed_memory_kept


def chunk_files(cache: CachedActivations) -> list[Path]:
    return [cache.chunk_file(hook, chunk["name"]) for chunk in cache.chunks for hook in cache.hook_points]


def sequential_read(files: list[Path]) -> float:
    """Seconds to read every file into one reused buffer."""
    buffer = bytearray(max(path.stat().st_size for path in files))
    view = memoryview(buffer)
    started = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            size = path.stat().st_size
            read = 0
            while read < size:
                read += handle.readinto(view[read:size])
    return time.perf_counter() - started


def touch(tensor: torch.Tensor) -> None:
    """Read one element per 4 KiB page, so a lazily mapped tensor is really read (a no-op cost once it is)."""
    flat = tensor.reshape(-1)
    flat[:: max(1, 4096 // tensor.element_size())].sum()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reader(cache: CachedActivations, device: str, workers: int, epoch: int) -> float:
    started = time.perf_counter()
    for item in cache.iterate(device=device, num_workers=workers, shuffle_seed=0, epoch=epoch):
        if not device.startswith("cuda"):
            for value in item.values():
                touch(value)
    synchronize(device)
    return time.perf_counter() - started


def training_stream(
    cache: CachedActivations, device: str, workers: int, epoch: int, later: bool, buffer_size: int | None = 32768
) -> float:
    """Seconds for one epoch; `later`: after an untimed one in the same fit, so that it reuses that one's memory."""
    source = {"type": "activations", "name": "cache", "path": str(cache.root), "shuffle_chunks": True,
              "device": device, "num_workers": workers}  # fmt: skip
    cfg = ActivationFactoryConfig(sources=[source], target="activations-1d", hook_points=cache.hook_points,
                                  batch_size=4096, buffer_size=buffer_size,
                                  buffer_shuffle={"perm_seed": 0})  # fmt: skip
    with freed_memory_kept():  # as in `Trainer.fit`: the batches' memory is reused, not faulted in afresh
        if later:
            for _ in ActivationFactory(cfg).process(epoch=epoch):
                pass
        started = time.perf_counter()
        for batch in ActivationFactory(cfg).process(epoch=epoch + later):
            if not device.startswith("cuda"):
                for value in batch.values():
                    touch(value)
        synchronize(device)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=".lm_saes/quickstart/activations")
    parser.add_argument("--hooks", nargs="+", default=None, help="hook points to read (default: all of the cache's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2, help="reader threads (the source's num_workers)")
    parser.add_argument(
        "--shuffled-cache",
        default=".lm_saes/bench/shuffled-1d",
        help="a 1-D cache written shuffled (see above); its rows are left out when it does not exist",
    )
    args = parser.parse_args()
    if not (Path(args.cache) / "manifest.json").exists():
        raise SystemExit(
            f"no activation cache at {args.cache}: make one with `lm-saes quickstart` or `lm-saes generate`"
        )
    cache = CachedActivations(args.cache, hook_points=args.hooks)
    files = chunk_files(cache)
    n_bytes = sum(path.stat().st_size for path in files)
    shuffled = None
    if (Path(args.shuffled_cache) / "manifest.json").exists():
        shuffled = CachedActivations(args.shuffled_cache, hook_points=args.hooks)
        shuffled_files = chunk_files(shuffled)
        shuffled_bytes = sum(path.stat().st_size for path in shuffled_files)
        if shuffled.layout != "1d":
            raise SystemExit(f"{args.shuffled_cache} holds a {shuffled.layout} cache; the shuffled rows need a 1-D one")
    else:
        print(f"no cache written shuffled at {args.shuffled_cache}: its rows are left out (see --help's docstring)")
    seconds: dict[str, list[float]] = {"raw": [], "reader": [], "stream": [], "later": []}
    if shuffled is not None:
        seconds |= {"shuffled raw": [], "shuffled stream": []}
    sequential_read(files)  # warm-up: the page cache, the allocator, the threads
    reader(cache, args.device, args.workers, 0)
    if shuffled is not None:
        sequential_read(shuffled_files)
    for round_ in range(args.rounds):
        seconds["raw"].append(sequential_read(files))
        seconds["reader"].append(reader(cache, args.device, args.workers, round_))
        seconds["stream"].append(training_stream(cache, args.device, args.workers, round_, later=False))
        seconds["later"].append(training_stream(cache, args.device, args.workers, round_, later=True))
        if shuffled is not None:
            seconds["shuffled raw"].append(sequential_read(shuffled_files))
            seconds["shuffled stream"].append(
                training_stream(shuffled, args.device, args.workers, round_, later=False, buffer_size=None)
            )
    sizes = {name: shuffled_bytes if name.startswith("shuffled") else n_bytes for name in seconds}
    rates = {name: sizes[name] / statistics.median(values) for name, values in seconds.items()}
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    table = Table(
        title=f"Cached activations: {len(cache.chunks)} chunks x {len(cache.hook_points)} hook points "
        f"({n_bytes / 2**20:,.0f} MiB, {cache.dtype}, {cache.layout}) from {args.cache}; {args.workers} reader "
        f"threads; {device}; page cache warm; median of {args.rounds} interleaved rounds"
    )
    for column in ("contender", "MiB/s", "s per pass (each round)", "vs sequential read"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    labels = {
        "raw": "sequential read of the chunk files (readinto one buffer)",
        "reader": f"CachedActivations.iterate, shuffled chunks, decoded on {args.device}",
        "stream": f"training stream: + 1-D tokens, 32,768-row shuffle buffer, batches of 4,096 on {args.device}",
        "later": "training stream, a later epoch (the buffer's memory freed by the one before reused)",
    }
    if shuffled is not None:
        labels |= {
            "shuffled raw": f"cache written shuffled ({shuffled_bytes / 2**20:,.0f} MiB, 1-D): sequential read",
            "shuffled stream": "cache written shuffled: training stream, shuffled chunks, no buffer, batches of 4,096",
        }
    for name, label in labels.items():
        runs = " ".join(f"{value:.2f}" for value in seconds[name])
        base = rates["shuffled raw" if name.startswith("shuffled") else "raw"]
        table.add_row(label, f"{rates[name] / 2**20:,.0f}", runs, f"{rates[name] / base:.2f}")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
