"""Training throughput of our sparse autoencoders against a plain-torch dense step and EleutherAI's sparsify.

Every contender trains on the same in-memory activations (real SmolLM2 layer-6 activations from the quickstart cache
when it exists, else Gaussian stand-ins), same batch, same width, fp32, same thread count, in one run; each timing
is the median over repeats of a block of optimiser steps (forward, loss, backward, Adam step), the contenders taking
turns within every repeat (a shared machine's load then falls on all of them alike).

ReLU and JumpReLU run twice. Once from the fresh initialisation ("init": ReLU has ~50% of its features active, a
state training soon leaves), and once at a trained-like density (`--density`, default 2%: a trained ReLU or
JumpReLU SAE keeps tens to a few hundred of thousands of features active): b_E (ReLU) or the thresholds (JumpReLU)
are set from the first batch so that this fraction is active. The dense reference starts from the same weights, bias
and thresholds as our SAE, so both run at the same density; the "active" column is the fraction measured after the
timed steps. "dense codec" rows force our fused node's dense path (`sparse_kernels = False`), the others let it pick
its path by density (`kernels.codec_is_sparse`).

Every contender's steps run with the memory one step frees kept for the next, as `Trainer.fit` runs them
(`freed_memory_kept`); `--default-allocator` times them under glibc's defaults instead, where every large tensor is
mapped and faulted in afresh on CPU (slower for all, and most for the step that allocates most).

    python benchmarks/sae_training.py [--steps 10] [--repeats 5] [--batch 4096] [--density 0.02] [--default-allocator]
    python benchmarks/sae_training.py --device cuda --d-model 2048 --d-sae 65536 --k 64   # a GPU-sized run

sparsify comes from the `bench` extra (`pip install -e .[bench]`); without it its row is skipped.
"""

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from rich.console import Console
from rich.table import Table

from lm_saes_core.models import LossConfig, SAEConfig, SparseAutoEncoder
from lm_saes_core.training.memory import freed_memory_kept

D_MODEL, D_SAE, K = 576, 4608, 32  # defaults; --d-model/--d-sae/--k override them
DEVICE = "cpu"
AMP: torch.dtype | None = None  # --amp bf16: autocast our step and the dense reference (sparsify autocasts on CUDA)
HOOK = "blocks.6.hook_resid_post"
QUICKSTART_CACHE = Path(".lm_saes/quickstart/activations")


def configure(device: str, d_model: int, d_sae: int, k: int, amp: str | None) -> None:
    global DEVICE, D_MODEL, D_SAE, K, AMP
    DEVICE, D_MODEL, D_SAE, K = device, d_model, d_sae, k
    AMP = {"bf16": torch.bfloat16, None: None}[amp]


def autocast():
    enabled = AMP is not None
    return torch.autocast(torch.device(DEVICE).type, dtype=AMP or torch.bfloat16, enabled=enabled)


def load_activations(n_rows: int) -> tuple[torch.Tensor, str]:
    if (QUICKSTART_CACHE / "manifest.json").exists() and D_MODEL == 576:
        from lm_saes_core.activation.reader import CachedActivations

        rows = []
        for item in CachedActivations(QUICKSTART_CACHE).iterate(num_workers=0):
            rows.append(item[HOOK][item["mask"]])
            if sum(len(r) for r in rows) >= n_rows:
                break
        x = torch.cat(rows)[:n_rows].float()
        return x / x.norm(dim=-1).mean() * D_MODEL**0.5, "SmolLM2 layer 6 (quickstart cache)"
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n_rows, D_MODEL, generator=generator), "Gaussian stand-in (no quickstart cache)"


def synchronize() -> None:
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(steps: list[Callable[[torch.Tensor], None]], batches: list[torch.Tensor], repeats: int):
    """Tokens/s of each step, per repeat: every repeat times one block of steps of each contender in turn."""
    for step in steps:
        step(batches[0])  # warm-up
    rates: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, step_rates in zip(steps, rates, strict=True):
            synchronize()
            started = time.perf_counter()
            for batch in batches:
                step(batch)
            synchronize()
            step_rates.append(sum(len(b) for b in batches) / (time.perf_counter() - started))
    return rates


class Contender(NamedTuple):
    name: str
    step: Callable[[torch.Tensor], None] | None
    active: Callable[[torch.Tensor], float] | None = None
    """The fraction of nonzero features on a batch, without a step."""


def active_fraction(f: torch.Tensor) -> float:
    return torch.count_nonzero(f).item() / f.numel()


