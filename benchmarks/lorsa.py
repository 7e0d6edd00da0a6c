"""Training throughput of our Lorsa against a plain-torch reference of the same math written here: explicit attention
with materialised (B, H, S, S) patterns, TopK over the d_sae heads of each position on h * ||W_O,i||, a dense
decode, MSE, Adam.

Same shapes, same k, same batches (whole contexts, every position in the loss), fp32; each timing is the median over
repeats of a block of optimiser steps (forward, loss, backward, Adam step), the contenders' blocks interleaved in one
process so that a change of machine load hits them alike. Inputs are SmolLM2 layer-3 activations
(`blocks.3.ln1.hook_normalized` -> `blocks.3.hook_attn_out`, computed here by the HuggingFace backend) with `--real`,
else Gaussian stand-ins. Memory is measured in a fresh process per contender: the peak RSS that two training steps
add to what the process held once its model and batches were built.

    python benchmarks/lorsa.py [--d-sae 2304] [--heads 9] [--d-head 64] [--k 32] [--batch 8] [--context 128]
        [--steps 4] [--repeats 5] [--threads N] [--real]
"""

import argparse
import math
import multiprocessing
import resource
import statistics
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

IN, OUT = "blocks.3.ln1.hook_normalized", "blocks.3.hook_attn_out"
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def load_batches(args) -> Batches:
    """(x, y) pairs of (batch, context, d_model), each hook scaled to mean token norm sqrt(d_model)."""
    n_contexts = args.batch * args.steps
    if args.real:
        from lm_saes_core.backend import HuggingFaceLanguageModel, LanguageModelConfig
        from lm_saes_core.data import DatasetConfig, load_dataset

        model = HuggingFaceLanguageModel(LanguageModelConfig(model_name="smollm2-135m"))
        texts = [row["text"] for row in load_dataset(DatasetConfig(split="train[:400]"))]
        encoded = model.tokenizer(
            texts, return_tensors="pt", padding="max_length", truncation=True, max_length=args.context
        )
        full = encoded["attention_mask"].all(-1)  # contexts filled to the end
        tokens = encoded["input_ids"][full][:n_contexts]
        if len(tokens) < n_contexts:
            raise SystemExit(f"only {len(tokens)} documents fill {args.context} tokens; lower --context or --steps")
        acts = model.activations(tokens, torch.ones_like(tokens), [IN, OUT])
        x, y = acts[IN].float(), acts[OUT].float()
    else:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(n_contexts, args.context, args.d_model, generator=generator)
        y = torch.randn(n_contexts, args.context, args.d_model, generator=generator)
    x = x / x.norm(dim=-1).mean() * args.d_model**0.5
    y = y / y.norm(dim=-1).mean() * args.d_model**0.5
    return list(zip(x.split(args.batch), y.split(args.batch), strict=True))


# -------------------------------------------------------------------------------- contenders


