"""Training throughput of our cross-layer transcoder and crosscoder against plain-torch dense references of the same
math.

Same shapes, same k, same batches, fp32, one run; each timing is the median over repeats of a block of optimiser steps
(forward, loss, backward, Adam step). The activations are a cache of SmolLM2 when `--cache` names one (`lm-saes
generate` with the hook points: `ln2.hook_normalized` -> `hook_mlp_out` at L consecutive layers for the CLT,
`hook_resid_post` at H consecutive layers for the crosscoder; `configs/quality/circuits/generate.yaml` writes both),
else Gaussian stand-ins. Peak RSS is read after each contender (it only grows, so the rows show the increments).

    python benchmarks/clt_training.py [--layers 4] [--d-sae 4608] [--k 32] [--batch 1024] [--cache DIR]
        [--kinds clt crosscoder] [--heads 3] [--first-head-layer 4]
"""

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lm_saes_core.models import CLTConfig, CrossCoder, CrossCoderConfig, CrossLayerTranscoder


def hooks(first_layer: int, layers: int) -> tuple[list[str], list[str]]:
    ins = [f"blocks.{first_layer + i}.ln2.hook_normalized" for i in range(layers)]
    outs = [f"blocks.{first_layer + i}.hook_mlp_out" for i in range(layers)]
    return ins, outs


def load_batches(args, ins: list[str], outs: list[str]) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], str]:
    """(x (N, L, D), y (N, L, D)) batches, each hook scaled to mean norm sqrt(D) (dataset-wise normalisation)."""
    n_rows = args.batch * args.steps
    if args.cache is not None:
        from lm_saes_core.activation.reader import CachedActivations

        unique = list(dict.fromkeys(ins + outs))
        columns: dict[str, list[torch.Tensor]] = {hook: [] for hook in unique}
        count = 0
        for item in CachedActivations(Path(args.cache), hook_points=unique).iterate(num_workers=0):
            for hook in unique:
                columns[hook].append(item[hook][item["mask"]].float())
            count += int(item["mask"].sum())
            if count >= n_rows:
                break
        stacked = {hook: torch.cat(values)[:n_rows] for hook, values in columns.items()}
        source = f"SmolLM2 {ins[0]} .. {outs[-1]} ({args.cache})"
    else:
        generator = torch.Generator().manual_seed(0)
        stacked = {hook: torch.randn(n_rows, args.d_model, generator=generator) for hook in dict.fromkeys(ins + outs)}
        source = "Gaussian stand-ins (no --cache)"
    for hook, value in stacked.items():
        stacked[hook] = value / value.norm(dim=-1).mean() * value.shape[-1] ** 0.5
    x = torch.stack([stacked[hook] for hook in ins], dim=1)
    y = torch.stack([stacked[hook] for hook in outs], dim=1)
    return list(zip(x.split(args.batch), y.split(args.batch), strict=True)), source