def new_model(act_fn: str) -> SparseAutoEncoder:
    cfg = SAEConfig(
        d_model=D_MODEL,
        d_sae=D_SAE,
        hook_point_in=HOOK,
        hook_point_out=HOOK,
        act_fn=act_fn,
        top_k=K,
        norm_activation="inference",
        device=DEVICE,
    )
    torch.manual_seed(0)
    return SparseAutoEncoder.from_config(cfg)


@torch.no_grad()
def set_density(model: SparseAutoEncoder, x: torch.Tensor, density: float) -> None:
    """Make `density` of the features active on x (trained-like sparsity): ReLU by one negative shift of b_E,
    JumpReLU by thresholds theta_i = t * ||W_D,i|| (its gated scores h * n pass exactly where h > t)."""
    h = (x[:512] @ model.W_E + model.b_E).flatten()
    cut = h.float().quantile(1 - density).item()
    if model.cfg.act_fn == "relu":
        model.b_E -= cut
    else:
        model.activation_function.log_jumprelu_threshold.copy_((max(cut, 1e-6) * model.decoder_norm()).log())


def ours(model: SparseAutoEncoder, dense_codec: bool = False) -> Contender:
    model.train()
    model.sparse_kernels = False if dense_codec else None
    act_fn = model.cfg.act_fn
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    penalty = {} if act_fn in ("topk", "batchtopk") else {"sparsity_loss_type": "power", "l1_coefficient": 1e-3}
    coefficients = LossConfig(**penalty).coefficients()

    def step(x: torch.Tensor) -> None:
        with autocast():
            out = model.compute_loss({HOOK: x}, coefficients)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def active(x: torch.Tensor) -> float:
        return active_fraction(model.encode(model.prepare(model.token_rows({HOOK: x})).input))

    return Contender("", step, active)


def dense_reference(act_fn: str, start: SparseAutoEncoder | None = None) -> Contender:
    """The textbook step: dense encode, activation, dense decode, MSE (+ L1 for ReLU), Adam. From `start`'s weights
    and b_E when given, JumpReLU then keeping h > theta_i / ||W_D,i||: the entries that `start` keeps."""
    torch.manual_seed(0)
    if start is None:
        W_E = torch.nn.Parameter(torch.randn(D_MODEL, D_SAE, device=DEVICE) / D_MODEL**0.5)
        b_E = torch.nn.Parameter(torch.zeros(D_SAE, device=DEVICE))
        W_D = torch.nn.Parameter(W_E.detach().T.clone())
    else:
        W_E, b_E, W_D = (torch.nn.Parameter(p.detach().clone()) for p in (start.W_E, start.b_E, start.W_D))
    b_D = torch.nn.Parameter(torch.zeros(D_MODEL, device=DEVICE))
    threshold = torch.nn.Parameter(torch.full((D_SAE,), 0.1, device=DEVICE))
    if start is not None and act_fn == "jumprelu":
        threshold.data = (start.activation_function.threshold() / start.decoder_norm()).detach().clone()
    params = [W_E, b_E, W_D, b_D] + ([threshold] if act_fn == "jumprelu" else [])
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def features(x: torch.Tensor) -> torch.Tensor:
        h = x @ W_E + b_E
        if act_fn == "topk":
            values, indices = torch.relu(h).topk(K, dim=-1)
            return torch.zeros_like(h).scatter(-1, indices, values)
        if act_fn == "jumprelu":
            return h * (h > threshold)  # no threshold gradient: a lower bound on the cost of any JumpReLU step
        return torch.relu(h)

    def step(x: torch.Tensor) -> None:
        with autocast():
            f = features(x)
            loss = ((f @ W_D + b_D - x) ** 2).sum(-1).mean()
            if act_fn != "topk":
                loss = loss + 1e-3 * (f * W_D.norm(dim=-1)).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def active(x: torch.Tensor) -> float:
        return active_fraction(features(x))

    return Contender("", step, active)


