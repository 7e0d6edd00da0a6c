"""Training throughput and peak memory of our MOLT (mixture of linear transforms) against a plain-torch reference of
the same math written as the reference system computes it: every transform's norm from the dense D x D product
U_i V_i, and the decode over every transform.

Same shapes, same k, same batches, fp32. Timings: the contenders take turns, one block of optimiser steps (forward,
loss, backward, Adam step) each per round, so a busy machine slows them alike; the table gives the median over rounds.
Peak memory: each contender first runs two steps alone in a fresh process, whose peak RSS (`ru_maxrss`) is reported
minus that of the same process before building the model (Python, torch and the batches). The activations are a cache of
SmolLM2 when `--cache` names one (`lm-saes generate` with `blocks.L.ln2.hook_normalized` and `blocks.L.hook_mlp_out`),
else Gaussian stand-ins.

    python benchmarks/molt.py [--rank-counts 1:512,2:256,4:128,8:64] [--k 32] [--batch 1024] [--cache DIR]
        [--layer 3] [--max-reference-gib 6]
"""

import argparse
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lm_saes_core.models import MixtureOfLinearTransforms, MOLTConfig

Step = Callable[[torch.Tensor, torch.Tensor], None]


def hooks(layer: int) -> tuple[str, str]:
    return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"


def load_batches(args) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """(x (N, D), y (N, D)) batches, each hook scaled to mean norm sqrt(D) (dataset-wise normalisation)."""
    n_rows = args.batch * args.steps
    hook_in, hook_out = hooks(args.layer)
    if args.cache is not None:
        from lm_saes_core.activation.reader import CachedActivations

        columns: dict[str, list[torch.Tensor]] = {hook_in: [], hook_out: []}
        count = 0
        for item in CachedActivations(Path(args.cache), hook_points=[hook_in, hook_out]).iterate(num_workers=0):
            for hook in columns:
                columns[hook].append(item[hook][item["mask"]].float())
            count += int(item["mask"].sum())
            if count >= n_rows:
                break
        x, y = (torch.cat(columns[hook])[:n_rows] for hook in (hook_in, hook_out))
        source = f"SmolLM2 {hook_in} -> {hook_out} ({args.cache})"
    else:
        generator = torch.Generator().manual_seed(0)
        x, y = (torch.randn(n_rows, args.d_model, generator=generator) for _ in range(2))
        source = "Gaussian stand-ins (no --cache)"
    x, y = (v / v.norm(dim=-1).mean() * v.shape[-1] ** 0.5 for v in (x, y))
    return list(zip(x.split(args.batch), y.split(args.batch), strict=True)), source