def ours(args, sparse: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    ins, outs = hooks(args.first_layer, args.layers)
    cfg = CLTConfig(d_model=args.d_model, d_sae=args.d_sae, hook_points_in=ins, hook_points_out=outs, act_fn="topk",
                    top_k=args.k, norm_activation="inference")  # fmt: skip
    torch.manual_seed(0)
    model = CrossLayerTranscoder.from_config(cfg)
    model.sparse_kernels = sparse
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        batch = {hook: x[:, i] for i, hook in enumerate(ins)} | {hook: y[:, i] for i, hook in enumerate(outs)}
        model.compute_loss(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def dense_reference(args) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The textbook CLT step: per-layer encoders, TopK per layer on h * (norm over each feature's decoders), the
    triangular decode as dense einsums, MSE, Adam."""
    L, D, F, k = args.layers, args.d_model, args.d_sae, args.k
    torch.manual_seed(0)
    W_E = torch.nn.Parameter(torch.randn(L, D, F) / D**0.5)
    b_E = torch.nn.Parameter(torch.zeros(L, F))
    W_D = [torch.nn.Parameter(torch.randn(t + 1, F, D) / (L * F) ** 0.5) for t in range(L)]
    b_D = torch.nn.Parameter(torch.zeros(L, D))
    optimizer = torch.optim.Adam([W_E, b_E, *W_D, b_D], lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        h = torch.einsum("nld,ldf->nlf", x, W_E) + b_E
        norm = torch.stack([sum(W_D[t][s].pow(2).sum(-1) for t in range(s, L)) for s in range(L)]).sqrt()
        scores = h * norm
        values, indices = scores.relu().topk(k, dim=-1)
        f = torch.zeros_like(h).scatter(-1, indices, values) / norm
        y_hat = torch.stack([torch.einsum("nsf,sfd->nd", f[:, : t + 1], W_D[t]) for t in range(L)], dim=1) + b_D
        ((y_hat - y) ** 2).sum(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def crosscoder_ours(args, sparse: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    heads = resid_hooks(args)
    cfg = CrossCoderConfig(d_model=args.d_model, d_sae=args.d_sae, heads=heads, act_fn="topk", top_k=args.k,
                           norm_activation="inference")  # fmt: skip
    torch.manual_seed(0)
    model = CrossCoder.from_config(cfg)
    model.sparse_kernels = sparse
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        model.compute_loss({hook: x[:, i] for i, hook in enumerate(heads)}).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def crosscoder_reference(args) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The textbook crosscoder step: one pre-activation summed over the heads' encoders, TopK per head on h times
    that head's decoder norms, per-head dense decodes, MSE, Adam."""
    H, D, F, k = args.heads, args.d_model, args.d_sae, args.k
    torch.manual_seed(0)
    W_E = torch.nn.Parameter(torch.randn(H, D, F) / D**0.5)
    b_E = torch.nn.Parameter(torch.zeros(H, F))
    W_D = torch.nn.Parameter(torch.randn(H, F, D) / F**0.5)
    b_D = torch.nn.Parameter(torch.zeros(H, D))
    optimizer = torch.optim.Adam([W_E, b_E, W_D, b_D], lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        h = torch.einsum("nhd,hdf->nf", x, W_E) + b_E.sum(0)
        norm = W_D.norm(dim=-1)  # (H, F)
        values, indices = (h[:, None] * norm).relu().topk(k, dim=-1)
        f = torch.zeros(len(x), H, F).scatter(-1, indices, values) / norm
        y_hat = torch.einsum("nhf,hfd->nhd", f, W_D) + b_D
        ((y_hat - y) ** 2).sum(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def resid_hooks(args) -> list[str]:
    return [f"blocks.{args.first_head_layer + i}.hook_resid_post" for i in range(args.heads)]


def time_steps(step, batches, repeats: int) -> list[float]:
    step(*batches[0])  # warm-up
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for x, y in batches:
            step(x, y)
        rates.append(sum(len(x) for x, _ in batches) / (time.perf_counter() - started))
    return rates


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--first-layer", type=int, default=3)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", default=None, help="activation cache with the L layers' hook points")
    parser.add_argument("--kinds", nargs="+", choices=("clt", "crosscoder"), default=["clt", "crosscoder"])
    parser.add_argument("--heads", type=int, default=3, help="crosscoder: residual streams of consecutive layers")
    parser.add_argument("--first-head-layer", type=int, default=4)
    args = parser.parse_args()
    console = Console()
    contenders = {
        "clt": (
            hooks(args.first_layer, args.layers),
            f"CLT training step, L {args.layers}, d_sae {args.d_sae} per layer, TopK k {args.k} per layer",
            (
                ("dense reference (einsum decode)", lambda: dense_reference(args)),
                ("lm-saes CLT, dense path", lambda: ours(args, sparse=False)),
                ("lm-saes CLT, sparse kernels", lambda: ours(args, sparse=True)),
            ),
        ),
        "crosscoder": (
            (resid_hooks(args), resid_hooks(args)),
            f"Crosscoder training step, {args.heads} heads, d_sae {args.d_sae}, TopK k {args.k} per head",
            (
                ("dense reference (einsum decode)", lambda: crosscoder_reference(args)),
                ("lm-saes crosscoder, dense path", lambda: crosscoder_ours(args, sparse=False)),
                ("lm-saes crosscoder, sparse kernels", lambda: crosscoder_ours(args, sparse=True)),
            ),
        ),
    }
    for kind in args.kinds:
        (ins, outs), title, builders = contenders[kind]
        batches, source = load_batches(args, ins, outs)
        rows = []
        for name, build in builders:
            rates = time_steps(build(), batches, args.repeats)
            rows.append((name, statistics.median(rates), peak_rss_gib()))
        reference = rows[0][1]
        table = Table(
            title=f"{title}, d_model {args.d_model}, batch {args.batch}, fp32, {torch.get_num_threads()} threads; "
            f"{source}; median of {args.repeats} x {args.steps} steps"
        )
        for column in ("contender", "tokens/s", "vs dense reference", "peak RSS (GiB, cumulative)"):
            table.add_column(column, justify="left" if column == "contender" else "right")
        for name, rate, rss in rows:
            table.add_row(name, f"{rate:,.0f}", f"{rate / reference:.2f}", f"{rss:.2f}")
        console.print(table)


if __name__ == "__main__":
    main()