def sparsify_step() -> Callable[[torch.Tensor], None] | None:
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    torch.manual_seed(0)
    sae = SparseCoder(D_MODEL, SparseCoderConfig(k=K, num_latents=D_SAE), device=DEVICE, dtype=torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step(x: torch.Tensor) -> None:  # what sparsify's Trainer does per batch for one hookpoint
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sae.set_decoder_norm_to_unit_norm()

    return step


def profile(step: Callable[[torch.Tensor], None], batches: list[torch.Tensor]) -> None:
    """The operators and kernels of a few steps, sorted by device time (CPU time without a GPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step(batches[0])
    synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.startswith("cuda") else [])
    with torch_profile(activities=activities) as prof:
        for batch in batches[:5]:
            step(batch)
        synchronize()
    sort_by = "cuda_time_total" if DEVICE.startswith("cuda") else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=25, max_name_column_width=60))


def threads_or_gpu() -> str:
    return torch.cuda.get_device_name() if DEVICE.startswith("cuda") else f"{torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--d-model", type=int, default=D_MODEL)
    parser.add_argument("--d-sae", type=int, default=D_SAE)
    parser.add_argument("--k", type=int, default=K)
    parser.add_argument("--amp", choices=["bf16"], default=None, help="autocast dtype for ours and the reference")
    parser.add_argument(
        "--density", type=float, default=0.02, help="trained-like active fraction (ReLU, JumpReLU); 0: init only"
    )
    parser.add_argument(
        "--act-fns", type=lambda v: v.split(","), default=["topk", "batchtopk", "relu", "jumprelu"], help="which to run"
    )
    parser.add_argument(
        "--default-allocator", action="store_true", help="glibc's defaults, not the memory kept as Trainer.fit keeps it"
    )
    parser.add_argument(
        "--profile", nargs="?", const="topk", default=None, metavar="ACT_FN",
        help="print where our step (TopK unless named; from initialisation) spends its time, then exit",
    )  # fmt: skip
    args = parser.parse_args()
    configure(args.device, args.d_model, args.d_sae, args.k, args.amp)
    x, source = load_activations(args.steps * args.batch)
    batches = [batch.to(DEVICE) for batch in x.split(args.batch)]
    if args.profile:
        profile(ours(new_model(args.profile)).step, batches)
        return

    contenders: list[Contender] = []
    if "topk" in args.act_fns:
        contenders += [
            dense_reference("topk")._replace(name="dense reference, TopK"),
            Contender("sparsify 1.3.3 SparseCoder, TopK", sparsify_step()),
            ours(new_model("topk"))._replace(name="lm-saes SparseAutoEncoder, TopK"),
        ]
    if "batchtopk" in args.act_fns:
        contenders.append(ours(new_model("batchtopk"))._replace(name="lm-saes SparseAutoEncoder, BatchTopK"))
    for density in (None, args.density) if args.density else (None,):
        at = "init" if density is None else f"{density:.0%}"
        for act_fn, family in (("relu", "ReLU + L1"), ("jumprelu", "JumpReLU")):
            if act_fn not in args.act_fns:
                continue
            models = [new_model(act_fn) for _ in range(2)]  # the same weights: one for each of our paths
            for model in models if density else ():
                set_density(model, batches[0], density)
            contenders += [
                dense_reference(act_fn, models[0])._replace(name=f"dense reference, {family} @ {at}"),
                ours(models[0], dense_codec=True)._replace(name=f"lm-saes SAE, dense codec, {family} @ {at}"),
                ours(models[1])._replace(name=f"lm-saes SparseAutoEncoder, {family} @ {at}"),
            ]
    for name, step, _ in contenders:
        if step is None:
            print(f"skipping {name}: not installed (pip install -e .[bench])")
    timed = [contender for contender in contenders if contender.step is not None]
    with contextlib.nullcontext() if args.default_allocator else freed_memory_kept():
        rates = time_steps([contender.step for contender in timed], batches, args.repeats)
    medians = {contender.name: statistics.median(r) for contender, r in zip(timed, rates, strict=True)}

    trained = (
        f" and at a trained-like density (@ {args.density:.0%} of features active, set on b_E / the thresholds of "
        "ours and the reference alike)"
        if args.density
        else ""
    )
    table = Table(
        title=f"SAE training step, d_model {D_MODEL}, d_sae {D_SAE}, k {K}, batch {args.batch}, "
        f"{'bf16 autocast' if AMP else 'fp32'} (sparsify: bf16 autocast on CUDA), {threads_or_gpu()}; {source}; "
        f"median of {args.repeats} x {args.steps} steps, contenders interleaved; ReLU/JumpReLU from the fresh "
        f"initialisation (@ init){trained}; 'active': measured after the timed steps; "
        + ("glibc's default allocator" if args.default_allocator else "freed memory kept, as Trainer.fit keeps it")
    )
    for column in ("contender", "active", "tokens/s", "vs dense reference", "vs sparsify"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    sparsify_rate = medians.get("sparsify 1.3.3 SparseCoder, TopK")
    for name, _, active in timed:
        family = name.split(", ")[-1]
        reference = medians.get(f"dense reference, {family}")
        table.add_row(
            name,
            f"{active(batches[0]):.1%}" if active else "",
            f"{medians[name]:,.0f}",
            f"{medians[name] / reference:.2f}" if reference else "",
            f"{medians[name] / sparsify_rate:.2f}" if sparsify_rate and family == "TopK" else "",
        )
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