def ours(args, sparse: bool | None) -> Step:
    hook_in, hook_out = hooks(args.layer)
    cfg = MOLTConfig(d_model=args.d_model, rank_counts=args.rank_counts, hook_point_in=hook_in, hook_point_out=hook_out,
                     act_fn="topk", top_k=args.k, norm_activation="inference")  # fmt: skip
    torch.manual_seed(0)
    model = MixtureOfLinearTransforms.from_config(cfg)
    model.sparse_kernels = sparse
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        model.compute_loss({hook_in: x, hook_out: y}).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def reference(args) -> Step:
    """The reference system's MOLT step: h = x W_E + b_E; n_i = ||U_i V_i||_F from the D x D product; TopK on h * n;
    y_hat = sum over every transform of f_i U_i (V_i x) + b_D as dense einsums; MSE; Adam."""
    D, k = args.d_model, args.k
    F = sum(args.rank_counts.values())
    torch.manual_seed(0)
    W_E = torch.nn.Parameter(torch.randn(D, F) / D**0.5)
    b_E = torch.nn.Parameter(torch.zeros(F))
    U = {r: torch.nn.Parameter(torch.randn(n, D, r) / (D * r) ** 0.25) for r, n in args.rank_counts.items()}
    V = {r: torch.nn.Parameter(torch.randn(n, r, D) / (D * r) ** 0.25) for r, n in args.rank_counts.items()}
    b_D = torch.nn.Parameter(torch.zeros(D))
    optimizer = torch.optim.Adam([W_E, b_E, *U.values(), *V.values(), b_D], lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        h = x @ W_E + b_E
        norm = torch.cat([(U[r] @ V[r]).flatten(1).norm(dim=1) for r in U])  # (F,) from (n_r, D, D) products
        values, indices = (h * norm).relu().topk(k, dim=-1)
        f = torch.zeros_like(h).scatter(-1, indices, values) / norm
        y_hat, start = b_D, 0
        for r in U:
            f_r = f[:, start : start + U[r].shape[0], None]
            y_hat = y_hat + torch.einsum("nir,idr->nd", f_r * torch.einsum("nd,ird->nir", x, V[r]), U[r])
            start += U[r].shape[0]
        ((y_hat - y) ** 2).sum(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_block(step: Step, batches) -> float:
    started = time.perf_counter()
    for x, y in batches:
        step(x, y)
    return sum(len(x) for x, _ in batches) / (time.perf_counter() - started)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure_memory(args, name: str, queue) -> None:
    """In a fresh process: the peak RSS that building `name` and training it for a few steps adds."""
    batches, _ = load_batches(args)
    before = peak_rss_gib()
    step = contenders(args)[name]()
    for x, y in batches[:2]:
        step(x, y)
    queue.put(peak_rss_gib() - before)


def reference_gib(args) -> float:
    """The D x D products the reference forms, with their gradients: 2 x count x D^2 floats."""
    return 2 * sum(args.rank_counts.values()) * args.d_model**2 * 4 / 2**30


def contenders(args) -> dict[str, Callable[[], Step]]:
    builders = {}
    if reference_gib(args) <= args.max_reference_gib:
        builders["reference (dense D x D norms, dense decode)"] = lambda: reference(args)
    builders["lm-saes MOLT, dense path"] = lambda: ours(args, sparse=False)
    builders["lm-saes MOLT, sparse path (default)"] = lambda: ours(args, sparse=None)
    return builders


def parse_rank_counts(text: str) -> dict[int, int]:
    return {int(rank): int(count) for rank, count in (pair.split(":") for pair in text.split(","))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--rank-counts", type=parse_rank_counts, default=parse_rank_counts("1:512,2:256,4:128,8:64"))
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3, help="optimiser steps per timed block")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--cache", default=None, help="activation cache with the layer's MLP input and output")
    parser.add_argument("--max-reference-gib", type=float, default=6.0,
                        help="skip the reference when its D x D products and their gradients need more")  # fmt: skip
    args = parser.parse_args()
    console = Console()
    batches, source = load_batches(args)
    builders = contenders(args)
    if len(builders) == 2:
        console.print(f"reference skipped: its D x D products need {reference_gib(args):.1f} GiB")
    # Memory first: a child's peak RSS starts from its parent's at the fork, so the parent must still be small.
    context = multiprocessing.get_context("spawn")
    memory = {}
    for name in builders:
        queue = context.Queue()
        process = context.Process(target=measure_memory, args=(args, name, queue))
        process.start()
        memory[name] = queue.get()
        process.join()
    steps = {name: build() for name, build in builders.items()}
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step(*batches[0])  # warm-up
    for _ in range(args.rounds):
        for name, step in steps.items():
            rates[name].append(run_block(step, batches))
    baseline = statistics.median(rates[next(iter(rates))])
    ranks = ", ".join(f"{r}: {n}" for r, n in args.rank_counts.items())
    table = Table(
        title=f"MOLT training step, d_model {args.d_model}, rank_counts {{{ranks}}} (d_sae "
        f"{sum(args.rank_counts.values())}), TopK k {args.k}, batch {args.batch}, fp32, {torch.get_num_threads()} "
        f"threads; {source}; median of {args.rounds} rounds x {args.steps} steps"
    )
    for column in ("contender", "tokens/s", f"vs {next(iter(rates)).split(' (')[0]}", "peak RSS added (GiB)"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    for name, values in rates.items():
        rate = statistics.median(values)
        table.add_row(name, f"{rate:,.0f}", f"{rate / baseline:.2f}", f"{memory[name]:.2f}")
    console.print(table)


if __name__ == "__main__":
    main()