def ours(args, sparse: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    from lm_saes_core.models import LorsaConfig, LowRankSparseAttention

    cfg = LorsaConfig(d_model=args.d_model, d_sae=args.d_sae, n_qk_heads=args.heads, d_qk_head=args.d_head,
                      n_ctx=args.context, hook_point_in=IN, hook_point_out=OUT, act_fn="topk", top_k=args.k,
                      rotary_adjacent_pairs=False, norm_activation="inference")  # fmt: skip
    torch.manual_seed(0)
    model = LowRankSparseAttention.from_config(cfg)
    model.sparse_kernels = sparse
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool)
        model.compute_loss({IN: x, OUT: y, "mask": mask}).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def reference(args) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The textbook Lorsa step: per-head q, k with RoPE (halves rotated), explicit causal softmax patterns, each QK
    head's patterns applied to its d_sae / H value channels, TopK on h * ||W_O,i||, dense decode."""
    D, H, E, F, k, S = args.d_model, args.heads, args.d_head, args.d_sae, args.k, args.context
    G = F // H
    torch.manual_seed(0)
    bound = math.sqrt(6 / (D + E))
    W_Q = torch.nn.Parameter(torch.empty(H, D, E).uniform_(-bound, bound))
    W_K = torch.nn.Parameter(torch.empty(H, D, E).uniform_(-bound, bound))
    b_Q, b_K = torch.nn.Parameter(torch.zeros(H, E)), torch.nn.Parameter(torch.zeros(H, E))
    W_V = torch.nn.Parameter(torch.randn(F, D) / F**0.5)
    b_V = torch.nn.Parameter(torch.zeros(F))
    W_O = torch.nn.Parameter(torch.randn(F, D) / D**0.5)
    b_D = torch.nn.Parameter(torch.zeros(D))
    optimizer = torch.optim.Adam([W_Q, W_K, b_Q, b_K, W_V, b_V, W_O, b_D], lr=1e-4)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, E, 2, dtype=torch.float64) / E)
    angles = torch.arange(S, dtype=torch.float64)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    sin, cos = angles.sin().float(), angles.cos().float()
    causal = torch.ones(S, S, dtype=torch.bool).tril()

    def rope(t: torch.Tensor) -> torch.Tensor:
        first, second = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-second, first], dim=-1) * sin

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        B = x.shape[0]
        q = rope(torch.einsum("bsd,hde->bhse", x, W_Q) + b_Q[:, None])
        kk = rope(torch.einsum("bsd,hde->bhse", x, W_K) + b_K[:, None])
        scores = (q @ kk.transpose(-1, -2) / math.sqrt(E)).masked_fill(~causal, float("-inf"))
        pattern = scores.softmax(dim=-1)  # (B, H, S, S)
        v = (x @ W_V.T + b_V).view(B, S, H, G).transpose(1, 2)
        h = (pattern @ v).transpose(1, 2).reshape(B, S, F)
        norm = W_O.norm(dim=1)
        with torch.no_grad():
            kept = torch.zeros_like(h, dtype=torch.bool).scatter_(-1, (h * norm).topk(k, dim=-1).indices, True)
            kept &= h > 0
        y_hat = (h * kept) @ W_O + b_D
        (y_hat - y).pow(2).sum(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


CONTENDERS = {
    "plain-torch reference (explicit patterns, dense decode)": reference,
    "lm-saes Lorsa, dense decode": lambda args: ours(args, sparse=False),
    "lm-saes Lorsa (fused attention, sparse decode)": lambda args: ours(args, sparse=True),
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_block(step, batches: Batches) -> float:
    """Tokens per second of one pass over the batches."""
    started = time.perf_counter()
    for x, y in batches:
        step(x, y)
    return sum(x.shape[0] * x.shape[1] for x, _ in batches) / (time.perf_counter() - started)


def step_memory(name: str, args) -> float:
    """In a fresh process: the peak RSS (MiB) that two training steps add to the process holding the model and the
    batches (activations kept for backward, gradients, optimiser state). Gaussian batches of the same shapes: the
    language model that computes real ones would leave a higher peak behind than the steps reach."""
    torch.set_num_threads(args.threads)
    batches = load_batches(argparse.Namespace(**{**vars(args), "real": False}))
    step = CONTENDERS[name](args)
    before = peak_rss_mib()
    for x, y in batches[:2]:
        step(x, y)
    return peak_rss_mib() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--heads", type=int, default=9, help="QK heads")
    parser.add_argument("--d-head", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="contexts per step")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--real", action="store_true", help="SmolLM2 layer-3 activations instead of Gaussians")
    args = parser.parse_args()
    source = f"SmolLM2 {IN} -> {OUT} (python-docs)" if args.real else "Gaussian stand-ins (no --real)"
    memory = {}
    for name in CONTENDERS:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            memory[name] = pool.apply(step_memory, (name, args))
    # Timings in this process, the contenders' blocks interleaved, so a change of machine load hits all of them.
    torch.set_num_threads(args.threads)
    batches = load_batches(args)
    steps = {name: build(args) for name, build in CONTENDERS.items()}
    for step in steps.values():
        step(*batches[0])  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for _ in range(args.repeats):
        for name, step in steps.items():
            rates[name].append(time_block(step, batches))
    rows = [(name, statistics.median(rates[name]), memory[name]) for name in CONTENDERS]
    reference_rate = rows[0][1]
    table = Table(
        title=f"Lorsa training step: d_model {args.d_model}, {args.heads} QK heads of {args.d_head}, d_sae "
        f"{args.d_sae} OV heads, TopK k {args.k}, {args.batch} contexts x {args.context} tokens, fp32, "
        f"{args.threads} threads; {source}; median of {args.repeats} x {args.steps} steps"
    )
    for column in ("contender", "tokens/s", "vs reference", "peak RSS of the steps (MiB)"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    for name, rate, rss in rows:
        table.add_row(name, f"{rate:,.0f}", f"{rate / reference_rate:.2f}", f"{rss:,.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
